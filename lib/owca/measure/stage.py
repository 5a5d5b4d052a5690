"""owca-measure: a `measurements` frame for each `tasks` frame (or each interval).

What it reads comes from its sources (lib/owca/measure/sources/): the tasks' cgroups
and the platform always, perf counters, APM files, the services' own service levels
(sli) and RDT monitoring when the configuration turns them on.  Each is a Source
(sources/base.py): told of the task set when it changes, read once per cycle, closed
at the end; the stage merges what they read in a fixed order and adds, per source,
whether it worked and how long it took (owca_source_success,
owca_source_duration_seconds).  A task whose cgroup vanishes is dropped from that
cycle with a warning.
"""
import importlib
import time
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple

from owca.core import frames
from owca.core.kernel import fd_usage, raise_fd_limit
from owca.core.paths import paths_from_options
from owca.core.ownusage import own_usage
from owca.core.stage import Stage
from owca.measure.budget import LONGER_INTERVAL, NO_PERF, STRIDE, CpuBudget
from owca.measure.sources import BUILTINS, SWITCHES
from owca.measure.sources.base import Cycle, Reading, Source
from owca.measure.sources.sli_config import SliConfig


@dataclass
class MeasureConfig:
    # Re-measure the latest task list every `interval` seconds, whatever the
    # pace of discovery; without it, one measurement per tasks frame.
    interval: Optional[float] = None
    # Which cgroup hierarchy to read a task from: auto takes v1 where the task's
    # cgroup exists in a v1 hierarchy, else v2.
    cgroup_version: Literal["auto", "v1", "v2"] = "auto"
    # The files of the slow-changing task metrics (memory limits and NUMA pages,
    # docs/metrics.md) are read every this many cycles, spread evenly over the
    # tasks; in between their last values are reported.  1 reads them every cycle.
    slow_metrics_every: int = 10
    # task_run_queue_delay_seconds: each thread's /proc/TID/schedstat read every
    # cycle (benchmarks/measure_cycle.py measures the cost); false reads none.
    run_queue_delay: bool = True
    # The costly signals of a BE task (its PSI files and run-queue delay) are read
    # every this many cycles, the last values reported in between; HP tasks' every
    # cycle.  1 reads every task's every cycle.
    be_costly_signals_every: int = 1
    # The share of one CPU owca-measure may use, its perf helper included (2.0: 2 %);
    # past it, optional work is shed in the order lib/owca/measure/budget.py gives,
    # and taken up again when there is room.  None: no budget.
    cpu_budget_percent: Optional[float] = None
    # --- perf counters: the perf section (lib/owca/measure/sources/perf/) plugs in here ---
    # Events counted per task (docs/perf.md), e.g. [instructions, cycles,
    # task-clock, stalled_mem_loads=0x140014a3]; none: no perf helper at all.
    perf_events: Optional[list] = None
    # The owca-perf binary; default beside the Python executable, else build/, else PATH.
    perf_helper: Optional[str] = None
    # Where task cgroups are found for perf; default: the v1 perf_event mount when
    # the controller is bound to v1, else the cgroup2 mount.
    perf_cgroup_root: Optional[str] = None
    # --- application performance metrics: the wrappers' files (lib/owca/measure/sources/apm.py) ---
    # Directory of the wrappers' APM files (/run/owca/apm is theirs by default);
    # None reads none.  Files older than apm_max_age seconds are ignored.
    apm_dir: Optional[str] = None
    apm_max_age: float = 30.0
    # --- service levels the services publish (lib/owca/measure/sources/sli.py) ---
    # Their own Prometheus histograms, a Prometheus server, redis: per task by its
    # owca.io/sli-* annotations or by rules here (docs/control.md); None reads none.
    sli: Optional[SliConfig] = None
    # --- Intel RDT monitoring through resctrl (lib/owca/measure/sources/rdt.py) ---
    # A resctrl monitoring group per task: its L3 occupancy and memory bandwidth.
    rdt_monitoring: bool = False

    def __post_init__(self):
        if self.perf_events:
            from owca.measure.sources.perf import parse_events
            parse_events(self.perf_events)  # a ValueError is reported with file:line
        if self.slow_metrics_every < 1:
            raise ValueError("slow_metrics_every: expected a number of cycles, at least 1")
        if self.be_costly_signals_every < 1:
            raise ValueError("be_costly_signals_every: expected a number of cycles, at least 1")
        if self.cpu_budget_percent is not None and not self.cpu_budget_percent > 0:
            raise ValueError("cpu_budget_percent: expected a positive share of one CPU")
        if not self.apm_max_age > 0:
            raise ValueError("apm_max_age: expected a positive number of seconds")


