"""Hostile signals, plug-ins and descriptors against the five tools, as real processes.

SIGHUP, repeated stop signals, a stop signal while the tool imports its own package,
an unwritable stdout for --help, a directory as stdin, and plug-ins that raise
KeyboardInterrupt or SystemExit or print: what README.md's exit-status table promises
for each.  A deadline on a process is only a guard against a hang.

`python tests/test_hostile_signals.py [RUNS]` measures what no launcher can close:
a stop signal at a random instant of the interpreter's own start (README.md).
"""
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest

from conftest import ROOT, tool_command, tool_env
from test_contract_table import check_exposition
from test_tools_contract import measurements_line, tasks_line

HANG_GUARD = 120  # seconds: only ever reached by a tool that hangs
TOOLS = ("discover", "measure", "detect", "allocate", "ship")
# What each tool writes for a frame it consumes: a line of it shows its loop runs.
FIRST_OUTPUT = {"discover": b'"kind":"tasks"', "measure": b'"kind":"measurements"',
                "detect": b'"kind":"measurements"', "allocate": b'"kind":"measurements"',
                "ship": b"# owca metrics "}


def argv(tool: str, tmp_path, *args) -> list:
    """The tool's command line, with what lets many run side by side: discover scans an
    empty directory, each allocate has a state directory of its own."""
    extra = []
    if tool == "discover":
        extra = ["--cgroupfs", str(tmp_path), "--interval", "3600"]
    elif tool == "allocate":
        state = tmp_path / f"state-{random.getrandbits(64):016x}"
        extra = ["--state-dir", str(state)]
    return tool_command(tool, *extra, *args)


def spawn(command: list, env=None, sighup=signal.SIG_DFL, **kwargs) -> subprocess.Popen:
    """The tool with SIGHUP as `sighup` says, whatever the test runner's is (`nohup`)."""
    kwargs.setdefault("stdin", subprocess.PIPE)
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    def hangup():
        signal.signal(signal.SIGHUP, sighup)
    # The test process runs no threads: a preexec_fn is safe here.
    return subprocess.Popen(command, env=env or tool_env(), cwd=ROOT,
                            preexec_fn=hangup, **kwargs)  # noqa: PLW1509


