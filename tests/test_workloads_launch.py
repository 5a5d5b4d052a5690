"""The launcher: real processes in real cgroup v1 hierarchies, stopped by recorded ids."""
import os
import subprocess
import sys
import signal
import uuid

import pytest

from conftest import wait_for
from owca.discover.sources.cgroup import CgroupDiscovery
from owca.core.paths import Paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
sys.path.insert(0, WORKLOADS)

from owca_workloads.launch import CONTROLLERS, CgroupSet, LaunchError, Launcher  # noqa: E402

PATHS = Paths()


def _cgroups_usable() -> str:
    if os.geteuid() != 0:
        return "needs root to make cgroups"
    missing = CgroupSet(PATHS, "/", CONTROLLERS).missing_controllers()
    if missing:
        return f"cgroup v1 controllers not mounted: {', '.join(missing)}"
    return ""


pytestmark = pytest.mark.skipif(bool(_cgroups_usable()), reason=_cgroups_usable() or "ok")


@pytest.fixture
def launcher(tmp_path):
    launcher = Launcher(f"/owca-test-launch-{uuid.uuid4().hex[:8]}", PATHS,
                        state_file=str(tmp_path / "state.json"))
    yield launcher
    launcher.stop_all(timeout=2)  # by the recorded pids and paths, whatever the test did
    assert not os.path.exists(PATHS.cgroup_v1("cpu", launcher.parent))


def cgroups_of(pid: int) -> dict:
    """controller -> cgroup path, from /proc/PID/cgroup."""
    out = {}
    with open(PATHS.proc(str(pid), "cgroup")) as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(","):
                out[c] = path
    return out


def alive(pid: int) -> bool:
    try:
        with open(PATHS.proc(str(pid), "stat")) as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


# A guard on the waits below against a hang, not a timing goal: a loaded machine
# may take its time to start or reap a process.
GUARD_SECONDS = 60


def test_a_workload_runs_in_its_own_cgroups_pinned_to_its_cpus(launcher):
    w = launcher.start("hp", ["sleep", "60"], cpus="0", role="hp", workload="sleep")
    assert w.cgroup_path == f"{launcher.parent}/hp"
    found = cgroups_of(w.pid)
    for controller in CONTROLLERS:
        assert found[controller] == w.cgroup_path
    with open(os.path.join(PATHS.cgroup_v1("cpuset", w.cgroup_path), "cpuset.cpus")) as f:
        assert f.read().strip() == "0"
    # owca-discover's cgroup source sees it, and only it, under the parent
    tasks = CgroupDiscovery(root=launcher.parent, hierarchies=["cpuacct", "memory"]).list_tasks(
        PATHS)
    assert [t["id"] for t in tasks] == [w.cgroup_path]


def test_stop_ends_the_process_group_and_removes_the_cgroups(launcher):
    # The shell's child shares its process group: SIGTERM to the group ends both.
    w = launcher.start("be", ["sh", "-c", "sleep 60 & wait"])
    wait_for(lambda: len(CgroupSet(PATHS, w.cgroup_path).pids()) == 2, GUARD_SECONDS,
             "the shell's child", step=0.02)
    children = CgroupSet(PATHS, w.cgroup_path).pids() - {w.pid}
    launcher.stop("be", timeout=2)
    assert not alive(w.pid) and not any(alive(p) for p in children)
    for controller in CONTROLLERS:
        assert not os.path.exists(PATHS.cgroup_v1(controller, w.cgroup_path))
    assert launcher.launched["be"].stopped_ts is not None


def test_a_process_that_left_the_group_or_ignores_sigterm_is_killed_by_its_cgroup(launcher):
    # setsid: a new session and process group that SIGTERM to ours does not reach;
    # the trap: a leader that ignores SIGTERM.
    w = launcher.start("stubborn", ["sh", "-c", "trap '' TERM; setsid sleep 60 & "
                                    "while true; do sleep 0.1; done"])
    wait_for(lambda: len(CgroupSet(PATHS, w.cgroup_path).pids()) >= 2, GUARD_SECONDS,
             "the escaped sleep", step=0.02)
    escaped = CgroupSet(PATHS, w.cgroup_path).pids() - {w.pid}
    stopped = launcher.stop("stubborn", timeout=1)
    assert stopped.exit_status == -signal.SIGKILL  # SIGTERM was ignored: it was killed
    assert not alive(w.pid)
    wait_for(lambda: not any(alive(p) for p in escaped), GUARD_SECONDS,
             "the escaped sleep to be killed", step=0.02)
    assert not os.path.exists(PATHS.cgroup_v1("memory", w.cgroup_path))


