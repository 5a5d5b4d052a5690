"""Every row of tests/contract_cases.py on every tool it names, as real processes.

What a row expects is the README's contract (Exit status) and docs/protocol.md's
bad-line policy: the exit status, the first line of stderr (never a traceback), and
the effect on the stream.  A deadline on each process is only a guard against a hang.
"""
import json
import os
import random
import re
import signal
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import (ROOT, blocked_writing, tool_command, tool_env, wait_for,
                      wchan_missing)
from contract_cases import CASES, GOOD, GOOD2, PIPELINE_SECONDS, REPEATS
from test_tools_contract import measurements_line, own_counters, tasks_line

HANG_GUARD = 120  # seconds: only ever reached by a tool that hangs
OUTPUT_KIND = {"discover": "tasks", "measure": "measurements", "detect": "anomalies",
               "allocate": "allocations"}
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def cases():
    for case in CASES:
        for tool in case["tools"]:
            yield pytest.param(case, tool, id=f"{tool}: {case['id']}")


@pytest.mark.unit
def test_the_table_covers_every_tool_and_item():
    tools = {tool for case in CASES for tool in case["tools"]}
    assert tools == {"discover", "measure", "detect", "allocate", "ship"}
    assert len({case["id"] for case in CASES}) == len(CASES)


class Row:
    """A row made concrete for one tool in a temporary directory."""

    def __init__(self, case, tool, tmp_path):
        self.case, self.tool = case, tool
        self.dir = tmp_path / "empty"
        self.dir.mkdir()
        self.values = {"{tool}": f"owca-{tool}", "{dir}": str(self.dir),
                       "{config}": str(tmp_path / "owca.yaml"),
                       "{plugin}": str(tmp_path / "plugin_for_test.py")}
        self.values["{now}"] = repr(time.time())
        config = case["config"]
        if config is not None:
            raw = config if isinstance(config, bytes) else config.encode()
            raw = self.fill(raw.decode("latin-1").replace("{section}", tool)).encode("latin-1")
            (tmp_path / "owca.yaml").write_bytes(raw)
        for path, text in case["files"].items():
            with open(self.fill(path), "w") as f:
                f.write(self.fill(text))
        if case["plugin"] is not None:
            (tmp_path / "plugin_for_test.py").write_text(self.fill(case["plugin"]))

    def fill(self, text: str, escape=False) -> str:
        for key, value in self.values.items():
            text = text.replace(key, re.escape(value) if escape else value)
        return text

    def argv(self, args=None, tool=None) -> list:
        args = self.case["args"] if args is None else args
        if isinstance(args, dict):
            args = args.get(self.tool, args.get("*", []))
        return tool_command(tool or self.tool, *[self.fill(a) for a in args])

    def stdin(self) -> bytes:
        good = tasks_line if self.tool == "measure" else measurements_line
        tokens = {GOOD: lambda: good(1), GOOD2: lambda: good(2)}
        return b"".join(tokens[item]() if isinstance(item, str) else item
                        for item in self.case["stdin"])


def spawn(argv, close=(), **kwargs):
    """A tool with some of its descriptors 0-2 closed, as a shell's `<&-` does."""
    if close:
        fds = [{"stdin": 0, "stdout": 1, "stderr": 2}[name] for name in close]

        def preexec():
            for fd in fds:
                os.close(fd)
        kwargs["preexec_fn"] = preexec
    return subprocess.Popen(argv, env=tool_env(), cwd=ROOT, **kwargs)


def run_plain(row: Row):
    close = row.case["close"]
    proc = spawn(row.argv(), close,
                 stdin=None if "stdin" in close else subprocess.PIPE,
                 stdout=None if "stdout" in close else subprocess.PIPE,
                 stderr=None if "stderr" in close else subprocess.PIPE)
    out, err = proc.communicate(row.stdin() if "stdin" not in close else None,
                                timeout=HANG_GUARD)
    return proc.returncode, out or b"", err or b""


