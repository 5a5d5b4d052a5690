"""A new operator's first hour (issue #32): an allocation error that names the hierarchy
a cgroup is really in.  Real tools on cgroup trees made under tmp_path (--cgroupfs)."""
import json
import subprocess
import time

from conftest import tool_command, tool_env


def cgroup(tree, hierarchy: str, path: str, pids: str = "") -> None:
    """A cgroup directory in one hierarchy of a tree standing in for /sys/fs/cgroup,
    with its cgroup.procs (empty: no processes)."""
    directory = tree / hierarchy / path.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup.procs").write_text(pids)


def discover_once(tree, config_path):
    return subprocess.run(tool_command("discover", "--once", "--cgroupfs", str(tree),
                                       "-c", str(config_path)),
                          capture_output=True, env=tool_env(), timeout=60, check=False)


# -- item 5: the hierarchy a cgroup lives in -----------------------------------------

def test_allocate_names_the_hierarchy_a_cgroup_lives_in_on_a_v1_node(tmp_path):
    tree = tmp_path / "cgroup"
    for hierarchy in ("cpu", "cpuacct", "cpuset", "unified"):
        (tree / hierarchy).mkdir(parents=True)
    cgroup(tree, "memory", "/batch", "1\n")   # made by a tool that knows memory only
    config = tmp_path / "owca.yaml"
    config.write_text("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
                      "      - labels: {priority: be}\n"
                      "        allocations: {cpu_quota: 0.2, cpuset_cpus: '0'}\n")
    frame = {"v": 1, "kind": "measurements", "ts": time.time(), "host": "n1", "seq": 1,
             "platform": {"platform_topology_cpus": 1},
             "tasks": {"/batch": {"name": "batch", "cgroup_path": "/batch",
                                  "labels": {"priority": "be"}, "resources": {},
                                  "metrics": {}}},
             "metrics": []}
    result = subprocess.run(
        tool_command("allocate", "-c", str(config), "--cgroupfs", str(tree),
                     "--state-dir", str(tmp_path / "state")),
        input=(json.dumps(frame) + "\n").encode(), capture_output=True, env=tool_env(),
        timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    for type_, controller in (("cpu_quota", "cpu"), ("cpuset_cpus", "cpuset")):
        assert (f"task /batch: {type_}: no cgroup /batch in the {controller} hierarchy "
                f"({tree}/{controller}) or cgroup2 ({tree}/unified), where {type_} is "
                f"written; it exists in: memory") in err, err
