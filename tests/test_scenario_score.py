"""The scorer: figures on literal recordings whose answers are worked out by hand, a real
replay through owca-detect, the command line and the picture."""
import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, tool_env
from owca.core import frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
RECORDED = os.path.join(FIXTURES, "scenario_nginx_cpu_membw")
sys.path.insert(0, WORKLOADS)

from owca_workloads import score as scoring  # noqa: E402

HP, CPU, IO = "/s/hp", "/s/cpu", "/s/io"

# t=0 at 1000; interval 2, load step 2: the frame at ts is positive when an aggressive
# phase overlaps [ts - 4, ts].
TRUTH = {
    "version": 2, "scenario": "t", "run": 1, "interval": 2, "duration": 60,
    "started_ts": 1000.0, "ended_ts": 1060.0,
    "hp": {"task_id": HP, "name": "hp", "workload": "nginx", "slo": 0.002,
           "sli_metric": "apm_latency_p99_seconds", "load": {"step": 2}},
    "tasks": {HP: {"name": "hp", "role": "hp"},
              CPU: {"name": "cpu", "role": "be", "resource": "cpu"},
              IO: {"name": "io", "role": "be", "resource": "io"}},
    "phases": [
        {"task": "cpu", "task_id": CPU, "kind": "aggressive", "resource": "cpu",
         "scheduled_start": 10, "scheduled_stop": 20, "start_ts": 1010.0, "stop_ts": 1020.0,
         "progress": {"ops": 500, "seconds": 10, "ops_per_second": 50, "unit": "bogo-ops"}},
        {"task": "io", "task_id": IO, "kind": "benign", "resource": "io",
         "scheduled_start": 10, "scheduled_stop": 20, "start_ts": 1010.0, "stop_ts": 1020.0,
         "progress": {"ops": 7, "seconds": 10, "ops_per_second": 0.7, "unit": "bogo-ops"}},
        {"task": "io", "task_id": IO, "kind": "aggressive", "resource": "io",
         "scheduled_start": 30, "scheduled_stop": 40, "start_ts": 1030.0, "stop_ts": 1040.0},
        {"task": "hp", "task_id": HP, "kind": "surge", "resource": None,
         "scheduled_start": 46, "scheduled_stop": 52, "start_ts": 1046.0, "stop_ts": 1052.0},
    ],
    "noisy": {"flag": False, "reasons": []},
}


def anomaly(resource, *contending):
    return {"type": "contention", "resource": resource, "contended_task_id": HP,
            "contending_task_ids": list(contending)}


def recording(sli=lambda ts: 0.001):
    """Frames every 2 s from t=2 to t=60, the HP's report of the step before each."""
    lines = []
    for seq, ts in enumerate(range(1002, 1062, 2), start=1):
        m = {"apm_latency_p99_seconds": sli(ts), "apm_report_timestamp_seconds": ts - 0.5}
        lines.append(frames.encode(frames.measurements_frame(
            seq, {}, {HP: {"name": "hp", "metrics": m}, CPU: {"metrics": {}},
                      IO: {"metrics": {}}}, ts=float(ts))).rstrip(b"\n"))
    return lines


def seq_at(ts):
    return (ts - 1000) // 2


