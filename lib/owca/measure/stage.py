"""owca-measure: a `measurements` frame for each `tasks` frame (or each interval).

Per task it reads the task's cgroup (lib/owca/measure/sources/cgroup.py, v1 or v2) and, when
configured, its perf counters (lib/owca/measure/sources/perf.py); once per cycle it reads the
platform (lib/owca/measure/sources/platform.py).  Readers are kept between cycles, so that their
files stay open and a cycle costs reads, not opens.  A task whose cgroup
vanishes is dropped from that cycle with a warning.
"""
import logging
import time
from dataclasses import dataclass
from typing import Dict, Literal, Optional

from owca.core import frames
from owca.measure.sources.apm import ApmReader
from owca.core.kernel import CgroupGone, fd_usage, raise_fd_limit
from owca.measure.sources.cgroup import TaskCgroup
from owca.core.config import ConfigError
from owca.core.paths import paths_from_options
from owca.measure.sources.platform import PlatformReader
from owca.measure.sources.rdt import start_rdt_monitor
from owca.core.stage import Stage

log = logging.getLogger("owca.measure")


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
    # --- perf counters: the perf section (lib/owca/measure/sources/perf.py) plugs in here ---
    # Events counted per task (docs/perf.md), e.g. [instructions, cycles,
    # task-clock, stalled_mem_loads=0x140014a3]; none: no perf helper at all.
    perf_events: Optional[list] = None
    # The owca-perf binary; default beside the Python executable, else build/, else PATH.
    perf_helper: Optional[str] = None
    # Where task cgroups are found for perf; default: the v1 perf_event mount when
    # the controller is bound to v1, else the cgroup2 mount.
    perf_cgroup_root: Optional[str] = None
    # --- application performance metrics: workload wrappers' files (lib/owca/measure/sources/apm.py) ---
    # Directory of the wrappers' APM files (/run/owca/apm is theirs by default);
    # None reads none.  Files older than apm_max_age seconds are ignored.
    apm_dir: Optional[str] = None
    apm_max_age: float = 30.0
    # --- Intel RDT monitoring through resctrl (lib/owca/measure/sources/rdt.py) ---
    # A resctrl monitoring group per task: its L3 occupancy and memory bandwidth.
    rdt_monitoring: bool = False

    def __post_init__(self):
        if self.perf_events:
            from owca.measure.sources.perf import parse_events
            parse_events(self.perf_events)  # a ValueError is reported with file:line
        if self.slow_metrics_every < 1:
            raise ValueError("slow_metrics_every: expected a number of cycles, at least 1")
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
        self.platform = PlatformReader(self.paths)
        self.readers: Dict[str, TaskCgroup] = {}
        self.tasks: Dict[str, dict] = {}
        self.upstream_metrics = []
        self.dropped = 0
        self.seq = 0
        self.readers_created = 0  # the next reader's phase for its slow metrics
        self.perf = self._start_perf()
        self.apm = ApmReader(cfg.apm_dir, cfg.apm_max_age) if cfg.apm_dir else None
        self.rdt = start_rdt_monitor(self.paths) if cfg.rdt_monitoring else None

    def _start_perf(self):
        if not self.cfg.perf_events:
            return None
        from owca.measure.sources.perf import HelperGone, PerfCounters
        try:
            return PerfCounters(self.cfg.perf_events, helper_path=self.cfg.perf_helper,
                                paths=self.paths, cgroup_root=self.cfg.perf_cgroup_root)
        except (OSError, ValueError, HelperGone) as e:
            raise ConfigError(f"perf_events: cannot count perf events here: {e}") from None

    @property
    def paced_by_interval(self) -> bool:
        return bool(self.interval)

    def process(self, frame: dict) -> list:
        self.update(frame["tasks"])
        self.upstream_metrics = frame.get("metrics", [])
        if self.interval:
            return []
        return [self.measure(frame["seq"])]

    def idle(self) -> list:
        if not self.interval:
            return []
        self.seq += 1
        return [self.measure(self.seq)]

    def update(self, tasks: list) -> None:
        """Open readers for new tasks, close those of tasks that went."""
        current = {t["id"]: t for t in tasks}
        for task_id in list(self.readers):
            task = current.get(task_id)
            if task is None or task["cgroup_path"] != self.tasks[task_id]["cgroup_path"]:
                self.readers.pop(task_id).close()
                del self.tasks[task_id]
        for task_id, task in current.items():
            self.tasks[task_id] = task
            if task_id not in self.readers:
                self.readers[task_id] = TaskCgroup(
                    self.paths, task["cgroup_path"], self.cfg.cgroup_version,
                    slow_every=self.cfg.slow_metrics_every, phase=self.readers_created,
                    run_queue_delay=self.cfg.run_queue_delay)
                self.readers_created += 1
        if self.perf is not None:
            self.perf.update({i: t["cgroup_path"] for i, t in current.items()})
        if self.rdt is not None:
            self.rdt.update({i: t["cgroup_path"] for i, t in current.items()})

    def measure(self, seq: int) -> dict:
        started = time.monotonic()
        ts = time.time()
        platform = self.platform.read()
        rdt_tasks, rdt_platform = self.rdt.read_cycle() if self.rdt is not None else ({}, {})
        platform.update(rdt_platform)
        out = {}
        tasks = self.tasks
        for task_id, metrics in self.read_tasks(seq, rdt_tasks).items():
            metrics["task_up"] = 1
            metrics["task_last_seen"] = ts
            task = tasks[task_id]
            out[task_id] = {"name": task.get("name", task_id),
                            "cgroup_path": task["cgroup_path"],
                            "labels": task.get("labels", {}),
                            "resources": task.get("resources", {}),
                            "metrics": metrics}
        self.stats.cycle_duration = time.monotonic() - started
        labels = {"stage": self.name}
        own = self.stats.samples() + [
            frames.sample("owca_tasks", len(out), labels),
            frames.sample("owca_tasks_dropped_total", self.dropped, labels, "counter"),
            frames.sample("owca_files_not_kept_open", fd_usage()["not_kept_open"], labels),
        ]
        if self.perf is not None:
            own += self.perf.samples(labels)
        if self.apm is not None:
            own += self.apm.samples(labels)
        if self.rdt is not None:
            own += self.rdt.samples(labels)
        return frames.measurements_frame(seq, platform, out, ts=ts,
                                         metrics=list(self.upstream_metrics) + own)

    def read_tasks(self, seq: int, extra: Dict[str, dict] = None) -> Dict[str, dict]:
        """Every task's metrics of this cycle: its cgroup's, its perf counters',
        its APM file's, and `extra`'s (RDT monitoring).  A task whose cgroup is gone
        is left out."""
        perf = self.perf.read() if self.perf is not None else {}
        apm = self.apm.read() if self.apm is not None else {}
        measured = {}
        for task_id, reader in self.readers.items():
            try:
                metrics = reader.read()
            except CgroupGone as e:
                self.dropped += 1
                log.warning("task %s left out of cycle %d: %s", task_id, seq, e)
                continue
            if perf:
                metrics.update(perf.get(task_id, ()))
            if apm:
                metrics.update(apm.get(task_id, ()))
            if extra:
                metrics.update(extra.get(task_id, ()))
            measured[task_id] = metrics
        return measured

    def close(self) -> list:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
        self.platform.close()
        if self.perf is not None:
            self.perf.close()
        if self.rdt is not None:
            self.rdt.close()
        return []
