"""The platform (platform.py's PlatformReader) as a source: platform metrics only."""
from owca.measure.sources.base import Cycle, Reading, Source
from owca.measure.sources.platform import PlatformReader


class PlatformSource(Source):
    name = "platform"

    def __init__(self, cfg, paths):
        self.reader = PlatformReader(paths)

    def read(self, cycle: Cycle) -> Reading:
        return Reading(platform=self.reader.read())

    def close(self) -> None:
        self.reader.close()
