"""The workload wrappers' APM files (apm.py's ApmReader) as a source.

Imported only when the configuration sets `apm_dir`.

Failure as a whole: the APM directory could not be listed this cycle (it is a
file, or not readable: owca_apm_read_errors_total counts it).  A directory that
does not exist yet is no failure: no wrapper has written on this node.  A stale,
malformed or unreadable file is not one either; each has its own counter.
"""
from owca.measure.sources.apm import ApmReader
from owca.measure.sources.base import Cycle, Reading, Source


class ApmSource(Source):
    name = "apm"

    def __init__(self, cfg, paths):
        self.reader = ApmReader(cfg.apm_dir, cfg.apm_max_age)

    def read(self, cycle: Cycle) -> Reading:
        tasks = self.reader.read()
        return Reading(tasks=tasks, samples=self.reader.samples(cycle.labels),
                       ok=not self.reader.directory_unreadable)
