"""lib/owca/measure/sources/cgroup.py: parsers on literal strings, the reader on recorded trees and
on real cgroups (v1 and v2) holding real processes.

The recorded trees are described in tests/fixtures/cgroup_v{1,2}_tree/README.md;
the v2 memory files there are written from the kernel's documented formats,
because this machine's cgroup2 mount has no memory controller.  What a real v2
cgroup with the cpu and memory controllers gives is therefore only covered by
that fixture, not by a live cgroup.
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

from cgroup_helpers import (ALLOCATE, BURN_FOREVER, BURN_THEN_SLEEP, let_burn, needs_v1,
                            needs_v2, process_cpu_seconds, read_int, tell, v1_cgroup,
                            v2_cgroup, wait_line)
from conftest import FIXTURES, tool_command, tool_env
from owca.measure.sources import cgroup as cgroups
from owca.measure.sources.cgroup import (V1_FILES, V2_FILES, TaskCgroup, parse_cpu_stat,
                                         parse_memory_limit, parse_memory_stat, parse_numa_stat,
                                         parse_pressure)
from owca.core.kernel import CgroupGone
from owca.core.metrics import TASK_CGROUP
from owca.core.paths import DEFAULT_PATHS, Paths

V1_TREE = os.path.join(FIXTURES, "cgroup_v1_tree")
V2_TREE = os.path.join(FIXTURES, "cgroup_v2_tree")
MIB = 1 << 20


def open_fds() -> int:
    return len(os.listdir(DEFAULT_PATHS.proc("self", "fd")))


def fds_into(directories) -> int:
    """This process's fds open on files in `directories`."""
    fd_dir = DEFAULT_PATHS.proc("self", "fd")
    count = 0
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        count += any(target.startswith(d.rstrip("/") + "/") for d in directories)
    return count


# -- parsers -----------------------------------------------------------------------------

def test_cpu_stat_v1_times_are_nanoseconds():
    text = b"nr_periods 26\nnr_throttled 23\nthrottled_time 1442461682\nnr_bursts 0\nburst_time 0\n"
    assert parse_cpu_stat(text) == {"task_cpu_periods": 26, "task_cpu_throttled_periods": 23,
                                    "task_cpu_throttled_seconds": 1.442461682}


def test_cpu_stat_v2_with_the_cpu_controller():
    text = (b"usage_usec 8765432\nuser_usec 7000000\nsystem_usec 1765432\nnr_periods 120\n"
            b"nr_throttled 30\nthrottled_usec 2500000\nnr_bursts 0\nburst_usec 0\n")
    assert parse_cpu_stat(text) == {"task_cpu_usage_seconds": 8.765432, "task_cpu_periods": 120,
                                    "task_cpu_throttled_periods": 30,
                                    "task_cpu_throttled_seconds": 2.5}


def test_cpu_stat_v2_without_the_cpu_controller_has_usage_only():
    text = b"usage_usec 1268593\nuser_usec 1214445\nsystem_usec 54148\nnice_usec 0\n"
    assert parse_cpu_stat(text) == {"task_cpu_usage_seconds": 1.268593}


def stored(table, name: str, data: bytes) -> dict:
    """What the file `name` of a V1_FILES or V2_FILES table stores for `data`."""
    out = {}
    next(into for _, file, into in table if file == name)(data, out)
    return out


def test_cpuacct_usage_is_nanoseconds():
    assert stored(V1_FILES, "cpuacct.usage", b"945336841\n") == \
        {"task_cpu_usage_seconds": 0.945336841}


def test_an_unlimited_memory_limit_is_left_out():
    assert stored(V1_FILES, "memory.limit_in_bytes", b"9223372036854771712\n") == {}
    assert stored(V2_FILES, "memory.max", b"max\n") == {}
    assert stored(V2_FILES, "memory.low", b"0\n") == {"task_mem_soft_limit_bytes": 0}


