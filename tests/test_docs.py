"""The docs say what the code does: metrics reference, emitted names, tool help."""
import os
import re
import subprocess

import pytest

from conftest import ROOT, tool_command, tool_env
from owca.core import metrics
from owca.docs import markdown

DOCS = os.path.join(ROOT, "docs")


def test_metrics_md_is_generated_from_the_registry():
    with open(os.path.join(DOCS, "metrics.md")) as f:
        assert f.read() == markdown(), "run `make docs`"


def emitted_names(text: str) -> set:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


@pytest.mark.integration
def test_every_metric_a_real_pipeline_emits_is_documented():
    recording = os.path.join(ROOT, "tests", "fixtures", "recorded_stream", "stream.jsonl")
    live = subprocess.run(" ".join(tool_command("discover", "--once")) + " | "
                          + " ".join(tool_command("measure")) + " | "
                          + " ".join(tool_command("detect")) + " | "
                          + " ".join(tool_command("allocate")) + " | "
                          + " ".join(tool_command("ship")),
                          shell=True, capture_output=True, env=tool_env(), timeout=120)
    with open(recording, "rb") as f:
        replay = subprocess.run(" ".join(tool_command("detect")) + " | "
                                + " ".join(tool_command("allocate")) + " | "
                                + " ".join(tool_command("ship")), shell=True, stdin=f,
                                capture_output=True, env=tool_env(), timeout=120)
    assert live.returncode == 0 and replay.returncode == 0, live.stderr + replay.stderr
    exposed = emitted_names(live.stdout.decode()) | emitted_names(replay.stdout.decode())
    # The exposition has the Prometheus names; the registry (and frames) WCA's.
    # The deprecated names of release 0.1 are written beside the new ones until 0.3.
    frame_name = {spec.exposed_name: name for name, spec in metrics.REGISTRY.items()}
    frame_name.update((old, spec.name) for old, spec in metrics.deprecated().items())
    names = {frame_name.get(n, n) for n in exposed}
    assert {"task_cpu_usage_seconds_total", "anomalies", "anomalies_found",
            "platform_cpu_usage_seconds_total"} <= exposed
    assert {"task_cpu_usage_seconds", "task_mem_usage_bytes", "platform_cpu_usage",
            "owca_frames_read_total", "anomaly_count"} <= names
    undocumented = sorted(n for n in names if n not in metrics.REGISTRY)
    assert undocumented == []


def test_every_metric_named_in_the_code_is_documented():
    """Names passed to frames.sample() literally, in every module of the package."""
    found = set()
    package = os.path.join(ROOT, "lib", "owca")
    for directory, _dirs, names in os.walk(package):
        for name in (n for n in names if n.endswith(".py")):
            with open(os.path.join(directory, name)) as f:
                found |= set(re.findall(r'sample\(\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"', f.read()))
    assert len(found) > 10
    assert sorted(n for n in found if n not in metrics.REGISTRY) == []


def test_docs_the_readme_names_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for doc in set(re.findall(r"docs/[a-z_]+\.md", readme)):
        assert os.path.exists(os.path.join(ROOT, doc)), doc


def test_the_scripts_the_makefile_runs_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        scripts = set(re.findall(r"\b((?:benchmarks|bin|workloads)/[\w./-]+\.py)\b", f.read()))
    assert "benchmarks/measure_cycle.py" in scripts
    assert [s for s in sorted(scripts) if not os.path.isfile(os.path.join(ROOT, s))] == []


def test_the_protocol_examples_are_valid_frames():
    from owca.core import frames
    with open(os.path.join(DOCS, "protocol.md")) as f:
        lines = [line for line in f.read().splitlines() if line.startswith('{"v":')]
    assert len(lines) >= 3
    for line in lines:
        frame = frames.decode(line.encode())
        frames.validate(frame)
        assert frames.sniff(line.encode()) == (1, frame["kind"])


def console_blocks(path):
    """(command, expected output) for each `$ ` line of the ```console blocks."""
    with open(path) as f:
        blocks = re.findall(r"```console\n(.*?)```", f.read(), re.S)
    for block in blocks:
        command, expected = None, []
        for line in block.splitlines():
            if line.startswith("$ "):
                if command is not None:
                    yield command, expected
                command, expected = line[2:], []
            else:
                expected.append(line)
        if command is not None:
            yield command, expected


@pytest.mark.integration
def test_the_examples_print_what_they_say():
    import shutil
    import sys
    if shutil.which("jq") is None:
        import pytest
        pytest.skip("jq is not installed")
    env = tool_env()
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
    examples = list(console_blocks(os.path.join(DOCS, "examples.md")))
    assert len(examples) >= 6
    for command, expected in examples:
        result = subprocess.run(["bash", "-c", "set -o pipefail; " + command]
                                if "exit $?" not in command else ["bash", "-c", command],
                                capture_output=True, env=env, cwd=ROOT, timeout=60)
        assert result.stdout.decode().splitlines() == expected, (command, result.stderr)