def test_figures_worked_out_by_hand():
    alarms = {
        seq_at(1014): [anomaly("cpu", CPU)],          # cpu episode, 2 intervals in
        seq_at(1016): [anomaly("memory", CPU, IO)],   # names the decoy io too
        seq_at(1006): [anomaly("cpu", CPU)],          # quiet: a false alarm ...
        seq_at(1008): [anomaly("cpu", CPU)],          # ... the same one (consecutive)
        seq_at(1050): [anomaly("cpu", CPU)],          # surge: a false alarm
        seq_at(1056): [{**anomaly("cpu", CPU), "contended_task_id": CPU}],  # not about the HP
    }
    s = scoring.score(TRUTH, recording(), alarms)
    # positive: frames 1010..1024 (8) and 1030..1044 (8); surge: 1046..1056 (6); of the
    # 30 frames 1002..1060 the other 8 are quiet
    assert s["intervals"] == {"positive": 16, "surge": 6, "quiet": 8}
    assert s["alarm_intervals"] == {"positive": 2, "quiet": 2, "surge": 1}
    cpu, io = s["episodes"]
    assert cpu["detected"] and cpu["time_to_detect_intervals"] == 2.0
    assert cpu["resource_named"] and cpu["antagonist_named"]
    assert not io["detected"] and io["time_to_detect_intervals"] is None
    assert s["false_alarms"] == {"quiet": 1, "surge": 1}
    assert s["decoy_alarm_intervals"] == 1  # at 1016 io was benign, not aggressive
    assert s["be_work"] == {"cpu": {"unit": "bogo-ops", "aggressive": 500},
                            "io": {"unit": "bogo-ops", "benign": 7}}
    t = scoring.totals([s])
    assert (t["recall"], t["precision"]) == (0.5, 2 / 5)
    assert t["resource_named"] == 1.0 and t["antagonist_named"] == 1.0
    assert t["decoys_named"] == 0.5
    assert t["false_alarms_per_hour_quiet"] == pytest.approx(1 / (8 * 2 / 3600))
    assert t["false_alarms_per_hour_surge"] == pytest.approx(1 / (6 * 2 / 3600))
    text = scoring.format_recording("t", s)
    assert "recall 0.50 (1/2)" in text and "precision 0.40" in text


def test_within_slo_counts_each_report_once_by_its_own_time():
    lines = recording(sli=lambda ts: 0.003 if 1010 <= ts < 1020 else 0.001)
    lines += lines[-1:]  # the last report read again by another cycle: one report still
    s = scoring.score(TRUTH, lines, {})
    assert s["sli_reports"] == 30
    assert s["within_slo"] == pytest.approx(25 / 30)


def test_a_version_1_ground_truth_is_read_as_aggressive_phases():
    with open(os.path.join(RECORDED, "ground_truth.json")) as f:
        truth = json.load(f)
    got = scoring.phases(truth)
    assert [(p["task"], p["kind"], p["resource"]) for p in got] == \
        [("cpu", "aggressive", "cpu"), ("membw", "aggressive", "memory_bandwidth")]


def run_score(*args):
    return subprocess.run([sys.executable, os.path.join(WORKLOADS, "owca-scenario"), "score",
                           *args], capture_output=True, text=True, env=tool_env(), timeout=120)


@pytest.mark.integration
def test_the_threshold_example_replayed_through_owca_detect(tmp_path):
    """A real replay: owca-detect with the example plug-in, the figures read back."""
    config = tmp_path / "detect.yaml"
    config.write_text("detect:\n  detector: !ThresholdDetector\n"
                      "    metric: apm_latency_p99_seconds\n    threshold: 0.008\n"
                      "    contending_labels: {role: be}\n")
    out = run_score("-r", "configs/examples/threshold_detector.py:ThresholdDetector",
                    "-c", str(config), "--json", RECORDED)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)["recordings"]["scenario_nginx_cpu_membw"]
    lines = scoring.read_recording(RECORDED)
    truth = scoring.read_truth(RECORDED)
    alarmed = {f["seq"] for f in scoring.frames_of(lines, "measurements")
               if f["ts"] >= truth["started_ts"] and f["tasks"][truth["hp"]["task_id"]]
               ["metrics"].get("apm_latency_p99_seconds", 0) > 0.008}
    assert sum(got["alarm_intervals"].values()) == len(alarmed) > 0
    assert got["episodes"][0]["detected"]  # the cpu antagonist's latency passes 8 ms