@pytest.mark.parametrize("text, expected", [
    (b"268435456\n", 268435456),
    (b"9223372036854771712\n", None),  # v1 unlimited, 4 KiB pages
    (b"9223372036854710272\n", None),  # v1 unlimited, 64 KiB pages
    (b"max\n", None),                  # v2 unlimited
    (b"0\n", 0),                       # v2 memory.low: no protection, a value
])
def test_memory_limits(text, expected):
    assert parse_memory_limit(text) == expected


def test_memory_stat_v1_takes_the_hierarchical_page_faults():
    text = b"cache 0\npgfault 100\npgmajfault 3\ntotal_cache 0\ntotal_pgfault 250\n" \
           b"total_pgmajfault 7\n"
    assert parse_memory_stat(text) == {"task_mem_page_faults": 250}


def test_memory_stat_v2_page_faults_and_keys_that_end_alike():
    text = b"anon 4096\nthp_pgfault 9\npgmajfault 12\npgfault 54321\nthp_fault_alloc 0"
    assert parse_memory_stat(text) == {"task_mem_page_faults": 54321}
    assert parse_memory_stat(b"anon 4096\n") == {}
    assert parse_memory_stat(b"pgfault 7\nanon 0\n") == {"task_mem_page_faults": 7}


def test_memory_stat_working_set_and_refaults_v1_hierarchical():
    # v1's plain keys are the cgroup's own; only total_* (with its children) count.
    text = (b"cache 1\nactive_anon 999\nworkingset_refault_file 999\ntotal_pgfault 5\n"
            b"total_inactive_anon 4096\ntotal_active_anon 8192\ntotal_inactive_file 1\n"
            b"total_active_file 16384\ntotal_workingset_refault_anon 3\n"
            b"total_workingset_refault_file 7\n")
    assert parse_memory_stat(text) == {
        "task_mem_page_faults": 5, "task_mem_working_set_bytes": 4096 + 8192 + 16384,
        "task_mem_workingset_refaults": {"anon": 3, "file": 7}}


def test_memory_stat_working_set_and_refaults_v2_and_an_older_kernel():
    text = (b"anon 40960\nfile 999\nactive_anon 1\ninactive_file 2\nactive_file 8192\n"
            b"workingset_refault_anon 11\nworkingset_refault_file 12\npgfault 3\n")
    assert parse_memory_stat(text) == {
        "task_mem_page_faults": 3, "task_mem_working_set_bytes": 40960 + 8192,
        "task_mem_workingset_refaults": {"anon": 11, "file": 12}}
    # Before 5.9: one counter, of file pages.
    assert parse_memory_stat(b"anon 0\nactive_file 0\nworkingset_refault 9\n")[
        "task_mem_workingset_refaults"] == {"file": 9}


def test_numa_stat_v1_prefers_hierarchical_total():
    text = (b"total=10 N0=6 N1=4\nfile=1 N0=1 N1=0\nanon=9 N0=5 N1=4\nunevictable=0 N0=0 N1=0\n"
            b"hierarchical_total=73 N0=41 N1=32\nhierarchical_file=14 N0=0 N1=14\n")
    assert parse_numa_stat(text) == {"task_mem_numa_pages": {"0": 41, "1": 32}}


def test_numa_stat_v1_without_hierarchical_lines():
    assert parse_numa_stat(b"total=10 N0=6 N1=4\nfile=1 N0=1 N1=0\n") == \
        {"task_mem_numa_pages": {"0": 6, "1": 4}}


def test_numa_stat_v2_is_bytes_of_anon_and_file():
    text = (b"anon N0=67108864 N1=33554432\nfile N0=20971520 N1=8388608\n"
            b"kernel_stack N0=32768 N1=32768\nshmem N0=4096 N1=0\n")
    assert parse_numa_stat(text, page_size=4096) == \
        {"task_mem_numa_pages": {"0": 21504, "1": 10240}}
    assert parse_numa_stat(text, page_size=65536) == \
        {"task_mem_numa_pages": {"0": 1344, "1": 640}}


