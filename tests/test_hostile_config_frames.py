"""Hostile configuration files and hostile frames, given to the real tools.

A configuration that could exhaust the loader (an alias bomb, a recursive alias, an
endless or huge file, a FIFO without a writer, nesting thousands deep, a key that is
a list) is a configuration error: exit 2, `file:line: reason`, at once.  A line that
could upset a stage downstream (nesting thousands deep, a lone surrogate, NaN, a
cgroup path with `..`) is a bad line at the reader: reported, counted, skipped, and
the stream goes on (docs/protocol.md).
"""
import json
import os
import resource
import subprocess

import pytest

from conftest import tool_command, tool_env
from owca.core import config, frames
from test_tools_contract import CONSUMED, FILTERS, good_line, measurements_line, own_counters
from test_tools_contract import run as run_tool

# A guard against a hang, not a timing goal: each of these runs ends in well under it.
GUARD = 120


def run(tool, args=(), stdin=b""):
    return run_tool(tool, args, stdin=stdin, timeout=GUARD)


def one_error(result, tool, only_line=True) -> str:
    """The one error line on stderr (the only line, unless only_line is false), without
    its prefix."""
    lines = result.stderr.decode().splitlines()
    if not only_line:
        lines = [line for line in lines if ": error: " in line]
    assert len(lines) == 1, result.stderr.decode()[-2000:]
    assert lines[0].startswith(f"owca-{tool}: error: "), lines[0]
    return lines[0][len(f"owca-{tool}: error: "):]


def check_config(path, tool="detect", stdin=None, limit_memory=False):
    """`owca-<tool> --check-config -c path`, as the Ansible role runs it."""
    def at_most_a_gib():  # without the fix /dev/zero would take the machine's memory
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    return subprocess.run(tool_command(tool, "--check-config", "-c", str(path)),
                          stdin=stdin if stdin is not None else subprocess.DEVNULL, check=False,
                          capture_output=True, env=tool_env(), timeout=GUARD,
                          preexec_fn=at_most_a_gib if limit_memory else None)


# -- configuration -----------------------------------------------------------------------

