"""Perf counters (perf.py's PerfCounters, through the owca-perf helper) as a source.

Imported only when the configuration sets `perf_events`.  The helper is started
with the source: a configuration it cannot count here (no helper binary, no
perf_event cgroup controller, an event the grammar refuses) is a ConfigError.
"""
from typing import Dict

from owca.core.config import ConfigError
from owca.measure.sources.base import Cycle, Reading, Source, cgroup_paths
from owca.measure.sources.perf import HelperGone, PerfCounters


class PerfSource(Source):
    name = "perf"

    def __init__(self, cfg, paths):
        try:
            self.counters = PerfCounters(cfg.perf_events, helper_path=cfg.perf_helper,
                                         paths=paths, cgroup_root=cfg.perf_cgroup_root)
        except (OSError, ValueError, HelperGone) as e:
            raise ConfigError(f"perf_events: cannot count perf events here: {e}") from None

    def update(self, tasks: Dict[str, dict]) -> None:
        self.counters.update(cgroup_paths(tasks))

    def read(self, cycle: Cycle) -> Reading:
        tasks = self.counters.read()
        return Reading(tasks=tasks, samples=self.counters.samples(cycle.labels))

    def close(self) -> None:
        self.counters.close()
