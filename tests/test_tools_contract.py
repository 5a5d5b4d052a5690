"""The pipe contract of every tool, run as real processes.

Bad lines are reported in one line with their number, counted and skipped;
unknown kinds and versions are forwarded unchanged; a closed stdout, EOF,
SIGTERM and SIGINT end a tool cleanly; usage and configuration errors exit 2.
"""
import json
import os
import signal
import subprocess

import pytest

from cgroup_helpers import kill
from conftest import ROOT, load_tool, tool_command, tool_env
from owca.core import frames

FILTERS = ("measure", "detect", "allocate", "ship")
CONSUMED = {"measure": "tasks", "detect": "measurements", "allocate": "measurements",
            "ship": "measurements"}


def run(tool, args=(), stdin=b"", timeout=60):
    return subprocess.run(tool_command(tool, *args), input=stdin, capture_output=True,
                          env=tool_env(), timeout=timeout, cwd=ROOT)


def measurements_line(seq=1, ntasks=2):
    tasks = {f"t{i}": {"name": f"t{i}", "labels": {"priority": "be"}, "resources": {},
                       "metrics": {"task_cpu_usage_seconds": 1.0 + i, "task_up": 1}}
             for i in range(ntasks)}
    return frames.encode(frames.measurements_frame(
        seq, {"platform_topology_cpus": 2}, tasks, ts=1700000000.0 + seq, host="n1"))


def tasks_line(seq=1):
    return frames.encode(frames.tasks_frame(seq, [], ts=1700000000.0 + seq, host="n1"))


def good_line(tool, seq):
    return tasks_line(seq) if CONSUMED[tool] == "tasks" else measurements_line(seq)


def own_counters(tool, stdout: bytes) -> dict:
    """The stage's own owca_* counters from the last frame it wrote (or shipped)."""
    if tool == "ship":
        text = stdout.decode()
        found = {}
        for line in text.splitlines():
            for name in ("owca_bad_frames_total", "owca_frames_read_total",
                         "owca_skipped_frames_total"):
                if line.startswith(name + "{") and 'stage="ship"' in line:
                    found[name] = float(line.split()[1])
        return found
    last = json.loads(stdout.splitlines()[-1])
    return {s["name"]: s["value"] for s in last["metrics"]
            if s.get("labels", {}).get("stage") == tool}


@pytest.mark.parametrize("tool", FILTERS)
def test_bad_lines_are_reported_counted_and_skipped(tool):
    unknown_kind = b'{"v":1,"kind":"gossip","ts":1,"host":"n1","seq":1,"x":[1]}\n'
    unknown_version = b'{"v":9,"kind":"measurements","future":true}\n'
    stdin = b"".join([
        b"this is not json\n",                                  # line 1
        good_line(tool, 1),                                     # line 2
        b'{"v":1,"kind":"' + CONSUMED[tool].encode() + b'","ts":1,"host":"n","seq":2}\n',
        unknown_kind,                                           # line 4
        unknown_version,                                        # line 5
        b"[]\n",                                                # line 6
        good_line(tool, 3),                                     # line 7
    ])
    result = run(tool, stdin=stdin)
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.decode().splitlines() if ": error: " in line]
    assert errors[0].startswith(f"owca-{tool}: error: line 1: invalid JSON")
    assert errors[1].startswith(f"owca-{tool}: error: line 3: field ")
    assert errors[2].startswith(f"owca-{tool}: error: line 6: a frame is a JSON object")
    assert len(errors) == 3
    counters = own_counters(tool, result.stdout)
    assert counters["owca_bad_frames_total"] == 3
    assert counters["owca_frames_read_total"] == 7
    if tool == "ship":
        assert counters["owca_skipped_frames_total"] == 2  # the sink cannot store them
    else:
        out = result.stdout.splitlines(keepends=True)
        assert unknown_kind in out and unknown_version in out  # forwarded byte for byte


@pytest.mark.parametrize("tool", FILTERS)
def test_strict_makes_a_bad_line_fatal(tool):
    result = run(tool, ["--strict"], stdin=good_line(tool, 1) + b"{oops\n" + good_line(tool, 2))
    assert result.returncode == 1
    assert result.stderr.decode().strip().splitlines()[-1].startswith(
        f"owca-{tool}: error: line 2: invalid JSON")


