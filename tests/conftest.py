"""Shared test helpers: the tools as modules, the tree's own paths, and each test's kind."""
import fnmatch
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



@pytest.fixture(scope="session", autouse=True)
def private_allocate_state(tmp_path_factory):
    """owca-allocate's state directory for every test that does not name one: a
    stage or tool started without --state-dir would otherwise take the host's
    /var/lib/owca-allocate (and its lock, which a second run of the suite holds)."""
    state = str(tmp_path_factory.mktemp("owca-allocate-state"))
    before = os.environ.get("STATE_DIRECTORY")
    os.environ["STATE_DIRECTORY"] = state
    yield state
    if before is None:
        os.environ.pop("STATE_DIRECTORY", None)
    else:
        os.environ["STATE_DIRECTORY"] = before

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


def end_processes(processes) -> None:
    """Kill the ones of these Popen objects (recorded by the test) that still run, and
    close their pipes."""
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None and not stream.closed:
                stream.close()


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


# -- the kind of each test (pytest.ini describes the kinds) ------------------------------
#
# Every test has exactly one kind.  A test file's tests take the kind this table gives
# the file (patterns relative to tests/); a test, or a file's `pytestmark`, may carry
# its own kind instead (`@pytest.mark.integration` on a process test in a unit file).
# A test file that is in neither place stops the run at collection: `make test-quick`
# (pytest -m unit) must not leave out a new file unseen.
KINDS = ("unit", "integration", "vm", "deploy")
KIND_OF_FILE = {
    "unit": [
        "test_allocate.py", "test_allocate_journal.py", "test_allocate_types.py",
        "test_apm.py", "test_architecture.py", "test_cgroups.py", "test_config.py",
        "test_configs.py", "test_contention.py", "test_control_score.py", "test_corpus.py",
        "test_discover.py", "test_docs.py", "test_file_storage.py", "test_frames.py",
        "test_headroom.py",
        "test_kernel.py", "test_kubernetes.py", "test_memory_protection.py", "test_mesos.py",
        "test_platform.py",
        "test_prometheus_endpoint.py", "test_rdt_monitor.py", "test_resctrl.py",
        "test_scenario.py", "test_scenario_score.py", "test_slo_controller.py",
        "test_sli_spec.py", "test_spool.py", "test_workloads_catalog.py", "test_workloads_parsers.py",
        "test_workloads_imports.py", "test_workloads_sine.py",
    ],
    "integration": [
        "test_allocate_cgroups.py", "test_allocate_memory_cgroups.py", "test_contract_table.py",
        "test_detect.py", "test_docs_examples.py", "test_first_hour.py",
        "test_headroom_kubernetes.py",
        "test_discovery_e2e.py", "test_discovery_failures.py", "test_hybrid_signals.py",
        "test_kafka.py", "test_measure.py", "test_measure_sources.py", "test_perf.py",
        "test_plugin_compat.py", "test_pipeline_cgroups.py", "test_profile*.py",
        "test_promtool.py", "test_rdt_hardware.py", "test_scenario_control.py", "test_sli.py",
        "test_slo_controller_cgroups.py",
        "test_tools_contract.py", "test_workloads_launch.py", "test_workloads_wrap.py",
        # hostile inputs (one file per area): real tools, real servers, real signals
        "test_hostile_*.py",
    ],
    "vm": ["vm/test_*.py", "vm/guest_*.py"],  # guest_*: what the guest itself runs
    "deploy": ["deploy/test_*.py"],
}


def kind_of_file(path: str):
    """The kind KIND_OF_FILE gives a test file, or None."""
    relative = os.path.relpath(path, os.path.join(ROOT, "tests"))
    for kind, patterns in KIND_OF_FILE.items():
        if any(fnmatch.fnmatchcase(relative, pattern) for pattern in patterns):
            return kind
    return None


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the kinds given here
def pytest_collection_modifyitems(config, items):
    unknown, doubled = set(), []
    for item in items:
        own = {mark.name for mark in item.iter_markers() if mark.name in KINDS}
        if len(own) > 1:
            doubled.append(f"{item.nodeid}: {', '.join(sorted(own))}")
        elif not own:
            kind = kind_of_file(str(item.path))
            if kind is None:
                unknown.add(os.path.relpath(str(item.path), ROOT))
            else:
                item.add_marker(kind)
    if unknown or doubled:
        raise pytest.UsageError(
            "every test has exactly one kind, one of the markers pytest.ini lists:"
            + "".join(f"\n  {path}: no kind: list it in KIND_OF_FILE (tests/conftest.py)"
                      for path in sorted(unknown))
            + "".join(f"\n  {line}: more than one kind" for line in doubled))
