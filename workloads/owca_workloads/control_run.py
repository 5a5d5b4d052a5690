"""Live runs that judge an allocator: HP services under sine load with a surge, BE tasks
that start at scripted times and run to the end, the real pipeline with owca-allocate.

    owca-discover (static file) | owca-measure (apm_dir) | owca-detect
        | owca-allocate -c ALLOCATOR | tee recording.jsonl | owca-ship (file)

One run is one scenario (benchmarks/control/*.yaml) under one configuration:

    none        every BE task on every CPU, nothing applied (NOPAllocator)
    static      every BE task pinned, from its start, to the CPUs no HP task uses
    controller  BE tasks start on every CPU; !SloController (its defaults) moves them
    controller-floor  the same, with static isolation as its floor: BE never has less
                than the cores no HP uses (quota_floor = their share, lend_level 1), so
                the controller only decides when to lend it the HP cores

A BE task's work is the CPU time its cgroup used (the recording's
task_cpu_usage_seconds); `be_alone` (calibrate()) is what the same BE tasks
use per second with nothing else of the scenario on the node.  The host's own
load (CPU used outside the run's cgroups, the load average) is sampled every
interval into the ground truth, so that a noisy run can be told from a bad one.
workloads/owca_workloads/control_score.py scores a run directory.
"""
import json
import logging
import os
import subprocess
import threading
import time
from typing import Dict, List, Optional

import yaml

from owca.core.paths import Paths

from owca_workloads.cgroup_files import read_int
from owca_workloads.catalog import load_catalog, start, tool, wrapped_load
from owca_workloads.launch import Launcher
from owca_workloads.scenario import other_cpus
from owca_workloads.tools import tool_argv, tool_env

log = logging.getLogger("owca.control_run")

CONFIGS = ("none", "static", "controller", "controller-floor")
STAGES = ("discover", "measure", "detect", "allocate", "tee", "ship")


def load(path: str) -> dict:
    with open(path) as f:
        s = yaml.safe_load(f)
    s.setdefault("interval", 1.0)
    s.setdefault("cpus", "0")
    s.setdefault("warmup", 4.0)
    s.setdefault("surges", [])
    s.setdefault("controller", {})
    return s


def allocator_yaml(config: str, scenario: dict, home_share: float = None) -> str:
    """The allocate section of a configuration."""
    if config.startswith("controller"):
        params = {"hp_labels": {"role": "hp"}, "be_labels": {"role": "be"},
                  **scenario["controller"]}
        if config == "controller-floor":
            params.update(quota_floor=round(home_share, 4), lend_level=1)
        body = yaml.safe_dump(params, default_flow_style=False, sort_keys=False)
        body = "".join(f"    {line}\n" for line in body.splitlines())
        return f"allocate:\n  allocator: !SloController\n{body}"
    return "allocate:\n  allocator: !NOPAllocator\n"


class HostLoad(threading.Thread):
    """Every interval: the host's busy CPUs, those used by this run's cgroups, the rest
    (everything else on the machine), and the 1-minute load average."""

    def __init__(self, parent_cpuacct: str, interval: float):
        super().__init__(daemon=True)
        self.usage_file = os.path.join(parent_cpuacct, "cpuacct.usage")
        self.interval = interval
        self.samples: List[dict] = []
        self.stopped = threading.Event()

    @staticmethod
    def _busy_seconds() -> float:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _ours(self) -> float:
        try:
            with open(self.usage_file) as f:
                return int(f.read()) / 1e9
        except (OSError, ValueError):
            return 0.0

    def run(self):
        last = (time.time(), self._busy_seconds(), self._ours())
        while not self.stopped.wait(self.interval):
            now = (time.time(), self._busy_seconds(), self._ours())
            dt = now[0] - last[0]
            if dt > 0:
                busy, ours = (now[1] - last[1]) / dt, (now[2] - last[2]) / dt
                with open("/proc/loadavg") as f:
                    load1 = float(f.read().split()[0])
                self.samples.append({"ts": round(now[0], 3), "busy_cores": round(busy, 3),
                                     "run_cores": round(ours, 3),
                                     "other_cores": round(max(0.0, busy - ours), 3),
                                     "loadavg1": load1})
            last = now


