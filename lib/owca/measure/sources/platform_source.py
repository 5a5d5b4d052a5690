"""The platform (platform.py's PlatformReader) as a source: platform metrics only.

Failure as a whole: one of the files every Linux has was unreadable this cycle,
so that its figures are missing: /proc/stat (platform_cpu_usage), /proc/meminfo
(platform_mem_*) or /sys/devices/system/cpu/online (platform_topology_cpus).  The
CPUs' core and package ids and the NUMA nodes' files are not there on every
machine (a kernel without NUMA has no node directory): their absence is no failure.
"""
from owca.measure.sources.base import Cycle, Reading, Source
from owca.measure.sources.platform import PlatformReader

# One metric from each file every Linux has.
ALWAYS_THERE = ("platform_cpu_usage", "platform_mem_total_bytes", "platform_topology_cpus")


class PlatformSource(Source):
    name = "platform"

    def __init__(self, cfg, paths):
        self.reader = PlatformReader(paths)

    def read(self, cycle: Cycle) -> Reading:
        platform = self.reader.read()
        return Reading(platform=platform, ok=all(name in platform for name in ALWAYS_THERE))

    def close(self) -> None:
        self.reader.close()
