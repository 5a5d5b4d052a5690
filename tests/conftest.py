"""Shared test helpers: the tools as modules, and the tree's own paths."""
import importlib.machinery
import importlib.util
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin")
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TOOLS = ("discover", "measure", "detect", "allocate", "ship")

# Tests run from the tree: lib/ and the tree's root (for configs/ plug-ins) first.
for p in (os.path.join(ROOT, "lib"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)


def wait_for(predicate, timeout: float, what: str, step: float = 0.3, detail=None):
    """predicate()'s first true value, asked every `step` s.  After `timeout` s an
    AssertionError names `what` (and adds detail(), where given): a guard against a
    hang, not a timing goal, so make it generous."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (":\n" + detail() if detail else ""))
        time.sleep(step)


class FakeClock:
    """The clock of a module under test, moved by the test instead of by waiting:
    `monkeypatch.setattr(module, "time", clock)` for a module that calls
    time.monotonic() or time.time() (anything else of `time` it calls fails loudly)."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now

    time = monotonic

    def advance(self, seconds: float) -> None:
        self.now += seconds


def load_tool(name: str):
    """bin/owca-<name> as a module, so that tests can call its main(argv)."""
    path = os.path.join(BIN, f"owca-{name}")
    loader = importlib.machinery.SourceFileLoader(f"owca_tool_{name}", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def tool_command(name: str, *args) -> list:
    """The argv that runs bin/owca-<name> with this interpreter (a real process)."""
    return [sys.executable, os.path.join(BIN, f"owca-{name}"), *args]


def tool_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "lib"), ROOT,
                                         env.get("PYTHONPATH", "")])
    return env


def blocked_writing(pid: int) -> bool:
    """True while the process is blocked writing to a pipe (its reader stalled)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "pipe_write" in f.read()
    except FileNotFoundError:
        return False


def wchan_missing():
    """Why /proc/PID/wchan cannot tell where a process waits here, or None."""
    import subprocess
    import time
    child = subprocess.Popen(["sleep", "5"])
    try:
        for _ in range(200):
            with open(f"/proc/{child.pid}/wchan") as f:
                wchan = f.read().strip()
            if wchan not in ("", "0"):
                return None
            time.sleep(0.01)
        return "/proc/PID/wchan does not name kernel functions here"
    finally:
        child.kill()
        child.wait()


@pytest.fixture
def fixtures_dir():
    return FIXTURES
