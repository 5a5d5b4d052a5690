"""Scores of an allocator's run: did the HP tasks keep their SLO, how much work did BE do.

A run directory holds `recording.jsonl` (or `.jsonl.gz`): the frames after
owca-allocate (measurements and allocations), and `ground_truth.json`, the lab's
(docs/workloads.md: the HP tasks, `hps` or the single `hp`; the BE tasks and their
phases; `host_load`) with, from the control matrix (control_matrix.py), `config`
and `be_alone` (CPU cores each BE task uses alone on the node).  The matrix's
earlier runner wrote version 1, with the BE tasks that started as `antagonists`
(task_id, name, start_ts) and `surges`; both are read.  Per run:

| score | how |
|---|---|
| within_slo | fraction of intervals (measurements frames from t=0) in which every HP task's SLI met its SLO; an interval without an SLI counts as missed |
| worst_p99_seconds | the highest apm_latency_p99_seconds any HP task reported |
| recovery_intervals | per BE start and surge: from its start to the first report back within the SLO after the first one that broke it (0 when none broke it within `recovery_window` s); in intervals; None when it never came back |
| be_cpu_seconds, be_work_vs_alone | CPU time of the BE tasks' cgroups, and that over what the same tasks use alone for as long as they ran (the lab's BE ops over its ops alone, where it measured those) |
| changes, rollbacks | BE values written by owca-allocate; the controller's rollbacks |
| oom_kills | processes the OOM killer killed on the node during the run (the lab's host samples, /proc/vmstat); None where not recorded |
| hp_refault_pages | the HP tasks' refaults (task_mem_workingset_refaults, anon + file) from t=0 to the end; None where the kernel does not count them |
| sign_changes_per_minute | of the BE allocation (CPUs the BE tasks may use: quota and cpuset) in steady load: outside surges and the first `recovery_window` s after a BE start |
| host_other_cores | CPU the rest of the machine used meanwhile (mean, max) |

`panels(axes, run)` draws the SLI, the BE allocation and the BE work over time
on three matplotlib axes, for a scorer's `--plot`.
"""
import gzip
import json
import math
import os
import statistics
from typing import Dict, List, Optional

from owca.core.kernel import parse_cpu_list

RECOVERY_WINDOW = 20.0
SURGE = "surge"


def find_runs(dirs: List[str]) -> List[str]:
    out = []
    for top in dirs:
        for here, _, files in os.walk(top):
            if os.path.basename(here) == "quiet":
                continue   # the SLO's calibration (control_matrix.calibrate_slo), not a run
            if "ground_truth.json" in files and any(f.startswith("recording.jsonl")
                                                    for f in files):
                out.append(here)
    return sorted(out)


