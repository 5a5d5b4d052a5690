"""Scoring a detector on recorded scenarios: replay, label, count.

A recording (a directory: recording.jsonl or recording.jsonl.gz, ground_truth.json)
is replayed through the real owca-detect with any configuration and plug-ins
(`replay`), or its own anomalies are taken (`recorded_anomalies`); `score` then
compares the anomalies with the ground truth.

Labels.  The measurements frame at `ts` describes the interval before it, and
the HP's latency in it describes a load report up to one load step older, so
an interval is *positive* when an aggressive phase overlaps
[ts - interval - step, ts]; *surge* when a load surge overlaps it and it is not
positive; *quiet* otherwise (benign phases, the decoys, are quiet).  An *alarm*
is an interval whose anomalies frame names the HP task as contended.

Figures, per recording and over several:
- episodes: one per aggressive phase; detected when an alarm falls in
  [start, stop + interval + step]; time to detect: from its start to the first
  such alarm, in intervals; resource named / antagonist named: some alarm in it
  names the phase's resource / lists the phase's task among the contending ones;
- recall: detected episodes / episodes; precision: positive alarm intervals /
  alarm intervals;
- decoys named: of the positive alarm intervals, those whose anomalies list a
  BE task that was not aggressive then;
- false alarms per hour, in quiet and in surge intervals: runs of consecutive
  alarm intervals of that label, per hour of such intervals;
- within SLO: the HP's SLI reports that meet the SLO / all reports (the measure
  of a run with an allocator), and the BE tasks' work (ops) per phase kind.
"""
import gzip
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

from owca_workloads import control_score
from owca_workloads.tools import tool_argv, tool_env

RECORDING_NAMES = ("recording.jsonl", "recording.jsonl.gz")


class ScoreError(ValueError):
    """A recording that cannot be scored (one line)."""


# -- reading --------------------------------------------------------------------------------

def recording_dirs(paths: List[str]) -> List[str]:
    """Recording directories: each path that is one, or the ones right below it, sorted."""
    out = []
    for path in paths:
        if is_recording(path):
            out.append(path)
            continue
        below = sorted(os.path.join(path, d) for d in os.listdir(path)) \
            if os.path.isdir(path) else []
        found = [d for d in below if is_recording(d)]
        if not found:
            raise ScoreError(f"{path}: no recording (ground_truth.json and recording.jsonl[.gz])")
        out += found
    return out


def is_recording(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "ground_truth.json")) and \
        any(os.path.isfile(os.path.join(path, n)) for n in RECORDING_NAMES)


def read_recording(path: str) -> List[bytes]:
    for name in RECORDING_NAMES:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(full, "rb") as f:
                return f.read().splitlines()
    raise ScoreError(f"{path}: no recording.jsonl[.gz]")


