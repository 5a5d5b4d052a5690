"""One picture of a scored run (matplotlib, the `plot` extra): what a person looks at first.

Panels over the run's seconds (t=0 the scenario's start), sharing the time axis:
1. the HP's SLI per load report, the SLO, and the detector's alarms (red marks
   on the top edge: right ones filled, false ones hollow; "no alarm" written when there
   is none) and allocations;
2. the HP's CPU use and its run-queue delay (seconds per second);
3. the HP's pressure stall (PSI some, cpu / memory / io) where it has it;
4. each BE task's CPU use;
5. the host's own load: others' CPU on the HP's cores, host PSI cpu.
Aggressive phases are shaded in every panel, one colour per resource, and named in a
box at the foot of the first panel; load surges are hatched; benign phases are drawn
as thin bars in the BE panel.  A legend lists only what the picture shows: a kind of
marker, shading or hatching that does not occur in the run has no entry.
"""
import os
import textwrap
from typing import Dict, List

from owca_workloads import score as scoring
from owca_workloads.scenario import BUSY_CORES, BUSY_SHARE

RESOURCE_COLOURS = {"cpu": "tab:red", "llc": "tab:purple", "memory_bandwidth": "tab:orange",
                    "memory": "tab:brown", "io": "tab:blue"}


def _rates(frames: List[dict], task_id: str, metric: str, origin: float) -> tuple:
    """(t, per-second rate) of a counter of a task between consecutive frames."""
    xs, ys, last = [], [], None
    for f in frames:
        value = f["tasks"].get(task_id, {}).get("metrics", {}).get(metric)
        if value is None:
            last = None
            continue
        if last is not None and f["ts"] > last[0] and value >= last[1]:
            xs.append(f["ts"] - origin)
            ys.append((value - last[1]) / (f["ts"] - last[0]))
        last = (f["ts"], value)
    return xs, ys


def _gauge(frames, task_id, metric, origin, *levels) -> tuple:
    xs, ys = [], []
    for f in frames:
        value = f["tasks"].get(task_id, {}).get("metrics", {}).get(metric)
        for level in levels:
            value = value.get(level) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            xs.append(f["ts"] - origin)
            ys.append(value)
    return xs, ys


def plot_runs(plot_dir: str, results: List[tuple]) -> None:
    """PLOT_DIR/<recording>.png for each of score.score_dirs' results."""
    os.makedirs(plot_dir, exist_ok=True)
    for name, scored, truth, lines, anomalies in results:
        plot_run(os.path.join(plot_dir, f"{name}.png"), name, truth, lines, anomalies, scored)


def host_line(scored: dict) -> str:
    """The title's line about the host: what the noisy flag says, in words."""
    if scored["noisy"]:
        return "NOISY host, the run says as much about the host as about interference: " + \
            "; ".join(scored["noisy_reasons"])
    return (f"quiet host (not noisy): with no antagonist the HP met its SLO, and other "
            f"programs used more than {BUSY_CORES:g} cores of its CPUs in under "
            f"{BUSY_SHARE:.0%} of intervals")


def _episode_labels(ax, phases: List[dict], origin: float) -> None:
    """Each aggressive phase named in a box at the foot of the panel, in its resource's
    colour; a label that would run into the one before goes one row up."""
    lo, hi = ax.get_xlim()
    per_char = (hi - lo) / 140      # the panel is about 140 characters of 9 points wide
    rows: List[float] = []          # where each row's last label ends
    trans = ax.get_xaxis_transform()
    for p in sorted(phases, key=lambda p: p["start_ts"]):
        text = f"BE task {p['task']}: {p['resource']} antagonist"
        x = p["start_ts"] - origin
        row = next((i for i, end in enumerate(rows) if end < x), len(rows))
        if row == len(rows):
            rows.append(0.0)
        rows[row] = x + (len(text) + 3) * per_char
        ax.text(x, 0.03 + 0.09 * row, text, transform=trans, fontsize=9, va="bottom",
                ha="left", color="black", zorder=6,
                bbox={"boxstyle": "round,pad=0.25", "lw": 1.2, "facecolor": "white",
                      "edgecolor": RESOURCE_COLOURS.get(p["resource"], "grey")})


