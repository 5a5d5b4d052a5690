"""Interference scenarios: HP workloads under load, BE tasks with scripted phases.

The runner starts each HP workload (one, or several) in its own cgroup (v1, and on
a hybrid host a cgroup2 group at the same path, for PSI and perf events), pinned
to the scenario's cores, optionally under a CPU quota.  Every BE task of the
scenario is started at once, in its own cgroup on the same cores (or `be_cpus`),
and stays for the whole run: between its phases it idles (`quiet`, an idle
process), in a `benign` phase it runs a light version of its work (a decoy), in
an `aggressive` one the antagonist at full strength; several overlap.  A BE task
that `arrives` is started at its first phase instead (a task that comes to the
node while the HP runs, as the control matrix's do).  Load-only `surges` add
unmeasured clients of an HP with no antagonist.  Before t=0 each HP's SLO is
calibrated on this host: its SLI at peak load with every BE task idle, times a
factor.  The real pipeline runs beside it,

    owca-discover (static file) | owca-measure (apm_dir) | owca-detect
        [| owca-allocate] | tee recording.jsonl | owca-ship (file storage)

owca-allocate when the scenario or the configuration has an `allocate:` section;
a stage that dies ends the run with an error.  Beside the recording the runner
writes the ground truth (version 2): the phases, when each really began and
ended, the BE tasks' progress in each, the host's own load per interval, the SLO
calibration, and whether the run was noisy.  docs/workloads.md describes the
formats.
"""
import json
import logging
import os
import signal
import statistics
import subprocess
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import yaml

from owca.measure.sources import apm
from owca.core.kernel import online_cpus, parse_cpu_list
from owca.core.paths import Paths

from owca_workloads import score
from owca_workloads.catalog import (Workload, fill, load_catalog, parse_bytes, start, tool,
                                    wrapped_load)
from owca_workloads.cli import ToolError
from owca_workloads.hostload import HostLoad
from owca_workloads.launch import Launcher, LaunchError, enter_cgroups
from owca_workloads.progress import parse_progress, with_progress
from owca_workloads.tools import tool_argv, tool_env

log = logging.getLogger("owca.scenario")

GROUND_TRUTH_VERSION = 2
MODES = ("aggressive", "benign")
SURGE_CLIENTS = ("surge", "load")
# A BE task between its phases: a process that does nothing, so that the task (its
# cgroup, a pid) is there in every interval and its presence tells nothing.
IDLE_COMMAND = ["sleep", "infinity"]
DEFAULT_BENIGN = ["stress-ng", "--cpu", "1", "--cpu-load", "10", "--timeout", "0"]
# Host-load thresholds of a noisy run: others' CPU on the HP's cores, in cores, in
# at least this share of the intervals.
BUSY_CORES = 0.15
BUSY_SHARE = 0.2
# Launcher names the runner gives its own processes ("loadgen-<hp>", "surge-<i>").
RESERVED_PREFIXES = ("loadgen-", "calibration-", "surge-")
# The perf software events asked for where the helper is installed (no hardware PMU
# is needed; a task's cgroup2 group carries them on a hybrid host).
PERF_SOFTWARE_EVENTS = ["task-clock", "context-switches", "cpu-migrations", "page-faults"]


class ScenarioError(ValueError):
    """A scenario file that cannot be used: `file: reason`."""


class StageDied(ToolError):
    """A pipeline stage ended during the run (one line, naming it and its log)."""


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
    slo: Optional[float] = None        # used as is when calibrate is 0
    load: LoadSpec = field(default_factory=LoadSpec)
    quota: Optional[float] = None      # cores (cpu.cfs_quota_us / cpu.cfs_period_us)
    calibrate: float = 20.0            # seconds of the quiet, peak-load calibration
    slo_factor: float = 3.0            # SLO = factor x the calibration's median SLI


@dataclass
class PhaseSpec:
    start: float
    stop: Optional[float] = None       # default: the scenario's end
    mode: str = "aggressive"


@dataclass
class BeSpec:
    workload: str
    name: Optional[str] = None
    phases: List[PhaseSpec] = field(default_factory=list)
    memory_limit: Optional[object] = None   # bytes or "256M"; default: the catalog's
    # Started at its first phase's start (a task that comes to the node while the HP
    # runs), not idle from before t=0.
    arrives: bool = False


@dataclass
class AntagonistSpec:
    """Version 1's form: a BE task with one aggressive phase."""
    workload: str
    start: float
    stop: float
    name: Optional[str] = None


@dataclass
class SurgeSpec:
    start: float
    stop: float
    rate: Optional[float] = None       # requests per second (default: the load's base)
    connections: int = 4
    hp: Optional[str] = None           # the HP task's name (default: the first HP's)
    # surge: the catalog's surge command; load: the HP's own load generator held at
    # `rate` by owca-sine, a step a second (for redis, whose surge command is unpaced).
    client: str = "surge"


