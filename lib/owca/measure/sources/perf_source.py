"""Perf counters (perf.py's PerfCounters, through the owca-perf helper) as a source.

Imported only when the configuration sets `perf_events`.  The helper is started
with the source: a configuration it cannot count here (no helper binary, no
perf_event cgroup controller, an event the grammar refuses) is a ConfigError.

Failure as a whole: the cycle has no perf metrics because of the helper: it died,
hung or spoke out of protocol during the read and was restarted, or it is not
running (a restart failed and the next try is cycles away).  A task whose counters
could not be opened (owca_perf_tasks_not_counted) or an event this machine lacks
(owca_perf_events_missing) is not a failure.
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
        restarts = self.counters.restarts
        tasks = self.counters.read()
        # read() restarts a helper that failed, or tries to start a missing one; both
        # count a restart, and give this cycle no perf metrics.
        ok = self.counters.restarts == restarts and self.counters.helper is not None
        return Reading(tasks=tasks, samples=self.counters.samples(cycle.labels), ok=ok)

    def close(self) -> None:
        self.counters.close()