def read_truth(path: str) -> dict:
    try:
        with open(os.path.join(path, "ground_truth.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ScoreError(f"{path}/ground_truth.json: {e}") from None


def frames_of(lines, kind: str) -> List[dict]:
    out = []
    for line in lines:
        try:
            frame = json.loads(line)
        except ValueError:
            continue
        if isinstance(frame, dict) and frame.get("kind") == kind:
            out.append(frame)
    return out


def phases(truth: dict) -> List[dict]:
    """The ground truth's phases; a version 1 truth's antagonists as aggressive phases."""
    if truth.get("version", 1) >= 2:
        return truth.get("phases", [])
    return [{"task": a["name"], "task_id": a["task_id"], "kind": "aggressive",
             "resource": a.get("resource"), "start_ts": a["start_ts"], "stop_ts": a["stop_ts"],
             "scheduled_start": a.get("scheduled_start"),
             "scheduled_stop": a.get("scheduled_stop")}
            for a in truth.get("antagonists", [])]


def step_of(truth: dict) -> float:
    return float(truth["hp"].get("load", {}).get("step") or 2.0)


def label(truth: dict, begin: float, end: float) -> str:
    """positive, surge or quiet for the span [begin, end]."""
    kinds = {p["kind"] for p in phases(truth)
             if p["kind"] in ("aggressive", "surge") and p["start_ts"] <= end
             and p["stop_ts"] >= begin}
    if "aggressive" in kinds:
        return "positive"
    return "surge" if "surge" in kinds else "quiet"


def frame_label(truth: dict, ts: float) -> str:
    return label(truth, ts - float(truth["interval"]) - step_of(truth), ts)


def sli_by_label(truth: dict, lines) -> List[tuple]:
    """(report time, SLI, label) of each HP load report in the recording, once each.

    The report's own time (apm_report_timestamp_seconds) when the recording has it,
    describing [t - step, t]; else the frame's, lagged by one interval and a step."""
    hp = truth["hp"]
    metric = hp.get("sli_metric") or "apm_latency_p99_seconds"
    step = step_of(truth)
    out, seen = [], set()
    for frame in frames_of(lines, "measurements"):
        if frame["ts"] < truth.get("started_ts", 0):
            continue
        m = frame.get("tasks", {}).get(hp["task_id"], {}).get("metrics", {})
        value = m.get(metric)
        if value is None:
            continue
        at = m.get("apm_report_timestamp_seconds")
        if at is not None:
            if at in seen:
                continue
            seen.add(at)
            out.append((at, value, label(truth, at - step, at)))
        else:
            if out and out[-1][1] == value:
                continue
            out.append((frame["ts"], value, frame_label(truth, frame["ts"])))
    return out


# -- anomalies ------------------------------------------------------------------------------

def recorded_anomalies(lines) -> Dict[int, list]:
    """seq -> anomalies of the recording's own anomalies frames."""
    return {f["seq"]: f.get("anomalies", []) for f in frames_of(lines, "anomalies")}


def detect_command(config: Optional[str] = None, plugins=()) -> List[str]:
    argv = tool_argv("detect") + ["--no-timing"]
    if config:
        argv += ["-c", config]
    for spec in plugins:
        argv += ["-r", spec]
    return argv


def replay(lines, config: Optional[str] = None, plugins=()) -> Dict[int, list]:
    """seq -> anomalies of owca-detect run on the recording (its own anomalies dropped
    by owca-detect); ScoreError with owca-detect's last error line when it fails."""
    data = b"\n".join(lines) + b"\n"
    done = subprocess.run(detect_command(config, plugins), input=data, capture_output=True,
                          env=tool_env())
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ScoreError(f"owca-detect exited with status {done.returncode}: "
                         f"{err[-1] if err else '(no message)'}")
    return recorded_anomalies(done.stdout.splitlines())


# -- scoring --------------------------------------------------------------------------------

def _alarm(anomalies: list, hp_task: str) -> list:
    return [a for a in anomalies if a.get("contended_task_id") == hp_task]


def score(truth: dict, lines, anomalies_by_seq: Dict[int, list]) -> dict:
    hp_task = truth["hp"]["task_id"]
    interval = float(truth["interval"])
    step = step_of(truth)
    started, ended = truth.get("started_ts", 0), truth.get("ended_ts", float("inf"))
    all_phases = phases(truth)
    intervals = []
    for frame in frames_of(lines, "measurements"):
        ts = frame["ts"]
        if not started <= ts <= ended:
            continue
        alarms = _alarm(anomalies_by_seq.get(frame["seq"], []), hp_task)
        intervals.append({"seq": frame["seq"], "ts": ts, "label": frame_label(truth, ts),
                          "alarms": alarms})
    episodes = []
    for p in all_phases:
        if p["kind"] != "aggressive":
            continue
        window = [x for x in intervals
                  if p["start_ts"] <= x["ts"] <= p["stop_ts"] + interval + step]
        hits = [x for x in window if x["alarms"]]
        named = [a for x in hits for a in x["alarms"]]
        episodes.append({
            "task": p["task"], "task_id": p["task_id"], "resource": p["resource"],
            "start": p.get("scheduled_start"), "stop": p.get("scheduled_stop"),
            "intervals": len(window), "detected": bool(hits),
            "time_to_detect_intervals": round((hits[0]["ts"] - p["start_ts"]) / interval, 2)
            if hits else None,
            "resource_named": any(a.get("resource") == p["resource"] for a in named),
            "antagonist_named": any(p["task_id"] in a.get("contending_task_ids", [])
                                    for a in named)})
    counts = {k: sum(1 for x in intervals if x["label"] == k)
              for k in ("positive", "quiet", "surge")}
    alarm_counts = {k: sum(1 for x in intervals if x["label"] == k and x["alarms"])
                    for k in ("positive", "quiet", "surge")}
    false_alarms = {"quiet": 0, "surge": 0}
    previous = None
    for x in intervals:
        flagged = bool(x["alarms"]) and x["label"] in false_alarms
        if flagged and not (previous and previous["alarms"] and previous["label"] == x["label"]):
            false_alarms[x["label"]] += 1
        previous = x
    decoys = 0
    for x in intervals:
        if x["label"] != "positive" or not x["alarms"]:
            continue
        aggressive = {p["task_id"] for p in all_phases if p["kind"] == "aggressive"
                      and p["start_ts"] <= x["ts"] and p["stop_ts"] >= x["ts"] - interval - step}
        named = {t for a in x["alarms"] for t in a.get("contending_task_ids", [])}
        if named - aggressive:
            decoys += 1
    slo = truth["hp"].get("slo")
    reports = sli_by_label(truth, lines)
    within = [v <= slo for _, v, _ in reports] if slo is not None else []
    work = {}
    for p in all_phases:
        progress = p.get("progress")
        if progress:
            w = work.setdefault(p["task"], {"unit": progress["unit"]})
            w[p["kind"]] = round(w.get(p["kind"], 0) + progress["ops"], 2)
    return {
        "scenario": truth.get("scenario"), "run": truth.get("run", 1),
        "hp_workload": truth["hp"].get("workload"), "slo": slo,
        "sli_metric": truth["hp"].get("sli_metric"), "interval": interval,
        "noisy": (truth.get("noisy") or {}).get("flag", False),
        "noisy_reasons": (truth.get("noisy") or {}).get("reasons", []),
        "intervals": counts, "alarm_intervals": alarm_counts, "episodes": episodes,
        "false_alarms": false_alarms, "decoy_alarm_intervals": decoys,
        "within_slo": (sum(within) / len(within)) if within else None,
        "sli_reports": len(within), "be_work": work,
        "alarm_seqs": [x["seq"] for x in intervals if x["alarms"]],
    }


def _ratio(num, den):
    return num / den if den else None


def totals(scores: List[dict]) -> dict:
    """The figures over one or several scored recordings."""
    episodes = [e for s in scores for e in s["episodes"]]
    detected = [e for e in episodes if e["detected"]]
    alarms = {k: sum(s["alarm_intervals"][k] for s in scores)
              for k in ("positive", "quiet", "surge")}
    hours = {k: sum(s["intervals"][k] * s["interval"] for s in scores) / 3600.0
             for k in ("quiet", "surge")}
    ttd = [e["time_to_detect_intervals"] for e in detected]
    within = [s["within_slo"] for s in scores if s["within_slo"] is not None]
    return {
        "recordings": len(scores), "noisy_recordings": sum(1 for s in scores if s["noisy"]),
        "episodes": len(episodes), "detected": len(detected),
        "recall": _ratio(len(detected), len(episodes)),
        "precision": _ratio(alarms["positive"], sum(alarms.values())),
        "time_to_detect_median_intervals": statistics.median(ttd) if ttd else None,
        "resource_named": _ratio(sum(e["resource_named"] for e in detected), len(detected)),
        "antagonist_named": _ratio(sum(e["antagonist_named"] for e in detected), len(detected)),
        "decoys_named": _ratio(sum(s["decoy_alarm_intervals"] for s in scores),
                               alarms["positive"]),
        "false_alarms_per_hour_quiet": _ratio(sum(s["false_alarms"]["quiet"] for s in scores),
                                              hours["quiet"]),
        "false_alarms_per_hour_surge": _ratio(sum(s["false_alarms"]["surge"] for s in scores),
                                              hours["surge"]),
        "within_slo": statistics.fmean(within) if within else None,
    }


# -- printing -------------------------------------------------------------------------------

def _f(value, fmt="{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _yes(b) -> str:
    return "yes" if b else "no"


def format_recording(name: str, s: dict) -> str:
    noisy = "NOISY: " + "; ".join(s["noisy_reasons"]) if s["noisy"] else "quiet host (not noisy)"
    lines = [f"== {name}: {s['hp_workload']}, SLO {_f(s['slo'], '{:.6g}')} "
             f"({s['sli_metric']}), {sum(s['intervals'].values())} intervals "
             f"(positive {s['intervals']['positive']}, quiet {s['intervals']['quiet']}, "
             f"surge {s['intervals']['surge']}), {noisy}",
             f"  {'episode':<14}{'resource':<18}{'start-stop':^11}{'detected':>9}"
             f"{'ttd':>6}{'resource':>9}{'antagonist':>11}"]
    for e in s["episodes"]:
        lines.append(f"  {e['task']:<14}{e['resource'] or '-':<18}{_f(e['start'], '{:>5.0f}')}-"
                     f"{_f(e['stop'], '{:<5.0f}')}{_yes(e['detected']):>9}"
                     f"{_f(e['time_to_detect_intervals'], '{:.1f}'):>6}"
                     f"{_yes(e['resource_named']) if e['detected'] else '-':>9}"
                     f"{_yes(e['antagonist_named']) if e['detected'] else '-':>11}")
    lines.append("  " + format_totals(totals([s])))
    if s.get("control"):
        c = s["control"]
        lines.append(
            f"  control: within SLO {_f(c['within_slo'], '{:.0%}')}, worst p99 "
            f"{_f(c['worst_p99_seconds'], '{:.6g}')} s, recovery after antagonist "
            f"{_f(c['antagonist_recovery_intervals'], '{:.1f}')} and after surge "
            f"{_f(c['surge_recovery_intervals'], '{:.1f}')} intervals, BE work / alone "
            f"{_f(c['be_work_vs_alone'])}, changes {c['changes']}, rollbacks "
            f"{c['rollbacks']}, sign changes {_f(c['sign_changes_per_minute'], '{:.1f}')}/min")
    if s["be_work"]:
        work = ", ".join(f"{task} " + " ".join(f"{k} {v:g}" for k, v in w.items()
                                               if k != "unit") + f" {w['unit']}"
                         for task, w in sorted(s["be_work"].items()))
        lines.append(f"  BE work: {work}")
    return "\n".join(lines)


def format_totals(t: dict) -> str:
    return (f"recall {_f(t['recall'])} ({t['detected']}/{t['episodes']})  "
            f"precision {_f(t['precision'])}  "
            f"ttd {_f(t['time_to_detect_median_intervals'], '{:.1f}')} intervals  "
            f"resource named {_f(t['resource_named'])}  "
            f"antagonist named {_f(t['antagonist_named'])}  "
            f"decoys named {_f(t['decoys_named'])}  "
            f"false alarms/h quiet {_f(t['false_alarms_per_hour_quiet'], '{:.0f}')} "
            f"surge {_f(t['false_alarms_per_hour_surge'], '{:.0f}')}  "
            f"within SLO {_f(t['within_slo'])}")


def score_dirs(dirs: List[str], config: Optional[str] = None, plugins=(),
               recorded: bool = False) -> List[tuple]:
    """[(name, score, truth, lines, anomalies)] of each recording directory."""
    out = []
    for d in recording_dirs(dirs):
        truth = read_truth(d)
        lines = read_recording(d)
        anomalies = recorded_anomalies(lines) if recorded else replay(lines, config, plugins)
        s = score(truth, lines, anomalies)
        if frames_of(lines, "allocations"):
            # A run with owca-allocate in its pipeline: the controller's figures too
            # (docs/control.md), from the same recording.
            s["control"] = control_score.score(control_score.load_run(d))
        out.append((os.path.basename(os.path.normpath(d)), s, truth, lines, anomalies))
    return out


def print_scores(results: List[tuple], as_json: bool = False, stream=sys.stdout) -> dict:
    """score_dirs' results, per recording and overall, as tables or as one JSON object;
    the overall figures."""
    scores = [s for _, s, *_ in results]
    overall = totals(scores)
    if as_json:
        json.dump({"recordings": {name: {k: v for k, v in s.items() if k != "alarm_seqs"}
                                  for name, s, *_ in results},
                   "overall": overall}, stream, indent=1)
        stream.write("\n")
    else:
        for name, s, *_ in results:
            stream.write(format_recording(name, s) + "\n")
        stream.write(f"== overall, {overall['recordings']} recordings "
                     f"({overall['noisy_recordings']} noisy)\n  {format_totals(overall)}\n")
    return overall
