"""Every example of the README, the docs and the tools' --help runs as written.

What a new operator pastes first must work, so the examples are run here, each in a
temporary directory that holds the tree's files (as links) and takes what the example
writes, with the tree's tools first on PATH:

- every ```sh block of README.md and docs/*.md, as one bash script (`set -e -o
  pipefail`): it must exit 0, print no error line, and print what its text says it
  prints (EXPECTED below);
- every command under `Examples:` of every tool's --help (bin/owca-*, workloads/owca-*),
  one tool's in order in one directory (an earlier one may make the file a later one
  reads).

The marks an example may carry, visible to its reader:

- `# needs: REASON` (a block's first line, or the line before a --help example): it
  cannot run on a test machine (a Kafka broker, a fleet, minutes of load); not run;
- a comment that says `Ctrl-C` on the last command: it runs until stopped; it is run
  until it prints what it should, then stopped with SIGINT, as a terminal's Ctrl-C;
- `# with the YAML above saved as FILE` (a block's first line): the ```yaml block
  before it is written to FILE first, as the reader is told to.

A fenced block without a language must not hold commands: a command block is ```sh,
so that it is run here or says why not.
"""
import glob
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

import pytest

from conftest import BIN, ROOT, tool_env

WORKLOADS = os.path.join(ROOT, "workloads")
PIPELINE_TOOLS = ("discover", "measure", "detect", "allocate", "ship")
WORKLOAD_TOOLS = ("launch", "wrap", "sine", "scenario")
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                                   for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))

NEEDS = re.compile(r"^# needs: (\S.*)$")
SAVED_AS = re.compile(r"^# with the YAML above saved as (\S+)")
# Words that start a command line: a command block without a language is a mistake.
COMMAND_WORDS = re.compile(r"^\s*(\$ )?(owca-[a-z]+|make|\.venv/bin/\S+|ansible-playbook|"
                           r"systemctl|journalctl|jq|pip)( |$)")

# What an example's text says it prints: (a part of its command, a pattern its stdout
# must hold).  Each entry must name an example (test_every_expectation_names_an_example).
EXPECTED = [
    ("make run", r"(?m)^task_cpu_usage_seconds_total\{"),
    ("jq '.tasks[].id'", r'(?m)^"/'),
    ("| grep task_mem_usage_bytes", r"(?m)^task_mem_usage_bytes\{"),
    ("| grep task_cpu_usage_seconds", r"(?m)^task_cpu_usage_seconds_total\{"),
    ("head -n 3 metrics.prom", r"(?m)^# (HELP|TYPE) "),
    ("owca-discover -c priorities.yaml", r"(?m)^\[.*\]$"),
    ("owca-scenario score", r"(?m)^== overall, \d+ recordings"),
    ("slo_controller_hp_pressure", r'(?m)^slo_controller_hp_pressure\{[^}]*'
                                   r'task_id="/owca-fixture/hp"[^}]*\} 0\.4 '),
    ("slo_controller_hp_pressure", r'(?m)^apm_sli\{[^}]*task_id="/owca-fixture/hp"'
                                   r'[^}]*\} 0\.004 '),
    ("owca-wrap --task-id /owca/app", r"(?m)^apm_latency_p99_seconds\{"),
    ("owca-sine --base 10", r"(?m)^rate=\d"),
    ("owca-launch run", r"(?m)^/owca"),
]
# Every example that runs until Ctrl-C is stopped once it printed this much.
FIRST_OUTPUT = r"(?m)^\S"
# A long-running example: how long it may take to print, and to stop after SIGINT.
START_TIMEOUT = 120
STOP_TIMEOUT = 60
# A one-shot example (scoring the corpus, with plots, on a loaded machine).
RUN_TIMEOUT = 300


@dataclass
class Example:
    where: str                      # file:line, or the tool's --help
    script: str                     # what the reader pastes
    needs: Optional[str] = None     # why it is not run here
    saved_yaml: Optional[tuple] = None  # (file name, text) written first
    until_ctrl_c: bool = False


# -- the examples ---------------------------------------------------------------------