def read_frames(run_dir: str):
    for name in ("recording.jsonl", "recording.jsonl.gz"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue
            return


def _hps(truth: dict) -> List[dict]:
    return truth.get("hps") or ([truth["hp"]] if truth.get("hp") else [])


def _surges(truth: dict) -> List[dict]:
    """The load surges (start_ts, stop_ts): version 1's `surges`, the lab's surge phases."""
    return truth.get("surges", []) + [p for p in truth.get("phases", [])
                                      if p.get("kind") == "surge"]


def _pressure(metrics: dict, slo: Optional[float]) -> Optional[float]:
    n = metrics.get("apm_sli_normalized")
    if isinstance(n, (int, float)) and n > 0:
        return 1.0 / n
    sli = metrics.get("apm_sli")
    if isinstance(sli, (int, float)) and slo:
        return sli / slo
    return None


def load_run(run_dir: str) -> dict:
    """The series a score and a plot need, out of a run directory."""
    with open(os.path.join(run_dir, "ground_truth.json")) as f:
        truth = json.load(f)
    t0, t1 = truth.get("started_ts", 0), truth.get("ended_ts", math.inf)
    hps = _hps(truth)
    # The lab's version 2 names its BE tasks under `tasks` (its `antagonists` are
    # phases, task@start); version 1 under `antagonists`.  `be_alone` goes by task name.
    be_names = {task_id: t.get("name", task_id)
                for task_id, t in (truth.get("tasks") or {}).items() if t.get("role") == "be"}
    for a in truth.get("antagonists", []):
        be_names.setdefault(a["task_id"], a["name"])
    run = {"dir": run_dir, "truth": truth, "intervals": [], "be_alloc": [],
           "be_usage": {}, "rollbacks": 0, "changes": 0, "hp_refaults": {}}
    ncpus, present = None, set()
    for frame in read_frames(run_dir):
        kind, ts = frame.get("kind"), frame.get("ts", 0)
        if kind == "measurements":
            ncpus = frame.get("platform", {}).get("platform_topology_cpus") or ncpus
            tasks = frame.get("tasks", {})
            present = set()
            for task_id, task in tasks.items():
                if task.get("labels", {}).get("role") == "be" or \
                        task.get("labels", {}).get("priority") == "be":
                    be_names.setdefault(task_id, task.get("name", task_id))
                if task_id in be_names:
                    present.add(task_id)
                if task_id in be_names and "task_cpu_usage_seconds" in task.get("metrics", {}):
                    run["be_usage"].setdefault(task_id, []).append(
                        (ts, task["metrics"]["task_cpu_usage_seconds"]))
            if not t0 <= ts <= t1:
                continue
            entry = {"ts": ts, "hp": {}}
            for hp in hps:
                m = tasks.get(hp["task_id"], {}).get("metrics", {})
                refaults = m.get("task_mem_workingset_refaults")
                if isinstance(refaults, dict):   # first and last count of the run
                    seen = run["hp_refaults"].setdefault(hp["name"], [None, None])
                    total = sum(refaults.values())
                    seen[0] = total if seen[0] is None else seen[0]
                    seen[1] = total
                entry["hp"][hp["name"]] = {"pressure": _pressure(m, hp.get("slo")),
                                           "p99": m.get("apm_latency_p99_seconds"),
                                           "report": (m.get("apm_report_timestamp_seconds"),
                                                      m.get("apm_sli"),
                                                      m.get("apm_throughput_per_second"))}
            run["intervals"].append(entry)
        elif kind == "allocations" and not frame.get("shutdown"):
            if t0 <= ts <= t1:
                run["changes"] += sum(len(v) for t, v in (frame.get("allocations") or {}).items()
                                      if t in be_names)
            alloc = _be_allocation(frame.get("metrics", []), present, ncpus or 1, truth)
            if alloc is not None:
                run["be_alloc"].append((ts, alloc))
            for s in frame.get("metrics", []):
                if s.get("name") == "slo_controller_rollbacks_total":
                    run["rollbacks"] = max(run["rollbacks"], s["value"])
    run["be_names"] = be_names
    run["ncpus"] = ncpus or 1
    return run


def _be_allocation(samples, be_tasks, ncpus, truth) -> Optional[float]:
    """CPUs the BE tasks (those of this cycle) may use together: their quotas summed (each
    at most its cpuset), at most the CPUs of their cpusets together, at most the node's."""
    if not be_tasks:
        return 0.0
    quota, cpus, union = {}, {}, set()
    for s in samples:
        labels = s.get("labels") or {}
        if labels.get("task_id") not in be_tasks:
            continue
        if s["name"] == "allocation_cpu_quota":
            quota[labels["task_id"]] = min(1.0, s["value"]) * ncpus
        elif s["name"] == "allocation_cpuset_cpus":
            cpus[labels["task_id"]] = s["value"]
            union.update(parse_cpu_list(labels.get("cpus", "")))
    if not quota and not cpus:
        # An allocator that reads nothing back: the cpuset the BE tasks were started on.
        return float(len(parse_cpu_list(truth["be_cpus"]))) if truth.get("be_cpus") else None
    total = sum(min(quota.get(t, ncpus), cpus.get(t, ncpus)) for t in be_tasks)
    return round(min(ncpus, len(union) if union else ncpus, total), 4)


def _reports(run: dict, name: str) -> List[tuple]:
    """(ts, pressure) of one HP task, a load report once (not once per cycle it was read)."""
    out, last = [], None
    for i in run["intervals"]:
        h = i["hp"].get(name)
        if not h or h["pressure"] is None:
            continue
        if h["report"] != last:
            out.append((i["ts"], h["pressure"]))
            last = h["report"]
    return out


def _recovery(reports, start: float, interval: float) -> Optional[float]:
    after = [(ts, p) for ts, p in reports if ts > start]
    broken = next((ts for ts, p in after if p > 1.0 and ts <= start + RECOVERY_WINDOW), None)
    if broken is None:
        return 0.0
    back = next((ts for ts, p in after if ts > broken and p <= 1.0), None)
    return None if back is None else round((back - start) / interval, 2)


def _worst(values) -> Optional[float]:
    """The largest; None (never recovered) wins; None of nothing is 0."""
    values = list(values)
    return None if any(v is None for v in values) else max(values, default=0.0)


def _sign_changes(series: List[tuple], quiet) -> float:
    points = [(ts, v) for ts, v in series if quiet(ts)]
    if len(points) < 2:
        return 0.0
    signs, minutes = [], 0.0
    for (t0, a), (t1, b) in zip(points, points[1:]):
        if t1 - t0 > 5.0:        # a gap (a surge, a BE start) between steady stretches
            signs.append(None)
            continue
        minutes += (t1 - t0) / 60.0
        if b != a:
            signs.append(1 if b > a else -1)
    changes, previous = 0, None
    for s in signs:
        if s is None:
            previous = None
            continue
        if previous is not None and s != previous:
            changes += 1
        previous = s
    return round(changes / minutes, 2) if minutes > 0 else 0.0


def score(run: dict) -> dict:
    truth = run["truth"]
    interval = float(truth.get("interval") or 1.0)
    hps = _hps(truth)
    intervals = run["intervals"]
    within = [all(h["pressure"] is not None and h["pressure"] <= 1.0 for h in i["hp"].values())
              for i in intervals]
    p99s = [h["p99"] for i in intervals for h in i["hp"].values() if h["p99"] is not None]
    worst_pressure = max((h["pressure"] for i in intervals for h in i["hp"].values()
                          if h["pressure"] is not None), default=None)
    # The lab's version 2 lists every aggressive phase under `phases` (and again, version-1
    # shaped, under `antagonists`): one of the two.
    events = [] if truth.get("phases") else \
        [(a["start_ts"], a["name"]) for a in truth.get("antagonists", [])
         if a.get("start_ts", 0) >= truth.get("started_ts", 0)]
    events += [(u["start_ts"], SURGE) for u in truth.get("surges", [])]
    events += [(p["start_ts"], SURGE if p["kind"] == "surge" else p.get("task", p["kind"]))
               for p in truth.get("phases", []) if p.get("kind") in ("aggressive", "surge")]
    recovery = {}
    for start, name in sorted(events):
        if name in recovery:      # the lab's phases: one task may have several
            name = f"{name}@{round(start - truth.get('started_ts', 0))}"
        worst = 0.0
        for hp in hps:
            r = _recovery(_reports(run, hp["name"]), start, interval)
            worst = None if r is None or worst is None else max(worst, r)
        recovery[name] = worst
    # BE work over the run: each task's CPU time from t=0 (or its start) to the end.
    t0, t1 = truth.get("started_ts", 0), truth.get("ended_ts", math.inf)
    used = alone = 0.0
    be_alone = truth.get("be_alone") or {}   # CPU cores each BE task uses alone
    for task_id, series in run["be_usage"].items():
        inside = [(ts, v) for ts, v in series if t0 - interval <= ts <= t1]
        if len(inside) < 2:
            continue
        used += inside[-1][1] - inside[0][1]
        rate = be_alone.get(run["be_names"].get(task_id))
        if rate is not None:
            alone += rate * (inside[-1][0] - inside[0][0])
    ops = _be_ops(truth)
    busy_windows = [(s, s + RECOVERY_WINDOW) for s, _ in events] + \
        [(u["start_ts"], u.get("stop_ts", u["start_ts"]) + 10) for u in _surges(truth)]
    steady = lambda ts: not any(a <= ts <= b for a, b in busy_windows)  # noqa: E731
    host = truth.get("host_load") or []
    others = [h.get("other_cores", h.get("other_cpu_cores")) for h in host]
    others = [o for o in others if o is not None]
    return {
        "run": run["dir"], "scenario": truth.get("scenario"), "config": truth.get("config"),
        "intervals": len(intervals),
        "within_slo": round(sum(within) / len(within), 4) if within else None,
        "worst_p99_seconds": max(p99s) if p99s else None,
        "worst_pressure": round(worst_pressure, 3) if worst_pressure is not None else None,
        "recovery_intervals": recovery,
        "worst_recovery_intervals": _worst(recovery.values()),
        "antagonist_recovery_intervals": _worst(v for k, v in recovery.items()
                                                if not k.startswith(SURGE)),
        "surge_recovery_intervals": _worst(v for k, v in recovery.items()
                                           if k.startswith(SURGE)),
        "be_cpu_seconds": round(used, 2),
        # In ops where the lab measured them alone, else in CPU time (the matrix's be_alone).
        "be_work_vs_alone": (ops["vs_alone"] if ops and ops["vs_alone"] is not None else
                             round(used / alone, 4) if alone else None),
        "be_ops": ops["ops"] if ops else None,
        "changes": run["changes"], "rollbacks": run["rollbacks"],
        "oom_kills": (sum(h["oom_kills"] for h in host if "oom_kills" in h)
                      if any("oom_kills" in h for h in host) else None),
        "hp_refault_pages": (sum(last - first for first, last in run["hp_refaults"].values())
                             if run.get("hp_refaults") else None),
        "sign_changes_per_minute": _sign_changes(run["be_alloc"], steady),
        "host_other_cores_mean": round(statistics.fmean(others), 3) if others else None,
        "host_other_cores_max": max(others) if others else None,
        "host_loadavg1_mean": (round(statistics.fmean(h["loadavg1"] for h in host), 2)
                               if host and "loadavg1" in host[0] else None),
    }


def _be_ops(truth: dict) -> Optional[dict]:
    """BE work in the lab's terms (ground truth version 2): the ops of every BE phase, and
    against `be_alone_ops_per_second` ({task name: ops/s alone}) when the lab records it."""
    phases = [p for p in truth.get("phases", []) if p.get("progress") and
              p.get("kind") != "surge"]
    if not phases:
        return None
    alone_rates = truth.get("be_alone_ops_per_second") or {}
    done = sum(p["progress"].get("ops", 0) for p in phases)
    alone = sum(alone_rates[p["task"]] * p["progress"].get("seconds", 0) for p in phases
                if p.get("task") in alone_rates)
    return {"ops": done, "vs_alone": round(done / alone, 4) if alone else None}


def score_dir(run_dir: str, plot_dir: Optional[str] = None) -> dict:
    run = load_run(run_dir)
    out = score(run)
    if plot_dir:
        plot(run, os.path.join(plot_dir, _run_name(run_dir) + ".png"))
    return out


def _run_name(run_dir: str) -> str:
    parts = os.path.normpath(run_dir).split(os.sep)
    return "-".join(parts[-2:])


# -- the table ---------------------------------------------------------------------------

COLUMNS = (("within_slo", "within SLO", "{:.0%}"),
           ("worst_p99_seconds", "worst p99 ms", "{:.1f}", 1000.0),
           ("antagonist_recovery_intervals", "recovery after antagonist (intervals)",
            "{:.1f}"),
           ("surge_recovery_intervals", "recovery after surge (intervals)", "{:.1f}"),
           ("be_work_vs_alone", "BE work / alone", "{:.2f}"),
           ("be_vs_static", "BE work / static", "{:.2f}"),
           ("changes", "changes", "{:.0f}"),
           ("hp_refault_pages", "HP refaults (pages)", "{:.0f}"),
           ("oom_kills", "OOM kills", "{:.0f}"),
           ("rollbacks", "rollbacks", "{:.0f}"),
           ("sign_changes_per_minute", "sign changes /min", "{:.1f}"),
           ("host_other_cores_mean", "host others (cores)", "{:.2f}"))


def format_table(scores: List[dict]) -> str:
    """Markdown: one row per scenario and configuration, mean [min..max] over repeats."""
    groups: Dict[tuple, List[dict]] = {}
    for s in scores:
        groups.setdefault((s["scenario"], s["config"]), []).append(s)
    static = {scn: statistics.fmean(x["be_cpu_seconds"] for x in runs)
              for (scn, cfg), runs in groups.items() if cfg == "static"}
    for (scn, cfg), runs in groups.items():
        for x in runs:
            x["be_vs_static"] = x["be_cpu_seconds"] / static[scn] if static.get(scn) else None
    head = "| scenario | config | runs | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    order = {"none": 0, "static": 1, "controller": 2, "controller-floor": 3}
    for (scn, cfg) in sorted(groups, key=lambda k: (k[0], order.get(k[1], 9))):
        runs = groups[(scn, cfg)]
        cells = []
        for key, _, fmt, *scale in COLUMNS:
            values = [x[key] for x in runs]
            if any(v is None for v in values):
                known = [v for v in values if v is not None]
                missing = len(values) - len(known)
                if key.endswith("recovery_intervals"):
                    cells.append((_cell(known, fmt, scale) + " " if known else "") +
                                 f"({missing} never)")
                else:
                    cells.append(_cell(known, fmt, scale) if known else "n/a")
                continue
            cells.append(_cell(values, fmt, scale))
        lines.append(f"| {scn} | {cfg} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(values, fmt, scale) -> str:
    k = scale[0] if scale else 1.0
    values = [v * k for v in values]
    mean = statistics.fmean(values)
    if len(values) == 1 or min(values) == max(values):
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(min(values))}..{fmt.format(max(values))}]"


