"""owca-allocate: hands each `measurements` frame to an allocator plug-in.

The measurements frame is forwarded unchanged, followed by an `allocations`
frame of the same cycle (and an `anomalies` frame when the allocator reports
any).

Allocator API (DESIGN.md):

    allocate(platform, tasks_measurements, tasks_resources, tasks_labels,
             tasks_allocations) -> (allocations, anomalies, extra_metrics)

`tasks_allocations` is what the tasks have now, read back from the system each
cycle; `allocations` maps task ids to the allocations wanted (only the changes
need be given).
"""
import logging
from dataclasses import dataclass, field
from typing import Dict

from owca import frames
from owca.config import register
from owca.detect import anomaly_dicts, plugin_inputs
from owca.stage import Stage

log = logging.getLogger("owca.allocate")


class Allocator:
    """Base class of allocator plug-ins."""

    def allocate(self, platform, tasks_measurements: Dict[str, dict],
                 tasks_resources: Dict[str, dict], tasks_labels: Dict[str, dict],
                 tasks_allocations: Dict[str, dict]):
        raise NotImplementedError


@register
@dataclass
class NOPAllocator(Allocator):
    """Allocates nothing."""

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        return {}, [], []


@dataclass
class AllocateConfig:
    allocator: Allocator = field(default_factory=NOPAllocator)
    interval: float = None
    # --- actuation (cgroup and resctrl writers) plugs in here ---


class Allocate(Stage):
    name = "allocate"
    consumes = ("measurements",)

    def __init__(self, cfg: AllocateConfig, options: dict):
        super().__init__(cfg, options)
        self.errors = 0
        self.dry_run = bool(options.get("--dry-run"))

    def current_allocations(self, frame: dict) -> Dict[str, dict]:
        """What each task has now, read from its cgroup (actuation fills this in)."""
        return {task_id: {} for task_id in frame["tasks"]}

    def process(self, frame: dict) -> list:
        allocator = self.cfg.allocator
        anomalies, extra, allocations = [], [], {}
        try:
            current = self.current_allocations(frame)
            allocations, anomalies, extra = allocator.allocate(*plugin_inputs(frame), current)
            anomalies = anomaly_dicts(anomalies)
        except Exception as e:  # a plug-in's bug costs its cycle, not the pipeline
            self.errors += 1
            log.error("cycle %s: %s failed: %s: %s", frame["seq"], type(allocator).__name__,
                      type(e).__name__, e)
            allocations, anomalies, extra = {}, [], []
        metrics = list(extra) + [
            frames.sample("owca_allocator_errors_total", self.errors, {"stage": self.name},
                          "counter")] + self.stats.samples()
        out = [frames.allocations_frame(frame["seq"], allocations, ts=frame["ts"],
                                        host=frame["host"], metrics=metrics,
                                        dry_run=self.dry_run)]
        if anomalies:
            out.append(frames.anomalies_frame(frame["seq"], anomalies, ts=frame["ts"],
                                              host=frame["host"]))
        return out