@dataclass
class Scenario:
    name: str
    duration: float
    hp: HpSpec                         # the first HP task: the one a detector is scored on
    be: List[BeSpec] = field(default_factory=list)
    antagonists: List[AntagonistSpec] = field(default_factory=list)
    surges: List[SurgeSpec] = field(default_factory=list)
    interval: float = 1.0
    cpus: str = "0"
    loadgen_cpus: Optional[str] = None
    be_cpus: Optional[str] = None      # the BE tasks' cores (default: `cpus`, the HP's)
    # Seconds of load before t=0, so that the first samples are not a cold start.
    warmup: float = 4.0
    # Merged into owca-measure's section (apm_dir is the runner's).
    measure: Dict[str, object] = field(default_factory=dict)
    # owca-allocate's section as YAML text, its tags kept: the pipeline then has
    # owca-allocate (a configuration's `allocate:` section, where given, instead).
    allocate: Optional[str] = None
    # The HP tasks after the first (the file's `hp:` as a list).
    other_hps: List[HpSpec] = field(default_factory=list)


def _build(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a mapping")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ScenarioError(f"{where}: {e}") from None


class _AnyTagLoader(yaml.SafeLoader):
    """Reads a file's plain parts, whatever tags its plug-in sections use (as None)."""


_AnyTagLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def section_yaml(text: str, name: str) -> Optional[str]:
    """The top-level section `name` of a YAML document as YAML text, its tags kept (for
    the tool that builds it); None when it is absent or empty, ValueError when it is not
    a mapping."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    for key, value in root.value if isinstance(root, yaml.MappingNode) else ():
        if key.value != name:
            continue
        if isinstance(value, yaml.MappingNode):
            return yaml.serialize(value, Dumper=yaml.SafeDumper)
        if value.tag != "tag:yaml.org,2002:null":
            raise ValueError(f"{name}: expected a mapping")
    return None


def parse_scenario(text: str, where: str = "scenario") -> Scenario:
    try:
        raw = yaml.load(text, Loader=_AnyTagLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ScenarioError(f"{where}: line {mark.line + 1}: {e.problem}" if mark
                            else f"{where}: {e}") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: expected a mapping")
    raw = dict(raw)
    if "other_hps" in raw:
        raise ScenarioError(f"{where}: other_hps: several HP tasks are a list under hp")
    listed = raw.get("hp") if isinstance(raw.get("hp"), list) else None
    hps = []
    for i, hp in enumerate(listed if listed else [raw.get("hp") or {}]):
        key = f"hp[{i}]" if listed else "hp"
        hp = dict(hp) if isinstance(hp, dict) else hp
        if isinstance(hp, dict):
            hp["load"] = _build(LoadSpec, hp.get("load") or {}, f"{where}: {key}.load")
        hps.append(_build(HpSpec, hp, f"{where}: {key}"))
    raw["hp"], raw["other_hps"] = hps[0], hps[1:]
    raw["antagonists"] = [_build(AntagonistSpec, a, f"{where}: antagonists[{i}]")
                          for i, a in enumerate(raw.get("antagonists") or [])]
    be = []
    for i, b in enumerate(raw.get("be") or []):
        b = dict(b) if isinstance(b, dict) else b
        if isinstance(b, dict):
            b["phases"] = [_build(PhaseSpec, p, f"{where}: be[{i}].phases[{j}]")
                           for j, p in enumerate(b.get("phases") or [])]
        be.append(_build(BeSpec, b, f"{where}: be[{i}]"))
    raw["be"] = be
    raw["surges"] = [_build(SurgeSpec, x, f"{where}: surges[{i}]")
                     for i, x in enumerate(raw.get("surges") or [])]
    if not isinstance(raw.get("measure") or {}, dict):
        raise ScenarioError(f"{where}: measure: expected a mapping (owca-measure's section)")
    raw["measure"] = dict(raw.get("measure") or {})
    try:
        raw["allocate"] = section_yaml(text, "allocate")
    except ValueError as e:
        raise ScenarioError(f"{where}: {e} (owca-allocate's section)") from None
    scenario = _build(Scenario, raw, where)
    for b in scenario.be:
        for p in b.phases:
            if p.stop is None:
                p.stop = scenario.duration
    check_scenario(scenario, where)
    return scenario


def hp_tasks(s: Scenario) -> List[HpSpec]:
    """The scenario's HP tasks, the first (`hp`) first."""
    return [s.hp] + list(s.other_hps)


def be_tasks(s: Scenario) -> List[BeSpec]:
    """The scenario's BE tasks; version 1's antagonists as tasks of one aggressive phase."""
    return list(s.be) + [BeSpec(workload=a.workload, name=a.name,
                                phases=[PhaseSpec(a.start, a.stop, "aggressive")])
                         for a in s.antagonists]


def check_scenario(s: Scenario, where: str, catalog: Dict[str, Workload] = None) -> None:
    catalog = catalog or load_catalog()
    if not s.name or "/" in s.name:
        raise ScenarioError(f"{where}: name: expected a cgroup-safe name")
    if not s.duration > 0 or not s.interval > 0:
        raise ScenarioError(f"{where}: duration and interval: expected positive seconds")
    names = {"loadgen", "pipeline", "calibration"}
    hp_workloads = {}
    for i, h in enumerate(hp_tasks(s)):
        key = f"hp[{i}]" if s.other_hps else "hp"
        hp = catalog.get(h.workload)
        if hp is None or hp.role != "hp":
            raise ScenarioError(f"{where}: {key}.workload {h.workload!r} is not an hp workload "
                                f"of the catalog")
        if h.calibrate < 0 or not h.slo_factor > 0:
            raise ScenarioError(f"{where}: {key}: expected calibrate >= 0 and slo_factor > 0")
        if h.calibrate == 0 and h.slo is None and hp.slo is None:
            raise ScenarioError(f"{where}: {key}: no slo and no calibration")
        if h.quota is not None and not h.quota > 0:
            raise ScenarioError(f"{where}: {key}.quota: expected a positive number of cores")
        name = h.name or h.workload
        if name in names or name.startswith(RESERVED_PREFIXES) or "/" in name:
            raise ScenarioError(f"{where}: {key}: name {name!r} is taken")
        names.add(name)
        hp_workloads[name] = hp
    for i, a in enumerate(be_tasks(s)):
        key = f"be[{i}]" if i < len(s.be) else f"antagonists[{i - len(s.be)}]"
        wl = catalog.get(a.workload)
        if wl is None or wl.role != "be":
            raise ScenarioError(f"{where}: {key}.workload {a.workload!r} is not a "
                                f"be workload of the catalog")
        last = 0.0
        for j, p in enumerate(sorted(a.phases, key=lambda p: p.start)):
            if not 0 <= p.start < p.stop <= s.duration:
                raise ScenarioError(f"{where}: {key}: expected 0 <= start < stop <= "
                                    f"duration ({s.duration})")
            if p.start < last:
                raise ScenarioError(f"{where}: {key}: phases overlap at {p.start}")
            if p.mode not in MODES:
                raise ScenarioError(f"{where}: {key}: mode {p.mode!r}: expected one of "
                                    f"{', '.join(MODES)}")
            last = p.stop
        if a.arrives and not a.phases:
            raise ScenarioError(f"{where}: {key}: arrives: expected a phase to arrive with")
        if a.memory_limit is not None:
            try:
                parse_bytes(a.memory_limit)
            except ValueError as e:
                raise ScenarioError(f"{where}: {key}.memory_limit: {e}") from None
        name = a.name or a.workload
        if name in names or name.startswith(RESERVED_PREFIXES) or "/" in name:
            raise ScenarioError(f"{where}: {key}: name {name!r} is taken")
        names.add(name)
    first = s.hp.name or s.hp.workload
    for i, x in enumerate(s.surges):
        if not 0 <= x.start < x.stop <= s.duration or x.connections < 1 \
                or (x.rate is not None and not x.rate > 0):
            raise ScenarioError(f"{where}: surges[{i}]: expected 0 <= start < stop <= duration, "
                                f"rate > 0, connections >= 1")
        hp = hp_workloads.get(x.hp or first)
        if hp is None:
            raise ScenarioError(f"{where}: surges[{i}].hp {x.hp!r} is not an HP task of the "
                                f"scenario")
        if x.client not in SURGE_CLIENTS:
            raise ScenarioError(f"{where}: surges[{i}].client {x.client!r}: expected one of "
                                f"{', '.join(SURGE_CLIENTS)}")
        if x.client == "surge" and hp.surge is None:
            raise ScenarioError(f"{where}: surges: the catalog's {hp.name} has no surge command")
        if x.client == "load" and hp.load.fixed:
            raise ScenarioError(f"{where}: surges[{i}]: the catalog's {hp.name} has a fixed "
                                f"load, which owca-sine cannot pace")


def load_scenario(path: str) -> Scenario:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ScenarioError(f"{path}: {e.strerror}") from None
    return parse_scenario(text, path)


def other_cpus(cpus: str, paths: Paths) -> str:
    """The online CPUs not in `cpus` (the load generator's), or all when none is left."""
    online = online_cpus(paths)
    rest = sorted(online - parse_cpu_list(cpus))
    return ",".join(map(str, rest)) if rest else ",".join(map(str, sorted(online)))


def config_sections(path: Optional[str]) -> Dict[str, object]:
    """The top-level sections of a pipeline configuration (tagged values read as None)."""
    if not path:
        return {}
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_AnyTagLoader)  # noqa: S506 (a SafeLoader subclass)
    except OSError as e:
        raise ScenarioError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: expected a mapping of sections")
    return raw