BILLION_LAUGHS = "".join(
    ["x: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"] +
    [f"y{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)])


@pytest.mark.parametrize("text, line", [
    ("detect:\n  interval: 5\n  detector: &a [*a]\n", 3),                   # recursive
    ("detect:\n  interval: 5\n" + "".join("  " + row for row in BILLION_LAUGHS.splitlines(True)),
     4),                                                                     # 9**10 "lol"s
    ("detect: {interval: &i 5, detector: !NOPAnomalyDetector {}}\n"
     "allocate: {interval: *i}\n", 2),                                      # a plain alias
], ids=["recursive", "billion-laughs", "plain"])
def test_a_yaml_alias_is_a_configuration_error(tmp_path, text, line):
    path = tmp_path / "alias.yaml"
    path.write_text(text)
    result = check_config(path)
    assert result.returncode == 2
    reason = one_error(result, "detect")
    assert reason.startswith(f"{path}:{line}: ") and "alias" in reason, reason


def test_a_configuration_larger_than_the_limit_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    comment = "# " + "x" * 1021 + "\n"  # 1 KiB a line
    path.write_text("detect:\n  interval: 5\n" + comment * 1024)  # valid YAML, over 1 MiB
    result = check_config(path)
    assert result.returncode == 2
    reason = one_error(result, "detect")
    assert reason.startswith(f"{path}: ") and f"{config.MAX_CONFIG_BYTES}" in reason, reason
    path.write_text("detect:\n  interval: 5\n" + comment * 1000)  # under it: fine
    assert check_config(path).returncode == 0


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_a_device_as_configuration_is_refused(path):
    result = check_config(path, limit_memory=True)
    assert result.returncode == 2
    reason = one_error(result, "detect")
    assert reason.startswith(f"{path}: not a regular file"), reason


def test_a_fifo_without_a_writer_as_configuration_is_refused_at_once(tmp_path):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    result = check_config(fifo)  # opening it for reading used to wait for a writer for ever
    assert result.returncode == 2
    reason = one_error(result, "detect")
    assert reason.startswith(f"{fifo}: not a regular file"), reason


def test_dev_stdin_redirected_from_a_file_is_a_configuration(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("discover:\n  interval: 5\n")
    with open(path, "rb") as f:
        result = check_config("/dev/stdin", tool="discover", stdin=f)
    assert (result.returncode, result.stderr) == (0, b"")


@pytest.mark.parametrize("text, line", [
    ("detect:\n  interval: 5\n  ? [a, b]\n  : 1\n", 3),
    ("detect:\n  detector: !ContentionDetector\n    priority: !PriorityRule {[1]: 2}\n", 3),
    ("detect:\n  interval: 5\n? {a: 1}\n: 1\n", 3),
    ("discover:\n  source: !CgroupDiscovery\n    labels: {[x]: y}\n", 3),
], ids=["section", "tag", "root", "dict-field"])
def test_a_key_that_is_not_a_scalar_is_a_configuration_error(tmp_path, text, line):
    path = tmp_path / "key.yaml"
    path.write_text(text)
    tool = text.split(":", 1)[0]
    result = check_config(path, tool=tool)
    assert result.returncode == 2
    reason = one_error(result, tool)
    assert reason.startswith(f"{path}:{line}: ") and "key" in reason, reason


@pytest.mark.parametrize("style", ["flow", "block"])
def test_yaml_nested_thousands_deep_is_a_configuration_error(tmp_path, style):
    path = tmp_path / "deep.yaml"
    if style == "flow":
        path.write_text("detect:\n  interval: 5\n  x: " + "[" * 10000 + "]" * 10000 + "\n")
    else:
        path.write_text("detect:\n  interval: 5\n  x:\n" +
                        "".join("  " * (i + 2) + "-\n" for i in range(600)))
    result = check_config(path)
    assert result.returncode == 2
    reason = one_error(result, "detect")
    assert reason.startswith(f"{path}:") and f"deeper than {config.MAX_DEPTH}" in reason, reason
    # The line where it went too deep: the third level starts on line 3 or 4.
    line = int(reason[len(str(path)) + 1:].split(":")[0])
    assert line == (3 if style == "flow" else 4 + config.MAX_DEPTH - 2), reason


def test_yaml_nested_to_the_limit_is_read(tmp_path):
    path = tmp_path / "deep.yaml"
    for levels, too_deep in ((config.MAX_DEPTH, False), (config.MAX_DEPTH + 1, True)):
        # the mapping of sections, the section's mapping, then lists in lists
        lists = levels - 2
        path.write_text("ship:\n  storages: " + "[" * lists + "]" * lists + "\n")
        result = check_config(path, tool="ship")
        assert result.returncode == 2
        reason = one_error(result, "ship")
        # At the limit what stops it is the schema (a list of storages), not the depth.
        assert ("deeper than" in reason) == too_deep, reason


# -- frames --------------------------------------------------------------------------------

def with_field(line: bytes, text: bytes) -> bytes:
    """The frame of `line` with one more field, given as JSON text."""
    assert line.endswith(b"}\n")
    return line[:-2] + b',"x":' + text + b"}\n"


def deep(levels: int) -> bytes:
    """JSON text nesting `levels` deep, objects and arrays in turn."""
    opening = [b'{"a":' if i % 2 == 0 else b"[" for i in range(levels)]
    closing = [b"}" if i % 2 == 0 else b"]" for i in reversed(range(levels))]
    return b"".join(opening) + b"1" + b"".join(closing)


def bad_lines(tool):
    good = good_line(tool, 2)
    out = {
        "nested 10000 deep": (with_field(good, deep(10000)), "nested deeper than"),
        "nested one too deep": (with_field(good, deep(frames.MAX_DEPTH)), "nested deeper than"),
        "lone surrogate in host": (good.replace(b'"host":"n1"', b'"host":"\\ud800"'),
                                   "surrogate"),
        "NaN": (with_field(good, b"[1, NaN]"), "NaN"),
        "-Infinity": (with_field(good, b"{\"y\": -Infinity}"), "-Infinity"),
    }
    if CONSUMED[tool] == "measurements":
        out.update({
            "lone surrogate in a label": (good.replace(b'"be"', b'"x\\udc00y"', 1),
                                          "surrogate"),
            "NaN metric value": (good.replace(b'"task_up":1', b'"task_up":NaN', 1), "NaN"),
            "Infinity metric value": (good.replace(b'"task_up":1', b'"task_up":Infinity', 1),
                                      "Infinity"),
            "cgroup path with ..": (good.replace(b'"name":"t0"',
                                                 b'"name":"t0","cgroup_path":"/owca/../etc"', 1),
                                    "cgroup_path"),
        })
    return out


CASES = [(tool, case) for tool in FILTERS for case in bad_lines(tool)]


@pytest.mark.parametrize("tool, case", CASES, ids=[f"{t}: {c}" for t, c in CASES])
def test_a_hostile_line_is_a_bad_line_and_the_stream_goes_on(tool, case):
    bad, reason = bad_lines(tool)[case]
    assert json.loads(good_line(tool, 2))  # what it was made from is a frame
    result = run(tool, stdin=good_line(tool, 1) + bad + good_line(tool, 3))
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    error = one_error(result, tool, only_line=False)
    assert error.startswith("line 2: ") and reason in error, error
    counters = own_counters(tool, result.stdout)
    assert counters["owca_bad_frames_total"] == 1 and counters["owca_frames_read_total"] == 3
    if tool == "ship":
        assert 'host="n1"' in result.stdout.decode()
        return
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["seq"] for f in out if f["kind"] == "measurements"] == [1, 3]
    if tool == "allocate":  # a clean stop: everything restored, then the last frame
        assert out[-1]["kind"] == "allocations" and out[-1]["shutdown"] is True


@pytest.mark.parametrize("tool", ("detect", "allocate"))
@pytest.mark.parametrize("token", ("NaN", "Infinity", "-Infinity"))
def test_strict_refuses_nan_and_infinities(tool, token):
    bad = measurements_line(2).replace(b'"task_up":1', b'"task_up":' + token.encode(), 1)
    result = run(tool, ["--strict"], stdin=measurements_line(1) + bad + measurements_line(3))
    assert result.returncode == 1
    last = result.stderr.decode().splitlines()[-1]
    assert last.startswith(f"owca-{tool}: error: line 2: {token} is not a JSON number"), last


@pytest.mark.parametrize("tool", FILTERS)
def test_a_frame_nested_to_the_limit_is_a_frame(tool):
    line = with_field(good_line(tool, 1), deep(frames.MAX_DEPTH - 1))  # the frame is one
    assert frames.nesting_depth(line) == frames.MAX_DEPTH
    result = run(tool, ["--strict"], stdin=line)
    assert result.returncode == 0 and b"error" not in result.stderr, result.stderr


@pytest.mark.parametrize("text, depth", [
    (b'{"a":"[[[[[[[[[["}', 1),
    (b'{"a\\\\":"\\"{{{{{{","b":[[1]]}', 3),
    (b'{"a":"\\\\","b":"]]]","c":{"d":"[[["}}', 2),
    (b'["\\u005b\\"[", ["x\\\\\\"}"], "}"]', 2),
    (b"[]", 1),
    (b'"[[["', 0),
])
def test_nesting_depth_counts_containers_not_brackets_in_strings(text, depth):
    json.loads(text)
    assert frames.nesting_depth(text) == depth


@pytest.mark.parametrize("text", [
    b'{"x":"\\ud83d\\ude00"}',           # a pair: one character, U+1F600
    b'{"x":"\\\\ud800"}',                # a backslash, then the letters ud800
    b'{"x":"\\u00e9\\u2603"}',
])
def test_escapes_that_are_characters_are_kept(text):
    assert frames.parse(text) == json.loads(text)


@pytest.mark.parametrize("text", [
    b'{"x":"\\ud800"}', b'{"x":"\\udfff"}', b'{"x":"a\\ud83d"}', b'{"\\ude00":1}',
    b'{"x":"\\\\\\ud800"}', b'{"x":["\\ude00\\ud83d"]}',
])
def test_lone_surrogates_are_refused(text):
    with pytest.raises(frames.FrameError, match="surrogate"):
        frames.parse(text)