class Measure(Stage):
    name = "measure"
    consumes = ("tasks",)
    forward_consumed = False

    def __init__(self, cfg: MeasureConfig, options: dict):
        super().__init__(cfg, options)
        self.paths = paths_from_options(procfs=options.get("--procfs"),
                                        sysfs=options.get("--sysfs"),
                                        cgroupfs=options.get("--cgroupfs"),
                                        resctrlfs=options.get("--resctrlfs"))
        raise_fd_limit()
        self.tasks: Dict[str, dict] = {}
        self.upstream_metrics: List[dict] = []   # the tasks frame's own samples
        self.dropped = 0
        self.seq = 0
        self.sources: List[Source] = [source_class(name)(cfg, self.paths)
                                      for name in enabled_sources(cfg)]
        self.budget = CpuBudget(cfg.cpu_budget_percent) if cfg.cpu_budget_percent else None
        self._opened = False   # new tasks since the budget's last look
        self._skip_next = False

    def source(self, name: str) -> Optional[Source]:
        """The source of that name, None where the configuration leaves it off."""
        return next((s for s in self.sources if s.name == name), None)

    @property
    def paced_by_interval(self) -> bool:
        return bool(self.interval)

    def process(self, frame: dict) -> list:
        self.update(frame["tasks"])
        self.upstream_metrics = frame.get("metrics", [])
        if self.interval or self._skipped():
            return []
        return [self.measure(frame["seq"])]

    def idle(self) -> list:
        if not self.interval or self._skipped():
            return []
        self.seq += 1
        return [self.measure(self.seq)]

    def _skipped(self) -> bool:
        """Whether the CPU budget skips this cycle (every other one at its last level)."""
        if self.budget is None or self.budget.level < LONGER_INTERVAL:
            return False
        self._skip_next = not self._skip_next
        return not self._skip_next

    def update(self, tasks: list) -> None:
        """The task set of a tasks frame, handed to every source."""
        if self.budget is not None and any(
                t["id"] not in self.tasks or self.tasks[t["id"]]["cgroup_path"]
                != t["cgroup_path"] for t in tasks):
            self._opened = True
        self.tasks = {t["id"]: t for t in tasks}
        for source in self.sources:
            source.update(self.tasks)

    def measure(self, seq: int) -> dict:
        started = time.monotonic()
        ts = time.time()
        labels = {"stage": self.name}
        readings = self.read_sources(Cycle(seq, labels))
        platform, measured = merge(readings)
        self.dropped += len(self.tasks) - len(measured)
        out = {}
        tasks = self.tasks
        for task_id, metrics in measured.items():
            metrics["task_up"] = 1
            metrics["task_last_seen"] = ts
            task = tasks[task_id]
            out[task_id] = {"name": task.get("name", task_id),
                            "cgroup_path": task["cgroup_path"],
                            "labels": task.get("labels", {}),
                            "resources": task.get("resources", {}),
                            "metrics": metrics}
        self.stats.cycle_duration = time.monotonic() - started
        own = self.budget_samples(len(out), labels) + self.stats.samples() + [
            frames.sample("owca_tasks", len(out), labels),
            frames.sample("owca_tasks_dropped_total", self.dropped, labels, "counter"),
            frames.sample("owca_files_not_kept_open", fd_usage()["not_kept_open"], labels),
        ]
        for _source, reading, _seconds in readings:
            own += reading.samples
        own += self.source_samples(readings, labels)
        return frames.measurements_frame(seq, platform, out, ts=ts,
                                         metrics=list(self.upstream_metrics) + own)

    def budget_samples(self, tasks: int, labels: dict) -> list:
        """The CPU budget's look at the cycle that ends (it may change the level),
        and its samples; none without a budget."""
        budget = self.budget
        if budget is None:
            return []
        perf = self.source("perf")
        helper = getattr(perf, "helper_cpu_seconds", None)
        cpu = own_usage().cpu_seconds + (helper() if helper else 0.0)
        opened, self._opened = self._opened, False
        if budget.observe(time.monotonic(), cpu, tasks, opening=opened) is not None:
            self.apply_level(budget.level)
        out = [frames.sample("owca_measure_shed_level", budget.level, labels)]
        if self.stats.timing:
            out.append(frames.sample("owca_measure_cpu_share", round(budget.share, 6),
                                     labels))
        return out

    def apply_level(self, level: int) -> None:
        """What the budget's level sheds (budget.py's table), told to the sources."""
        cgroups = self.source("cgroup")
        if cgroups is not None:
            cgroups.set_stride(STRIDE if level > 0 else 1)  # type: ignore[attr-defined]

    def read_sources(self, cycle: Cycle) -> List[Tuple[Source, Reading, float]]:
        """(source, its reading, seconds the read took) of every source, in order;
        perf's left out while the CPU budget sheds it."""
        readings = []
        shed_perf = self.budget is not None and self.budget.level >= NO_PERF
        for source in self.sources:
            if shed_perf and source.name == "perf":
                continue
            started = time.monotonic()
            reading = source.read(cycle)
            readings.append((source, reading, time.monotonic() - started))
        return readings

    def source_samples(self, readings, labels: dict) -> list:
        """owca_source_success and (unless --no-timing) owca_source_duration_seconds of
        each source, one metric after the other."""
        out = [frames.sample("owca_source_success", int(reading.ok),
                             dict(labels, source=source.name))
               for source, reading, _seconds in readings]
        if self.stats.timing:
            out += [frames.sample("owca_source_duration_seconds", round(seconds, 6),
                                  dict(labels, source=source.name))
                    for source, _reading, seconds in readings]
        return out

    def files_read(self) -> dict:
        """What a steady cycle reads, from the stage itself, so that the same-work floor
        of benchmarks/measure_cycle.py cannot drift from it: `files`, [(path, every,
        phase, kept)] (TaskCgroup.files_read); `perf_cgroups`, the cgroup directories
        counted; `perf_events`, the events configured."""
        cgroups = self.source("cgroup")
        perf = self.source("perf")
        return {"files": [item for files in cgroups.files_read().values()  # type: ignore[attr-defined]
                          for item in files] if cgroups else [],
                "perf_cgroups": perf.cgroups_counted() if perf else [],  # type: ignore[attr-defined]
                "perf_events": list(self.cfg.perf_events or [])}

    def close(self) -> list:
        for source in self.sources:
            source.close()
        return []


