"""A new operator's first hour (issue #32): HP and BE marked by cgroup path, a discovery
root that lists nothing said out loud, and an allocation error that names the hierarchy
a cgroup is really in.  Real tools on cgroup trees made under tmp_path (--cgroupfs)."""
import json
import shutil
import signal
import subprocess
import threading
import time

from conftest import tool_command, tool_env, wait_for


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


# -- item 2: HP and BE by cgroup path ------------------------------------------------

def test_cgroup_discovery_marks_hp_and_be_by_cgroup_path(tmp_path):
    tree = tmp_path / "cgroup"
    for path in ("/system.slice/nginx.service", "/system.slice/sshd.service",
                 "/batch/job-1", "/batch/job-2/step", "/web/frontend"):
        for hierarchy in ("cpuacct", "memory"):
            cgroup(tree, hierarchy, path, "1\n")
    config = tmp_path / "owca.yaml"
    config.write_text("discover:\n"
                      "  source: !CgroupDiscovery\n"
                      "    root: /\n"
                      "    labels: {team: infra}\n"
                      "    hp_cgroups: [/system.slice/nginx.service, /web/*]\n"
                      "    be_cgroups: [/batch/*, /web/*]\n")
    result = discover_once(tree, config)
    assert result.returncode == 0, result.stderr
    labels = {t["id"]: t["labels"] for t in json.loads(result.stdout)["tasks"]}
    assert labels == {
        "/system.slice/nginx.service": {"team": "infra", "priority": "hp"},
        "/system.slice/sshd.service": {"team": "infra"},   # unmarked: neither HP nor BE
        "/batch/job-1": {"team": "infra", "priority": "be"},
        "/batch/job-2/step": {"team": "infra", "priority": "be"},  # `*` crosses `/`
        "/web/frontend": {"team": "infra", "priority": "hp"},      # both match: HP
    }


def test_a_relative_priority_pattern_is_a_configuration_error(tmp_path):
    config = tmp_path / "owca.yaml"
    config.write_text("discover:\n  source: !CgroupDiscovery\n"
                      "    be_cgroups: [batch/*]\n")
    result = discover_once(tmp_path, config)
    assert result.returncode == 2
    assert f"{config}:3" in result.stderr.decode()
    assert ("'batch/*' is not an absolute cgroup path pattern (one starts with /)"
            in result.stderr.decode())


# -- item 5: a root that lists no task -----------------------------------------------

class Discovering:
    """owca-discover every 0.1 s on a tree, its frames counted as they come."""

    def __init__(self, tree, config_path):
        self.process = subprocess.Popen(
            tool_command("discover", "--interval", "0.1", "--cgroupfs", str(tree),
                         "-c", str(config_path)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
        self.frames = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.frames.append(json.loads(line))

    def cycles(self, n: int, what: str) -> list:
        """The tasks of the frame n cycles from now."""
        target = len(self.frames) + n
        wait_for(lambda: len(self.frames) >= target, 60, what)
        return self.frames[target - 1]["tasks"]

    def stop(self) -> str:
        self.process.send_signal(signal.SIGINT)
        _out, err = self.process.communicate(timeout=60)
        self.reader.join(timeout=10)
        assert self.process.returncode == 0, err
        return err.decode()


def test_a_discovery_root_that_lists_nothing_is_warned_once_per_change(tmp_path):
    tree = tmp_path / "cgroup"
    (tree / "memory").mkdir(parents=True)
    config = tmp_path / "owca.yaml"
    config.write_text("discover:\n  source: !CgroupDiscovery\n"
                      "    root: /kubepods\n    hierarchies: [memory]\n")
    run = Discovering(tree, config)
    try:
        assert run.cycles(5, "cycles with no /kubepods") == []
        cgroup(tree, "memory", "/kubepods/pod1")             # there, but no processes
        assert run.cycles(5, "cycles with an empty /kubepods") == []
        (tree / "memory" / "kubepods" / "pod1" / "cgroup.procs").write_text("1\n")
        assert [t["id"] for t in run.cycles(5, "cycles with a task")] == ["/kubepods/pod1"]
        shutil.rmtree(tree / "memory" / "kubepods")             # gone again
        assert run.cycles(5, "cycles with no /kubepods again") == []
    finally:
        err = run.stop()
    missing = ("owca-discover: warning: cgroup: root /kubepods exists in none of the "
               f"hierarchies scanned (memory, under {tree}): no tasks until it appears")
    empty = ("owca-discover: warning: cgroup: no cgroup under /kubepods holds processes "
             "(max_depth 3, the root itself left out): no tasks until one does")
    back = "owca-discover: info: cgroup: 1 tasks under /kubepods again"
    lines = [line for line in err.splitlines() if "cgroup:" in line]
    assert lines == [missing, empty, back, missing], err


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
