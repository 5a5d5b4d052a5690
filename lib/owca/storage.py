"""Where owca-ship puts a cycle: the storage interface and the local storages.

A storage receives Cycle objects, one per frame shipped, each already rendered
as Prometheus text exposition; it selects what it keeps by `categories`
(metrics, anomalies, allocations).  Kafka and the Prometheus endpoint live in
their own modules.
"""
import os
from dataclasses import dataclass, field
from typing import List

from owca.config import register
from owca.exposition import escape
from owca.stream import FrameWriter, write_all as _write_all

CATEGORIES = ("metrics", "anomalies", "allocations")


@dataclass
class Cycle:
    category: str   # metrics, anomalies or allocations
    seq: int
    ts: float
    host: str
    text: str       # exposition text, newline-terminated lines


@dataclass(kw_only=True)
class Storage:
    """Base of every storage.  store() may raise StorageError; close() flushes."""
    categories: List[str] = field(default_factory=lambda: list(CATEGORIES))

    def __post_init__(self):
        for c in self.categories:
            if c not in CATEGORIES:
                raise ValueError(f"categories: unknown category {c!r} "
                                 f"(expected {', '.join(CATEGORIES)})")

    def wants(self, category: str) -> bool:
        return category in self.categories

    def start(self) -> None:
        """Called once by owca-ship before the first cycle, to take what the storage holds
        while it runs (a spool, a listening socket): building one from the configuration
        has no side effects, so a configuration can be checked on its own."""

    def store(self, cycle: Cycle) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StorageError(Exception):
    """A storage could not take a cycle (one line, counted)."""


def _block(cycle: Cycle) -> str:
    # The host name comes from a frame: escaped like a label value, so that no
    # character of it can end the comment line and start a sample of its own.
    return f"# owca {cycle.category} seq={cycle.seq} host={escape(cycle.host)}\n{cycle.text}"


@register
@dataclass(kw_only=True)
class StdoutStorage(Storage):
    """Each cycle's block on standard output, for shells (`owca-ship | less`)."""

    def store(self, cycle: Cycle) -> None:
        # A closed stdout (`| head`) ends owca-ship quietly: OutputClosed, not an error.
        self._out.write(_block(cycle).encode())

    def __post_init__(self):
        super().__post_init__()
        self._out = FrameWriter(1)


@register
@dataclass(kw_only=True)
class LogStorage(Storage):
    """Each cycle's block appended to standard error (the journal) or to a file."""
    output: str = "stderr"

    def __post_init__(self):
        super().__post_init__()
        self._fd = None

    def store(self, cycle: Cycle) -> None:
        if self._fd is None:
            self._fd = 2 if self.output == "stderr" else \
                os.open(self.output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            _write_all(self._fd, _block(cycle).encode())
        except OSError as e:
            raise StorageError(f"{self.output}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd not in (None, 2):
            os.close(self._fd)
        self._fd = None


@register
@dataclass(kw_only=True)
class FileStorage(Storage):
    """Cycles appended to `path`; with `overwrite`, the file holds only the latest
    cycle, replaced atomically (for a node exporter's textfile collector)."""
    path: str
    overwrite: bool = False
    fsync: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._fd = None

    def store(self, cycle: Cycle) -> None:
        data = _block(cycle).encode()
        try:
            if self.overwrite:
                tmp = f"{self.path}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    _write_all(fd, data)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self.path)
                return
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                   0o644)
            _write_all(self._fd, data)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            raise StorageError(f"{self.path}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
