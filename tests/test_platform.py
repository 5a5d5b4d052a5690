"""lib/owca/measure/sources/platform.py: parsers on literal strings and recorded samples, the reader
on a tree recorded from a 2-CPU machine (tests/fixtures/procfs_sysfs_2cpus) and on
this machine's own /proc and /sys."""
import json
import os
import shutil

from conftest import FIXTURES
from owca.core.kernel import online_cpus
from owca.core.metrics import PLATFORM
from owca.core.paths import DEFAULT_PATHS, Paths
from owca.measure.sources.platform import (PlatformReader, count_topology, memory_metrics,
                                           parse_meminfo, parse_proc_stat)

TREE = os.path.join(FIXTURES, "procfs_sysfs_2cpus")
SAMPLES = os.path.join(FIXTURES, "platform_samples")


def tree_paths(root=TREE) -> Paths:
    return Paths(procfs=os.path.join(root, "proc"), sysfs=os.path.join(root, "sys"))


# -- parsers -----------------------------------------------------------------------------

def test_proc_stat_busy_ticks_per_cpu():
    text = ("cpu  19353 0 7930 170368 519 0 456 17 0 0\n"
            "cpu0 7682 5 3622 87723 87 1 152 7 40 0\n"
            "cpu1 11671 0 4308 82645 431 0 304 9 0 0\n"
            "intr 730879 0 0 0\nctxt 1613296\n")
    # user + nice + system + irq + softirq + steal; idle and iowait are not busy
    assert parse_proc_stat(text) == {"0": 7682 + 5 + 3622 + 1 + 152 + 7,
                                     "1": 11671 + 4308 + 304 + 9}


def test_proc_stat_of_an_old_kernel_without_steal():
    assert parse_proc_stat("cpu  1 2 3 4 5 6 7\ncpu0 1 2 3 4 5 6 7\n") == {"0": 1 + 2 + 3 + 6 + 7}


def test_meminfo_in_bytes_and_counts_as_they_are():
    text = ("MemTotal:       24684084 kB\nMemFree:        23497916 kB\n"
            "MemAvailable:   23756520 kB\nBuffers:           15448 kB\n"
            "Cached:           875616 kB\nHugePages_Total:       0\nHugepagesize:       2048 kB\n")
    info = parse_meminfo(text)
    assert info["MemTotal"] == 24684084 * 1024
    assert info["HugePages_Total"] == 0
    assert memory_metrics(info) == {
        "platform_mem_total_bytes": 24684084 * 1024,
        "platform_mem_usage_bytes": (24684084 - 23497916 - 15448 - 875616) * 1024}


def test_node_meminfo_sample_of_a_large_machine():
    """A node's meminfo recorded on a 512 GB two-socket server (WCA's test sample)."""
    with open(os.path.join(SAMPLES, "sys-devices-system-nodex-meminfo.txt")) as f:
        info = parse_meminfo(f.read())
    assert info["MemTotal"] == 519689980 * 1024
    assert info["MemFree"] == 443814568 * 1024
    assert info["MemUsed"] == 75875412 * 1024
    assert info["HugePages_Free"] == 0


def test_topology_counts_cores_within_dies_and_packages():
    # 2 packages x 2 cores x 2 threads; core ids repeat in each package
    cpus = [(pkg, "0", core) for pkg in "01" for core in "01" for _thread in range(2)]
    assert count_topology(cpus) == {"platform_topology_cores": 4,
                                    "platform_topology_sockets": 2}
    # two dies in one package, core ids repeating per die
    cpus = [("0", die, core) for die in "01" for core in "0123"]
    assert count_topology(cpus) == {"platform_topology_cores": 8,
                                    "platform_topology_sockets": 1}


# -- the reader ---------------------------------------------------------------------------

def test_recorded_tree_golden():
    with open(os.path.join(TREE, "expected.json")) as f:
        want = json.load(f)
    reader = PlatformReader(tree_paths())
    assert reader.read() == want
    assert reader.read() == want  # re-read from the held files
    reader.close()


def test_recorded_tree_values_by_hand():
    got = PlatformReader(tree_paths()).read()
    assert got["platform_cpu_usage"]["0"] == 7682 + 0 + 3622 + 0 + 152 + 7
    assert got["platform_topology_cpus"] == 2
    assert got["platform_topology_numa_nodes"] == 1
    assert got["platform_mem_numa_free_bytes"] == {"0": 3491920 * 1024}
    assert got["platform_mem_numa_used_bytes"] == {"0": 1187964 * 1024}
    assert set(got) == set(PLATFORM)


def test_topology_is_read_again_when_the_online_cpus_change(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(TREE, root)
    reader = PlatformReader(tree_paths(str(root)))
    assert reader.read()["platform_topology_cpus"] == 2
    cpu = root / "sys" / "devices" / "system" / "cpu"
    # cpu1 goes offline; the online file is rewritten in place, as the kernel's would change
    with open(cpu / "online", "r+") as f:
        f.write("0  ")
    got = reader.read()
    assert got["platform_topology_cpus"] == 1
    assert got["platform_topology_cores"] == 1
    reader.close()


def test_without_numa_support_the_numa_metrics_are_absent(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(TREE, root)
    shutil.rmtree(root / "sys" / "devices" / "system" / "node")
    got = PlatformReader(tree_paths(str(root))).read()
    assert "platform_topology_numa_nodes" not in got
    assert "platform_mem_numa_free_bytes" not in got
    assert got["platform_topology_cpus"] == 2


def test_without_psi_the_node_pressure_is_absent_and_not_looked_for(tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(TREE, root)
    shutil.rmtree(root / "proc" / "pressure")
    reader = PlatformReader(tree_paths(str(root)))
    got = reader.read()
    assert "platform_mem_pressure_avg10_percent" not in got
    assert reader._pressure is None     # no open tried each cycle
    os.makedirs(root / "proc" / "pressure")
    (root / "proc" / "pressure" / "memory").write_text("some avg10=1.00 avg60=0 avg300=0 "
                                                       "total=1\n")
    assert "platform_mem_pressure_avg10_percent" not in reader.read()   # looked for once
    reader.close()


def test_this_machine():
    reader = PlatformReader(DEFAULT_PATHS)
    first = reader.read()
    second = reader.read()
    ncpus = len(online_cpus(DEFAULT_PATHS))
    assert first["platform_topology_cpus"] == ncpus == len(first["platform_cpu_usage"])
    assert 1 <= first["platform_topology_sockets"] <= first["platform_topology_cores"] <= ncpus
    assert 0 < first["platform_mem_usage_bytes"] < first["platform_mem_total_bytes"]
    assert all(second["platform_cpu_usage"][c] >= first["platform_cpu_usage"][c]
               for c in first["platform_cpu_usage"])
    reader.close()
