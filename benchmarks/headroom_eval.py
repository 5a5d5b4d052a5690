#!/usr/bin/env python3
"""The headroom's acceptance run: a BE filler that follows the published headroom.

    python benchmarks/headroom_eval.py run [--repeat 3] [-o runs/headroom]
    python benchmarks/headroom_eval.py score runs/headroom/run-*

`run` makes each repeat with the lab's runner (`owca-scenario run`, docs/workloads.md)
on benchmarks/headroom/nginx.yaml with benchmarks/headroom/lab-headroom.yaml (the
pipeline with `allocate: headroom:`), and beside it benchmarks/headroom_filler.py,
which keeps BE CPU workers in the scenario's idle BE task `filler` at the headroom that
owca-allocate publishes.  Run it alone on a quiet host (the lab's quiet-run wrapper).

`score` reads each run's recording.jsonl (the frames after owca-allocate) and prints,
per run and as mean [min..max]:

- within SLO: the share of intervals (measurements frames with a fresh HP report) in
  which every HP task's SLI met its SLO (pressure = SLI / SLO <= 1);
- BE / idle: the BE tasks' CPU time over the idle CPU the HP tasks left, the oracle:
  the sum over intervals of (capacity - the HP tasks' CPU rate) x the interval, with
  capacity the headroom's own capacity term (the CPUs BE may use);
- overstated: the share of one-minute windows in which an SLO broke and BE used more CPU
  than the HP had left idle in that window;
- the headroom's mean and the time it spent at zero.

The issue's goals: within SLO >= 95 %, BE / idle >= 0.80, overstated < 1 %.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def frames_of(path):
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def cpu_used(cpu, before, role, kind):
    """CPU seconds the tasks of `kind` used between two frames' counters."""
    return sum(max(0.0, cpu[t] - before[t]) for t in cpu
               if role[t] == kind and isinstance(cpu[t], (int, float))
               and isinstance(before.get(t), (int, float)))


def score_run(directory):
    hp_ok = hp_total = 0
    be_seconds = idle_seconds = 0.0
    prev = None
    capacity = None
    headrooms = []
    windows = defaultdict(lambda: {"broke": False, "be": 0.0, "idle": 0.0})
    start = None
    for frame in frames_of(os.path.join(directory, "recording.jsonl")):
        if frame.get("kind") == "allocations":
            for s in frame.get("metrics") or []:
                if s.get("labels"):
                    continue
                if s.get("name") == "headroom_cpu_capacity_cores":
                    capacity = s["value"]
                elif s.get("name") == "headroom_cpu_cores":
                    headrooms.append(s["value"])
            continue
        if frame.get("kind") != "measurements":
            continue
        ts = frame["ts"]
        start = ts if start is None else start
        tasks = frame["tasks"]
        role = {t: (v.get("labels") or {}).get("role") for t, v in tasks.items()}
        cpu = {t: (v.get("metrics") or {}).get("task_cpu_usage_seconds")
               for t, v in tasks.items()}
        window = windows[int((ts - start) // 60)]
        broke = False
        fresh = False
        for t, v in tasks.items():
            if role[t] != "hp":
                continue
            m = v.get("metrics") or {}
            normalized = m.get("apm_sli_normalized")
            if isinstance(normalized, (int, float)) and normalized > 0:
                fresh = True
                broke = broke or 1 / normalized > 1
        if fresh:
            hp_total += 1
            hp_ok += not broke
        window["broke"] = window["broke"] or broke
        if prev is not None and capacity is not None and ts > prev[0]:
            dt = ts - prev[0]
            hp_rate = cpu_used(cpu, prev[1], role, "hp") / dt
            be = cpu_used(cpu, prev[1], role, "be")
            idle = max(0.0, capacity - hp_rate) * dt
            be_seconds += be
            idle_seconds += idle
            window["be"] += be
            window["idle"] += idle
        prev = (ts, cpu)
    overstated = sum(1 for w in windows.values() if w["broke"] and w["be"] > w["idle"])
    return {"run": os.path.basename(directory.rstrip("/")),
            "within_slo": hp_ok / hp_total if hp_total else None,
            "be_over_idle": be_seconds / idle_seconds if idle_seconds else None,
            "overstated_windows": overstated / len(windows) if windows else None,
            "windows": len(windows),
            "headroom_mean_cores": statistics.fmean(headrooms) if headrooms else None,
            "headroom_zero_share": (sum(1 for h in headrooms if h == 0) / len(headrooms))
            if headrooms else None}


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.fmean(values):.3f} [{min(values):.3f}..{max(values):.3f}]"


def score(dirs, as_json):
    results = [score_run(d) for d in dirs]
    if as_json:
        print(json.dumps(results, indent=1))
        return 0
    keys = ("within_slo", "be_over_idle", "overstated_windows", "headroom_mean_cores",
            "headroom_zero_share")
    print("| run | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in results:
        print(f"| {r['run']} | " + " | ".join("-" if r[k] is None else f"{r[k]:.3f}"
                                              for k in keys) + " |")
    print("| mean [min..max] | " + " | ".join(spread([r[k] for r in results])
                                              for k in keys) + " |")
    return 0


def run(out, repeat, scenario, config):
    os.makedirs(out, exist_ok=True)
    for i in range(1, repeat + 1):
        directory = os.path.join(out, f"run-{i}")
        # The lab's runner beside this interpreter (a venv's bin/), else on PATH.
        runner = os.path.join(os.path.dirname(sys.executable), "owca-scenario")
        lab = subprocess.Popen([runner if os.path.exists(runner) else "owca-scenario", "run",
                                "-c", config, "-o", directory, scenario])
        filler = subprocess.Popen([sys.executable, os.path.join(HERE, "headroom_filler.py"),
                                   "--recording", os.path.join(directory, "recording.jsonl"),
                                   "--cgroup-glob", "/owca-scenario-headroom-nginx-*/filler",
                                   "--log", os.path.join(out, f"filler-{i}.jsonl")])
        status = lab.wait()
        filler.terminate()
        filler.wait()
        if status != 0:
            print(f"run {i}: owca-scenario exited {status}", file=sys.stderr)
            return status
    return score([os.path.join(out, f"run-{i}") for i in range(1, repeat + 1)], False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("-o", "--out", default="runs/headroom")
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--scenario", default=os.path.join(HERE, "headroom", "nginx.yaml"))
    r.add_argument("--config", default=os.path.join(HERE, "headroom", "lab-headroom.yaml"))
    s = sub.add_parser("score")
    s.add_argument("dirs", nargs="+")
    s.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.command == "run":
        return run(a.out, a.repeat, a.scenario, a.config)
    return score(a.dirs, a.json)


if __name__ == "__main__":
    sys.exit(main())
