"""Hostile configuration files, given to the real tools.

A configuration that could exhaust the loader (an alias bomb, a recursive alias, an
endless or huge file, a FIFO without a writer, nesting thousands deep, a key that is
a list) is a configuration error: exit 2, `file:line: reason`, at once.
"""
import os
import resource
import subprocess

import pytest

from conftest import tool_command, tool_env
from owca.core import config

# A guard against a hang, not a timing goal: each of these runs ends in well under it.
GUARD = 120


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
