"""The committed corpora (workloads/corpus/, recorded on a busy host, and
workloads/corpus-quiet/, on a quiet one): every recording against its ground truth,
and the detectors replayed through owca-detect, their figures as docs/detection.md
states them."""
import os
import sys

import pytest

from owca.core import frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
CORPUS = os.path.join(WORKLOADS, "corpus")
QUIET_CORPUS = os.path.join(WORKLOADS, "corpus-quiet")
DETECTION_MD = os.path.join(ROOT, "docs", "detection.md")
sys.path.insert(0, WORKLOADS)

from owca_workloads import score as scoring  # noqa: E402

RESOURCES = {"cpu", "llc", "memory_bandwidth", "memory", "io"}
BASELINES = {
    "threshold": ("configs/examples/threshold-baseline.yaml",
                  ["configs/examples/threshold_detector.py:ThresholdDetector"]),
    "k-MAD": ("configs/examples/mad-baseline.yaml",
              ["configs/examples/mad_detector.py:MadDetector"]),
}
DETECTORS = {"ContentionDetector": ("configs/examples/contention-lab.yaml", []), **BASELINES}


def recordings(corpus=None):
    return scoring.recording_dirs([corpus] if corpus else [CORPUS, QUIET_CORPUS])


def corpus_id(path):
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


@pytest.mark.parametrize("corpus", [CORPUS, QUIET_CORPUS], ids=os.path.basename)
def test_the_corpus_covers_three_hp_workloads_and_every_antagonist_class(corpus):
    truths = [scoring.read_truth(d) for d in recordings(corpus)]
    assert len(truths) >= 8
    assert {t["hp"]["workload"] for t in truths} >= {"nginx", "redis", "memcached"}
    aggressive = {p["resource"] for t in truths for p in t["phases"] if p["kind"] == "aggressive"}
    assert aggressive >= RESOURCES
    for t in truths:
        kinds = [p["kind"] for p in t["phases"]]
        assert "benign" in kinds and "surge" in kinds, t["scenario"]  # decoys and surges
        assert len({p["task"] for p in t["phases"] if p["kind"] != "surge"}) >= 3


@pytest.mark.parametrize("path", recordings(), ids=corpus_id)
def test_a_recording_matches_its_ground_truth(path):
    truth = scoring.read_truth(path)
    assert truth["version"] == 2 and truth["completed"]
    lines = scoring.read_recording(path)
    measurements = [frames.validate(frames.decode(line)) for line in lines
                    if frames.sniff(line) == (1, "measurements")]
    assert len(measurements) >= 0.9 * truth["duration"] / truth["interval"]
    every = set(truth["tasks"])
    # every task, the BE ones above all, in every interval: presence gives nothing away
    assert all(set(m["tasks"]) == every for m in measurements)
    be = [i for i, t in truth["tasks"].items() if t["role"] == "be"]
    for task_id in be:
        mine = [p for p in truth["phases"] if p["task_id"] == task_id]
        assert mine[0]["start_ts"] < truth["started_ts"]
        assert all(a["stop_ts"] <= b["start_ts"] + 1e-3 for a, b in zip(mine, mine[1:]))
        for p in mine:
            if p["kind"] != "quiet":
                # each change happened at its time, give or take a slow stop
                assert abs(p["start_ts"] - truth["started_ts"] - p["scheduled_start"]) < 10
    assert truth["hp"]["slo_calibration"]["samples"]
    assert len(truth["host_load"]) >= 0.9 * truth["duration"] / truth["interval"]
    assert isinstance(truth["noisy"]["flag"], bool)
    hp = truth["hp"]["task_id"]
    m = measurements[len(measurements) // 2]["tasks"][hp]["metrics"]
    for name in ("task_run_queue_delay_seconds", "task_pressure_stall_seconds",
                 "task_context_switches", "apm_report_timestamp_seconds", "apm_slo"):
        assert name in m, name


def documented_table(heading: str, key: str) -> dict:
    """{(first column, recording or "overall"): {column: text}} from the tables of one
    section of docs/detection.md whose header's first cell is `key`."""
    with open(DETECTION_MD) as f:
        text = f.read()
    section = text[text.index(heading) + len(heading):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    rows = {}
    header = None
    for line in section.splitlines():
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == key:
            header = cells
            continue
        if header is None or set(cells[0]) <= {"-", ":"}:
            continue
        rows[(cells[0], cells[1])] = dict(zip(header[2:], cells[2:]))
    return rows


def documented_figures():
    return documented_table("## Baselines", "baseline")


def formatted(t: dict) -> dict:
    f = scoring._f
    return {"recall": f(t["recall"]), "precision": f(t["precision"]),
            "ttd (intervals)": f(t["time_to_detect_median_intervals"], "{:.1f}"),
            "resource named": f(t["resource_named"]),
            "antagonist named": f(t["antagonist_named"]),
            "decoys named": f(t["decoys_named"]),
            "false alarms/h quiet": f(t["false_alarms_per_hour_quiet"], "{:.0f}"),
            "false alarms/h surge": f(t["false_alarms_per_hour_surge"], "{:.0f}")}


@pytest.mark.integration
@pytest.mark.parametrize("baseline", sorted(BASELINES))
def test_the_baselines_figures_are_the_documented_ones(baseline):
    """Replayed through the real owca-detect: the overall and per-recording figures of
    docs/detection.md's table, to the digits printed there."""
    config, plugins = BASELINES[baseline]
    documented = documented_figures()
    results = scoring.score_dirs([CORPUS], os.path.join(ROOT, config),
                                 [os.path.join(ROOT, p) for p in plugins])
    assert documented[(baseline, "overall")] == formatted(
        scoring.totals([s for _, s, *_ in results]))
    for name, s, *_ in results:
        assert documented[(baseline, name)] == formatted(scoring.totals([s])), name


@pytest.mark.integration
@pytest.mark.parametrize("detector", sorted(DETECTORS))
def test_the_quiet_corpus_figures_are_the_documented_ones(detector):
    """The quiet-host corpus replayed through the real owca-detect: every figure of
    docs/detection.md's "Scores on a quiet host", overall and per recording."""
    config, plugins = DETECTORS[detector]
    documented = documented_table("## Scores on a quiet host", "detector")
    results = scoring.score_dirs([QUIET_CORPUS], os.path.join(ROOT, config),
                                 [os.path.join(ROOT, p) for p in plugins])
    assert len(results) == len([k for k in documented if k[0] == detector]) - 1 >= 8
    assert documented[(detector, "overall")] == formatted(
        scoring.totals([s for _, s, *_ in results]))
    for name, s, *_ in results:
        assert documented[(detector, name)] == formatted(scoring.totals([s])), name
