"""owca-detect with plug-ins: loaded by -r and from config, failures contained."""
import json
import subprocess

import pytest

from conftest import ROOT, tool_command, tool_env
from owca.core import frames
from owca.plugin import ContentionAnomaly, anomaly_uuid

PLUGIN = "configs/examples/threshold_detector.py:ThresholdDetector"
CONFIG = "configs/examples/threshold-detector.yaml"


def stream():
    tasks = {
        "hp-web": {"name": "web", "labels": {"priority": "hp"},
                   "metrics": {"task_cpu_usage_seconds": 150.0}},
        "be-batch": {"name": "batch", "labels": {"priority": "be"},
                     "metrics": {"task_cpu_usage_seconds": 900.0}},
        "be-small": {"name": "small", "labels": {"priority": "be"},
                     "metrics": {"task_cpu_usage_seconds": 5.0}},
        "hp-idle": {"name": "idle", "labels": {"priority": "hp"},
                    "metrics": {"task_cpu_usage_seconds": 1.0}},
    }
    return b"".join(frames.encode(frames.measurements_frame(
        seq, {"platform_topology_cpus": 2}, tasks, ts=1700000000.0 + seq, host="n1"))
        for seq in (1, 2))


def run_detect(*args, stdin=b""):
    return subprocess.run(tool_command("detect", *args), input=stdin, capture_output=True,
                          env=tool_env(), cwd=ROOT, timeout=60)


def test_external_detector_loaded_with_r_finds_the_contended_hp_task():
    result = run_detect("-r", PLUGIN, "-c", CONFIG, stdin=stream())
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["kind"] for f in out] == ["measurements", "anomalies"] * 2
    first, second = out[1]["anomalies"], out[3]["anomalies"]
    assert len(first) == 1
    a = first[0]
    assert a["contended_task_id"] == "hp-web" and a["resource"] == "cpu"
    assert a["contending_task_ids"] == ["be-batch", "be-small"]  # heaviest first
    assert a["uuid"] == second[0]["uuid"]  # the same contention keeps its id
    extra = {s["name"]: s["value"] for s in out[1]["metrics"]}
    assert extra["threshold_detector_threshold"] == 100.0 and extra["anomaly_count"] == 1


def test_anomalies_are_shipped_as_metrics():
    detect = subprocess.Popen(tool_command("detect", "-r", PLUGIN, "-c", CONFIG),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=tool_env(),
                              cwd=ROOT)
    ship = subprocess.Popen(tool_command("ship"), stdin=detect.stdout, stdout=subprocess.PIPE,
                            env=tool_env(), cwd=ROOT)
    detect.stdout.close()
    detect.stdin.write(stream())
    detect.stdin.close()
    text = ship.communicate(timeout=60)[0].decode()
    assert detect.wait(10) == 0 and ship.returncode == 0
    anomaly_lines = [line for line in text.splitlines() if line.startswith("anomaly{")]
    assert len(anomaly_lines) == 4  # two cycles, two contending tasks each
    assert 'contended_task_id="hp-web",contending_task_id="be-batch"' in anomaly_lines[0]
    assert anomaly_lines[0].split()[1] == "1"


def test_a_failing_detector_costs_its_cycle_not_the_pipeline(tmp_path, capsys):
    plugin = tmp_path / "broken_detector.py"
    plugin.write_text(
        "from owca.detect.stage import AnomalyDetector\n"
        "class BrokenDetector(AnomalyDetector):\n"
        "    def detect(self, platform, m, r, l):\n"
        "        raise RuntimeError('boom')\n")
    config = tmp_path / "c.yaml"
    config.write_text("detect:\n  detector: !BrokenDetector\n")
    result = run_detect("-r", f"{plugin}:BrokenDetector", "-c", str(config), stdin=stream())
    assert result.returncode == 0
    errors = [line for line in result.stderr.decode().splitlines() if "boom" in line]
    assert errors == ["owca-detect: error: cycle 1: BrokenDetector failed: RuntimeError: boom",
                      "owca-detect: error: cycle 2: BrokenDetector failed: RuntimeError: boom"]
    last = json.loads(result.stdout.splitlines()[-1])
    counters = {s["name"]: s["value"] for s in last["metrics"]}
    assert last["anomalies"] == [] and counters["owca_detector_errors_total"] == 2


@pytest.mark.unit
def test_anomaly_uuid_depends_on_what_not_on_order():
    a = ContentionAnomaly("llc", "hp", ["be1", "be2"]).to_dict()
    b = ContentionAnomaly("llc", "hp", ["be2", "be1"]).to_dict()
    assert a["uuid"] == b["uuid"] == anomaly_uuid("contention", "llc", "hp", ["be1", "be2"])
    assert ContentionAnomaly("cpu", "hp", ["be1", "be2"]).to_dict()["uuid"] != a["uuid"]


def test_a_replayed_recording_has_one_anomalies_frame_per_cycle_the_detectors():
    """A recording holds the anomalies of its run: replayed, they are dropped (counted as
    skipped), so that each measurements frame is followed by this detector's only."""
    first = run_detect("-r", PLUGIN, "-c", CONFIG, stdin=stream())
    assert first.returncode == 0, first.stderr
    recording = first.stdout + frames.encode(frames.tasks_frame(3, []))
    replay = run_detect("--no-timing", stdin=recording)  # the NOP detector this time
    assert replay.returncode == 0, replay.stderr
    out = [json.loads(line) for line in replay.stdout.splitlines()]
    assert [f["kind"] for f in out] == ["measurements", "anomalies"] * 2 + ["tasks"]
    assert all(f["anomalies"] == [] for f in out if f["kind"] == "anomalies")
    # counted by the time of the second cycle: the recording's first anomalies frame
    skipped = [m["value"] for m in out[-2]["metrics"] if m["name"] == "owca_skipped_frames_total"]
    assert skipped == [1]