@pytest.mark.parametrize("tool", ("detect", "ship"))
def test_huge_and_truncated_lines(tool):
    huge = b'{"v":1,"kind":"measurements","pad":"' + b"x" * (frames.MAX_FRAME_BYTES + 10) + b'"}\n'
    stdin = huge + good_line(tool, 1) + good_line(tool, 2)[:40]
    result = run(tool, stdin=stdin)
    assert result.returncode == 0
    errors = [line for line in result.stderr.decode().splitlines() if ": error: " in line]
    assert errors == [
        f"owca-{tool}: error: line 1: frame exceeds the limit of {frames.MAX_FRAME_BYTES} bytes",
        f"owca-{tool}: error: line 3: truncated frame: input ended without a newline"]
    assert len(result.stdout) < 1_000_000  # the huge line was dropped, not forwarded


def test_empty_lines_are_skipped_silently_and_end_a_half_frame():
    half = measurements_line(1)[:50]  # a writer killed in mid-frame
    stdin = b"\n" + half + b"\n" + measurements_line(2) + b"  \n"
    result = run("detect", stdin=stdin)
    assert result.returncode == 0
    errors = [line for line in result.stderr.decode().splitlines() if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("owca-detect: error: line 2: invalid JSON")
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(f["kind"], f["seq"]) for f in out] == [("measurements", 2), ("anomalies", 2)]
    counters = own_counters("detect", result.stdout)
    assert counters["owca_frames_read_total"] == 2 and counters["owca_bad_frames_total"] == 1


def test_forwarding_keeps_bytes_of_frames_not_consumed():
    # (not an anomalies frame: owca-detect makes its own and drops a recording's, see
    # tests/test_detect.py)
    other = [b'{"v":1,"kind":"tasks","ts":1,"host":"h","seq":1,"tasks":[]}\n',
             b'{"kind":"allocations","v":1,"ts":1,"host":"h","seq":1,"allocations":{}}\n']
    result = run("detect", stdin=b"".join(other))
    assert result.stdout.splitlines(keepends=True) == other


def test_detect_writes_input_then_its_anomalies_frame():
    line = measurements_line(5)
    result = run("detect", stdin=line)
    out = result.stdout.splitlines(keepends=True)
    assert out[0] == line
    anomalies = json.loads(out[1])
    assert anomalies["kind"] == "anomalies" and anomalies["seq"] == 5
    assert anomalies["ts"] == json.loads(line)["ts"] and anomalies["anomalies"] == []