def end(proc: subprocess.Popen) -> None:
    """A test's process gone, whatever the test did: SIGKILL only if it still runs."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            try:
                stream.close()
            except BrokenPipeError:
                pass


def wait_output(proc: subprocess.Popen, expected: bytes) -> None:
    """Block until the tool's stdout shows `expected` (its loop has run a cycle)."""
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + HANG_GUARD
    while expected not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {expected!r} from the tool; stdout so far: {seen[-300:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1 << 16)
            assert chunk, f"stdout ended before {expected!r}: {proc.stderr.read()!r}"
            seen += chunk


def running(tool: str, tmp_path, **kwargs) -> subprocess.Popen:
    """The tool in its stage loop, its input left open."""
    proc = spawn(argv(tool, tmp_path), **kwargs)
    try:
        if tool != "discover":
            proc.stdin.write(tasks_line(1) if tool == "measure" else measurements_line(1))
            proc.stdin.flush()
        wait_output(proc, FIRST_OUTPUT[tool])
    except BaseException:
        end(proc)
        raise
    return proc


# --- 1: SIGHUP is a clean stop -----------------------------------------------------------

def stops_cleanly(proc: subprocess.Popen, signum) -> None:
    """The signal ends the tool with 0 and nothing on stderr."""
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert (proc.returncode, err) == (0, b"")


@pytest.mark.parametrize("tool", TOOLS)
def test_sighup_is_a_clean_stop(tool, tmp_path):
    proc = running(tool, tmp_path)
    try:
        stops_cleanly(proc, signal.SIGHUP)
    finally:
        end(proc)


def test_a_sighup_that_nohup_ignores_stays_ignored(tmp_path):
    proc = running("detect", tmp_path, sighup=signal.SIG_IGN)
    try:
        proc.send_signal(signal.SIGHUP)
        proc.stdin.write(measurements_line(2))
        proc.stdin.flush()
        wait_output(proc, b'"kind":"anomalies","ts":1700000002.0')   # still running
        stops_cleanly(proc, signal.SIGTERM)
    finally:
        end(proc)


def test_sighup_makes_allocate_restore_every_value_it_changed(tmp_path):
    from cgroup_helpers import v1_cgroup, v1_missing
    from owca.core import frames
    from test_allocate_cgroups import (CONTROLLERS, STATIC, init_cpuset, measurements,
                                       settings, start)
    if v1_missing(controllers=CONTROLLERS):
        pytest.skip(v1_missing(controllers=CONTROLLERS))
    with ExitStack() as stack:
        parent = stack.enter_context(v1_cgroup(CONTROLLERS))
        init_cpuset(parent)
        task = stack.enter_context(v1_cgroup(CONTROLLERS, path=f"{parent.path}/task"))
        init_cpuset(task)
        start(task)
        before = settings(parent, task)
        config = tmp_path / "owca.yaml"
        config.write_text(STATIC)
        tool = spawn(tool_command("allocate", "-c", str(config), "--state-dir",
                                  str(tmp_path / "state")))
        stack.callback(end, tool)
        tool.stdin.write(frames.encode(measurements(1, task.path, {"priority": "be"})))
        tool.stdin.flush()
        assert json.loads(tool.stdout.readline())["kind"] == "measurements"
        allocations = json.loads(tool.stdout.readline())
        assert allocations["allocations"]["task"]["cpu_shares"] == 0.25
        assert settings(parent, task) != before   # the caps are on
        tool.send_signal(signal.SIGHUP)
        out, err = tool.communicate(timeout=HANG_GUARD)
        assert tool.returncode == 0, err
        assert settings(parent, task) == before
        last = json.loads(out.splitlines()[-1])
        assert last["shutdown"] is True and "cpu_shares" in last["restored"]["task"]


# --- 2: a stop signal after the first changes nothing ------------------------------------

REPEATED = 8    # processes per tool and pair of signals
PAIRS = [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT"),
         ("SIGHUP", "SIGHUP")]


@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
@pytest.mark.parametrize("tool", TOOLS)
def test_a_second_stop_signal_5_ms_after_the_first_is_harmless(tool, pair, tmp_path):
    signums = [getattr(signal, name) for name in pair]
    procs = []
    try:
        for _ in range(REPEATED):
            procs.append(running(tool, tmp_path))
        for proc in procs:
            proc.send_signal(signums[0])
            time.sleep(0.005)
            proc.send_signal(signums[1])
        outcomes = []
        for proc in procs:
            _, err = proc.communicate(timeout=HANG_GUARD)
            outcomes.append((proc.returncode, err.decode()))
        assert outcomes == [(0, "")] * REPEATED
    finally:
        for proc in procs:
            end(proc)


# --- 3: a stop signal while the tool imports its package --------------------------------

# On the tool's PYTHONPATH ahead of everything: at the instant the tool begins to import
# its own package (the audit event of the import, before the package's first line), the
# process sends itself the signal.  This is an instant of the launcher's own start,
# after its first instruction, chosen exactly.
SIGNAL_AT_IMPORT = """\
import os, sys

def _hook(event, args, _done=[]):
    if event == "import" and args[0].split(".")[0] == {package!r} and not _done:
        _done.append(1)
        os.kill(os.getpid(), {signum})

sys.addaudithook(_hook)
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_stop_signal_while_the_launcher_imports_the_package_ends_it_quietly(
        tool, signame, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        SIGNAL_AT_IMPORT.format(package="owca", signum=int(getattr(signal, signame))))
    env = tool_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env["PYTHONPATH"]])
    proc = spawn(argv(tool, tmp_path), env=env)
    try:
        out, err = proc.communicate(timeout=HANG_GUARD)
        assert (proc.returncode, out, err.decode()) == (0, b"", "")
    finally:
        end(proc)


def measure_start(runs: int) -> None:
    """Each stop signal sent at a random instant of the first 0.25 s of owca-detect,
    `runs` times: the outcomes counted (README.md, Exit status)."""
    for signame in ("SIGINT", "SIGTERM"):
        counts: dict = {}
        for _ in range(runs):
            proc = spawn(tool_command("detect"))
            time.sleep(random.uniform(0, 0.25))
            proc.send_signal(getattr(signal, signame))
            _, err = proc.communicate(timeout=HANG_GUARD)
            text = err.decode()
            kind = ("quiet" if not text else "Fatal Python error" if "Fatal Python" in text
                    else "traceback" if "Traceback" in text else text.splitlines()[0])
            counts[(proc.returncode, kind)] = counts.get((proc.returncode, kind), 0) + 1
        print(signame, sorted(counts.items(), key=lambda kv: -kv[1]))


# --- 4: --help and --version into a full device ------------------------------------------

@pytest.mark.parametrize("option", ["--help", "--version"])
@pytest.mark.parametrize("tool", TOOLS)
def test_help_into_a_full_device_is_one_line_and_exit_1(tool, option):
    with open("/dev/full", "wb") as full:
        result = subprocess.run(tool_command(tool, option), check=False, stdout=full,
                                stderr=subprocess.PIPE, env=tool_env(), cwd=ROOT,
                                timeout=HANG_GUARD)
    err = result.stderr.decode()
    assert result.returncode == 1, err
    assert err.startswith(f"owca-{tool}: error: ") and len(err.splitlines()) == 1, err
    assert "No space left on device" in err


# --- 5: a directory as standard input ----------------------------------------------------

@pytest.mark.parametrize("tool", ["measure", "detect"])
def test_a_directory_as_stdin_ends_the_tool_with_an_error_and_no_frame(tool):
    # The interpreter refuses it before the tool's first instruction (README.md): no
    # frame, and a status that is not success.
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = subprocess.run(tool_command(tool), check=False, stdin=fd, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=tool_env(), cwd=ROOT,
                                timeout=HANG_GUARD)
    finally:
        os.close(fd)
    assert result.returncode == 1 and result.stdout == b""
    assert b"is a directory" in result.stderr


# --- 6, 7: plug-ins that raise KeyboardInterrupt, SystemExit --------------------------

@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "SystemExit(0)", "SystemExit(3)"])
@pytest.mark.parametrize("tool", TOOLS)
def test_a_plugin_raising_base_exceptions_at_import_is_a_config_error(tool, raised, tmp_path):
    plugin = tmp_path / "plugin_raising.py"
    plugin.write_text(f"class X:\n    pass\n\nraise {raised}\n")
    proc = spawn(argv(tool, tmp_path, "-r", f"{plugin}:X"))
    try:
        _, err = proc.communicate(measurements_line(1), timeout=HANG_GUARD)
        text = err.decode()
        assert proc.returncode == 2, text
        assert len(text.splitlines()) == 1 and text.startswith(f"owca-{tool}: error: "), text
        assert f"{plugin}:4: " in text and f"-r {plugin}:X" in text
    finally:
        end(proc)


FAILING_DETECTOR = """\
from owca.plugin import AnomalyDetector

class FailingDetector(AnomalyDetector):
    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        if platform.metrics.get("seq_marker") == 2:
            raise {raised}
        return [], []
"""

FAILING_ALLOCATOR = """\
from owca.plugin import Allocator

class FailingAllocator(Allocator):
    reads_current_allocations = False

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        if platform.metrics.get("seq_marker") == 2:
            raise {raised}
        return {{}}, [], []
"""


def marked_line(seq: int) -> bytes:
    """A measurements frame whose platform tells the plug-in its cycle."""
    frame = json.loads(measurements_line(seq))
    frame["platform"]["seq_marker"] = seq
    return json.dumps(frame).encode() + b"\n"


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "KeyboardInterrupt()",
                                    "SystemExit(0)", "SystemExit(4)", "GeneratorExit"])
@pytest.mark.parametrize("tool", ["detect", "allocate"])
def test_a_plugin_raising_base_exceptions_costs_its_cycle_only(tool, raised, tmp_path):
    name, source = (("FailingDetector", FAILING_DETECTOR) if tool == "detect"
                    else ("FailingAllocator", FAILING_ALLOCATOR))
    plugin = tmp_path / "failing_plugin.py"
    plugin.write_text(source.format(raised=raised))
    config = tmp_path / "owca.yaml"
    config.write_text(f"{tool}:\n  {'detector' if tool == 'detect' else 'allocator'}: "
                      f"!{name}\n")
    proc = spawn(argv(tool, tmp_path, "-r", f"{plugin}:{name}", "-c", str(config)))
    try:
        out, err = proc.communicate(b"".join(marked_line(seq) for seq in (1, 2, 3)),
                                    timeout=HANG_GUARD)
        text = err.decode()
        assert proc.returncode == 0, text
        own = "anomalies" if tool == "detect" else "allocations"
        written = [json.loads(line) for line in out.splitlines()]
        cycles = [f for f in written if f["kind"] == own and not f.get("shutdown")]
        assert [f["seq"] for f in cycles] == [1, 2, 3]
        errors = {s["name"]: s["value"] for s in cycles[-1]["metrics"]
                  if s["name"].endswith("_errors_total") and s["labels"].get("stage") == tool}
        assert errors == {f"owca_{'detector' if tool == 'detect' else 'allocator'}"
                          f"_errors_total": 1}
        lines = text.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"owca-{tool}: error: cycle 2: {name} "
                                                       f"failed: "), text
        assert raised.split("(")[0] in lines[0]
    finally:
        end(proc)


# --- 8: plug-ins that print ------------------------------------------------------------

PRINTING_PLUGIN = """\
import os
import sys
print("PRINTED AT IMPORT")
os.write(1, b"WRITTEN TO FD 1 AT IMPORT\\n")

from owca.plugin import Allocator, AnomalyDetector

class PrintingDetector(AnomalyDetector):
    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        print("PRINTED IN DETECT", end="")
        sys.stdout.write("{half a frame")
        return [], []

class PrintingAllocator(Allocator):
    reads_current_allocations = False

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        print("PRINTED IN ALLOCATE")
        return {}, [], []

class X:
    pass
"""


@pytest.mark.parametrize("tool", TOOLS)
def test_what_a_plugin_prints_goes_to_stderr_not_into_the_stream(tool, tmp_path):
    plugin = tmp_path / "printing_plugin.py"
    plugin.write_text(PRINTING_PLUGIN)
    args = ["-r", f"{plugin}:X"]
    if tool in ("detect", "allocate"):
        name = "PrintingDetector" if tool == "detect" else "PrintingAllocator"
        config = tmp_path / "owca.yaml"
        config.write_text(f"{tool}:\n  {'detector' if tool == 'detect' else 'allocator'}: "
                          f"!{name}\n")
        args = ["-r", f"{plugin}:{name}", "-c", str(config)]
    if tool == "discover":
        args += ["--once"]
    stdin = b"" if tool == "discover" else \
        b"".join(tasks_line(s) if tool == "measure" else measurements_line(s) for s in (1, 2))
    proc = spawn(argv(tool, tmp_path, *args))
    try:
        out, err = proc.communicate(stdin, timeout=HANG_GUARD)
    finally:
        end(proc)
    assert proc.returncode == 0, err
    for text in (b"PRINTED AT IMPORT", b"WRITTEN TO FD 1 AT IMPORT"):
        assert text not in out and text in err
    if tool == "ship":
        check_exposition(out)
        assert out.count(b"# owca metrics ") == 2
    else:
        written = [json.loads(line) for line in out.splitlines()]
        assert written and all(isinstance(f, dict) and "kind" in f for f in written)
    if tool == "detect":
        assert b"PRINTED IN DETECT" in err and b"{half a frame" in err
    if tool == "allocate":
        assert err.count(b"PRINTED IN ALLOCATE") == 2


if __name__ == "__main__":
    measure_start(int(sys.argv[1]) if len(sys.argv) > 1 else 50)