def fenced_blocks(path: str):
    """(line, info string, body lines, the ```yaml body before it or None) of a file."""
    with open(os.path.join(ROOT, path)) as f:
        lines = f.read().split("\n")
    last_yaml = None
    i = 0
    while i < len(lines):
        opening = re.match(r"^\s*```(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        start, info, body = i + 1, opening.group(1).strip(), []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        i += 1
        yield start, info, body, last_yaml
        if info == "yaml":
            last_yaml = "\n".join(body) + "\n"


def mark_of(comment_lines: List[str], example: Example) -> Example:
    for line in comment_lines:
        needs = NEEDS.match(line.strip())
        if needs:
            example.needs = needs.group(1)
    return example


def doc_examples() -> List[Example]:
    found = []
    for path in DOCUMENTS:
        for line, info, body, last_yaml in fenced_blocks(path):
            if info.split(" ")[0] != "sh":
                continue
            example = mark_of(body[:1], Example(f"{path}:{line}", "\n".join(body)))
            saved = SAVED_AS.match(body[0]) if body else None
            if saved:
                assert last_yaml is not None, f"{path}:{line}: no ```yaml block above it"
                example.saved_yaml = (saved.group(1), last_yaml)
            example.until_ctrl_c = "Ctrl-C" in example.script
            found.append(example)
    return found


def tool_path(tool: str) -> str:
    if tool in PIPELINE_TOOLS:
        return os.path.join(BIN, f"owca-{tool}")
    return os.path.join(WORKLOADS, f"owca-{tool}")


def help_text(tool: str) -> str:
    result = subprocess.run([sys.executable, tool_path(tool), "--help"], capture_output=True,
                            env=tool_env(), timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def help_examples(tool: str) -> List[Example]:
    """The commands under `Examples:`, continuation lines joined; a `#` line before a
    command is its comment (and may mark it)."""
    text = help_text(tool)
    section = text.split("\nExamples:\n", 1)
    assert len(section) == 2, f"owca-{tool} --help has no Examples: section"
    found, comments, command = [], [], []
    for line in section[1].split("\n"):
        if not line.startswith("  "):
            break
        line = line.strip()
        if not command and line.startswith("#"):
            comments.append(line)
            continue
        command.append(line)
        if not line.endswith("\\"):
            script = "\n".join(command)
            example = mark_of(comments, Example(f"owca-{tool} --help", script))
            example.until_ctrl_c = "Ctrl-C" in script
            found.append(example)
            comments, command = [], []
    assert not command, f"owca-{tool} --help: an example ends with a continuation"
    return found


# -- running one ----------------------------------------------------------------------

def workdir(tmp_path) -> str:
    """A directory that looks like the tree (its files as links) and keeps what the
    examples write; bin/ of it holds the tree's tools, first on PATH."""
    for name in os.listdir(ROOT):
        if name in (".git", "build", "dist") or (name.startswith(".") and name != ".venv"):
            continue
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in PIPELINE_TOOLS + WORKLOAD_TOOLS:
        wrapper = tools / f"owca-{tool}"
        wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} "
                           f"{shlex.quote(tool_path(tool))} \"$@\"\n")
        wrapper.chmod(0o755)
    return str(tmp_path)


def example_env(directory: str) -> dict:
    env = tool_env()
    env["PATH"] = os.pathsep.join([os.path.join(directory, "tools"),
                                   os.path.dirname(sys.executable), env["PATH"]])
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # `make run` under `make test`
        env.pop(name, None)
    return env


def expected_for(script: str) -> List[str]:
    return [pattern for part, pattern in EXPECTED if part in script]


def run_example(example: Example, directory: str) -> None:
    if example.needs:
        return
    if example.saved_yaml:
        name, text = example.saved_yaml
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    env = example_env(directory)
    commands = split_commands(example.script)
    # What runs until Ctrl-C is the last command: the ones before it run to their end
    # first, so that only its own output tells that it has started.
    last = commands.pop() if example.until_ctrl_c else None
    stdout, stderr = "", ""
    if commands:
        result = subprocess.run(["bash", "-c", "set -e -o pipefail\n" + "\n".join(commands)],
                                capture_output=True, env=env, cwd=directory,
                                timeout=RUN_TIMEOUT, check=False)
        stdout, stderr = (result.stdout.decode(errors="replace"),
                          result.stderr.decode(errors="replace"))
        assert result.returncode == 0, \
            f"{example.where}: exit {result.returncode}\n{example.script}\n{stderr}"
    if last is not None:
        out, err = run_until_output(last, env, directory, example)
        stdout, stderr = stdout + out, stderr + err
    for pattern in expected_for(example.script):
        assert re.search(pattern, stdout), (f"{example.where}: no {pattern!r} in what it "
                                            f"printed\n{example.script}\n{stdout[:2000]}")
    errors = [line for line in stderr.splitlines()
              if ": error:" in line or line.startswith("Traceback")]
    assert errors == [], f"{example.where}: {example.script}\n{stderr}"


