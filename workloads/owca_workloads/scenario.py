"""Interference scenarios: an HP workload under sine load, BE antagonists at scripted times.

The runner starts the HP workload in its own cgroup, pinned to the scenario's
cores; its load generator (owca-sine under owca-wrap, on other cores) keeps the
HP task's APM file fresh; the real pipeline runs beside it,

    owca-discover (static file) | owca-measure (apm_dir) | owca-detect
        | tee recording.jsonl | owca-ship (file storage)

and the antagonists are started and stopped, each in its own cgroup on the HP
task's cores, at the times the scenario names.  The static tasks file lists the
HP task and the antagonists that run, so that the recording holds exactly them.
Beside the recording the runner writes the ground truth: which antagonist ran
when, on which cores, against which HP task, and the load's parameters.
docs/workloads.md describes both formats.
"""
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import yaml

from owca.paths import Paths

from owca_workloads.catalog import Workload, load_catalog, start, wrapped_load
from owca_workloads.cli import WORKLOADS_DIR
from owca_workloads.launch import Launcher, enter_cgroups

log = logging.getLogger("owca.scenario")

ROOT = os.path.dirname(WORKLOADS_DIR)
GROUND_TRUTH_VERSION = 1
PIPELINE = ("discover", "measure", "detect", "tee", "ship")


class ScenarioError(ValueError):
    """A scenario file that cannot be used: `file: reason`."""


@dataclass
class LoadSpec:
    base: float = 800.0
    amplitude: float = 400.0
    period: float = 60.0
    step: Optional[float] = None
    connections: Optional[int] = None


@dataclass
class HpSpec:
    workload: str
    name: Optional[str] = None
    slo: Optional[float] = None
    load: LoadSpec = field(default_factory=LoadSpec)


@dataclass
class AntagonistSpec:
    workload: str
    start: float
    stop: float
    name: Optional[str] = None


@dataclass
class Scenario:
    name: str
    duration: float
    hp: HpSpec
    antagonists: List[AntagonistSpec] = field(default_factory=list)
    interval: float = 1.0
    cpus: str = "0"
    loadgen_cpus: Optional[str] = None
    # Seconds of load before t=0, so that the first samples are not a cold start.
    warmup: float = 4.0


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a mapping")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ScenarioError(f"{where}: {e}") from None


def parse_scenario(text: str, where: str = "scenario") -> Scenario:
    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a mapping")
    raw = dict(raw)
    hp = dict(raw.get("hp") or {})
    hp["load"] = _build(LoadSpec, hp.get("load") or {}, f"{where}: hp.load")
    raw["hp"] = _build(HpSpec, hp, f"{where}: hp")
    raw["antagonists"] = [_build(AntagonistSpec, a, f"{where}: antagonists[{i}]")
                          for i, a in enumerate(raw.get("antagonists") or [])]
    scenario = _build(Scenario, raw, where)
    check_scenario(scenario, where)
    return scenario


def check_scenario(s: Scenario, where: str, catalog: Dict[str, Workload] = None) -> None:
    catalog = catalog or load_catalog()
    if not s.name or "/" in s.name:
        raise ScenarioError(f"{where}: name: expected a cgroup-safe name")
    if not s.duration > 0 or not s.interval > 0:
        raise ScenarioError(f"{where}: duration and interval: expected positive seconds")
    hp = catalog.get(s.hp.workload)
    if hp is None or hp.role != "hp":
        raise ScenarioError(f"{where}: hp.workload {s.hp.workload!r} is not an hp workload "
                            f"of the catalog")
    names = {s.hp.name or s.hp.workload, "loadgen", "pipeline"}
    for i, a in enumerate(s.antagonists):
        be = catalog.get(a.workload)
        if be is None or be.role != "be":
            raise ScenarioError(f"{where}: antagonists[{i}].workload {a.workload!r} is not a "
                                f"be workload of the catalog")
        if not 0 <= a.start < a.stop <= s.duration:
            raise ScenarioError(f"{where}: antagonists[{i}]: expected 0 <= start < stop <= "
                                f"duration ({s.duration})")
        name = a.name or a.workload
        if name in names:
            raise ScenarioError(f"{where}: antagonists[{i}]: name {name!r} is taken")
        names.add(name)


def load_scenario(path: str) -> Scenario:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ScenarioError(f"{path}: {e.strerror}") from None
    return parse_scenario(text, path)