@pytest.mark.integration
def test_a_detector_that_cannot_start_is_one_line_and_exit_1(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("detect:\n  detector: !NoSuchDetector {}\n")
    out = run_score("-c", str(config), RECORDED)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "owca-detect exited with status 2" in out.stderr


@pytest.mark.integration
def test_no_recording_is_a_runtime_error(tmp_path):
    out = run_score(str(tmp_path))
    assert out.returncode == 1 and "no recording" in out.stderr


@pytest.mark.integration
def test_plot_writes_one_png_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    out = run_score("--recorded", "--plot", str(tmp_path / "plots"), RECORDED)
    assert out.returncode == 0, out.stderr
    png = tmp_path / "plots" / "scenario_nginx_cpu_membw.png"
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 20000  # five panels drawn, not an empty canvas


def test_the_k_mad_baseline_flags_a_report_far_above_the_median_once_it_has_history():
    sys.path.insert(0, os.path.join(ROOT, "configs", "examples"))
    from mad_detector import MadDetector
    d = MadDetector(metric="apm_sli", k=3.0, window=20, min_history=10)
    labels = {HP: {"role": "hp"}, CPU: {"role": "be"}, IO: {"role": "be"}}

    def cycle(report, sli, cpu, io):
        m = {HP: {"apm_sli": sli, "apm_report_timestamp_seconds": report},
             CPU: {"task_cpu_usage_seconds": cpu}, IO: {"task_cpu_usage_seconds": io}}
        return d.detect(None, m, {}, labels)[0]

    values = [0.0010, 0.0012, 0.0011, 0.0009, 0.0010, 0.0011, 0.0012, 0.0010, 0.0009]
    for i, v in enumerate(values):
        assert cycle(i, v, i, 2 * i) == []          # fewer than min_history reports
    assert cycle(9, 0.0050, 9, 18) == []            # the 10th is judged by none: kept
    (a,) = cycle(10, 0.0100, 15, 19)                # median 0.00105, MAD 0.0001
    assert a.contended_task_id == HP and a.contending_task_ids == [CPU]  # CPU grew 6, IO 1
    (again,) = cycle(10, 0.0100, 16, 20)            # the same report, read again
    assert again.contending_task_ids == [CPU]
    assert cycle(11, 0.0011, 17, 21) == []


def _drawn(truth, alarms):
    """(legend labels of every panel, every text drawn, the title) of the run's figure."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from owca_workloads.plot import figure
    lines = recording()
    fig = figure("t", truth, lines, scoring.score(truth, lines, alarms))
    try:
        legends = [t.get_text() for ax in fig.axes if ax.get_legend()
                   for t in ax.get_legend().get_texts()]
        texts = [(t.get_text(), t.get_fontsize()) for ax in fig.axes for t in ax.texts]
        return legends, texts, fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_the_plot_s_legend_lists_only_the_markers_the_run_has():
    right_only = {seq_at(1014): [anomaly("cpu", CPU)]}
    legends, texts, _ = _drawn(TRUTH, right_only)
    assert "alarm during an antagonist (right)" in legends
    assert not [t for t in legends if "false" in t]
    assert {"cpu antagonist running", "io antagonist running",
            "load surge (no antagonist)"} <= set(legends)

    legends, texts, _ = _drawn(TRUTH, {seq_at(1006): [anomaly("cpu", CPU)]})
    assert "alarm with no antagonist (false)" in legends
    assert not [t for t in legends if "right" in t]

    no_surge = dict(TRUTH, phases=[p for p in TRUTH["phases"] if p["kind"] != "surge"])
    legends, texts, _ = _drawn(no_surge, {})
    assert not [t for t in legends if "alarm" in t or "surge" in t]
    assert any(text.startswith("no alarm") for text, _ in texts)


def test_the_plot_names_each_episode_readably_and_says_what_the_host_was():
    _, texts, title = _drawn(TRUTH, {})
    names = {text: size for text, size in texts if "antagonist" in text}
    assert names == {"BE task cpu: cpu antagonist": 9, "BE task io: io antagonist": 9}
    assert "quiet host (not noisy): with no antagonist the HP met its SLO" in title
    noisy = dict(TRUTH, noisy={"flag": True, "reasons": ["others used more than 0.15 cores"]})
    _, _, title = _drawn(noisy, {})
    assert "NOISY host" in title and "others used more than 0.15 cores" in title
