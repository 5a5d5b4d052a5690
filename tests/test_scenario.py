"""Interference scenarios: the file format, the summary, a replay of the recorded scenario
through owca-detect and owca-ship, and a short live run of the real pipeline."""
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from conftest import FIXTURES, tool_command, tool_env
from owca.core import frames
from owca.core.config import register
from owca.plugin import AnomalyDetector, ContentionAnomaly
from owca.core.paths import Paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
RECORDED = os.path.join(FIXTURES, "scenario_nginx_cpu_membw")
sys.path.insert(0, WORKLOADS)

from owca_workloads.catalog import load_catalog, unavailable  # noqa: E402
from owca_workloads.scenario import (ScenarioError, format_summary, hp_samples,  # noqa: E402
                                     load_scenario, parse_scenario, summarize)

VALID = """
name: t
duration: 30
hp: {workload: nginx, load: {base: 100, amplitude: 50, period: 10}}
antagonists:
  - {workload: stress-cpu, start: 5, stop: 10}
"""


def test_a_valid_scenario_and_its_defaults():
    s = parse_scenario(VALID)
    assert (s.name, s.duration, s.interval, s.cpus, s.warmup) == ("t", 30, 1.0, "0", 4.0)
    assert s.hp.load.base == 100 and s.hp.load.step is None
    assert s.antagonists[0].workload == "stress-cpu"


@pytest.mark.parametrize("change, reason", [
    (("workload: nginx", "workload: stress-cpu"), "not an hp workload"),
    (("workload: stress-cpu", "workload: nginx"), "not a\nbe workload"),
    (("start: 5, stop: 10", "start: 10, stop: 5"), "start < stop"),
    (("start: 5, stop: 10", "start: 5, stop: 31"), "stop <= duration"),
    (("duration: 30", "duration: 0"), "positive seconds"),
    (("name: t", "name: a/b"), "cgroup-safe"),
    (("period: 10", "period: 10, rate: 3"), "unexpected keyword argument 'rate'"),
    (("name: t", "name: t\ncolour: red"), "colour"),
])
def test_bad_scenarios_are_refused_with_the_reason(change, reason):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(VALID.replace(*change), "bad.yaml")
    assert str(e.value).startswith("bad.yaml: ")
    assert reason.replace("\n", " ") in str(e.value).replace("\n", " ")


def test_two_antagonists_may_not_share_a_name():
    text = VALID + "  - {workload: stress-cpu, start: 12, stop: 14}\n"
    with pytest.raises(ScenarioError, match="is taken"):
        parse_scenario(text)