def other_cpus(cpus: str, paths: Paths) -> str:
    """The online CPUs not in `cpus` (the load generator's), or all when none is left."""
    online = _cpu_list(open(paths.sys("devices/system/cpu/online")).read())
    rest = sorted(online - _cpu_list(cpus))
    return ",".join(map(str, rest)) if rest else ",".join(map(str, sorted(online)))


def _cpu_list(text: str) -> set:
    out = set()
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    return out


def tool_argv(name: str) -> List[str]:
    """bin/owca-<name> of this tree with this interpreter, else the installed one."""
    path = os.path.join(ROOT, "bin", f"owca-{name}")
    return [sys.executable, path] if os.path.exists(path) else [f"owca-{name}"]


def tool_env() -> dict:
    env = dict(os.environ)
    lib = os.path.join(ROOT, "lib")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib, ROOT, env.get("PYTHONPATH")) if p)
    return env


class Runner:
    def __init__(self, scenario: Scenario, out_dir: str, detect_config: Optional[str] = None,
                 signals=None, paths: Paths = None, catalog: Dict[str, Workload] = None):
        self.s = scenario
        self.out = os.path.abspath(out_dir)
        self.detect_config = detect_config
        self.signals = signals
        self.paths = paths or Paths()
        self.catalog = catalog or load_catalog()
        self.parent = f"/owca-scenario-{scenario.name}-{os.getpid()}"
        self.launcher = Launcher(self.parent, self.paths,
                                 state_file=os.path.join(self.out, "launcher-state.json"))
        self.pipeline: List[subprocess.Popen] = []
        self.logs = {}
        self.origin = None
        self.events = []

    # -- files --------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def log_file(self, name: str):
        if name not in self.logs:
            self.logs[name] = open(self.path("logs", f"{name}.log"), "ab")
        return self.logs[name]

    def write_tasks(self) -> None:
        """The static discovery file: the HP task and the antagonists now running."""
        tasks = []
        for w in self.launcher.launched.values():
            if w.role in ("hp", "be") and w.stopped_ts is None:
                tasks.append({"id": w.cgroup_path, "name": w.name, "cgroup_path": w.cgroup_path,
                              "labels": {"role": w.role, "workload": w.workload,
                                         "scenario": self.s.name}})
        tmp = self.path("tasks.yaml.tmp")
        with open(tmp, "w") as f:
            yaml.safe_dump(tasks, f, sort_keys=False)
        os.replace(tmp, self.path("tasks.yaml"))

    def write_pipeline_config(self) -> str:
        """The configuration of discover, measure and ship (detect takes its own)."""
        q = json.dumps  # a JSON string is a YAML double-quoted scalar
        text = (f"discover:\n"
                f"  source: !StaticDiscovery\n"
                f"    file: {q(self.path('tasks.yaml'))}\n"
                f"  interval: {self.s.interval}\n"
                f"measure:\n"
                f"  apm_dir: {q(self.path('apm'))}\n"
                f"  apm_max_age: {max(10.0, 5 * self.s.interval)}\n"
                f"ship:\n"
                f"  storages:\n"
                f"    - !FileStorage\n"
                f"      path: {q(self.path('metrics.prom'))}\n")
        path = self.path("pipeline.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    # -- the pipeline -------------------------------------------------------------------
    def start_pipeline(self, config: str, cpus: str) -> None:
        """The pipeline's stages in a cgroup of their own on `cpus` (the load generator's),
        so that their cycles do not disturb the HP task's cores."""
        enter = enter_cgroups(self.launcher.make_cgroup("pipeline", cpus).procs_files())
        commands = {
            "discover": tool_argv("discover") + ["-c", config],
            "measure": tool_argv("measure") + ["-c", config],
            "detect": tool_argv("detect") + (["-c", self.detect_config]
                                             if self.detect_config else []),
            "tee": ["tee", self.path("recording.jsonl")],
            "ship": tool_argv("ship") + ["-c", config],
        }
        stdin = subprocess.DEVNULL
        env = tool_env()
        for stage in PIPELINE:
            last = stage == PIPELINE[-1]
            p = subprocess.Popen(commands[stage], stdin=stdin,
                                 stdout=subprocess.DEVNULL if last else subprocess.PIPE,
                                 stderr=self.log_file(stage), env=env, start_new_session=True,
                                 preexec_fn=enter)
            if stdin is not subprocess.DEVNULL:
                stdin.close()  # the next stage holds it now
            stdin = p.stdout
            self.pipeline.append(p)

    def stop_pipeline(self, timeout: float = 20.0) -> None:
        """SIGTERM to the source; every later stage ends on its input's EOF."""
        if not self.pipeline:
            return
        source = self.pipeline[0]
        if source.poll() is None:
            source.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.pipeline:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pipeline stage %s (pid %d) did not end: killing it", p.args[-1], p.pid)
                p.kill()
                p.wait()
        self.pipeline = []

    # -- the run ------------------------------------------------------------------------
    def stopping(self) -> bool:
        return self.signals is not None and self.signals.stop

    def sleep_until(self, t: float) -> None:
        while not self.stopping():
            left = t - time.monotonic()
            if left <= 0:
                return
            if self.signals is not None:
                self.signals.sleep(min(left, 1.0))
            else:
                time.sleep(min(left, 1.0))

    def run(self) -> dict:
        os.makedirs(self.path("logs"), exist_ok=True)
        os.makedirs(self.path("apm"), exist_ok=True)
        for stale in ("recording.jsonl", "ground_truth.json", "metrics.prom"):
            if os.path.exists(self.path(stale)):
                os.unlink(self.path(stale))
        s = self.s
        hp_wl = self.catalog[s.hp.workload]
        hp_name = s.hp.name or s.hp.workload
        loadgen_cpus = s.loadgen_cpus or other_cpus(s.cpus, self.paths)
        truth = {"version": GROUND_TRUTH_VERSION, "scenario": s.name, "host": os.uname().nodename,
                 "cpus": s.cpus, "loadgen_cpus": loadgen_cpus, "interval": s.interval,
                 "duration": s.duration, "completed": False}
        try:
            hp_dir = self.path("run", hp_name)
            hp, port = start(self.launcher, hp_wl, hp_name, hp_dir, s.cpus,
                             self.log_file(hp_name))
            self.write_tasks()
            self.start_pipeline(self.write_pipeline_config(), loadgen_cpus)
            load = s.hp.load
            argv = wrapped_load(hp_wl, hp.cgroup_path, hp_dir, port, self.path("apm"),
                                load.base, load.amplitude, load.period,
                                slo=s.hp.slo, step=load.step, connections=load.connections,
                                interval=min(1.0, s.interval),
                                labels={"scenario": s.name})
            self.launcher.start("loadgen", argv, cpus=loadgen_cpus,
                                stdout=self.log_file("loadgen"), stderr=self.log_file("loadgen"),
                                role="loadgen", workload=hp_wl.load.parser)
            load_started = time.time()
            truth["hp"] = {"task_id": hp.cgroup_path, "name": hp_name, "workload": hp_wl.name,
                           "port": port, "slo": s.hp.slo if s.hp.slo is not None else hp_wl.slo,
                           "sli_metric": hp_wl.sli_metric,
                           "load": {**asdict(load), "step": load.step or hp_wl.load.step,
                                    "generator": hp_wl.load.command[0],
                                    "fixed": hp_wl.load.fixed, "started_ts": load_started}}
            self.sleep_until(time.monotonic() + s.warmup)
            self.origin = time.monotonic()
            truth["started_ts"] = time.time()
            truth["antagonists"] = self.play(hp.cgroup_path)
            truth["completed"] = not self.stopping()
        finally:
            truth["ended_ts"] = time.time()
            self.stop_pipeline()
            self.launcher.stop_all()
            truth.setdefault("antagonists", [])
            with open(self.path("ground_truth.json"), "w") as f:
                json.dump(truth, f, indent=1)
                f.write("\n")
            for f in self.logs.values():
                f.close()
        return truth

    def play(self, hp_task_id: str) -> List[dict]:
        """The antagonists' script; what actually ran, when."""
        s = self.s
        events = []
        for a in s.antagonists:
            events.append((a.start, 1, a))
            events.append((a.stop, 0, a))
        events.sort(key=lambda e: (e[0], e[1]))
        record = {}
        for at, starting, a in events:
            self.sleep_until(self.origin + at)
            if self.stopping():
                break
            name = a.name or a.workload
            wl = self.catalog[a.workload]
            if starting:
                launched, _ = start(self.launcher, wl, name, self.path("run", name), s.cpus,
                                    self.log_file(name))
                record[name] = {"name": name, "workload": wl.name, "resource": wl.resource,
                                "task_id": launched.cgroup_path, "cpus": s.cpus,
                                "contended_task_id": hp_task_id,
                                "scheduled_start": a.start, "scheduled_stop": a.stop,
                                "start_ts": launched.started_ts, "stop_ts": None}
            else:
                stopped = self.launcher.stop(name)
                record[name]["stop_ts"] = stopped.stopped_ts
            self.write_tasks()
        self.sleep_until(self.origin + s.duration)
        now = time.time()
        for name, r in record.items():  # stopped early, or by a signal
            if r["stop_ts"] is None:
                r["stop_ts"] = self.launcher.stop(name).stopped_ts or now
        return list(record.values())


# -- reading a recording back ---------------------------------------------------------------

def hp_samples(recording_lines, task_id: str, metric: str) -> List[tuple]:
    """(ts, value) of a task's metric in the measurements frames of a recording,
    consecutive repeats of one value (one load report read in several cycles) once."""
    out = []
    for line in recording_lines:
        try:
            frame = json.loads(line)
        except ValueError:
            continue
        if frame.get("kind") != "measurements":
            continue
        value = frame.get("tasks", {}).get(task_id, {}).get("metrics", {}).get(metric)
        if value is None or (out and out[-1][1] == value):
            continue
        out.append((frame["ts"], value))
    return out


def summarize(recording_lines, truth: dict, metric: Optional[str] = None) -> dict:
    """The HP task's metric with no antagonist, and under each antagonist.

    A sample is taken to describe the load report that precedes it by up to one
    step and one interval: it counts for a window only when that whole lag lies
    inside it, and for the baseline only when it overlaps no antagonist.
    """
    hp = truth["hp"]
    metric = metric or hp.get("sli_metric") or "apm_latency_p99_seconds"
    lag = float(hp["load"].get("step") or 2.0) + float(truth.get("interval", 1.0)) + 0.5
    lines = list(recording_lines)
    samples = [(ts, v) for ts, v in hp_samples(lines, hp["task_id"], metric)
               if ts >= truth.get("started_ts", 0)]
    windows = [(a["start_ts"], a["stop_ts"], a["name"]) for a in truth.get("antagonists", [])]
    baseline, during = [], {name: [] for _, _, name in windows}
    for ts, value in samples:
        inside = [name for start, stop, name in windows if start <= ts - lag and ts <= stop]
        overlaps = any(ts - lag <= stop and ts >= start for start, stop, _ in windows)
        for name in inside:
            during[name].append(value)
        if not overlaps:
            baseline.append(value)
    throughput = dict(hp_samples(lines, hp["task_id"], "apm_throughput_per_second"))

    def stats(values):
        if not values:
            return {"samples": 0}
        return {"samples": len(values), "median": statistics.median(values),
                "mean": statistics.fmean(values), "max": max(values)}

    out = {"hp_task_id": hp["task_id"], "metric": metric, "baseline": stats(baseline),
           "antagonists": []}
    for _begin, _end, name in windows:
        entry = {"name": name, **stats(during[name])}
        if entry["samples"] and out["baseline"]["samples"]:
            entry["ratio_to_baseline"] = entry["median"] / out["baseline"]["median"]
        out["antagonists"].append(entry)
    out["throughput_samples"] = len(throughput)
    return out


def format_summary(summary: dict) -> str:
    metric = summary["metric"]
    lines = [f"HP task {summary['hp_task_id']}: {metric}, per load report",
             f"{'window':<24}{'samples':>8}{'median':>12}{'mean':>12}{'max':>12}{'x base':>8}"]

    def row(name, s, ratio=None):
        if not s["samples"]:
            return f"{name:<24}{0:>8}"
        r = f"{ratio:>8.2f}" if ratio is not None else f"{'':>8}"
        return (f"{name:<24}{s['samples']:>8}{s['median']:>12.6f}{s['mean']:>12.6f}"
                f"{s['max']:>12.6f}{r}")
    lines.append(row("no antagonist", summary["baseline"]))
    for a in summary["antagonists"]:
        lines.append(row(a["name"], a, a.get("ratio_to_baseline")))
    return "\n".join(lines)