# -- plots -------------------------------------------------------------------------------

def panels(axes, run: dict) -> None:
    """Three matplotlib axes: each HP's SLI / SLO, the BE allocation (CPUs), the BE work
    (CPU cores used), against seconds from t=0, with the BE starts and surges marked."""
    truth = run["truth"]
    t0 = truth.get("started_ts", 0)
    for hp in _hps(truth):
        r = _reports(run, hp["name"])
        axes[0].plot([ts - t0 for ts, _ in r], [p for _, p in r], label=hp["name"])
    axes[0].axhline(1.0, color="red", linewidth=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("SLI / SLO")
    axes[0].legend(loc="upper right")
    axes[1].step([ts - t0 for ts, _ in run["be_alloc"]], [v for _, v in run["be_alloc"]],
                 where="post")
    axes[1].set_ylabel("BE CPUs allowed")
    total: Dict[float, float] = {}
    for series in run["be_usage"].values():
        for (ta, a), (tb, b) in zip(series, series[1:]):
            if tb > ta:
                total[tb] = total.get(tb, 0.0) + (b - a) / (tb - ta)
    axes[2].plot([ts - t0 for ts in sorted(total)], [total[ts] for ts in sorted(total)])
    axes[2].set_ylabel("BE CPU used (cores)")
    axes[2].set_xlabel("seconds")
    for a in truth.get("antagonists", []):
        for ax in axes:
            ax.axvline(a["start_ts"] - t0, color="grey", linestyle="--", linewidth=0.8)
    for u in _surges(truth):
        for ax in axes:
            ax.axvspan(u["start_ts"] - t0, u.get("stop_ts", u["start_ts"]) - t0,
                       color="orange", alpha=0.15)


def plot(run: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(9, 7))
    panels(axes, run)
    truth = run["truth"]
    axes[0].set_title(f"{truth.get('scenario')} / {truth.get('config')}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
