"""Intel RDT monitoring through resctrl (rdt.py's RdtMonitor) as a source.

Imported only when the configuration sets `rdt_monitoring`; a host without resctrl
or L3 monitoring is a ConfigError at start.

Failure as a whole: resctrl could not be read or written this cycle (unmounted
since the start, or failing), so that the cycle has no RDT figures.  A task left
without a monitoring group because the RMIDs are spent (owca_rdt_unmonitored_tasks)
or because its cgroup went away is not a failure.
"""
from typing import Dict

from owca.measure.sources.base import Cycle, Reading, Source, cgroup_paths
from owca.measure.sources.rdt import start_rdt_monitor


class RdtSource(Source):
    name = "rdt"

    def __init__(self, cfg, paths):
        self.monitor = start_rdt_monitor(paths)

    def update(self, tasks: Dict[str, dict]) -> None:
        self.monitor.update(cgroup_paths(tasks))

    def read(self, cycle: Cycle) -> Reading:
        tasks, platform = self.monitor.read_cycle()
        return Reading(tasks=tasks, platform=platform,
                       samples=self.monitor.samples(cycle.labels), ok=not self.monitor.failing)

    def close(self) -> None:
        self.monitor.close()