def split_commands(script: str) -> List[str]:
    """A script's commands: its lines, a line that ends with `\\` joined to the next."""
    commands, current = [], []
    for line in script.split("\n"):
        current.append(line)
        if not line.endswith("\\"):
            commands.append("\n".join(current))
            current = []
    if current:
        commands.append("\n".join(current))
    return [c for c in commands if c.strip()]


def run_until_output(command: str, env, directory, example):
    """Start it in its own session, wait for its first output (and what it should
    print), then SIGINT the session as Ctrl-C does; (stdout, stderr)."""
    wanted = expected_for(command) or [FIRST_OUTPUT]
    # Ctrl-C reaches a terminal's foreground job, whose SIGINT is never ignored; a test
    # run from a script's background job (`.ci/run &`) inherits SIGINT ignored, which a
    # shell and the tools keep, as they should.
    argv = ["env", "--default-signal=INT", "bash", "-c", "set -e -o pipefail\n" + command]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env, cwd=directory, start_new_session=True)
    out, err = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(lambda: s.read1(4096),
                                                                        b"")), daemon=True)
               for s, b in ((process.stdout, out), (process.stderr, err))]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not all(re.search(p, b"".join(out).decode(errors="replace")) for p in wanted):
            assert process.poll() is None, (
                f"{example.where}: ended ({process.returncode}) before printing {wanted}\n"
                f"{example.script}\n{b''.join(err).decode(errors='replace')}")
            assert time.monotonic() < deadline, (
                f"{example.where}: printed no {wanted} in {START_TIMEOUT} s\n"
                f"{b''.join(err).decode(errors='replace')}")
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        status = process.wait(timeout=STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            # SIGTERM first: a tool that starts workloads in process groups of their own
            # (owca-launch) stops and removes them; SIGKILL would leave them running.
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for reader in readers:
        reader.join(timeout=10)
    stdout, stderr = (b"".join(out).decode(errors="replace"),
                      b"".join(err).decode(errors="replace"))
    # The pipeline's tools end with 0 on SIGINT; make, which Ctrl-C stops too, then ends
    # by the signal itself, as does the shell that ran it.
    assert status == 0 or (status == -signal.SIGINT and command.startswith("make ")), \
        f"{example.where}: exit {status} after SIGINT\n{stderr}"
    return stdout, stderr


# -- the tests ------------------------------------------------------------------------

def test_every_command_block_is_sh_and_runs_or_says_why_not():
    """A command block without a language would be run by no test: it must be ```sh;
    a ```sh block that cannot run here says why on its first line."""
    untyped = []
    for path in DOCUMENTS:
        for line, info, body, _yaml in fenced_blocks(path):
            if info == "" and any(COMMAND_WORDS.match(b) for b in body):
                untyped.append(f"{path}:{line}")
    assert untyped == [], "command blocks without ```sh: " + ", ".join(untyped)
    examples = doc_examples()
    assert len(examples) >= 15
    for example in examples:
        lines = example.script.split("\n")
        assert all(not NEEDS.match(b.strip()) for b in lines[1:]), \
            f"{example.where}: `# needs:` goes on the block's first line"
        if example.until_ctrl_c:
            last = [b for b in lines if b.strip() and not b.startswith("#")][-1]
            assert "Ctrl-C" in last, \
                f"{example.where}: the command that runs until Ctrl-C must come last"


def test_every_expectation_names_an_example():
    scripts = [e.script for e in doc_examples()]
    scripts += [e.script for tool in PIPELINE_TOOLS + WORKLOAD_TOOLS
                for e in help_examples(tool)]
    unused = [part for part, _ in EXPECTED if not any(part in s for s in scripts)]
    assert unused == []


@pytest.mark.parametrize("example", doc_examples(), ids=lambda e: e.where)
def test_the_docs_examples_run_as_written(example, tmp_path):
    if example.needs:
        pytest.skip(f"needs: {example.needs}")
    run_example(example, workdir(tmp_path))


@pytest.mark.parametrize("tool", PIPELINE_TOOLS + WORKLOAD_TOOLS)
def test_the_help_examples_run_as_written(tool, tmp_path):
    examples = help_examples(tool)
    assert examples, f"owca-{tool} --help gives no example"
    directory = workdir(tmp_path)
    for example in examples:
        run_example(example, directory)