def plot_run(path: str, name: str, truth: dict, lines, anomalies: Dict[int, list],
             scored: dict) -> str:
    import matplotlib.pyplot as plt

    fig = figure(name, truth, lines, scored)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def figure(name: str, truth: dict, lines, scored: dict):
    """The run's matplotlib figure (the caller saves and closes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    origin = truth.get("started_ts") or 0.0
    hp = truth["hp"]
    frames = [f for f in scoring.frames_of(lines, "measurements")]
    fig, axes = plt.subplots(5, 1, figsize=(13, 12), sharex=True,
                             gridspec_kw={"height_ratios": [3, 2, 1.5, 2, 1.5]})
    ax_sli, ax_cpu, ax_psi, ax_be, ax_host = axes
    all_phases = scoring.phases(truth)

    # episodes and surges, in every panel
    shading = {}    # legend label -> patch, for the kinds the run has
    for p in all_phases:
        if p["kind"] == "aggressive":
            colour = RESOURCE_COLOURS.get(p["resource"], "grey")
            shading.setdefault(f"{p['resource']} antagonist running",
                               Patch(color=colour, alpha=0.15, lw=0))
        elif p["kind"] == "surge":
            shading.setdefault("load surge (no antagonist)",
                               Patch(facecolor="none", edgecolor="grey", hatch="//", lw=0))
        a, b = p["start_ts"] - origin, p["stop_ts"] - origin
        for ax in axes:
            if p["kind"] == "aggressive":
                ax.axvspan(a, b, color=RESOURCE_COLOURS.get(p["resource"], "grey"), alpha=0.15,
                           lw=0)
            elif p["kind"] == "surge":
                ax.axvspan(a, b, facecolor="none", edgecolor="grey", hatch="//", alpha=0.5, lw=0)
    # 1: the SLI
    reports = [r for r in scoring.sli_by_label(truth, lines) if r[1] > 0]  # a log scale
    unit = 1000.0 if "seconds" in (hp.get("sli_metric") or "") else 1.0
    ax_sli.plot([t - origin for t, _, _ in reports], [v * unit for _, v, _ in reports],
                "k.-", lw=0.8, ms=3, label=f"HP {hp.get('sli_metric')} (per report)")
    if hp.get("slo") is not None:
        ax_sli.axhline(hp["slo"] * unit, color="k", ls="--", lw=0.8,
                       label=f"SLO {hp['slo'] * unit:.3g}{' ms' if unit == 1000 else ''}")
    ax_sli.set_yscale("log")
    ax_sli.set_ylabel("ms" if unit == 1000 else hp.get("sli_metric"))
    by_seq = {f["seq"]: f["ts"] for f in frames}
    right, wrong = [], []
    for seq in scored.get("alarm_seqs", []):
        ts = by_seq.get(seq)
        if ts is not None:
            (right if scoring.frame_label(truth, ts) == "positive" else wrong).append(ts - origin)
    trans = ax_sli.get_xaxis_transform()
    if right:
        ax_sli.scatter(right, [0.97] * len(right), marker="v", color="red", transform=trans,
                       label="alarm during an antagonist (right)", zorder=5)
    if wrong:
        ax_sli.scatter(wrong, [0.97] * len(wrong), marker="v", facecolors="none",
                       edgecolors="red", transform=trans,
                       label="alarm with no antagonist (false)", zorder=5)
    if not right and not wrong:
        ax_sli.text(0.99, 0.97, "no alarm: the detector flagged nothing in this run",
                    transform=ax_sli.transAxes, ha="right", va="top", fontsize=9,
                    color="red", zorder=6,
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "lw": 0})
    allocations = [f["ts"] - origin for f in scoring.frames_of(lines, "allocations")
                   if f.get("allocations")]
    if allocations:
        ax_sli.scatter(allocations, [0.91] * len(allocations), marker="|", color="tab:green",
                       transform=trans, label="allocation")
    handles, labels = ax_sli.get_legend_handles_labels()
    ax_sli.legend(handles + list(shading.values()), labels + list(shading), loc="upper left",
                  fontsize=8, ncol=2)
    _episode_labels(ax_sli, [p for p in all_phases if p["kind"] == "aggressive"], origin)
    # 2: the HP's CPU and run-queue delay
    ax_cpu.plot(*_rates(frames, hp["task_id"], "task_cpu_usage_seconds", origin), "b-", lw=1,
                label="HP CPU (cores)")
    ax_cpu.plot(*_rates(frames, hp["task_id"], "task_run_queue_delay_seconds", origin), "r-",
                lw=1, label="HP run-queue delay (s/s)")
    ax_cpu.legend(loc="upper left", fontsize=7)
    ax_cpu.set_ylabel("per second")
    # 3: the HP's PSI
    for resource, style in (("cpu", "r-"), ("memory", "-"), ("io", "b-")):
        xs, ys = _gauge(frames, hp["task_id"], "task_pressure_avg10_percent", origin,
                        resource, "some")
        if xs:
            ax_psi.plot(xs, ys, style, lw=1, label=f"HP PSI {resource} some avg10")
    ax_psi.set_ylabel("%")
    if ax_psi.get_legend_handles_labels()[0]:
        ax_psi.legend(loc="upper left", fontsize=7)
    # 4: the BE tasks
    for task_id, task in sorted(truth.get("tasks", {}).items(), key=lambda kv: kv[1]["name"]):
        if task.get("role") != "be":
            continue
        line, = ax_be.plot(*_rates(frames, task_id, "task_cpu_usage_seconds", origin), lw=1,
                           label=f"{task['name']} ({task.get('resource')})")
        for p in all_phases:
            if p["task_id"] == task_id and p["kind"] == "benign":
                ax_be.axvspan(p["start_ts"] - origin, p["stop_ts"] - origin, ymin=0, ymax=0.04,
                              color=line.get_color())
    ax_be.set_ylabel("BE CPU (cores)")
    benign = any(p["kind"] == "benign" for p in all_phases)
    ax_be.legend(loc="upper left", fontsize=7, ncol=3,
                 title="bar at the foot: a decoy (benign phase)" if benign else None,
                 title_fontsize=7)
    # 5: the host
    load = truth.get("host_load") or []
    ax_host.plot([x["ts"] - origin for x in load], [x.get("other_cpu_on_hp_cpus", 0) for x in load],
                 "k-", lw=1, label="others' CPU on the HP cores")
    ax_host.set_ylabel("cores")
    twin = ax_host.twinx()
    twin.plot([x["ts"] - origin for x in load], [x.get("cpu_some_percent", 0) for x in load],
              color="grey", lw=0.8, ls=":", label="host PSI cpu some (%)")
    twin.set_ylabel("%")
    ax_host.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    ax_host.set_xlabel("seconds since the scenario's start"
                       + (" (shaded: an antagonist runs" if shading else "")
                       + (", hatched: a load surge" if "load surge (no antagonist)" in shading
                          else "") + (")" if shading else ""))
    t = scoring.totals([scored])
    noisy = textwrap.fill(host_line(scored), 150)
    fig.suptitle(f"{name} ({hp.get('workload')}): recall {scoring._f(t['recall'])}, "
                 f"precision {scoring._f(t['precision'])}, false alarms/h quiet "
                 f"{scoring._f(t['false_alarms_per_hour_quiet'], '{:.0f}')}, surge "
                 f"{scoring._f(t['false_alarms_per_hour_surge'], '{:.0f}')}, SLI within SLO "
                 f"{scoring._f(t['within_slo'])}\n{noisy}", fontsize=10)
    fig.tight_layout()
    return fig
