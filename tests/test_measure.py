"""owca-measure as a stage: tasks in, measurements out, tasks that vanish dropped."""
import json
import subprocess

import pytest

from cgroup_helpers import needs_v1, v1_cgroup
from conftest import ROOT, tool_command, tool_env
from owca.core import frames
from owca.measure.stage import Measure, MeasureConfig

SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"


def tasks_frame(seq, *paths):
    return frames.tasks_frame(seq, [{"id": p, "name": p.rsplit("/", 1)[-1], "cgroup_path": p,
                                     "labels": {"priority": "be"}, "resources": {"cpus": 1}}
                                    for p in paths], ts=1.0, host="h")


@needs_v1
def test_a_task_whose_cgroup_vanishes_is_dropped_from_that_cycle(caplog):
    with v1_cgroup() as stays:
        child = stays.start_python(SLEEP)
        assert child.stdout.readline().strip() == "running"
        with v1_cgroup() as goes:
            stage = Measure(MeasureConfig(), {})
            first = stage.process(tasks_frame(1, stays.path, goes.path))[0]
            assert set(first["tasks"]) == {stays.path, goes.path}
        # `goes` is removed now, but the next tasks frame still lists it
        second = stage.process(tasks_frame(2, stays.path, goes.path))[0]
        stage.close()
    assert set(second["tasks"]) == {stays.path}
    counters = {s["name"]: s["value"] for s in second["metrics"]}
    assert counters["owca_tasks"] == 1 and counters["owca_tasks_dropped_total"] == 1
    assert any(f"task {goes.path} left out of cycle 2" in r.getMessage() for r in caplog.records)
    frames.validate(second)
    task = first["tasks"][stays.path]
    assert task["labels"] == {"priority": "be"} and task["resources"] == {"cpus": 1}
    assert task["metrics"]["task_up"] == 1 and "task_cpu_usage_seconds" in task["metrics"]


@needs_v1
def test_interval_measures_the_latest_tasks_between_tasks_frames():
    with v1_cgroup() as cg:
        child = cg.start_python(SLEEP)
        assert child.stdout.readline().strip() == "running"
        proc = subprocess.Popen(tool_command("measure", "--interval", "0.2"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=tool_env(), cwd=ROOT)
        proc.stdin.write(frames.encode(tasks_frame(1, cg.path)))
        proc.stdin.flush()
        # One tasks frame only: the four cycles come from the interval's clock
        # (owca.core.stage.run_filter; tests/test_frames.py checks its pace).
        seen = [json.loads(proc.stdout.readline()) for _ in range(4)]
        proc.stdin.close()
        assert proc.wait(20) == 0
    assert [f["seq"] for f in seen] == [1, 2, 3, 4]
    assert all(cg.path in f["tasks"] for f in seen)
    usage = [f["tasks"][cg.path]["metrics"]["task_cpu_usage_seconds"] for f in seen]
    assert usage == sorted(usage)


@needs_v1
def test_measure_carries_discovery_counters_and_adds_its_own():
    upstream = frames.sample("owca_tasks", 1, {"stage": "discover"})
    with v1_cgroup() as cg:
        frame = tasks_frame(7, cg.path)
        frame["metrics"] = [upstream]
        stage = Measure(MeasureConfig(), {})
        out = stage.process(frame)[0]
        stage.close()
    assert out["seq"] == 7 and out["kind"] == "measurements"
    assert out["metrics"][0] == upstream
    stages = {s["labels"].get("stage") for s in out["metrics"]}
    assert stages == {"discover", "measure"}
    assert out["platform"]["platform_topology_cpus"] >= 1


@pytest.mark.parametrize("body, field", [
    ("measure:\n  cgroup_version: auto\n  slow_metrics_every: 0\n", "slow_metrics_every"),
    ("measure:\n  apm_dir: /run/owca/apm\n  apm_max_age: 0\n", "apm_max_age"),
    ("measure:\n  interval: 1\n  cpu_budget_percent: 0\n", "cpu_budget_percent"),
    ("measure:\n  interval: 1\n  be_costly_signals_every: 0\n", "be_costly_signals_every"),
])
def test_a_bad_measure_setting_fails_at_start_with_file_and_line(tmp_path, body, field):
    config = tmp_path / "owca.yaml"
    config.write_text(body)
    out = subprocess.run(tool_command("measure", "-c", str(config)), input=b"",
                         capture_output=True, env=tool_env(), timeout=60)
    assert out.returncode == 2
    assert f"{config}:3".encode() in out.stderr and field.encode() in out.stderr


@pytest.mark.unit
def test_tasks_get_consecutive_phases_for_their_slow_metrics():
    stage = Measure(MeasureConfig(slow_metrics_every=4), {"--no-timing": True})
    stage.update([{"id": f"t{i}", "cgroup_path": f"/t{i}"} for i in range(6)])
    readers = stage.source("cgroup").readers
    assert [r.phase for r in readers.values()] == [0, 1, 2, 3, 0, 1]
    assert {r.slow_every for r in readers.values()} == {4}
    stage.close()


@pytest.mark.unit
def test_the_metrics_reference_states_the_default_slow_metrics_cadence():
    from owca.core import metrics
    assert f"(default {MeasureConfig().slow_metrics_every})" in metrics.SLOW
