"""Real cgroups with real processes in them, for tests; cleaned up by what they made.

    with v1_cgroup() as cg:                # /owca-test-<random> in cpu, cpuacct, memory
        child = cg.start_python(BURN)      # runs inside the cgroup from its first instruction
        ...                                # TaskCgroup(DEFAULT_PATHS, cg.path).read()
    # the children are killed (by pid) and the directories removed

`v2_cgroup()` does the same in the cgroup2 hierarchy.  `needs_v1` and
`needs_v2` skip a test where the machine cannot give it such a cgroup.  A child
joins its cgroup between fork and exec, so that all it does is charged there.
"""
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from owca.core.paths import DEFAULT_PATHS

V1_CONTROLLERS = ("cpu", "cpuacct", "memory")


def v1_missing(paths=DEFAULT_PATHS, controllers=V1_CONTROLLERS):
    """Why v1 test cgroups cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    for c in controllers:
        if not os.access(os.path.join(paths.cgroup_v1(c), "cgroup.procs"), os.W_OK):
            return f"no writable cgroup v1 {c} hierarchy"
    return None


def v2_missing(paths=DEFAULT_PATHS):
    """Why a v2 test cgroup cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    if not os.access(os.path.join(paths.cgroup_v2_root, "cgroup.procs"), os.W_OK):
        return "no writable cgroup2 hierarchy"
    return None


needs_v1 = pytest.mark.skipif(v1_missing() is not None, reason=str(v1_missing()))
needs_v2 = pytest.mark.skipif(v2_missing() is not None, reason=str(v2_missing()))


# Cgroup files are read and written the harness's one way, shared with the lab and
# benchmarks/ (workloads/owca_workloads/cgroup_files.py says why it lives there).
sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "workloads"))
from owca_workloads.cgroup_files import read_int, read_str, write_str  # noqa: E402,F401


class TestCgroup:
    """One cgroup (the same path in one or more hierarchies) and the children started in it."""
    __test__ = False  # not a pytest class

    def __init__(self, path: str, dirs: dict):
        self.path = path    # the cgroup path, "/owca-test-..."
        self.dirs = dirs    # hierarchy ("cpu", ..., or "v2") -> directory
        self.children = []

    def file(self, hierarchy: str, name: str) -> str:
        return os.path.join(self.dirs[hierarchy], name)

    def start_python(self, code: str) -> subprocess.Popen:
        """A Python child running `code` inside the cgroup; text pipes on stdin and stdout."""
        procs_files = [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

        def join():
            for procs in procs_files:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))

        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, preexec_fn=join)
        self.children.append(child)
        return child

    def cleanup(self) -> None:
        for child in self.children:
            kill(child)
        for d in self.dirs.values():
            remove_dir(d)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL a process this test started (by its pid), reap it, close its pipes."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream:
            stream.close()


def remove_dir(d: str, timeout: float = 5.0) -> None:
    """rmdir a cgroup; a cgroup whose last process just died may be busy a moment."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def new_name(prefix: str = "owca-test") -> str:
    return f"/{prefix}-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def v1_cgroup(controllers=V1_CONTROLLERS, paths=DEFAULT_PATHS, path: str = None):
    """A fresh cgroup in each v1 `controllers` hierarchy, removed afterwards."""
    path = path or new_name()
    cg = TestCgroup(path, {})
    try:
        for c in controllers:
            d = paths.cgroup_v1(c, path)
            os.mkdir(d)
            cg.dirs[c] = d
        yield cg
    finally:
        cg.cleanup()


@contextlib.contextmanager
def v2_cgroup(paths=DEFAULT_PATHS, path: str = None):
    """A fresh cgroup in the cgroup2 hierarchy, removed afterwards."""
    path = path or new_name()
    cg = TestCgroup(path, {})
    try:
        d = paths.cgroup_v2(path)
        os.mkdir(d)
        cg.dirs["v2"] = d
        yield cg
    finally:
        cg.cleanup()


def wait_line(child: subprocess.Popen, expected: str) -> None:
    """Block until the child prints `expected` (its programs print and flush)."""
    line = child.stdout.readline().strip()
    assert line == expected, f"child said {line!r}, expected {expected!r}"


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc/<pid>/stat (clock ticks)."""
    with open(DEFAULT_PATHS.proc(str(pid), "stat")) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def let_burn(child: subprocess.Popen, seconds: float, timeout: float = 30.0) -> None:
    """Wait until a burning child used `seconds` more CPU (however loaded the machine)."""
    start = process_cpu_seconds(child.pid)
    deadline = time.monotonic() + timeout
    while process_cpu_seconds(child.pid) < start + seconds:
        assert time.monotonic() < deadline, "the child got no CPU"
        time.sleep(0.05)


# Children: each prints a line when it reached a point the test waits for.
BURN_FOREVER = "import sys\nprint('running', flush=True)\nwhile True: pass\n"
BURN_THEN_SLEEP = ("import sys, time\nend = time.process_time() + %(seconds)s\n"
                   "while time.process_time() < end: pass\n"
                   "print('done', flush=True)\nsys.stdin.readline()\n")
# Prints "started", waits for a line, then allocates and touches MIB MiB (b'x' * n
# writes every page) and prints "allocated"; holds it until the next line.
ALLOCATE = ("import sys\nprint('started', flush=True)\nsys.stdin.readline()\n"
            "held = b'x' * (%(mib)d << 20)\nprint('allocated', flush=True)\n"
            "sys.stdin.readline()\n")


def tell(child: subprocess.Popen, line: str = "go") -> None:
    child.stdin.write(line + "\n")
    child.stdin.flush()