def test_the_shipped_scenarios_are_valid():
    paths = glob.glob(os.path.join(WORKLOADS, "scenarios", "*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        load_scenario(path)


# -- summarize: literal data --------------------------------------------------------------

def _measurements(ts, p99, task="/s/hp"):
    return json.dumps(frames.measurements_frame(
        1, {}, {task: {"name": "hp", "metrics": {"apm_latency_p99_seconds": p99}}}, ts=ts))


def test_summary_separates_the_antagonists_windows_from_the_baseline():
    truth = {"interval": 1, "started_ts": 100.0,
             "hp": {"task_id": "/s/hp", "load": {"step": 2}},
             "antagonists": [{"name": "cpu", "start_ts": 110.0, "stop_ts": 120.0}]}
    values = {102: 0.001, 104: 0.0012, 106: 0.0011, 112: 0.005,  # 112: lag reaches 108.5
              115: 0.004, 116: 0.006, 118: 0.004, 121: 0.003, 126: 0.0013, 128: 0.001}
    lines = [_measurements(ts, v) for ts, v in values.items()]
    lines.insert(3, json.dumps(frames.anomalies_frame(1, [], ts=107.0)))
    lines.insert(7, _measurements(116.5, 0.006))  # the same report read again: counted once
    s = summarize(lines, truth)
    assert s["metric"] == "apm_latency_p99_seconds"
    assert s["baseline"]["samples"] == 5 and s["baseline"]["median"] == 0.0011
    cpu = s["antagonists"][0]
    assert cpu["samples"] == 3 and cpu["median"] == 0.004 and cpu["max"] == 0.006
    assert cpu["ratio_to_baseline"] == pytest.approx(0.004 / 0.0011)
    table = format_summary(s)
    assert "no antagonist" in table and "cpu" in table and "3.64" in table


def test_hp_samples_skip_frames_without_the_metric():
    lines = [_measurements(1, 0.1), _measurements(2, 0.1), "not json",
             json.dumps(frames.measurements_frame(3, {}, {"/s/hp": {"metrics": {}}}, ts=3)),
             _measurements(4, 0.2)]
    assert hp_samples(lines, "/s/hp", "apm_latency_p99_seconds") == [(1, 0.1), (4, 0.2)]


# -- the recorded scenario, replayed -----------------------------------------------------------

@register
@dataclass
class SloViolationDetector(AnomalyDetector):
    """For the replay: an HP task below its objective, contended by every BE task present.
    A stand-in detector; its only job is to show the recording and ground truth at work."""
    threshold: float = 1.0

    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        be = sorted(t for t, labels in tasks_labels.items() if labels.get("role") == "be")
        anomalies = []
        for task_id, labels in tasks_labels.items():
            normalized = tasks_measurements[task_id].get("apm_sli_normalized")
            if labels.get("role") == "hp" and be and normalized is not None \
                    and normalized < self.threshold:
                anomalies.append(ContentionAnomaly("cpu", task_id, be))
        return anomalies, []


def recorded():
    with open(os.path.join(RECORDED, "ground_truth.json")) as f:
        truth = json.load(f)
    with open(os.path.join(RECORDED, "recording.jsonl"), "rb") as f:
        lines = f.read().splitlines()
    return truth, lines


def test_the_recording_matches_its_ground_truth():
    truth, lines = recorded()
    assert truth["completed"] and truth["version"] == 1
    hp = truth["hp"]["task_id"]
    measurements = [frames.validate(frames.decode(line)) for line in lines
                    if frames.sniff(line) == (1, "measurements")]
    assert len(measurements) >= 0.8 * truth["duration"] / truth["interval"]
    assert all(hp in m["tasks"] for m in measurements)
    # every antagonist is in the stream while it runs, and only then
    for a in truth["antagonists"]:
        assert a["contended_task_id"] == hp
        present = [m["ts"] for m in measurements if a["task_id"] in m["tasks"]]
        assert present, a["name"]
        assert a["start_ts"] - truth["interval"] <= min(present)
        assert max(present) <= a["stop_ts"] + truth["interval"]
        assert max(present) - min(present) >= a["stop_ts"] - a["start_ts"] - 3 * truth["interval"]
    # the load's target follows the sine the ground truth states
    load = truth["hp"]["load"]
    targets = [m["tasks"][hp]["metrics"].get("apm_load_target_rate_per_second")
               for m in measurements]
    targets = [t for t in targets if t is not None]
    assert max(targets) > load["base"] + 0.7 * load["amplitude"]
    assert min(targets) < load["base"] - 0.7 * load["amplitude"]


def test_the_hp_latency_rises_while_an_antagonist_runs_on_its_cores():
    truth, lines = recorded()
    summary = summarize([line.decode() for line in lines], truth)
    assert summary["baseline"]["samples"] >= 5
    for a in summary["antagonists"]:
        assert a["samples"] >= 3, a
        assert a["ratio_to_baseline"] > 1.5, format_summary(summary)


@pytest.mark.integration
def test_replay_through_owca_detect_and_owca_ship(tmp_path):
    truth, lines = recorded()
    hp = truth["hp"]["task_id"]
    config = tmp_path / "detect.yaml"
    config.write_text("detect:\n  detector: !SloViolationDetector\n    threshold: 1.0\n")
    env = tool_env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env["PYTHONPATH"]])
    with open(os.path.join(RECORDED, "recording.jsonl"), "rb") as recording:
        detect = subprocess.Popen(
            tool_command("detect", "-r", "test_scenario:SloViolationDetector", "-c", str(config),
                         "--strict"),
            stdin=recording, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        tee = tmp_path / "detected.jsonl"
        detected = subprocess.run(["tee", str(tee)], stdin=detect.stdout,
                                  stdout=subprocess.PIPE, timeout=120)
        detect.stdout.close()
        assert detect.wait(60) == 0, detect.stderr.read().decode()
    shipped = subprocess.run(tool_command("ship", "--strict"), input=detected.stdout,
                             capture_output=True, env=tool_env(), timeout=120)
    assert shipped.returncode == 0, shipped.stderr.decode()
    out = shipped.stdout.decode()
    measurements = sum(1 for line in lines if frames.sniff(line) == (1, "measurements"))
    assert out.count("# owca metrics ") == measurements
    assert f'task_id="{hp}",task_name="nginx"' in out
    for name in ("apm_latency_p99_seconds", "apm_throughput_per_second",
                 "apm_load_target_rate_per_second", "apm_sli_normalized"):
        assert f"{name}{{" in out, name
    # the detector's anomalies name only antagonists that ran then, against the HP task,
    # and each antagonist is caught at least once
    caught = set()
    by_id = {a["task_id"]: a for a in truth["antagonists"]}
    for line in tee.read_bytes().splitlines():
        frame = frames.decode(line)
        if frame["kind"] != "anomalies":
            continue
        for anomaly in frame["anomalies"]:
            assert anomaly["contended_task_id"] == hp
            for task_id in anomaly["contending_task_ids"]:
                a = by_id[task_id]
                assert a["start_ts"] - 2 * truth["interval"] <= frame["ts"] \
                    <= a["stop_ts"] + 2 * truth["interval"]
                caught.add(a["name"])
    assert caught == {a["name"] for a in truth["antagonists"]}
    assert 'anomaly{host="' in out


# -- a short live run -------------------------------------------------------------------------------

@pytest.mark.integration
def test_a_short_scenario_records_the_pipeline_and_its_ground_truth(tmp_path):
    """About a minute: nginx under sine load, its SLO calibrated; stress-cpu aggressive on
    its core in the middle, stress-io a decoy before it, a load surge at the end."""
    catalog = load_catalog()
    reason = unavailable([catalog[n] for n in ("nginx", "stress-cpu", "stress-io")])
    if reason:
        pytest.skip(reason)
    out_dir = tmp_path / "out"
    run = subprocess.run([sys.executable, os.path.join(WORKLOADS, "owca-scenario"), "run",
                          "-o", str(out_dir),
                          os.path.join(WORKLOADS, "scenarios", "short-cpu.yaml")],
                         capture_output=True, text=True, timeout=300, env=tool_env())
    assert run.returncode == 0, run.stderr
    assert "no antagonist" in run.stdout
    truth = json.loads((out_dir / "ground_truth.json").read_text())
    assert truth["completed"] and truth["version"] == 2
    hp = truth["hp"]["task_id"]
    be = {t["name"]: i for i, t in truth["tasks"].items() if t["role"] == "be"}
    assert set(be) == {"cpu", "io"}
    # each BE task's phases follow one another from before t=0 to the end, as scheduled
    for name in be:
        mine = [p for p in truth["phases"] if p["task"] == name]
        assert mine[0]["start_ts"] < truth["started_ts"] and mine[-1]["stop_ts"] == \
            truth["ended_ts"]
        assert all(a["stop_ts"] == b["start_ts"] for a, b in zip(mine, mine[1:]))
    kinds = {n: [p["kind"] for p in truth["phases"] if p["task"] == n] for n in be}
    assert kinds == {"cpu": ["quiet", "aggressive", "quiet"],
                     "io": ["quiet", "benign", "quiet"]}
    (cpu,) = truth["antagonists"]
    assert cpu["workload"] == "stress-cpu" and cpu["resource"] == "cpu"
    aggressive = [p for p in truth["phases"] if p["kind"] == "aggressive"][0]
    assert aggressive["progress"]["ops"] > 0 and aggressive["progress"]["unit"] == "bogo-ops"
    (surge,) = [p for p in truth["phases"] if p["kind"] == "surge"]
    assert surge["task"] == "nginx" and surge["task_id"] == hp
    # the SLO was calibrated here, and the wrapper published it
    calibration = truth["hp"]["slo_calibration"]
    assert calibration["samples"] and truth["hp"]["slo"] == calibration["slo"] == \
        pytest.approx(3 * calibration["sli_median"], rel=1e-5)
    assert truth["host_load"] and "other_cpu_on_hp_cpus" in truth["host_load"][0]
    assert isinstance(truth["noisy"]["flag"], bool)
    lines = (out_dir / "recording.jsonl").read_bytes().splitlines()
    measurements = [frames.validate(frames.decode(line)) for line in lines
                    if frames.sniff(line) == (1, "measurements")]
    # The pipeline ran through the run (the runner fails a run whose stage ended), and
    # every cycle discovery began reached the recording, in order: how many cycles a
    # loaded host fits into the run's wall time is not the test's business.
    assert measurements, "no measurements recorded"
    assert [m["seq"] for m in measurements] == list(range(1, len(measurements) + 1))
    assert any(truth["started_ts"] <= m["ts"] <= truth["ended_ts"] for m in measurements)
    # every task in every interval: a task's presence tells nothing of what it does
    assert all(set(m["tasks"]) == {hp, *be.values()} for m in measurements)
    with_apm = [m["tasks"][hp]["metrics"] for m in measurements
                if "apm_latency_p99_seconds" in m["tasks"][hp]["metrics"]]
    assert with_apm, "no APM report of the HP task recorded"
    assert all(m["apm_slo"] == truth["hp"]["slo"] and "apm_report_timestamp_seconds" in m
               for m in with_apm)
    assert all("task_run_queue_delay_seconds" in m["tasks"][hp]["metrics"]
               for m in measurements[1:])
    assert "apm_latency_p99_seconds{" in (out_dir / "metrics.prom").read_text()
    # the run left no cgroup and no APM file behind
    parent = os.path.dirname(hp)
    for controller in ("cpu", "cpuacct", "memory", "cpuset"):
        assert not os.path.exists(Paths().cgroup_v1(controller, parent))
    assert not os.path.exists(Paths().cgroup_v2(parent))
    assert os.listdir(out_dir / "apm") == []


@pytest.mark.integration
def test_a_pipeline_stage_that_dies_fails_the_run_in_one_line(tmp_path):
    """owca-detect refuses its configuration (exit 2): the run stops, exit 1, one line."""
    catalog = load_catalog()
    reason = unavailable([catalog["nginx"], catalog["stress-cpu"]])
    if reason:
        pytest.skip(reason)
    scenario = tmp_path / "s.yaml"
    scenario.write_text(VALID.replace("name: t", "name: dies").replace(
        "hp: {workload: nginx,", "hp: {workload: nginx, calibrate: 0,"))
    config = tmp_path / "bad.yaml"
    config.write_text("detect:\n  detector: !NoSuchDetector {}\n")
    run = subprocess.run([sys.executable, os.path.join(WORKLOADS, "owca-scenario"), "run",
                          "-o", str(tmp_path / "out"), "-c", str(config), str(scenario)],
                         capture_output=True, text=True, timeout=180, env=tool_env())
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "pipeline stage detect exited with status 2" in errors[0]
    truth = json.loads((tmp_path / "out" / "ground_truth.json").read_text())
    assert not truth["completed"]


@pytest.mark.integration
def test_stop_cleans_up_what_a_crashed_run_left(tmp_path):
    """The runner's state file names what it started: `owca-scenario stop` ends it."""
    from owca_workloads.launch import Launcher, enter_cgroups
    reason = unavailable([])
    if reason:
        pytest.skip(reason)
    launcher = Launcher(f"/owca-test-scenario-{os.getpid()}", Paths(),
                        state_file=str(tmp_path / "launcher-state.json"))
    try:
        w = launcher.start("hp", ["sleep", "60"], role="hp")
        pipeline = launcher.make_cgroup("pipeline")
        stage = subprocess.Popen(["sleep", "60"], preexec_fn=enter_cgroups(pipeline.procs_files()))
        out = subprocess.run([sys.executable, os.path.join(WORKLOADS, "owca-scenario"), "stop",
                              str(tmp_path)], capture_output=True, text=True, timeout=60,
                             env=tool_env())
        assert out.returncode == 0, out.stderr
        assert launcher.popens["hp"].wait(10) is not None and stage.wait(10) is not None
        assert not os.path.exists(Paths().cgroup_v1("memory", os.path.dirname(w.cgroup_path)))
    finally:
        launcher.stop_all(timeout=2)


# -- the scenario format, version 2: BE tasks with phases, surges ---------------------------------

PHASED = """
name: p
duration: 60
hp: {workload: nginx, load: {base: 100, amplitude: 50, period: 10}, quota: 0.5}
be:
  - name: cpu
    workload: stress-cpu
    phases: [{start: 5, stop: 10}, {start: 20, stop: 30, mode: benign}]
  - {name: rec, workload: stress-reclaim, memory_limit: 64M, phases: [{start: 8, stop: 12}]}
surges: [{start: 40, stop: 50}]
measure: {slow_metrics_every: 5}
"""


def test_a_phased_scenario_and_its_defaults():
    from owca_workloads.scenario import be_tasks
    s = parse_scenario(PHASED)
    assert (s.hp.calibrate, s.hp.slo_factor, s.hp.quota) == (20.0, 3.0, 0.5)
    assert [(b.name, [(p.start, p.stop, p.mode) for p in b.phases]) for b in be_tasks(s)] == [
        ("cpu", [(5, 10, "aggressive"), (20, 30, "benign")]), ("rec", [(8, 12, "aggressive")])]
    assert s.surges[0].rate is None and s.surges[0].connections == 4
    assert s.measure == {"slow_metrics_every": 5}
    # version 1's antagonists are BE tasks of one aggressive phase
    (old,) = be_tasks(parse_scenario(VALID))
    assert old.workload == "stress-cpu" and [(p.start, p.mode) for p in old.phases] == \
        [(5, "aggressive")]


@pytest.mark.parametrize("change, reason", [
    (("{start: 20, stop: 30, mode: benign}", "{start: 8, stop: 30, mode: benign}"),
     "phases overlap"),
    (("mode: benign", "mode: loud"), "mode 'loud'"),
    (("memory_limit: 64M", "memory_limit: lots"), "expected bytes"),
    (("quota: 0.5", "quota: 0"), "positive number of cores"),
    (("name: rec,", "name: cpu,"), "is taken"),
    (("surges: [{start: 40, stop: 50}]", "surges: [{start: 40, stop: 70}]"), "surges[0]"),
    (("measure: {slow_metrics_every: 5}", "measure: [1]"), "measure: expected a mapping"),
])
def test_bad_phased_scenarios_are_refused_with_the_reason(change, reason):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(PHASED.replace(*change), "bad.yaml")
    assert str(e.value).startswith("bad.yaml: ") and reason in str(e.value)


def test_be_progress_from_stress_ng_and_sysbench_output():
    from owca_workloads.progress import parse_progress, with_progress
    assert with_progress(["stress-ng", "--cpu", "1"])[-1] == "--metrics-brief"
    assert with_progress(["sysbench", "cpu", "run"]) == \
        ["sysbench", "cpu", "--report-interval=1", "run"]
    stress = ("stress-ng: metrc: [11348] stressor       bogo ops real time  usr time\n"
              "stress-ng: metrc: [11348] cpu                3474      3.05      2.29      0.01"
              "      1140.88        1509.87\n")
    assert parse_progress(stress) == {"ops": 3474, "seconds": 3.05,
                                      "ops_per_second": round(3474 / 3.05, 3),
                                      "unit": "bogo-ops"}
    with open(os.path.join(WORKLOADS, "samples", "sysbench-cpu.txt")) as f:
        sample = f.read()
    lines = "[ 1s ] thds: 1 eps: 1873.18 lat (ms,95%): 0.97\n" \
            "[ 2s ] thds: 1 eps: 2442.19 lat (ms,95%): 0.43\n"
    assert parse_progress(lines) == {"ops": 4315.37, "seconds": 2.0,
                                     "ops_per_second": 2157.685, "unit": "events"}
    assert parse_progress("nothing here\n") is None and parse_progress(sample) is None


def test_host_load_from_proc_stat_and_psi():
    from owca_workloads.hostload import CLK_TCK, cpu_busy_seconds, psi_some_total_seconds
    stat = ("cpu  10 0 10 100 0 0 0 0 0 0\n"
            "cpu0 100 5 20 1000 7 1 2 3 0 0\ncpu1 1 0 1 10 0 0 0 0 0 0\nintr 5\n")
    assert cpu_busy_seconds(stat) == {0: 131 / CLK_TCK, 1: 2 / CLK_TCK}  # idle, iowait out
    assert psi_some_total_seconds("some avg10=1.00 avg60=0.50 avg300=0.10 total=2500000\n"
                                  "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n") == 2.5


def test_a_configuration_adds_owca_allocate_and_merges_its_measure_section(tmp_path):
    from owca_workloads.scenario import Runner
    config = tmp_path / "pipeline.yaml"
    config.write_text("measure:\n  slow_metrics_every: 3\n  apm_dir: /elsewhere\n"
                      "detect:\n  detector: !NOPAnomalyDetector {}\n"
                      "allocate:\n  allocator: !SomePlugin {x: 1}\n")
    s = parse_scenario(PHASED)
    runner = Runner(s, str(tmp_path / "out"), str(config), plugins=["m:C"])
    assert runner.stages() == ["discover", "measure", "detect", "allocate", "tee", "ship"]
    section = runner.measure_section()
    assert section["slow_metrics_every"] == 3  # the configuration's over the scenario's
    assert section["apm_dir"] == str(tmp_path / "out" / "apm")  # the runner's own
    plain = Runner(s, str(tmp_path / "out"))
    assert plain.stages() == ["discover", "measure", "detect", "tee", "ship"]
    assert plain.measure_section()["slow_metrics_every"] == 5  # the scenario's