class ControlRun:
    def __init__(self, scenario: dict, config: str, out_dir: str, paths: Paths = None,
                 be_alone: Optional[Dict[str, float]] = None):
        if config not in CONFIGS:
            raise ValueError(f"config: one of {', '.join(CONFIGS)}")
        self.s = scenario
        self.config = config
        self.out = os.path.abspath(out_dir)
        self.paths = paths or Paths()
        self.catalog = load_catalog()
        self.be_alone = be_alone or {}
        self.launcher = Launcher(f"/owca-control-{scenario['name']}-{config}-{os.getpid()}",
                                 self.paths, state_file=self.path("launcher-state.json"))
        self.pipeline: List[subprocess.Popen] = []
        self.logs = {}

    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def log_file(self, name: str):
        if name not in self.logs:
            self.logs[name] = open(self.path("logs", f"{name}.log"), "ab")
        return self.logs[name]

    def write_tasks(self) -> None:
        tasks = [{"id": w.cgroup_path, "name": w.name, "cgroup_path": w.cgroup_path,
                  "labels": {"role": w.role, "workload": w.workload,
                             "scenario": self.s["name"]}}
                 for w in self.launcher.launched.values()
                 if w.role in ("hp", "be") and w.stopped_ts is None]
        with open(self.path("tasks.yaml.tmp"), "w") as f:
            yaml.safe_dump(tasks, f, sort_keys=False)
        os.replace(self.path("tasks.yaml.tmp"), self.path("tasks.yaml"))

    def write_config(self) -> str:
        q = json.dumps
        text = (f"discover:\n  source: !StaticDiscovery\n    file: {q(self.path('tasks.yaml'))}\n"
                f"  interval: {self.s['interval']}\n"
                f"measure:\n  apm_dir: {q(self.path('apm'))}\n"
                f"  apm_max_age: {max(10.0, 5 * self.s['interval'])}\n"
                f"ship:\n  storages:\n    - !FileStorage\n"
                f"      path: {q(self.path('metrics.prom'))}\n"
                + allocator_yaml(self.config, self.s, self.home_share()))
        with open(self.path("pipeline.yaml"), "w") as f:
            f.write(text)
        return self.path("pipeline.yaml")

    def home_share(self) -> float:
        """The share of the platform that the cores no HP task uses are."""
        online = other_cpus("", self.paths).split(",")
        home = (self.s.get("loadgen_cpus") or other_cpus(self.s["cpus"], self.paths)).split(",")
        return len(home) / len(online)

    def start_pipeline(self, config: str, cpus: str) -> None:
        from owca_workloads.launch import enter_cgroups
        enter = enter_cgroups(self.launcher.make_cgroup("pipeline", cpus).procs_files())
        commands = {"discover": tool_argv("discover") + ["-c", config],
                    "measure": tool_argv("measure") + ["-c", config],
                    "detect": tool_argv("detect"),
                    "allocate": tool_argv("allocate") + ["-c", config],
                    "tee": ["tee", self.path("recording.jsonl")],
                    "ship": tool_argv("ship") + ["-c", config]}
        stdin, env = subprocess.DEVNULL, tool_env()
        for stage in STAGES:
            last = stage == STAGES[-1]
            p = subprocess.Popen(commands[stage], stdin=stdin,
                                 stdout=subprocess.DEVNULL if last else subprocess.PIPE,
                                 stderr=self.log_file(stage), env=env, start_new_session=True,
                                 preexec_fn=enter)
            if stdin is not subprocess.DEVNULL:
                stdin.close()
            stdin = p.stdout
            self.pipeline.append(p)

    def stop_pipeline(self) -> None:
        if not self.pipeline:
            return
        if self.pipeline[0].poll() is None:
            self.pipeline[0].terminate()   # every later stage ends on its input's EOF
        deadline = time.monotonic() + 20
        for p in self.pipeline:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pipeline stage pid %d did not end: killing it", p.pid)
                p.kill()
                p.wait()
        self.pipeline = []

    def run(self) -> dict:
        os.makedirs(self.path("logs"), exist_ok=True)
        os.makedirs(self.path("apm"), exist_ok=True)
        s = self.s
        hp_cpus = s["cpus"]
        other = s.get("loadgen_cpus") or other_cpus(hp_cpus, self.paths)
        online = other_cpus("", self.paths)
        be_cpus = other if self.config == "static" else online
        truth = {"version": 1, "kind": "control", "scenario": s["name"], "config": self.config,
                 "host": os.uname().nodename, "cpus": hp_cpus, "loadgen_cpus": other,
                 "be_cpus": be_cpus, "interval": s["interval"], "duration": s["duration"],
                 "completed": False, "hps": [], "antagonists": [], "surges": [],
                 "be_alone": self.be_alone, "scenario_file": s}
        sampler = None
        try:
            ports = {}
            for h in s["hp"]:
                wl = self.catalog[h["workload"]]
                name = h.get("name") or wl.name
                launched, port = start(self.launcher, wl, name, self.path("run", name), hp_cpus,
                                       self.log_file(name))
                ports[name] = (wl, launched, port)
            self.write_tasks()
            self.start_pipeline(self.write_config(), other)
            for h in s["hp"]:
                wl = self.catalog[h["workload"]]
                name = h.get("name") or wl.name
                _, launched, port = ports[name]
                ld = h["load"]
                argv = wrapped_load(wl, launched.cgroup_path, self.path("run", name), port,
                                    self.path("apm"), ld["base"], ld["amplitude"], ld["period"],
                                    slo=h.get("slo"), step=ld.get("step"),
                                    connections=ld.get("connections"),
                                    interval=min(1.0, s["interval"]),
                                    labels={"scenario": s["name"]})
                self.launcher.start(f"load-{name}", argv, cpus=other,
                                    stdout=self.log_file(f"load-{name}"),
                                    stderr=self.log_file(f"load-{name}"), role="loadgen",
                                    workload=wl.load.parser)
                truth["hps"].append({"task_id": launched.cgroup_path, "name": name,
                                     "workload": wl.name, "port": port,
                                     "slo": h.get("slo", wl.slo), "sli_metric": wl.sli_metric,
                                     "load": {**ld, "started_ts": time.time()}})
            truth["hp"] = truth["hps"][0]
            sampler = HostLoad(self.launcher.parent_set.dir("cpuacct"), s["interval"])
            sampler.start()
            time.sleep(s["warmup"])
            origin = time.monotonic()
            truth["started_ts"] = time.time()
            self.play(origin, ports, be_cpus, truth)
            truth["completed"] = True
        finally:
            truth["ended_ts"] = time.time()
            if sampler:
                sampler.stopped.set()
                sampler.join(5)
                truth["host_load"] = sampler.samples
            self.stop_pipeline()
            self.launcher.stop_all()
            with open(self.path("ground_truth.json"), "w") as f:
                json.dump(truth, f, indent=1)
            for f in self.logs.values():
                f.close()
        return truth

    def play(self, origin: float, ports: dict, be_cpus: str, truth: dict) -> None:
        """BE tasks at their start times (running to the end), surges at theirs."""
        s = self.s
        events = [(b["start"], "be", b) for b in s["be"]] + \
                 [(u["start"], "surge", u) for u in s["surges"]] + \
                 [(u["stop"], "surge_end", u) for u in s["surges"]]
        surges = {}
        for at, kind, item in sorted(events, key=lambda e: e[0]):
            time.sleep(max(0.0, origin + at - time.monotonic()))
            if kind == "be":
                wl = self.catalog[item["workload"]]
                launched, _ = start(self.launcher, wl, item["name"],
                                    self.path("run", item["name"]), be_cpus,
                                    self.log_file(item["name"]))
                self.write_tasks()
                truth["antagonists"].append({
                    "name": item["name"], "workload": wl.name, "resource": wl.resource,
                    "task_id": launched.cgroup_path, "scheduled_start": at,
                    "start_ts": launched.started_ts, "stop_ts": None})
            elif kind == "surge":
                wl, _, port = ports[item["hp"]]
                name = f"surge-{item['hp']}-{int(at)}"
                argv = tool("owca-sine") + [
                    "--base", str(item["rate"]), "--amplitude", "0", "--period", "60",
                    "--step", "1", "--duration", str(item["stop"] - item["start"]),
                    "--connections", str(item.get("connections", 4)), "--"] + \
                    wl.load_command(self.path("run", item["hp"]), port)
                self.launcher.start(name, argv, cpus=truth["loadgen_cpus"],
                                    stdout=self.log_file(name), stderr=self.log_file(name),
                                    role="loadgen", workload="surge")
                surges[name] = {"hp": item["hp"], "rate": item["rate"], "start_ts": time.time()}
            else:
                name = f"surge-{item['hp']}-{int(item['start'])}"
                self.launcher.stop(name)
                surges[name]["stop_ts"] = time.time()
                truth["surges"].append(surges[name])
        time.sleep(max(0.0, origin + s["duration"] - time.monotonic()))
        now = time.time()
        for a in truth["antagonists"]:
            a["stop_ts"] = now