def test_another_launcher_stops_what_the_state_file_recorded(launcher, tmp_path):
    w = launcher.start("orphan", ["sleep", "60"], cpus="0")
    # as after a crash: a new process reads the state and stops by recorded ids and paths
    other = Launcher.from_state(launcher.state_file, PATHS)
    assert other.launched["orphan"].pid == w.pid
    other.stop_all(timeout=2)
    wait_for(lambda: not alive(w.pid) or launcher.popens["orphan"].poll() is not None,
             GUARD_SECONDS, "the orphan to end", step=0.02)
    assert not os.path.exists(PATHS.cgroup_v1("cpuset", launcher.parent))
    launcher.popens["orphan"].wait(5)  # reap our child


def test_a_command_that_cannot_start_leaves_no_cgroup(launcher):
    with pytest.raises(LaunchError, match="cannot start"):
        launcher.start("missing", ["/nonexistent/binary"])
    assert not os.path.exists(PATHS.cgroup_v1("cpu", f"{launcher.parent}/missing"))


def test_bad_names_and_parents_are_refused(launcher):
    with pytest.raises(LaunchError):
        Launcher("relative/parent")
    with pytest.raises(LaunchError):
        Launcher("/a/../b")
    with pytest.raises(LaunchError):
        launcher.start("a/b", ["true"])
    with pytest.raises(LaunchError):
        launcher.start("", ["true"])


def test_owca_launch_runs_catalog_workloads_and_cleans_up(tmp_path):
    parent = f"/owca-test-launch-{uuid.uuid4().hex[:8]}"
    tasks = tmp_path / "tasks.yaml"
    out = subprocess.run(
        [sys.executable, os.path.join(WORKLOADS, "owca-launch"), "run", "--duration", "2",
         "--parent", parent, "--cpus", "0", "--run-dir", str(tmp_path / "run"),
         "--tasks-file", str(tasks), "be=sysbench-cpu"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"{parent}/be"]
    assert "started be" in out.stderr and "stopped be" in out.stderr
    assert tasks.read_text().strip() == "[]"  # nothing runs any more
    assert not os.path.exists(PATHS.cgroup_v1("cpu", parent))


def test_owca_launch_refuses_an_unknown_workload():
    out = subprocess.run([sys.executable, os.path.join(WORKLOADS, "owca-launch"), "run",
                          "nosuch"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "no workload 'nosuch'" in out.stderr


def test_on_a_hybrid_host_a_workload_also_gets_its_cgroup2_group(launcher):
    """v1 controllers with cgroup2 beside them: the same path in cgroup2 too, for PSI and
    perf events (docs/protocol.md: one path in every hierarchy)."""
    if PATHS.cgroup_v2_root == PATHS.cgroupfs or \
            not os.path.exists(os.path.join(PATHS.cgroup_v2_root, "cgroup.procs")):
        pytest.skip("not a hybrid host")
    w = launcher.start("hp", ["sleep", "60"], role="hp")
    assert cgroups_of(w.pid)[""] == w.cgroup_path  # the "0::/path" line
    launcher.stop("hp", timeout=2)
    assert not os.path.exists(PATHS.cgroup_v2(w.cgroup_path))


def test_replace_changes_the_work_and_keeps_the_task(launcher, tmp_path):
    w = launcher.start("be", ["sleep", "60"])
    first = w.pid
    launcher.replace("be", ["sh", "-c", "sleep 61 & wait"], timeout=2)
    assert not alive(first)
    assert launcher.launched["be"].pid != first and alive(launcher.launched["be"].pid)
    wait_for(lambda: len(CgroupSet(PATHS, w.cgroup_path).pids()) == 2, GUARD_SECONDS,
             "the shell's child", step=0.02)
    assert cgroups_of(launcher.launched["be"].pid)["cpu"] == w.cgroup_path
    assert '"sleep 61 & wait"' in (tmp_path / "state.json").read_text()  # recorded


def test_a_cpu_quota_is_set_in_cores(launcher):
    w = launcher.start("hp", ["sleep", "60"], cpu_quota_cores=0.5, role="hp")
    cpu = PATHS.cgroup_v1("cpu", w.cgroup_path)
    with open(os.path.join(cpu, "cpu.cfs_quota_us")) as q, \
            open(os.path.join(cpu, "cpu.cfs_period_us")) as p:
        assert int(q.read()) == int(p.read()) // 2


def test_the_installed_owca_launch_lists_the_catalog_as_the_docs_call_it(tmp_path):
    """docs/workloads.md: after `make venv`, .venv/bin/owca-launch (beside this Python) runs
    from anywhere, with no PYTHONPATH (it failed with No module named 'owca' before)."""
    command = os.path.join(os.path.dirname(sys.executable), "owca-launch")
    assert os.access(command, os.X_OK), "owca-launch is not installed beside " + sys.executable
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([command, "list"], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path), env=env)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()]
    assert {"nginx", "redis", "memcached", "stress-cpu", "stress-reclaim", "stress-io"} \
        <= set(names)
