"""owca-ship: every frame it reads, rendered and handed to its storages.

Measurements and tasks frames become `metrics` cycles, anomalies frames
`anomalies` cycles, allocations frames `allocations` cycles.  A storage that
fails is logged and counted; the others still get the cycle.  Frames of an
unknown kind or version cannot be stored: they are counted and skipped.
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List

from owca.core import config, frames
from owca.core.stage import DataError, Stage
from owca.plugin import Cycle, Storage, StorageError
from owca.ship.exposition import CATEGORY_OF_KIND, Formatter
from owca.ship.storages import BUILTINS
from owca.ship.storages.local import StdoutStorage

config.add_builtins(BUILTINS)

log = logging.getLogger("owca.ship")


@dataclass
class ShipConfig:
    storages: List[Storage] = field(default_factory=lambda: [StdoutStorage()])
    # No interval unless configured; the annotation stays `float`, not Optional, because
    # the configuration is checked against it: `interval: null` is refused.
    interval: float = None  # type: ignore[assignment]


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
        self.formatter = Formatter()
        self.storage_errors: Dict[str, int] = {}   # storage class -> cycles not stored
        self.bad_values = 0
        for i, storage in enumerate(self.cfg.storages):
            try:
                storage.start()
            except StorageError as e:  # the spool locked, the port taken: a restart may cure it
                for started in self.cfg.storages[:i]:
                    started.close()
                raise DataError(f"{type(storage).__name__}: {e}") from None

    def own_samples(self) -> List[dict]:
        out = self.stats.samples()
        out.append(frames.sample("owca_ship_bad_values_total", self.bad_values,
                                 {"stage": self.name}, "counter"))
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
        extra = self.own_samples() if category == "metrics" else ()
        block = self.formatter.format(frame, extra)
        if block.bad_values:
            self.bad_values += block.bad_values
            log.warning("cycle %d: %d metric values are not finite numbers: left out",
                        frame["seq"], block.bad_values)
        cycle = Cycle(category, frame["seq"], frame["ts"], frame["host"], block.render())
        for storage in wanted:
            try:
                storage.store(cycle)
            except StorageError as e:
                name = type(storage).__name__
                self.storage_errors[name] = self.storage_errors.get(name, 0) + 1
                log.error("%s: cycle %d not stored: %s", name, frame["seq"], e)
        return []

    def close(self) -> list:
        for storage in self.cfg.storages:
            try:
                storage.close()
            except Exception as e:  # noqa: BLE001 closing one storage must not keep the others open
                log.error("%s: close failed: %s", type(storage).__name__, e)
        return []