def test_pressure_some_and_full():
    text = (b"some avg10=12.50 avg60=8.25 avg300=2.10 total=3400000\n"
            b"full avg10=4.00 avg60=2.00 avg300=0.50 total=1200000\n")
    assert parse_pressure(text) == {
        "task_pressure_avg10_percent": {"some": 12.5, "full": 4.0},
        "task_pressure_stall_seconds": {"some": 3.4, "full": 1.2}}


def test_pressure_without_full_line_and_unknown_lines():
    # cpu.pressure of kernels before 5.13 has no "full" line
    assert parse_pressure(b"some avg10=0.28 avg60=0.23 avg300=0.26 total=3111302\n"
                          b"future avg10=x\n") == {
        "task_pressure_avg10_percent": {"some": 0.28},
        "task_pressure_stall_seconds": {"some": 3.111302}}


def test_every_metric_the_files_yield_is_registered():
    samples = {
        "cpuacct.usage": b"1\n", "memory.usage_in_bytes": b"1\n",
        "memory.max_usage_in_bytes": b"1\n", "memory.limit_in_bytes": b"1\n",
        "memory.soft_limit_in_bytes": b"1\n", "memory.current": b"1\n", "memory.peak": b"1\n",
        "memory.max": b"1\n", "memory.low": b"1\n",
        "cpu.stat": b"usage_usec 1\nnr_periods 1\nnr_throttled 1\nthrottled_usec 1\n",
        "memory.stat": b"pgfault 1\n", "memory.numa_stat": b"total=1 N0=1\n",
        "cpu.pressure": b"some avg10=1 avg60=0 avg300=0 total=1\n",
        "memory.pressure": b"some avg10=1 avg60=0 avg300=0 total=1\n",
        "io.pressure": b"some avg10=1 avg60=0 avg300=0 total=1\n",
    }
    names = set()
    for table in (V1_FILES, V2_FILES):
        for _, name, _ in table:
            names |= set(stored(table, name, samples[name]))
    assert len(names) == 12
    assert names <= set(TASK_CGROUP)


# -- the reader on recorded trees ---------------------------------------------------------

@pytest.mark.parametrize("tree, version", [(V1_TREE, "v1"), (V2_TREE, "v2")])
def test_recorded_tree_golden(tree, version):
    """Each cgroup of the tree, auto-detected, reads as its expected.json says."""
    if version == "v2" and cgroups.PAGE_SIZE != 4096:
        pytest.skip("the golden v2 NUMA pages assume 4 KiB pages")
    with open(os.path.join(tree, "expected.json")) as f:
        expected = json.load(f)
    paths = Paths(cgroupfs=tree)
    for cgroup_path, want in expected.items():
        reader = TaskCgroup(paths, cgroup_path)
        assert reader.read() == want
        assert reader.version == version
        reader.close()


def test_v1_tree_values_by_hand():
    hp = TaskCgroup(Paths(cgroupfs=V1_TREE), "/owca-fixture/hp", "v1").read()
    assert hp["task_cpu_usage_seconds"] == 465598022 / 1e9  # cpuacct.usage
    assert hp["task_cpu_throttled_periods"] == 23
    assert hp["task_mem_limit_bytes"] == 256 * MIB
    assert hp["task_mem_soft_limit_bytes"] == 128 * MIB
    assert hp["task_mem_numa_pages"] == {"0": 14006}
    be = TaskCgroup(Paths(cgroupfs=V1_TREE), "/owca-fixture/be").read()
    # unlimited: absent, not a huge number
    assert "task_mem_limit_bytes" not in be and "task_mem_soft_limit_bytes" not in be
    assert "task_pressure_avg10_percent" not in be