def perf_helper_available() -> bool:
    try:
        from owca.measure.sources.perf import find_helper
        find_helper()
        return True
    except (ImportError, OSError):
        return False


@dataclass
class HpRun:
    """One HP task of a run: what the scenario asks, where it runs, and its record in
    the ground truth."""
    spec: HpSpec
    workload: Workload
    name: str
    run_dir: str
    load_name: str          # its load generator's name with the launcher
    calibration_name: str   # and its calibration load's
    task_id: str = ""
    port: Optional[int] = None
    record: dict = field(default_factory=dict)


class Runner:
    def __init__(self, scenario: Scenario, out_dir: str, config: Optional[str] = None,
                 signals=None, paths: Paths = None, catalog: Dict[str, Workload] = None,
                 plugins: List[str] = (), run: int = 1, truth_fields: Optional[dict] = None):
        """`truth_fields` are the caller's, added to the ground truth (the control matrix
        records its configuration and the BE tasks' CPU use alone there)."""
        self.s = scenario
        self.out = os.path.abspath(out_dir)
        self.config = os.path.abspath(config) if config else None
        self.sections = config_sections(config)
        self.plugins = list(plugins)
        self.run_number = run
        self.truth_fields = dict(truth_fields or {})
        self.signals = signals
        self.paths = paths or Paths()
        self.catalog = catalog or load_catalog()
        self.parent = f"/owca-scenario-{scenario.name}-{os.getpid()}"
        self.launcher = Launcher(self.parent, self.paths,
                                 state_file=os.path.join(self.out, "launcher-state.json"))
        self.pipeline: List[tuple] = []   # (stage, Popen)
        self.logs = {}
        self.origin = None
        self.host_load: List[dict] = []
        self._sampler_stop = threading.Event()
        self.phases: List[dict] = []          # ended phases, as they really ran
        self.current: Dict[str, dict] = {}    # task -> its phase now
        self._done = threading.Event()        # set when the run ends: the timelines stop
        self._errors: List[Exception] = []    # what a timeline's thread ran into
        self._tasks_lock = threading.Lock()   # BE tasks that arrive rewrite the tasks file
        # {HP task id: its service's port}: the task's `port` label, where owca-measure's
        # sli rules find the service (benchmarks/sli/).
        self.hp_ports: Dict[str, int] = {}

    # -- files --------------------------------------------------------------------------
    def path(self, *parts) -> str:
        return os.path.join(self.out, *parts)

    def log_file(self, name: str):
        if name not in self.logs:
            self.logs[name] = open(self.path("logs", f"{name}.log"), "ab")
        return self.logs[name]

    def write_tasks(self) -> None:
        """The static discovery file: the HP task and every BE task (all of them, all
        the time: what a BE task does is for the detector to find out)."""
        with self._tasks_lock:
            tasks = []
            for w in list(self.launcher.launched.values()):
                if w.role in ("hp", "be") and w.stopped_ts is None:
                    labels = {"role": w.role, "workload": w.workload, "scenario": self.s.name}
                    if w.cgroup_path in self.hp_ports:
                        labels["port"] = str(self.hp_ports[w.cgroup_path])
                    tasks.append({"id": w.cgroup_path, "name": w.name,
                                  "cgroup_path": w.cgroup_path, "labels": labels})
            tmp = self.path("tasks.yaml.tmp")
            with open(tmp, "w") as f:
                yaml.safe_dump(tasks, f, sort_keys=False)
            os.replace(tmp, self.path("tasks.yaml"))

    def measure_section(self) -> dict:
        """The scenario's measure section, the configuration's over it, the APM
        directory the runner's; perf software events where the helper is installed."""
        section = {}
        if perf_helper_available():
            section["perf_events"] = list(PERF_SOFTWARE_EVENTS)
        section.update(self.s.measure)
        section.update(self.sections.get("measure") or {})
        section["apm_dir"] = self.path("apm")
        section.setdefault("apm_max_age", max(10.0, 5 * self.s.interval))
        return section

    def allocate_section(self) -> Optional[str]:
        """owca-allocate's section from the scenario, when the configuration has none."""
        return None if self.sections.get("allocate") is not None else self.s.allocate

    def write_pipeline_config(self) -> str:
        """The configuration of discover, measure and ship, and of allocate when the
        scenario gives its section (detect, and allocate otherwise, take the user's
        configuration)."""
        q = json.dumps  # JSON is YAML: a string is a double-quoted scalar, a dict a flow map
        text = (f"discover:\n"
                f"  source: !StaticDiscovery\n"
                f"    file: {q(self.path('tasks.yaml'))}\n"
                f"  interval: {self.s.interval}\n"
                f"measure: {q(self.measure_section())}\n"
                f"ship:\n"
                f"  storages:\n"
                f"    - !FileStorage\n"
                f"      path: {q(self.path('metrics.prom'))}\n")
        if self.allocate_section() is not None:
            text += "allocate:\n" + textwrap.indent(self.allocate_section(), "  ")
        path = self.path("pipeline.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    # -- the pipeline -------------------------------------------------------------------
    def stages(self) -> List[str]:
        allocate = ["allocate"] if self.sections.get("allocate") is not None \
            or self.s.allocate is not None else []
        return ["discover", "measure", "detect"] + allocate + ["tee", "ship"]

    def start_pipeline(self, config: str, cpus: str) -> None:
        """The pipeline's stages in a cgroup of their own on `cpus` (the load generator's),
        so that their cycles do not disturb the HP task's cores."""
        enter = enter_cgroups(self.launcher.make_cgroup("pipeline", cpus).procs_files())
        plugins = [a for spec in self.plugins for a in ("-r", spec)]
        user = ["-c", self.config] if self.config else []
        commands = {
            "discover": tool_argv("discover") + ["-c", config],
            "measure": tool_argv("measure") + ["-c", config],
            "detect": tool_argv("detect") + user + plugins,
            "allocate": tool_argv("allocate") + (["-c", config] if self.allocate_section()
                                                 is not None else user) + plugins,
            "tee": ["tee", self.path("recording.jsonl")],
            "ship": tool_argv("ship") + ["-c", config],
        }
        stdin = subprocess.DEVNULL
        env = tool_env()
        stages = self.stages()
        for stage in stages:
            last = stage == stages[-1]
            p = subprocess.Popen(commands[stage], stdin=stdin,
                                 stdout=subprocess.DEVNULL if last else subprocess.PIPE,
                                 stderr=self.log_file(stage), env=env, start_new_session=True,
                                 preexec_fn=enter)
            if stdin is not subprocess.DEVNULL:
                stdin.close()  # the next stage holds it now
            stdin = p.stdout
            self.pipeline.append((stage, p))

    def check_pipeline(self) -> None:
        """StageDied when a stage ended while the run goes on: the one that failed (its
        neighbours then end on a closed pipe, with status 0), else the first that ended."""
        ended = [(stage, p.returncode) for stage, p in self.pipeline if p.poll() is not None]
        if not ended:
            return
        stage, code = next(((s, c) for s, c in ended if c != 0), ended[0])
        self.log_file(stage).flush()
        raise StageDied(f"pipeline stage {stage} exited with status {code}: "
                        f"{last_line(self.path('logs', stage + '.log'))} (logs/{stage}.log)")

    def stop_pipeline(self, timeout: float = 20.0) -> None:
        """SIGTERM to the source; every later stage ends on its input's EOF."""
        if not self.pipeline:
            return
        source = self.pipeline[0][1]
        if source.poll() is None:
            source.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for stage, p in self.pipeline:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pipeline stage %s (pid %d) did not end: killing it", stage, p.pid)
                p.kill()
                p.wait()
        self.pipeline = []

    # -- the host's load ----------------------------------------------------------------
    def sample_host(self) -> None:
        sampler = HostLoad(self.paths, self.parent, parse_cpu_list(self.s.cpus))
        sampler.sample()
        while not self._sampler_stop.wait(self.s.interval):
            try:
                got = sampler.sample()
            except (OSError, ValueError) as e:
                log.warning("host load not sampled: %s", e)
                continue
            if got is not None:
                self.host_load.append(got)

    # -- the run ------------------------------------------------------------------------
    def stopping(self) -> bool:
        return self.signals is not None and self.signals.stop

    def sleep_until(self, t: float) -> None:
        while not self.stopping():
            if self.pipeline:
                self.check_pipeline()
            left = t - time.monotonic()
            if left <= 0:
                return
            if self.signals is not None:
                self.signals.sleep(min(left, 0.5))
            else:
                time.sleep(min(left, 0.5))

    def hp_runs(self) -> List[HpRun]:
        out = []
        for i, spec in enumerate(hp_tasks(self.s)):
            name = spec.name or spec.workload
            # The first HP's processes keep the names a one-HP scenario has always used.
            suffix = "" if i == 0 else f"-{name}"
            out.append(HpRun(spec, self.catalog[spec.workload], name, self.path("run", name),
                             f"loadgen{suffix}", f"calibration{suffix}"))
        return out

    def be_cpus(self) -> str:
        return self.s.be_cpus or self.s.cpus

    def run(self) -> dict:
        if os.path.isdir(self.path("logs")):  # a previous run's, in this output directory
            for name in os.listdir(self.path("logs")):
                os.unlink(self.path("logs", name))
        os.makedirs(self.path("logs"), exist_ok=True)
        os.makedirs(self.path("apm"), exist_ok=True)
        for stale in ("recording.jsonl", "ground_truth.json", "metrics.prom", "summary.json"):
            if os.path.exists(self.path(stale)):
                os.unlink(self.path(stale))
        s = self.s
        hps = self.hp_runs()
        loadgen_cpus = s.loadgen_cpus or other_cpus(s.cpus, self.paths)
        truth = {"version": GROUND_TRUTH_VERSION, "scenario": s.name, "run": self.run_number,
                 "host": os.uname().nodename, "cpus": s.cpus, "loadgen_cpus": loadgen_cpus,
                 "be_cpus": self.be_cpus(), "interval": s.interval, "duration": s.duration,
                 "completed": False, "tasks": {}, "phases": [], "antagonists": [],
                 **self.truth_fields}
        sampler = threading.Thread(target=self.sample_host, daemon=True)
        error = None
        try:
            for hp in hps:
                launched, hp.port = start(self.launcher, hp.workload, hp.name, hp.run_dir,
                                          s.cpus, self.log_file(hp.name),
                                          cpu_quota_cores=hp.spec.quota)
                hp.task_id = launched.cgroup_path
                if hp.port is not None:
                    self.hp_ports[hp.task_id] = hp.port
                hp.record.update(task_id=hp.task_id, name=hp.name, workload=hp.workload.name,
                                 port=hp.port, sli_metric=hp.workload.sli_metric,
                                 quota_cores=hp.spec.quota)
                truth["tasks"][hp.task_id] = {"name": hp.name, "role": "hp",
                                              "workload": hp.workload.name}
            truth["hp"] = hps[0].record
            if len(hps) > 1:
                truth["hps"] = [hp.record for hp in hps]
            for b in be_tasks(s):
                if not b.arrives:
                    self.start_be(b, truth)
            self.write_tasks()
            for hp, (slo, calibration) in zip(hps, self.calibrate(hps, loadgen_cpus)):
                hp.record.update(slo=slo, slo_calibration=calibration)
            self.start_pipeline(self.write_pipeline_config(), loadgen_cpus)
            for hp in hps:
                self.start_load(hp, loadgen_cpus)
            self.sleep_until(time.monotonic() + s.warmup)
            self.origin = time.monotonic()
            truth["started_ts"] = time.time()
            sampler.start()
            self.play(hps, loadgen_cpus, truth)
            truth["completed"] = not self.stopping()
        except (ToolError, LaunchError) as e:
            error = e
        finally:
            truth["ended_ts"] = time.time()
            self._sampler_stop.set()
            if sampler.is_alive():
                sampler.join()
            pipeline_alive = all(p.poll() is None for _, p in self.pipeline)
            self.stop_pipeline()
            self.launcher.stop_all()
            for name in list(self.current):
                self.close_phase(name, truth["ended_ts"])
            for f in self.logs.values():
                f.close()
            self.finish_truth(truth)
            with open(self.path("ground_truth.json"), "w") as f:
                json.dump(truth, f, indent=1)
                f.write("\n")
        if error is not None:
            raise error
        if not pipeline_alive and truth["completed"]:
            raise StageDied("a pipeline stage ended before the run did (logs/)")
        return truth

    def start_load(self, hp: HpRun, cpus: str) -> None:
        """The HP's measured load (owca-sine under owca-wrap) on the load generators' cores."""
        load = hp.spec.load
        argv = wrapped_load(hp.workload, hp.task_id, hp.run_dir, hp.port, self.path("apm"),
                            load.base, load.amplitude, load.period,
                            slo=hp.record["slo"], step=load.step, connections=load.connections,
                            interval=min(1.0, self.s.interval),
                            labels={"scenario": self.s.name})
        self.launcher.start(hp.load_name, argv, cpus=cpus, stdout=self.log_file(hp.load_name),
                            stderr=self.log_file(hp.load_name), role="loadgen",
                            workload=hp.workload.load.parser)
        hp.record["load"] = {**asdict(load), "step": load.step or hp.workload.load.step,
                             "generator": hp.workload.load.command[0],
                             "fixed": hp.workload.load.fixed, "started_ts": time.time()}

    def calibrate(self, hps: List[HpRun], cpus: str) -> List[tuple]:
        """Each HP's SLO on this host: its SLI at peak load, every BE task idle, for its
        `calibrate` seconds (the HP tasks at once); SLO = slo_factor x the median.
        [(slo, record)], in the order of `hps`."""
        fixed = {hp.name: hp.spec.slo if hp.spec.slo is not None else hp.workload.slo
                 for hp in hps}
        measured = [hp for hp in hps if hp.spec.calibrate]
        samples: Dict[str, dict] = {hp.name: {} for hp in measured}
        if measured:
            apm_dir = self.path("calibration")
            os.makedirs(apm_dir, exist_ok=True)
            for hp in measured:
                load = hp.spec.load
                argv = wrapped_load(hp.workload, hp.task_id, hp.run_dir, hp.port, apm_dir,
                                    load.base + load.amplitude, 0.0, load.period, slo=None,
                                    step=load.step, connections=load.connections, interval=0.5)
                self.launcher.start(hp.calibration_name, argv, cpus=cpus,
                                    stdout=self.log_file(hp.calibration_name),
                                    stderr=self.log_file(hp.calibration_name), role="loadgen",
                                    workload=hp.workload.load.parser)
            step = max(hp.spec.load.step or hp.workload.load.step for hp in measured)
            self.sleep_until(time.monotonic() + step + 1.0)  # the first report is a cold one
            began = time.monotonic()
            running = list(measured)
            while running and not self.stopping():
                records = apm.ApmReader(apm_dir, 30.0).read()
                for hp in list(running):
                    if time.monotonic() >= began + hp.spec.calibrate:
                        running.remove(hp)
                        self.launcher.stop(hp.calibration_name)
                        continue
                    record = records.get(hp.task_id) or {}
                    at = record.get("apm_report_timestamp_seconds")
                    value = record.get(hp.workload.sli_metric)
                    if at is not None and value is not None:
                        samples[hp.name][at] = value
                if running:
                    self.sleep_until(time.monotonic() + 0.5)
            for hp in running:
                self.launcher.stop(hp.calibration_name)
        return [self._calibrated(hp, fixed[hp.name], samples.get(hp.name)) for hp in hps]

    @staticmethod
    def _calibrated(hp: HpRun, fixed, samples: Optional[dict]) -> tuple:
        if not hp.spec.calibrate:
            return fixed, {"seconds": 0, "slo": fixed, "fixed_slo": fixed}
        load = hp.spec.load
        values = [v for _, v in sorted(samples.items())]
        record = {"seconds": hp.spec.calibrate, "rate": load.base + load.amplitude,
                  "factor": hp.spec.slo_factor, "samples": values, "fixed_slo": fixed}
        if not values:
            log.warning("SLO calibration of %s: no report in %.0f s: the fixed SLO %s stands",
                        hp.name, hp.spec.calibrate, fixed)
            record.update(slo=fixed, sli_median=None)
            return fixed, record
        median = statistics.median(values)
        slo = float(f"{hp.spec.slo_factor * median:.6g}")
        record.update(sli_median=median, slo=slo)
        log.info("SLO calibrated: %s %s median %.6g at %g/s, SLO %.6g", hp.name,
                 hp.workload.sli_metric, median, record["rate"], slo)
        return slo, record

    # -- the BE tasks' phases -----------------------------------------------------------
    def start_be(self, b: BeSpec, truth: dict, kind: str = "quiet", at: float = 0.0) -> None:
        """The BE task in its cgroup on the BE cores: idle from before t=0, or, for a
        task that arrives, at t=`at` with its first phase's work."""
        wl = self.catalog[b.workload]
        name = b.name or b.workload
        limit = parse_bytes(b.memory_limit) if b.memory_limit is not None \
            else wl.memory_limit_bytes
        run_dir = self.path("run", name)
        wl.prepare(run_dir, None)
        argv, log_path = self.phase_work(name, wl, kind)
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            launched = self.launcher.start(name, argv, cpus=self.be_cpus(),
                                           memory_limit_bytes=limit, cwd=run_dir, stdout=out,
                                           stderr=out, role="be", workload=wl.name)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        truth["tasks"][launched.cgroup_path] = {"name": name, "role": "be", "workload": wl.name,
                                                "resource": wl.resource,
                                                "memory_limit_bytes": limit}
        self.open_phase(name, launched.cgroup_path, kind, wl.resource, at, log_path)

    def phase_work(self, task: str, wl: Workload, kind: str) -> tuple:
        """(argv, log path or None) of a BE task's work in a phase of `kind`."""
        if kind == "aggressive":
            argv = wl.prepare(self.path("run", task), None)
        elif kind == "benign":
            argv = list(wl.benign or DEFAULT_BENIGN)
        else:
            return IDLE_COMMAND, None
        return with_progress(argv), self.path("logs", f"{task}.{len(self.phases)}.{kind}.log")

    def open_phase(self, task: str, task_id: str, kind: str, resource, start_at, log_path,
                   start_ts: Optional[float] = None):
        self.current[task] = {"task": task, "task_id": task_id, "kind": kind,
                              "resource": resource, "scheduled_start": start_at,
                              "start_ts": start_ts or time.time(), "log": log_path}

    def close_phase(self, task: str, stop_ts: float, scheduled_stop=None) -> None:
        record = self.current.pop(task)
        record["stop_ts"] = stop_ts
        record["scheduled_stop"] = scheduled_stop if scheduled_stop is not None \
            else self.s.duration
        log_path = record.pop("log")
        if log_path:
            try:
                with open(log_path, errors="replace") as f:
                    record["progress"] = parse_progress(f.read())
            except OSError:
                record["progress"] = None
        self.phases.append(record)

    def switch_phase(self, b_name: str, wl: Workload, kind: str, at: float) -> None:
        """The BE task's work becomes `kind` (aggressive, benign, quiet) at t=`at`."""
        task_id = self.current[b_name]["task_id"]
        argv, log_path = self.phase_work(b_name, wl, kind)
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        try:
            self.launcher.replace(b_name, argv, cwd=self.path("run", b_name), stdout=out,
                                  stderr=out, timeout=5.0)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        now = time.time()  # the old work ended and the new one began just now
        self.close_phase(b_name, now, at)
        self.open_phase(b_name, task_id, kind, wl.resource, at, log_path, now)

    def surge_argv(self, hp: HpRun, surge: SurgeSpec) -> List[str]:
        duration = surge.stop - surge.start
        rate = surge.rate or hp.spec.load.base
        if surge.client == "load":
            # The HP's own generator, held at `rate` a step a second by owca-sine.
            return tool("owca-sine") + [
                "--base", f"{rate:g}", "--amplitude", "0", "--period", "60", "--step", "1",
                "--duration", f"{duration:g}", "--connections", str(surge.connections),
                "--"] + hp.workload.load_command(hp.run_dir, hp.port)
        values = hp.workload.values(hp.run_dir, hp.port)
        values.update(rate=f"{rate:g}", duration=f"{max(1, int(duration))}",
                      connections=str(surge.connections),
                      delay_ms=f"{surge.connections * 1000.0 / rate:.3f}",
                      requests=str(int(rate * duration)))
        return [fill(a, values) for a in hp.workload.surge]

    def play(self, hps: List[HpRun], loadgen_cpus: str, truth: dict) -> None:
        """The phases' script: each BE task and the surges follow their own timeline in a
        thread of their own, so that a task slow to stop delays no other task's changes;
        this thread watches the pipeline and the signals until the end."""
        s = self.s
        timelines = []
        for b in be_tasks(s):
            changes = {}
            for p in sorted(b.phases, key=lambda p: p.start):
                if p.stop < s.duration:  # a phase that lasts to the end ends with the run
                    changes.setdefault(p.stop, "quiet")
                changes[p.start] = p.mode  # a phase that starts as another ends wins
            timelines.append((self._play_be, (b, sorted(changes.items()), truth)))
        if s.surges:
            timelines.append((self._play_surges, ({hp.name: hp for hp in hps}, loadgen_cpus)))
        threads = [threading.Thread(target=self._guarded, args=(f, a), daemon=True)
                   for f, a in timelines]
        for t in threads:
            t.start()
        try:
            while not self._errors and time.monotonic() < self.origin + s.duration \
                    and not self.stopping():
                self.sleep_until(min(self.origin + s.duration, time.monotonic() + 0.5))
        finally:
            self._done.set()
            for t in threads:
                t.join()
        if self._errors:
            raise self._errors[0]

    def _guarded(self, play, args) -> None:
        try:
            play(*args)
        except Exception as e:  # reported by the main thread, which stops the run
            self._errors.append(e if isinstance(e, (ToolError, LaunchError))
                                else ToolError(f"{type(e).__name__}: {e}"))

    def _wait_until(self, at: float) -> bool:
        """Until t=`at`; False when the run is ending."""
        while not self._done.is_set():
            left = self.origin + at - time.monotonic()
            if left <= 0:
                return True
            self._done.wait(min(left, 0.5))
        return False

    def _play_be(self, b: BeSpec, changes: List[tuple], truth: dict) -> None:
        name, wl = b.name or b.workload, self.catalog[b.workload]
        for at, kind in changes:
            if not self._wait_until(at):
                return
            if name in self.current:
                self.switch_phase(name, wl, kind, at)
            else:  # a task that arrives, with its first phase
                self.start_be(b, truth, kind, at)
                self.write_tasks()

    def _play_surges(self, hps: Dict[str, HpRun], loadgen_cpus: str) -> None:
        first = self.s.hp.name or self.s.hp.workload
        events = sorted([(x.start, 1, i, x) for i, x in enumerate(self.s.surges)]
                        + [(x.stop, 0, i, x) for i, x in enumerate(self.s.surges)])
        for at, starting, i, spec in events:
            if not self._wait_until(at):
                return
            name = f"surge-{i}"
            if starting:
                hp = hps[spec.hp or first]
                self.launcher.start(name, self.surge_argv(hp, spec), cpus=loadgen_cpus,
                                    stdout=self.log_file(name), stderr=self.log_file(name),
                                    role="loadgen", workload="surge")
                self.open_phase(name, hp.task_id, "surge", None, at, None)
                self.current[name]["task"] = hp.name
            else:
                self.launcher.stop(name, timeout=2.0)
                self.close_phase(name, time.time(), at)

    # -- after the run ------------------------------------------------------------------
    def finish_truth(self, truth: dict) -> None:
        phases = sorted(self.phases, key=lambda p: (p["start_ts"], p["task"]))
        truth["phases"] = phases
        truth["host_load"] = self.host_load
        # Version 1's view: one entry per aggressive phase.
        hp_task = truth.get("hp", {}).get("task_id")
        truth["antagonists"] = [
            {"name": f"{p['task']}@{p['scheduled_start']:g}", "task": p["task"],
             "workload": truth["tasks"].get(p["task_id"], {}).get("workload"),
             "resource": p["resource"], "task_id": p["task_id"], "cpus": self.be_cpus(),
             "contended_task_id": hp_task, "scheduled_start": p["scheduled_start"],
             "scheduled_stop": p["scheduled_stop"], "start_ts": p["start_ts"],
             "stop_ts": p["stop_ts"]}
            for p in phases if p["kind"] == "aggressive"]
        if "started_ts" in truth and os.path.exists(self.path("recording.jsonl")):
            with open(self.path("recording.jsonl"), "rb") as f:
                truth["noisy"] = noisy(truth, f.read().splitlines())


def last_line(path: str) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return lines[-1][:300] if lines else "(empty log)"


def noisy(truth: dict, lines) -> dict:
    """Whether the run says more about the host than about interference: the HP's quiet
    SLI already breaks the SLO, or others used the HP's cores in many intervals."""
    hp = truth["hp"]
    slo = hp.get("slo")
    quiet = [v for _ts, v, label in score.sli_by_label(truth, lines) if label == "quiet"]
    median = statistics.median(quiet) if quiet else None
    reasons = []
    if median is not None and slo is not None and median > slo:
        reasons.append(f"quiet {hp['sli_metric']} median {median:.6g} breaks the SLO {slo:.6g}")
    load = truth.get("host_load") or []
    busy = sum(1 for x in load if x.get("other_cpu_on_hp_cpus", 0) > BUSY_CORES)
    share = busy / len(load) if load else 0.0
    if share >= BUSY_SHARE:
        reasons.append(f"others used more than {BUSY_CORES} cores of the HP cpus in "
                       f"{100 * share:.0f}% of intervals")
    return {"flag": bool(reasons), "reasons": reasons, "quiet_sli_median": median,
            "quiet_samples": len(quiet), "slo": slo, "busy_intervals_fraction": round(share, 3)}


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
    windows += [(p["start_ts"], p["stop_ts"], f"surge@{p['scheduled_start']:g}")
                for p in truth.get("phases", []) if p["kind"] == "surge"]
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