def handler_installed(pid: int) -> bool:
    """True once the process catches SIGTERM: its first instruction has run."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & SIGTERM_BIT)
    except FileNotFoundError:
        pass
    return False


def run_starting(row: Row, signum):
    """REPEATS starts, each signalled at a random instant after its first instruction."""
    results = []
    for _ in range(REPEATS):
        proc = spawn(row.argv(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + HANG_GUARD
        while not handler_installed(proc.pid) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(random.uniform(0, 0.3))
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=HANG_GUARD)
        results.append((proc.returncode, err))
    # Every start must give the documented status and message: report the first that
    # does not, else the last.
    for rc, err in results:
        if rc != row.case["rc"] or err:
            return rc, b"", err
    return results[-1][0], b"", results[-1][1]


def run_importing(row: Row, signum):
    """The signal while the tool imports a plug-in that sleeps: a deterministic instant
    of its start, after its first instruction and before its loop."""
    proc = spawn(row.argv(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE)
    marker = row.dir / "importing"
    deadline = time.monotonic() + HANG_GUARD
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, b"", err


def run_stalled(row: Row, signum):
    """The tool's stdout is a pipe nobody reads; input is fed until the tool is blocked
    writing to it, then the signal comes."""
    if wchan_missing():
        pytest.skip(wchan_missing())
    both = len(row.case["signal"]) > 2
    if both:  # a stderr whose reader stalled too: a pipe filled before the tool starts
        stuck_r, stuck_w = os.pipe()
        os.set_blocking(stuck_w, False)
        try:
            while os.write(stuck_w, b"x" * 4096):
                pass
        except BlockingIOError:
            pass
        os.set_blocking(stuck_w, True)
    proc = spawn(row.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=stuck_w if both else subprocess.PIPE)
    if both:
        os.close(stuck_w)
    os.set_blocking(proc.stdin.fileno(), False)
    good = tasks_line if row.tool == "measure" else measurements_line
    pending, seq = b"", 0
    deadline = time.monotonic() + HANG_GUARD
    while not blocked_writing(proc.pid) and time.monotonic() < deadline:
        if row.tool != "discover":
            if not pending:
                seq += 1
                pending = good(seq, 20) if row.tool != "measure" else good(seq)
            try:
                pending = pending[os.write(proc.stdin.fileno(), pending):]
            except BlockingIOError:
                pass
        time.sleep(0.002)
    assert blocked_writing(proc.pid), "the tool never blocked on its output"
    proc.send_signal(signum)
    try:
        rc = proc.wait(HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if both:
        os.close(stuck_r)
    err = b"" if both else proc.stderr.read()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return rc, b"", err


def run_running(row: Row, signum):
    proc = spawn(row.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    proc.stdin.write(row.stdin())
    proc.stdin.flush()
    first = proc.stdout.readline()
    assert first, "the tool wrote nothing"
    proc.send_signal(signum)
    rc = proc.wait(HANG_GUARD)
    err = proc.stderr.read()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    return rc, first, err


def run_pipeline(row: Row):
    """Upstream tools piped into the tool for at least PIPELINE_SECONDS (the window in
    which a wrong warning would come) and until the tool wrote what the row expects to
    find (a bounded wait, however slowly the pipeline starts), then SIGTERM to all."""
    procs, upstream_out = [], None
    for command in row.case["upstream"]:
        proc = spawn(row.argv(command[1:], tool=command[0]), stdin=upstream_out or
                     subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        if upstream_out is not None:
            upstream_out.close()
        upstream_out = proc.stdout
        procs.append(proc)
    tool = spawn(row.argv(), stdin=upstream_out, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    upstream_out.close()
    out, err = bytearray(), bytearray()
    readers = [threading.Thread(target=drain, args=(stream, into), daemon=True)
               for stream, into in ((tool.stdout, out), (tool.stderr, err))]
    for reader in readers:
        reader.start()
    time.sleep(PIPELINE_SECONDS)
    needles = row.case["stream"].get("contains", ())
    wait_for(lambda: all(needle in out for needle in needles) or tool.poll() is not None,
             HANG_GUARD, f"{needles} in the output of owca-{row.tool}")
    for proc in procs + [tool]:
        proc.send_signal(signal.SIGTERM)
    tool.wait(HANG_GUARD)
    for reader in readers:
        reader.join(HANG_GUARD)
    tool.stdout.close()
    tool.stderr.close()
    for proc in procs:
        proc.wait(HANG_GUARD)
    return tool.returncode, bytes(out), bytes(err)


def drain(stream, into: bytearray) -> None:
    """Everything `stream` gives until its end, appended to `into` as it comes."""
    while True:
        chunk = os.read(stream.fileno(), 65536)
        if not chunk:
            return
        into.extend(chunk)


def run(row: Row):
    sig = row.case["signal"]
    if row.case["upstream"]:
        return run_pipeline(row)
    if sig is None:
        return run_plain(row)
    signum = getattr(signal, sig[0])
    return {"starting": run_starting, "importing": run_importing, "stalled": run_stalled,
            "running": run_running}[sig[1]](row, signum)


def cycles(tool: str, out: bytes) -> int:
    if tool == "ship":
        return out.count(b"# owca metrics ")
    frames_ = [json.loads(line) for line in out.splitlines()]
    # owca-allocate's last frame when it stops (`shutdown`) is no cycle of its own
    return sum(1 for f in frames_ if f["kind"] == OUTPUT_KIND[tool] and not f.get("shutdown"))


def counters(tool: str, out: bytes) -> dict:
    """The tool's own owca_* counters as of its last cycle."""
    if tool != "ship":
        return own_counters(tool, out)
    found = {}
    for m in re.finditer(r'^(owca_\w+)\{[^}]*stage="ship"[^}]*\} (\S+)', out.decode(), re.M):
        found[m.group(1)] = float(m.group(2))
    return found


def check_exposition(out: bytes) -> None:
    """Each block parses as Prometheus text, and no line is out of the format."""
    sample = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+( \d+)?$")
    for line in out.decode().splitlines():
        assert line.startswith("# ") or sample.match(line), f"not exposition: {line!r}"
    for block in out.decode().split("# owca ")[1:]:
        list(text_string_to_metric_families(block.split("\n", 1)[1]))


@pytest.mark.parametrize("case, tool", list(cases()))
def test_contract(case, tool, tmp_path):
    row = Row(case, tool, tmp_path)
    rc, out, err = run(row)
    text = err.decode(errors="replace")
    assert "Traceback" not in text, text
    assert rc == case["rc"], f"exit status {rc}, expected {case['rc']}; stderr: {text[:2000]}"
    if case["stderr"] is None:
        assert text == "", text
    else:
        first = text.splitlines()[0] if text else ""
        assert re.match(row.fill(case["stderr"], escape=True), first), \
            f"first stderr line {first!r} does not match {case['stderr']!r}"
    expected = case["stream"]
    if "cycles" in expected:
        assert cycles(tool, out) == expected["cycles"], out[:2000]
    for needle in expected.get("contains", ()):
        assert needle in out, f"{needle!r} not in stdout"
    for needle in expected.get("absent", ()):
        assert needle not in out, f"{needle!r} in stdout"
    if expected.get("counters"):
        found = counters(tool, out)
        for name, value in expected["counters"].items():
            assert found.get(name, 0) == value, f"{name}: {found}"
    if expected.get("exposition"):
        check_exposition(out)
