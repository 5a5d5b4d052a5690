"""The workload wrappers' APM files (apm.py's ApmReader) as a source.

Imported only when the configuration sets `apm_dir`.
"""
from owca.measure.sources.apm import ApmReader
from owca.measure.sources.base import Cycle, Reading, Source


class ApmSource(Source):
    name = "apm"

    def __init__(self, cfg, paths):
        self.reader = ApmReader(cfg.apm_dir, cfg.apm_max_age)

    def read(self, cycle: Cycle) -> Reading:
        tasks = self.reader.read()
        return Reading(tasks=tasks, samples=self.reader.samples(cycle.labels))
