"""owca-ship: every frame it reads, rendered and handed to its storages.

Measurements and tasks frames become `metrics` cycles, anomalies frames
`anomalies` cycles, allocations frames `allocations` cycles.  A storage that
fails is logged and counted; the others still get the cycle.  Frames of an
unknown kind or version cannot be stored: they are counted and skipped.
"""
import collections
import logging
from dataclasses import dataclass, field
from typing import Counter, Dict, List, Set, Tuple

from owca.core import config, frames
from owca.core.stage import DataError, Stage
from owca.plugin import Cycle, Storage, StorageError
from owca.ship.exposition import (CATEGORY_OF_KIND, CLASHING, DUPLICATE, FORGED, RESERVED,
                                  Block, Formatter)
from owca.ship.storages import BUILTINS
from owca.ship.storages.local import StdoutStorage

config.add_builtins(BUILTINS)

log = logging.getLogger("owca.ship")

# What the exposition repaired, as logged: once for each reason and metric.
_REPAIRS = {
    RESERVED: "a label name Prometheus reserves (__*): left out",
    CLASHING: "a label named like one owca-ship sets itself: renamed exported_<name>",
    DUPLICATE: "a series given twice in one cycle: the first kept",
    FORGED: "a sample with the name and labels of one of owca-ship's own: dropped",
}
_REPORTED_LIMIT = 10000


@dataclass
class ShipConfig:
    storages: List[Storage] = field(default_factory=lambda: [StdoutStorage()])
    # No interval unless configured; the annotation stays `float`, not Optional, because
    # the configuration is checked against it: `interval: null` is refused.
    interval: float = None  # type: ignore[assignment]
    # The exposition names renamed in release 0.2, written beside the new ones until 0.3
    # (docs/metrics.md "Deprecated names"); false once dashboards and rules use the new.
    deprecated_names: bool = True


class Ship(Stage):
    name = "ship"
    consumes = frames.KINDS
    forward_consumed = False
    forwards_unknown = False

    @classmethod
    def writes_stdout(cls, cfg) -> bool:
        return any(isinstance(s, StdoutStorage) for s in cfg.storages)

    def __init__(self, cfg: ShipConfig, options: dict):
        super().__init__(cfg, options)
        self.formatter = Formatter(cfg.deprecated_names)
        self.storage_errors: Dict[str, int] = {}   # storage class -> cycles not stored
        self.bad_values = 0
        self.bad_labels: Counter[str] = collections.Counter()   # reason -> labels
        self.dropped_samples: Counter[str] = collections.Counter()   # reason -> samples
        self.bad_timestamps = 0
        self._reported: Set[Tuple[str, str]] = set()
        for i, storage in enumerate(self.cfg.storages):
            try:
                storage.start()
            except StorageError as e:  # the spool locked, the port taken: a restart may cure it
                for started in self.cfg.storages[:i]:
                    started.close()
                raise DataError(f"{type(storage).__name__}: {e}") from None

    def own_samples(self) -> List[dict]:
        out = self.stats.samples()
        labels = {"stage": self.name}
        out.append(frames.sample("owca_ship_bad_values_total", self.bad_values, labels,
                                 "counter"))
        # The repairs below appear once they happen (a clean stream's cycles are unchanged).
        for reason, count in self.bad_labels.items():
            out.append(frames.sample("owca_ship_bad_labels_total", count,
                                     {**labels, "reason": reason}, "counter"))
        for reason, count in self.dropped_samples.items():
            out.append(frames.sample("owca_ship_dropped_samples_total", count,
                                     {**labels, "reason": reason}, "counter"))
        if self.bad_timestamps:
            out.append(frames.sample("owca_ship_bad_timestamps_total", self.bad_timestamps,
                                     labels, "counter"))
        for storage, count in self.storage_errors.items():
            out.append(frames.sample("owca_storage_errors_total", count,
                                     {"stage": self.name, "storage": storage}, "counter"))
        for storage in self.cfg.storages:
            sampler = getattr(storage, "samples", None)
            if sampler is not None:
                out.extend(sampler())
        return out

    def process(self, frame: dict) -> list:
        category = CATEGORY_OF_KIND[frame["kind"]]
        wanted = [s for s in self.cfg.storages if s.wants(category)]
        if not wanted:
            return []
        # Every category's block is checked against owca-ship's own series; a metrics
        # cycle carries them.
        block = self.formatter.format(frame, self.own_samples(), category == "metrics")
        self._count(frame, block)
        cycle = Cycle(category, frame["seq"], frame["ts"], block.host, block.render())
        for storage in wanted:
            try:
                storage.store(cycle)
            except StorageError as e:
                name = type(storage).__name__
                self.storage_errors[name] = self.storage_errors.get(name, 0) + 1
                log.error("%s: cycle %d not stored: %s", name, frame["seq"], e)
        return []

    def _count(self, frame: dict, block: Block):
        """What the exposition left out or changed: counted, and said (once a name)."""
        if block.bad_values:
            self.bad_values += block.bad_values
            log.warning("cycle %d: %d metric values are not finite numbers: left out",
                        frame["seq"], block.bad_values)
        self.bad_labels.update(block.bad_labels)
        self.dropped_samples.update(block.dropped)
        for reason, metric in block.examples.items():
            self._report(reason, metric, f"cycle {frame['seq']}: {metric}: {_REPAIRS[reason]}")
        if block.bad_timestamp:
            self.bad_timestamps += 1
            self._report("timestamp", "", f"cycle {frame['seq']}: ts {frame['ts']!r:.40} is "
                         f"beyond the exposition's int64 milliseconds (seconds mistaken for "
                         f"milliseconds?): its samples are stored without a timestamp")

    def _report(self, reason: str, name: str, message: str):
        """One error line for each reason and metric (bounded), however often it recurs:
        the counters count every time."""
        if (reason, name) not in self._reported and len(self._reported) < _REPORTED_LIMIT:
            self._reported.add((reason, name))
            log.error("%s (reported once)", message)

    def close(self) -> list:
        for storage in self.cfg.storages:
            try:
                storage.close()
            except Exception as e:  # noqa: BLE001 closing one storage must not keep the others open
                log.error("%s: close failed: %s", type(storage).__name__, e)
        return []