def enabled_sources(cfg: MeasureConfig) -> List[str]:
    """The names of the sources `cfg` turns on, in the order of BUILTINS."""
    return [name for name in BUILTINS if name not in SWITCHES or getattr(cfg, SWITCHES[name])]


def source_class(name: str) -> type:
    """A source's class, its module imported now (perf, APM and RDT only when on)."""
    module, _, cls = BUILTINS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def merge(readings) -> Tuple[dict, Dict[str, dict]]:
    """(platform metrics, {task id: metrics}) of a cycle's readings, merged in order.

    The tasks are those the source that lists tasks read; the others' metrics of a
    task are added to its own, after those a reading `replaces` are dropped (that
    source's dicts are updated in place: a cycle's readings are used once).
    """
    platform: dict = {}
    for _source, reading, _seconds in readings:
        platform.update(reading.platform)
    measured = next(reading.tasks for source, reading, _ in readings if source.lists_tasks)
    for source, reading, _seconds in readings:
        if source.lists_tasks or not reading.tasks:
            continue
        found = reading.tasks
        for task_id, metrics in measured.items():
            extra = found.get(task_id)
            if extra is not None:
                for name in reading.replaces:
                    metrics.pop(name, None)
            if extra:
                metrics.update(extra)
    return platform, measured