def test_v2_tree_root_is_the_cgroup2_mount():
    # laid out like a unified host: the tree itself is the cgroup2 root
    assert Paths(cgroupfs=V2_TREE).cgroup_v2_root == V2_TREE


def test_v2_tree_recorded_without_controllers_leaves_their_metrics_out():
    got = TaskCgroup(Paths(cgroupfs=V2_TREE), "/owca-fixture/recorded").read()
    assert got["task_cpu_usage_seconds"] == 1.268593
    assert got["task_pressure_stall_seconds"]["cpu"] == {"some": 0.121684, "full": 0.121684}
    for name in ("task_cpu_periods", "task_cpu_throttled_seconds", "task_mem_usage_bytes",
                 "task_mem_limit_bytes", "task_mem_page_faults", "task_mem_numa_pages"):
        assert name not in got


def test_v2_tree_documented_values_by_hand():
    got = TaskCgroup(Paths(cgroupfs=V2_TREE), "/owca-fixture/documented", "v2").read()
    assert got["task_mem_usage_bytes"] == 134217728            # memory.current
    assert got["task_mem_max_usage_bytes"] == 201326592        # memory.peak
    assert got["task_mem_limit_bytes"] == 256 * MIB            # memory.max
    assert got["task_mem_soft_limit_bytes"] == 64 * MIB        # memory.low
    assert got["task_mem_page_faults"] == 54321
    assert got["task_pressure_avg10_percent"]["memory"] == {"some": 1.25, "full": 0.75}


def test_a_version_that_does_not_hold_the_cgroup_is_gone():
    with pytest.raises(CgroupGone, match="v2"):
        TaskCgroup(Paths(cgroupfs=V1_TREE), "/owca-fixture/hp", "v2").read()
    with pytest.raises(CgroupGone, match="v1"):
        TaskCgroup(Paths(cgroupfs=V2_TREE), "/owca-fixture/recorded", "v1").read()
    with pytest.raises(CgroupGone):
        TaskCgroup(Paths(cgroupfs=V1_TREE), "/owca-fixture/nosuch").read()
    with pytest.raises(ValueError, match="cgroup version"):
        TaskCgroup(Paths(cgroupfs=V1_TREE), "/owca-fixture/hp", "v3")


