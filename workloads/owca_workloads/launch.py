"""Start processes each in its own cgroup (v1: cpu, cpuacct, memory, cpuset), stop them cleanly.

Every workload gets the same cgroup path in each of the four hierarchies,
under one parent that belongs to the launcher (`/owca-scenario-<name>-<pid>`),
so that owca-discover's cgroup and static sources find it and owca-measure
reads it.  A process enters its cgroups between fork and exec (it writes its
own pid to cgroup.procs), so nothing it starts escapes them.  cpuset pins a
workload to cores: an HP task and its antagonists share cores on purpose.

What was started is recorded (name, cgroup path, pid, process group) in a
state file, so that stopping, even from another process after a crash, goes
by the recorded ids and paths: SIGTERM to the process group, SIGKILL after a
timeout, then SIGKILL to whatever pid is still in the recorded cgroup; then
the cgroups are removed, children first.  Nothing is ever killed by name.
"""
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from owca.core.paths import Paths

from owca_workloads.cgroup_files import read_str, write_str
from owca_workloads.cli import ToolError

log = logging.getLogger("owca.launch")

CONTROLLERS = ("cpu", "cpuacct", "memory", "cpuset")


class LaunchError(ToolError):
    """A workload could not be started or its cgroups not made (one line)."""


# The pseudo-controller of the cgroup2 hierarchy of a hybrid host (v1 controllers,
# cgroup2 at `unified/`): a group there gives a task PSI and perf cgroup events.
UNIFIED = "unified"


def hybrid(paths: Paths) -> bool:
    """v1 controllers with a cgroup2 hierarchy mounted beside them."""
    root = paths.cgroup_v2_root
    return os.path.normpath(root) != os.path.normpath(paths.cgroupfs) \
        and os.path.exists(os.path.join(root, "cgroup.procs"))


class CgroupSet:
    """One cgroup path in several v1 hierarchies, and on a hybrid host in cgroup2 too
    (the same path in every hierarchy, as docs/protocol.md names a task)."""

    def __init__(self, paths: Paths, cgroup_path: str, controllers=CONTROLLERS):
        self.paths = paths
        self.cgroup_path = cgroup_path
        self.controllers = tuple(controllers)
        if UNIFIED not in self.controllers and hybrid(paths):
            self.controllers += (UNIFIED,)

    def dir(self, controller: str) -> str:
        if controller == UNIFIED:
            return self.paths.cgroup_v2(self.cgroup_path)
        return self.paths.cgroup_v1(controller, self.cgroup_path)

    def missing_controllers(self) -> List[str]:
        return [c for c in self.controllers if c != UNIFIED
                and not os.path.exists(os.path.join(self.paths.cgroup_v1(c), "cgroup.procs"))]

    def create(self, cpus: Optional[str] = None, mems: Optional[str] = None,
               memory_limit_bytes: Optional[int] = None,
               cpu_quota_cores: Optional[float] = None) -> None:
        """mkdir in every hierarchy; cpuset gets cpus (default: its parent's) and mems."""
        missing = self.missing_controllers()
        if missing:
            raise LaunchError(f"cgroup v1 controllers not mounted: {', '.join(missing)}")
        for controller in self.controllers:
            path = self.dir(controller)
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as e:
                raise LaunchError(f"cannot create cgroup {path}: {e.strerror}") from None
        if "cpuset" in self.controllers:
            self._init_cpuset(self.dir("cpuset"), cpus, mems)
        if memory_limit_bytes is not None and "memory" in self.controllers:
            write_str(os.path.join(self.dir("memory"), "memory.limit_in_bytes"),
                      str(memory_limit_bytes))
        if cpu_quota_cores is not None and "cpu" in self.controllers:
            period = 100000  # microseconds, the kernel's default CFS period
            write_str(os.path.join(self.dir("cpu"), "cpu.cfs_period_us"), str(period))
            write_str(os.path.join(self.dir("cpu"), "cpu.cfs_quota_us"),
                      str(max(1000, int(cpu_quota_cores * period))))

    def _init_cpuset(self, path: str, cpus: Optional[str], mems: Optional[str]) -> None:
        """A new cpuset is empty, and a process cannot enter it until it has cpus and
        mems; every ancestor we made needs them too."""
        parent = os.path.dirname(path.rstrip("/"))
        root = self.paths.cgroup_v1("cpuset")
        if os.path.normpath(parent) != os.path.normpath(root) \
                and not read_str(os.path.join(parent, "cpuset.cpus")):
            self._init_cpuset(parent, None, None)
        for name, wanted in (("cpuset.cpus", cpus), ("cpuset.mems", mems)):
            value = wanted or read_str(os.path.join(parent, name))
            try:
                write_str(os.path.join(path, name), value)
            except OSError as e:
                raise LaunchError(f"{os.path.join(path, name)}: cannot set {value!r}: "
                                  f"{e.strerror}") from None

    def procs_files(self) -> List[str]:
        return [os.path.join(self.dir(c), "cgroup.procs") for c in self.controllers]

    def pids(self) -> set:
        found = set()
        for path in self.procs_files():
            try:
                with open(path) as f:
                    found.update(int(line) for line in f if line.strip())
            except FileNotFoundError:
                continue
        return found

    def remove(self) -> List[str]:
        """rmdir in every hierarchy (sub-cgroups first); what could not be removed."""
        left = []
        for controller in self.controllers:
            top = self.dir(controller)
            if not os.path.isdir(top):
                continue
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
                try:
                    os.rmdir(dirpath)
                except OSError as e:
                    left.append(f"{dirpath}: {e.strerror}")
        return left