def calibrate(scenario: dict, out_dir: str, seconds: float = 15.0,
              paths: Paths = None) -> Dict[str, float]:
    """CPU cores each BE workload of the scenario uses with the others of its set and
    nothing else of the run on the node (every BE task on every CPU)."""
    paths = paths or Paths()
    catalog = load_catalog()
    os.makedirs(out_dir, exist_ok=True)
    launcher = Launcher(f"/owca-control-alone-{scenario['name']}-{os.getpid()}", paths,
                        state_file=os.path.join(out_dir, "launcher-state.json"))
    online = other_cpus("", paths)
    rates, logs = {}, []
    try:
        for b in scenario["be"]:
            logs.append(open(os.path.join(out_dir, f"{b['name']}.log"), "ab"))
            start(launcher, catalog[b["workload"]], b["name"],
                  os.path.join(out_dir, "run", b["name"]), online, logs[-1])
        time.sleep(2.0)
        first = {b["name"]: _usage(launcher, b["name"]) for b in scenario["be"]}
        t0 = time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        for b in scenario["be"]:
            rates[b["name"]] = round((_usage(launcher, b["name"]) - first[b["name"]]) / dt, 4)
    finally:
        launcher.stop_all()
        for f in logs:
            f.close()
    return rates


def calibrate_slo(scenario: dict, out_dir: str, seconds: float = 25.0, factor: float = 3.0,
                  paths: Paths = None) -> Dict[str, float]:
    """Each HP task's SLO: `factor` x the median of its SLI with its load alone on the node
    (no BE task, no surge), as the lab does: an SLO the quiet service meets with room,
    on this machine as it is now."""
    import statistics
    quiet = dict(scenario, name=scenario["name"] + "-quiet", be=[], surges=[],
                 duration=seconds)
    truth = ControlRun(quiet, "none", out_dir, paths).run()
    values: Dict[str, list] = {h["task_id"]: [] for h in truth["hps"]}
    metric = {h["task_id"]: h["sli_metric"] for h in truth["hps"]}
    last = {}
    with open(os.path.join(out_dir, "recording.jsonl")) as f:
        for line in f:
            frame = json.loads(line)
            if frame.get("kind") != "measurements" or frame["ts"] < truth["started_ts"]:
                continue
            for task_id in values:
                v = frame["tasks"].get(task_id, {}).get("metrics", {}).get(metric[task_id])
                if v is not None and v != last.get(task_id):
                    values[task_id].append(v)
                    last[task_id] = v
    out = {}
    for h in truth["hps"]:
        if values[h["task_id"]]:
            out[h["name"]] = round(factor * statistics.median(values[h["task_id"]]), 6)
    return out


def with_slos(scenario: dict, slos: Dict[str, float]) -> dict:
    """The scenario with these SLOs for its HP tasks (by name)."""
    catalog = load_catalog()
    hps = []
    for h in scenario["hp"]:
        name = h.get("name") or catalog[h["workload"]].name
        hps.append(dict(h, slo=slos.get(name, h.get("slo"))))
    return dict(scenario, hp=hps)


def _usage(launcher: Launcher, name: str) -> float:
    return read_int(os.path.join(launcher.cgroups(name).dir("cpuacct"), "cpuacct.usage")) / 1e9