@pytest.mark.parametrize("tool", FILTERS)
def test_closed_stdout_ends_quietly(tool):
    # Many frames into a reader that leaves after the first line.
    stdin = b"".join(good_line(tool, i) for i in range(1, 3000))
    producer = subprocess.Popen(tool_command(tool), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    head = subprocess.Popen(["head", "-c", "10"], stdin=producer.stdout,
                            stdout=subprocess.DEVNULL)
    producer.stdout.close()
    try:
        producer.stdin.write(stdin)
        producer.stdin.close()
    except BrokenPipeError:
        pass  # it may be gone before we finish writing
    assert producer.wait(60) == 0
    head.wait(10)
    stderr = producer.stderr.read().decode()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr


def test_discover_into_head_ends_quietly(tmp_path):
    result = subprocess.run(
        " ".join(tool_command("discover", "--interval", "0.05", "--cgroupfs", str(tmp_path)))
        + " | head -1", shell=True, capture_output=True, env=tool_env(), timeout=60)
    assert result.returncode == 0
    assert json.loads(result.stdout)["kind"] == "tasks"
    assert b"Traceback" not in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("tool", ("detect", "ship"))
def test_signals_end_the_stream_cleanly(tool, signum):
    proc = subprocess.Popen(tool_command(tool), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=tool_env())
    proc.stdin.write(measurements_line(1))
    proc.stdin.flush()
    first = proc.stdout.readline()  # the stage has processed the frame
    assert first
    proc.send_signal(signum)
    assert proc.wait(20) == 0
    assert b"Traceback" not in proc.stderr.read()
    proc.stdin.close()


def test_discover_stops_on_sigterm_between_cycles(tmp_path):
    # An interval of an hour: a tool that slept it out would outlast the guard on the
    # wait many times over, however loaded the machine.  How soon it stops is
    # benchmarks/discover_stop.py's figure, not this test's.
    proc = subprocess.Popen(tool_command("discover", "--interval", "3600", "--cgroupfs",
                                         str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    try:
        assert json.loads(proc.stdout.readline())["seq"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        kill(proc)  # SIGKILL only if it still runs (a failed test); reaped, pipes closed


@pytest.mark.parametrize("tool", ("discover",) + FILTERS)
def test_usage_and_config_errors_exit_2_with_one_line(tool, tmp_path):
    result = run(tool, ["--no-such-option"])
    assert result.returncode == 2
    assert result.stderr.decode().startswith(f"owca-{tool}: usage error:")
    assert len(result.stderr.decode().strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{tool}:\n  nonsense_field: 1\n")
    result = run(tool, ["--config", str(bad)])
    assert result.returncode == 2
    message = result.stderr.decode().strip()
    assert message.startswith(f"owca-{tool}: error: {bad}:2: ") and "nonsense_field" in message
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("tool", ("discover",) + FILTERS)
def test_help_is_the_docstring_with_sections_and_an_example(tool, capsys):
    module = load_tool(tool)
    assert module.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == module.__doc__.strip()
    for section in ("Usage:", "Options:", "Input:", "Output:", "Exit status:", "Examples:"):
        assert section in out
    for option in ("--once", "--interval", "--config", "--log-level"):
        assert option in out


def test_once_processes_one_frame_and_exits():
    result = run("detect", ["--once"], stdin=measurements_line(1) + measurements_line(2))
    kinds = [json.loads(line)["kind"] for line in result.stdout.splitlines()]
    assert kinds == ["measurements", "anomalies"]


def test_replaying_a_recording_twice_gives_identical_output(tmp_path):
    recording = os.path.join(ROOT, "tests", "fixtures", "recorded_stream", "stream.jsonl")
    outputs = []
    for _ in range(2):
        with open(recording, "rb") as f:
            detect = subprocess.Popen(tool_command("detect", "--no-timing"), stdin=f,
                                      stdout=subprocess.PIPE, env=tool_env())
            ship = subprocess.run(tool_command("ship", "--no-timing"), stdin=detect.stdout,
                                  capture_output=True, env=tool_env(), timeout=120)
            detect.stdout.close()
            assert detect.wait(60) == 0 and ship.returncode == 0
            outputs.append(ship.stdout)
    assert outputs[0] == outputs[1]
    # Frames keep their names; the exposition has the Prometheus ones.
    assert b"task_cpu_usage_seconds_total{" in outputs[0] and b"anomalies{" in outputs[0]


def test_ship_leaves_out_and_counts_values_that_are_not_numbers():
    frame = frames.measurements_frame(
        1, {"platform_topology_cpus": 2},
        {"t1": {"name": "t1", "metrics": {"task_up": 1, "task_cpu_usage_seconds": "fast",
                                          "task_mem_usage_bytes": True,
                                          "task_mem_numa_pages": {"0": None, "1": 7}}}},
        ts=1.0, host="n1")
    result = run("ship", stdin=frames.encode(frame) + frames.encode(dict(frame, seq=2)))
    assert result.returncode == 0
    text = result.stdout.decode()
    assert 'task_mem_numa_pages{host="n1",task_id="t1",task_name="t1",numa_node="1"} 7' in text
    assert "task_cpu_usage_seconds_total{" not in text and "task_mem_usage_bytes{" not in text
    counts = [line for line in text.splitlines() if line.startswith("owca_ship_bad_values_total")]
    assert [float(line.split()[1]) for line in counts] == [0, 3]  # as of before each cycle
    assert "cycle 1: 3 metric values are not finite numbers" in result.stderr.decode()


@pytest.mark.parametrize("tool", ("discover",) + FILTERS)
def test_check_config_loads_the_configuration_and_runs_nothing(tool, tmp_path):
    """What the Ansible role runs on each stage's file before installing it."""
    good = run(tool, ["--check-config", "--config", os.path.join(ROOT, "configs",
                                                                 "node-systemd.yaml")],
               stdin=measurements_line(1))
    assert (good.returncode, good.stdout, good.stderr) == (0, b"", b"")
    bad = tmp_path / f"{tool}.yaml"
    bad.write_text(f"# {tool}\n{tool}:\n  interval: 5\n  no_such_field: 1\n")
    result = run(tool, ["--check-config", "--config", str(bad)])
    assert result.returncode == 2 and result.stdout == b""
    (line,) = result.stderr.decode().splitlines()
    assert line.startswith(f"owca-{tool}: error: {bad}:4: ") and "no_such_field" in line