def test_an_absent_file_is_left_out_then_tried_again(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(V1_TREE, tree)
    numa = tree / "memory" / "owca-fixture" / "hp" / "memory.numa_stat"
    saved = numa.read_text()
    numa.unlink()
    reader = TaskCgroup(Paths(cgroupfs=str(tree)), "/owca-fixture/hp")
    assert "task_mem_numa_pages" not in reader.read()
    numa.write_text(saved)
    reads = [reader.read() for _ in range(cgroups.RETRY_ABSENT_AFTER)]
    assert "task_mem_numa_pages" not in reads[0]
    assert reads[-1]["task_mem_numa_pages"] == {"0": 14006}
    reader.close()


def test_slow_metrics_are_read_every_slow_every_reads_and_carried_between(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(V1_TREE, tree)
    memory = tree / "memory" / "owca-fixture" / "hp"
    reader = TaskCgroup(Paths(cgroupfs=str(tree)), "/owca-fixture/hp", slow_every=3, phase=1)
    first = reader.read()  # the first read reads everything
    assert first["task_mem_limit_bytes"] == int((memory / "memory.limit_in_bytes").read_text())
    assert "task_mem_numa_pages" in first
    (memory / "memory.limit_in_bytes").write_text("1048576\n")
    (memory / "memory.usage_in_bytes").write_text("4096\n")
    second = reader.read()  # read 2: (2 + 1) % 3 == 0, the slow files' turn
    assert second["task_mem_limit_bytes"] == 1048576
    (memory / "memory.limit_in_bytes").write_text("2097152\n")
    (memory / "memory.usage_in_bytes").write_text("8192\n")
    reads = [reader.read() for _ in range(3)]  # reads 3, 4, 5
    assert [r["task_mem_usage_bytes"] for r in reads] == [8192] * 3  # every read
    assert [r["task_mem_limit_bytes"] for r in reads] == [1048576, 1048576, 2097152]
    assert all(r["task_mem_numa_pages"] == first["task_mem_numa_pages"] for r in reads)
    reader.close()


def test_readers_with_consecutive_phases_spread_the_slow_reads(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(V1_TREE, tree)
    limit = tree / "memory" / "owca-fixture" / "hp" / "memory.limit_in_bytes"
    readers = [TaskCgroup(Paths(cgroupfs=str(tree)), "/owca-fixture/hp", slow_every=4, phase=i)
               for i in range(4)]
    for reader in readers:
        reader.read()
    limit.write_text("4096\n")
    seen_at = {}  # reader -> the read on which it saw the new limit
    for n in range(2, 6):
        for i, reader in enumerate(readers):
            if reader.read()["task_mem_limit_bytes"] == 4096:
                seen_at.setdefault(i, n)
    assert sorted(seen_at.values()) == [2, 3, 4, 5]
    for reader in readers:
        reader.close()


def test_a_file_larger_than_the_first_buffer_is_read_whole(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(V1_TREE, tree)
    stat = tree / "memory" / "owca-fixture" / "hp" / "memory.stat"
    filler = "".join(f"padding_{i} {i}\n" for i in range(2000))
    stat.write_text(filler + "total_pgfault 777\n")
    assert len(stat.read_bytes()) > 4 * 4096
    reader = TaskCgroup(Paths(cgroupfs=str(tree)), "/owca-fixture/hp")
    assert reader.read()["task_mem_page_faults"] == 777
    assert reader.read()["task_mem_page_faults"] == 777
    reader.close()


def test_files_stay_open_between_reads_and_close_releases_them():
    before = open_fds()
    reader = TaskCgroup(Paths(cgroupfs=V1_TREE), "/owca-fixture/hp")
    assert open_fds() == before  # opened lazily
    reader.read()
    held = open_fds() - before
    assert held == len(cgroups.V1_FILES)  # (the thread list, `tasks`, is opened per read)
    reader.read()
    assert open_fds() - before == held
    reader.close()
    assert open_fds() == before


@pytest.mark.integration
def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one():
    code = textwrap.dedent("""
        import logging, resource, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        from owca.core.kernel import raise_fd_limit
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 256), hard))
        print(raise_fd_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    out = subprocess.run([sys.executable, "-c", code], env=tool_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "True"
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] > 256:
        assert "soft limit raised from 256" in out.stdout


# -- real cgroups v1 ----------------------------------------------------------------------

@pytest.mark.integration
@needs_v1
def test_v1_cpu_usage_matches_what_the_process_burnt():
    with v1_cgroup() as cg:
        child = cg.start_python(BURN_THEN_SLEEP % {"seconds": 0.8})
        wait_line(child, "done")
        reader = TaskCgroup(DEFAULT_PATHS, cg.path)
        got = reader.read()["task_cpu_usage_seconds"]
        own = process_cpu_seconds(child.pid)
        kernel = read_int(cg.file("cpuacct", "cpuacct.usage")) / 1e9
        assert reader.version == "v1"
        assert got == pytest.approx(own, rel=0.10)
        assert got == pytest.approx(kernel, rel=0.01)
        assert got == pytest.approx(0.8, rel=0.10)
        reader.close()


@pytest.mark.integration
@needs_v1
def test_v1_counters_are_read_afresh_each_cycle():
    with v1_cgroup() as cg:
        child = cg.start_python(BURN_FOREVER)
        wait_line(child, "running")
        reader = TaskCgroup(DEFAULT_PATHS, cg.path)
        first = reader.read()
        let_burn(child, 0.2)
        second = reader.read()
        assert second["task_cpu_usage_seconds"] >= first["task_cpu_usage_seconds"] + 0.19
        assert second["task_cpu_periods"] == 0  # no quota: no CFS periods
        reader.close()


@pytest.mark.integration
@needs_v1
def test_v1_memory_usage_matches_what_the_process_allocated():
    with v1_cgroup() as cg:
        child = cg.start_python(ALLOCATE % {"mib": 64})
        wait_line(child, "started")
        reader = TaskCgroup(DEFAULT_PATHS, cg.path)
        before = reader.read()
        tell(child)
        wait_line(child, "allocated")
        after = reader.read()
        kernel = read_int(cg.file("memory", "memory.usage_in_bytes"))
        grew = after["task_mem_usage_bytes"] - before["task_mem_usage_bytes"]
        assert grew == pytest.approx(64 * MIB, rel=0.10)
        assert after["task_mem_usage_bytes"] == pytest.approx(kernel, rel=0.02)
        assert after["task_mem_max_usage_bytes"] >= after["task_mem_usage_bytes"] - MIB
        numa_bytes = sum(after["task_mem_numa_pages"].values()) * cgroups.PAGE_SIZE
        assert numa_bytes == pytest.approx(after["task_mem_usage_bytes"], rel=0.15)
        assert after["task_mem_page_faults"] > before["task_mem_page_faults"]
        assert "task_mem_limit_bytes" not in after  # a new cgroup is unlimited
        reader.close()


@pytest.mark.integration
@needs_v1
def test_v1_limits_set_on_the_cgroup_are_reported():
    with v1_cgroup() as cg:
        with open(cg.file("memory", "memory.limit_in_bytes"), "w") as f:
            f.write(str(512 * MIB))
        with open(cg.file("cpu", "cpu.cfs_quota_us"), "w") as f:
            f.write("10000")
        child = cg.start_python(BURN_FOREVER)
        wait_line(child, "running")
        let_burn(child, 0.04)  # 10% of a CPU: takes about 0.4 s of throttled periods
        got = TaskCgroup(DEFAULT_PATHS, cg.path).read()
        assert got["task_mem_limit_bytes"] == 512 * MIB
        assert got["task_cpu_periods"] >= 3
        assert got["task_cpu_throttled_periods"] >= 1
        assert got["task_cpu_throttled_seconds"] > 0


@pytest.mark.integration
@needs_v1
def test_v1_cgroup_removed_between_cycles_is_gone():
    with v1_cgroup() as cg:
        child = cg.start_python(BURN_FOREVER)
        wait_line(child, "running")
        reader = TaskCgroup(DEFAULT_PATHS, cg.path)
        assert "task_cpu_usage_seconds" in reader.read()
        # (the thread list, `tasks`, is opened per read; the thread's schedstat is in /proc)
        assert fds_into(cg.dirs.values()) == len(cgroups.V1_FILES)
        cg.cleanup()  # kills the child, removes the directories
        with pytest.raises(CgroupGone, match="removed"):
            reader.read()
        assert fds_into(cg.dirs.values()) == 0  # its files were released
        with pytest.raises(CgroupGone):
            reader.read()


@pytest.mark.integration
@needs_v1
def test_v1_cgroup_recreated_under_the_same_path_is_read_again():
    with v1_cgroup() as cg:
        reader = TaskCgroup(DEFAULT_PATHS, cg.path)
        reader.read()
        for d in cg.dirs.values():
            os.rmdir(d)
            os.mkdir(d)
        # the held fds went stale (ENODEV): reopened once, on the new cgroup
        assert reader.read()["task_cpu_usage_seconds"] == 0
        reader.close()


@pytest.mark.integration
@needs_v1
def test_1000_readers_under_a_1024_fd_soft_limit():
    """The budget keeps some files open, the rest are read open-read-close; all read."""
    code = textwrap.dedent("""
        import json, resource, sys
        from owca.measure.sources.cgroup import TaskCgroup
        from owca.core.kernel import fd_usage
        from owca.core.paths import DEFAULT_PATHS
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        readers = [TaskCgroup(DEFAULT_PATHS, sys.argv[1]) for _ in range(1000)]
        for cycle in range(2):
            results = [r.read() for r in readers]
        print(json.dumps({"keys": sorted({tuple(sorted(r)) for r in results}),
                          "usage": fd_usage()}))
    """)
    with v1_cgroup() as cg:
        child = cg.start_python(BURN_FOREVER)
        wait_line(child, "running")
        out = subprocess.run([sys.executable, "-c", code, cg.path], env=tool_env(),
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["keys"]) == 1  # every reader got every metric
    assert "task_cpu_usage_seconds" in result["keys"][0]
    assert "task_mem_numa_pages" in result["keys"][0]
    assert "task_run_queue_delay_seconds" in result["keys"][0]
    assert 0 < result["usage"]["kept_open"] <= 1024 - 128
    # each reader: its cgroup files and the one thread's schedstat
    assert result["usage"]["kept_open"] + result["usage"]["not_kept_open"] == \
        1000 * (len(cgroups.V1_FILES) + 1)
    assert "opened for each read" in out.stderr  # said once, in the log
    assert out.stderr.count("opened for each read") == 1


@pytest.mark.integration
@needs_v1
def test_owca_measure_measures_1000_tasks_with_1024_fds():
    """The tool, its hard limit 1024 too (so raise_fd_limit cannot help): every task measured."""
    with v1_cgroup() as cg:
        tasks = [{"id": f"t{i}", "name": f"t{i}", "cgroup_path": cg.path, "labels": {},
                  "resources": {}} for i in range(1000)]
        frame = {"v": 1, "kind": "tasks", "ts": time.time(), "host": "h", "seq": 1,
                 "tasks": tasks, "metrics": []}
        out = subprocess.run(tool_command("measure", "--once"), input=json.dumps(frame) + "\n",
                             capture_output=True, text=True, env=tool_env(), timeout=120,
                             preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                                   (1024, 1024)))
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    assert len(measured["tasks"]) == 1000
    assert all("task_mem_usage_bytes" in t["metrics"] for t in measured["tasks"].values())
    own = {s["name"]: s["value"] for s in measured["metrics"]}
    assert own["owca_files_not_kept_open"] > 0


# -- real cgroup v2 -----------------------------------------------------------------------

@pytest.mark.integration
@needs_v2
def test_v2_cpu_usage_grows_and_absent_controllers_give_absent_metrics():
    with v2_cgroup() as cg:
        with open(cg.file("v2", "cgroup.controllers")) as f:
            controllers = f.read().split()
        child = cg.start_python(BURN_FOREVER)
        wait_line(child, "running")
        reader = TaskCgroup(DEFAULT_PATHS, cg.path)  # auto: not in v1 here, so v2
        first = reader.read()
        let_burn(child, 0.2)
        second = reader.read()
        assert reader.version == "v2"
        assert second["task_cpu_usage_seconds"] >= first["task_cpu_usage_seconds"] + 0.19
        own = process_cpu_seconds(child.pid)
        assert second["task_cpu_usage_seconds"] == pytest.approx(own, rel=0.10, abs=0.02)
        if "memory" not in controllers:
            assert not any(name.startswith("task_mem_") for name in second)
        if "cpu" not in controllers:
            assert "task_cpu_periods" not in second
        if os.path.exists(cg.file("v2", "cpu.pressure")):
            assert set(second["task_pressure_stall_seconds"]) == {"cpu", "memory", "io"}
        reader.close()


@pytest.mark.integration
@needs_v2
def test_v2_cgroup_removed_between_cycles_is_gone():
    with v2_cgroup() as cg:
        reader = TaskCgroup(DEFAULT_PATHS, cg.path, "v2")
        reader.read()
        cg.cleanup()
        with pytest.raises(CgroupGone):
            reader.read()