def enter_cgroups(procs_files: List[str]):
    """A preexec_fn: the child writes its own pid to each cgroup.procs before exec."""
    def enter():
        pid = str(os.getpid())
        for path in procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid.encode())
            finally:
                os.close(fd)
    return enter


@dataclass
class Launched:
    """One started workload, as recorded in the state file."""
    name: str
    cgroup_path: str
    pid: int
    argv: List[str]
    started_ts: float
    cpus: Optional[str] = None
    role: str = "be"
    workload: str = ""
    labels: Dict[str, str] = field(default_factory=dict)
    stopped_ts: Optional[float] = None
    exit_status: Optional[int] = None


class Launcher:
    """Starts workloads under `parent` and stops them; keeps a state file if given."""

    def __init__(self, parent: str, paths: Paths = None, state_file: Optional[str] = None,
                 controllers=CONTROLLERS):
        if not parent.startswith("/") or ".." in parent.split("/") or parent == "/":
            raise LaunchError(f"parent cgroup {parent!r}: expected an absolute path below /")
        self.parent = parent.rstrip("/")
        self.paths = paths or Paths()
        self.state_file = state_file
        self.controllers = tuple(controllers)
        self.launched: Dict[str, Launched] = {}
        self.popens: Dict[str, subprocess.Popen] = {}
        self.parent_set = CgroupSet(self.paths, self.parent, self.controllers)
        self.parent_made = False
        self.extra_cgroups: List[str] = []  # made for processes started elsewhere
        self._save_lock = threading.Lock()  # a scenario changes its tasks from threads

    def _make_parent(self) -> None:
        if not self.parent_made:
            self.parent_set.create()
            self.parent_made = True
            self.save()

    def make_cgroup(self, name: str, cpus: Optional[str] = None) -> CgroupSet:
        """A cgroup under the parent for processes the caller starts itself (with
        preexec_fn=enter_cgroups(...)); stop_all kills what is left in it and removes it."""
        self._make_parent()
        cgroups = self.cgroups(name)
        cgroups.create(cpus=cpus)
        self.extra_cgroups.append(name)
        self.save()
        return cgroups

    def cgroups(self, name: str) -> CgroupSet:
        return CgroupSet(self.paths, f"{self.parent}/{name}", self.controllers)

    def start(self, name: str, argv: List[str], cpus: Optional[str] = None,
              memory_limit_bytes: Optional[int] = None, cwd: Optional[str] = None,
              env: Optional[dict] = None, stdout=None, stderr=None, role: str = "be",
              workload: str = "", labels: Optional[dict] = None,
              cpu_quota_cores: Optional[float] = None) -> Launched:
        if name in self.launched or "/" in name or name in ("", ".", ".."):
            raise LaunchError(f"workload name {name!r}: taken or not a cgroup name")
        self._make_parent()
        cgroups = self.cgroups(name)
        cgroups.create(cpus=cpus, memory_limit_bytes=memory_limit_bytes,
                       cpu_quota_cores=cpu_quota_cores)
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                     cwd=cwd, env=env, start_new_session=True,
                                     preexec_fn=enter_cgroups(cgroups.procs_files()))
        except (OSError, subprocess.SubprocessError) as e:
            cgroups.remove()
            raise LaunchError(f"{name}: cannot start {argv[0]}: {e}") from None
        launched = Launched(name=name, cgroup_path=cgroups.cgroup_path, pid=popen.pid,
                            argv=list(argv), started_ts=time.time(), cpus=cpus, role=role,
                            workload=workload, labels=dict(labels or {}))
        with self._save_lock:
            self.launched[name] = launched
            self.popens[name] = popen
        self.save()
        log.info("started %s (pid %d) in %s%s", name, popen.pid, cgroups.cgroup_path,
                 f" on cpus {cpus}" if cpus else "")
        return launched

    def replace(self, name: str, argv: List[str], cwd: Optional[str] = None,
                stdout=None, stderr=None, timeout: float = 5.0) -> Launched:
        """Stop a workload's processes (by its recorded group, then whatever is left in
        its cgroup) and start `argv` in the same cgroups: the task stays, its work
        changes (a scenario's phases).  The previous process's exit status is kept."""
        launched = self.launched[name]
        cgroups = self.cgroups(name)
        launched.exit_status = stop_process_group(launched.pid, self.popens.get(name),
                                                  timeout, self.paths)
        left = kill_cgroup(cgroups, timeout)
        if left:
            raise LaunchError(f"{name}: pids {sorted(left)} would not leave "
                              f"{launched.cgroup_path}")
        try:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout,
                                     stderr=stderr, cwd=cwd, start_new_session=True,
                                     preexec_fn=enter_cgroups(cgroups.procs_files()))
        except (OSError, subprocess.SubprocessError) as e:
            raise LaunchError(f"{name}: cannot start {argv[0]}: {e}") from None
        launched.pid, launched.argv = popen.pid, list(argv)
        self.popens[name] = popen
        self.save()
        log.info("%s: now %s (pid %d)", name, argv[0], popen.pid)
        return launched

    def running(self, name: str) -> bool:
        popen = self.popens.get(name)
        return popen is not None and popen.poll() is None

    def stop(self, name: str, timeout: float = 5.0) -> Launched:
        """Stop one workload by its recorded process group and cgroup; remove the cgroup."""
        launched = self.launched[name]
        if launched.stopped_ts is None:
            status = stop_process_group(launched.pid, self.popens.get(name), timeout, self.paths)
            left = kill_cgroup(self.cgroups(name), timeout)
            if left:
                log.error("%s: pids %s would not leave %s", name, sorted(left),
                          launched.cgroup_path)
            for problem in self.cgroups(name).remove():
                log.error("%s: cgroup not removed: %s", name, problem)
            launched.stopped_ts = time.time()
            launched.exit_status = status
            self.popens.pop(name, None)
            self.save()
            log.info("stopped %s (pid %d)", name, launched.pid)
        return launched

    def stop_all(self, timeout: float = 5.0) -> None:
        for name in reversed(list(self.launched)):
            try:
                self.stop(name, timeout)
            except Exception as e:  # one workload's trouble must not leave the others running
                log.error("%s: stop failed: %s", name, e)
        for name in self.extra_cgroups:
            left = kill_cgroup(self.cgroups(name), timeout)
            if left:
                log.error("%s: pids %s would not leave it", name, sorted(left))
            for problem in self.cgroups(name).remove():
                log.error("%s: cgroup not removed: %s", name, problem)
        self.extra_cgroups = []
        if self.parent_made:
            for problem in self.parent_set.remove():
                log.error("parent cgroup not removed: %s", problem)
            self.parent_made = False
            self.save()

    # -- the state file ---------------------------------------------------------------
    def save(self) -> None:
        if not self.state_file:
            return
        with self._save_lock:
            self._save()

    def _save(self) -> None:
        state = {"parent": self.parent, "controllers": list(self.controllers),
                 "parent_made": self.parent_made, "extra_cgroups": list(self.extra_cgroups),
                 "workloads": [asdict(w) for w in self.launched.values()]}
        tmp = f"{self.state_file}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
        os.replace(tmp, self.state_file)

    @classmethod
    def from_state(cls, state_file: str, paths: Paths = None) -> "Launcher":
        """A launcher that can stop what another one (perhaps crashed) recorded."""
        with open(state_file) as f:
            state = json.load(f)
        launcher = cls(state["parent"], paths, state_file, state.get("controllers", CONTROLLERS))
        for w in state.get("workloads", []):
            launcher.launched[w["name"]] = Launched(**w)
        launcher.parent_made = bool(state.get("parent_made", True))
        launcher.extra_cgroups = list(state.get("extra_cgroups", []))
        return launcher


def _alive(pid: int, paths: Paths) -> bool:
    """Whether the process runs (a zombie, waiting for its parent to reap it, does not)."""
    try:
        with open(paths.proc(str(pid), "stat")) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def stop_process_group(pgid: int, popen: Optional[subprocess.Popen], timeout: float,
                       paths: Paths):
    """SIGTERM to the group the workload leads, SIGKILL after `timeout`; its exit status
    when we are its parent."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    if popen is not None:
        try:
            return popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    else:
        while _alive(pgid, paths) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if popen is not None:
        return popen.wait()
    return None


def kill_cgroup(cgroups: CgroupSet, timeout: float) -> set:
    """SIGKILL whatever is left in the recorded cgroup (a process that left the group);
    the pids that are still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        pids = cgroups.pids()
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
