"""Where owca-ship puts a cycle: the storage interface and the local storages.

A storage receives Cycle objects, one per frame shipped, each already rendered
as Prometheus text exposition; it selects what it keeps by `categories`
(metrics, anomalies, allocations).  Kafka and the Prometheus endpoint live in
their own modules.
"""
import os
from dataclasses import dataclass

from owca.core.stream import FrameWriter, write_all as _write_all
from owca.plugin import CATEGORIES, Cycle, Storage, StorageError
from owca.ship.exposition import escape


def _block(cycle: Cycle) -> str:
    # The host name comes from a frame: escaped like a label value, so that no
    # character of it can end the comment line and start a sample of its own.
    return f"# owca {cycle.category} seq={cycle.seq} host={escape(cycle.host)}\n{cycle.text}"


def check_output_path(field: str, path: str) -> None:
    """ValueError (a configuration error, with file and line) for a file that cannot be
    written where it is named: its directory missing, not a directory, read-only, or the
    path itself a directory.  A missing directory right under /run or /var/lib passes:
    systemd makes a unit's RuntimeDirectory= and StateDirectory= there when the unit
    starts, after its configuration was checked."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{field}: {path} is a directory")
    if not os.path.exists(directory):
        if os.path.dirname(directory) in ("/run", "/var/lib"):
            return
        raise ValueError(f"{field}: directory {directory} does not exist")
    if not os.path.isdir(directory):
        raise ValueError(f"{field}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{field}: cannot write in {directory}")


@dataclass(kw_only=True)
class StdoutStorage(Storage):
    """Each cycle's block on standard output, for shells (`owca-ship | less`)."""

    def store(self, cycle: Cycle) -> None:
        # A closed stdout (`| head`) ends owca-ship quietly: OutputClosed, not an error.
        self._out.write(_block(cycle).encode())

    def __post_init__(self):
        super().__post_init__()
        # The tool's stdout: its private copy once the stage took it (core.stream's
        # take_output), so that what a plug-in or a storage prints goes to stderr.
        self._out = FrameWriter()


@dataclass(kw_only=True)
class LogStorage(Storage):
    """Each cycle's block appended to standard error (the journal) or to a file."""
    output: str = "stderr"

    def __post_init__(self):
        super().__post_init__()
        if self.output != "stderr":
            check_output_path("output", self.output)
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


@dataclass(kw_only=True)
class FileStorage(Storage):
    """Cycles appended to `path`; with `overwrite`, the file holds the latest whole cycle
    (for a node exporter's textfile collector).

    With `overwrite`, the frames of one cycle (one seq: its metrics, anomalies and
    allocations) are gathered and written as one exposition, without timestamps (the
    textfile collector refuses them), by one atomic rename once the cycle is whole: when
    every category that earlier cycles brought has come, else when the next cycle
    starts or owca-ship stops.  A reader never sees half a cycle, nor one category alone."""
    path: str
    overwrite: bool = False
    fsync: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_output_path("path", self.path)
        self._fd = None
        self._pending = None        # [seq, host, {category: text}, written] of the latest cycle
        self._expected = None       # categories a whole cycle brings, learnt from earlier ones

    def store(self, cycle: Cycle) -> None:
        if self.overwrite:
            return self._gather(cycle)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                   0o644)
            _write_all(self._fd, _block(cycle).encode())
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            raise StorageError(f"{self.path}: {e.strerror}") from None

    def _gather(self, cycle: Cycle) -> None:
        pending = self._pending
        if pending is not None and (pending[0], pending[1]) != (cycle.seq, cycle.host):
            # The next cycle began: the last one is all there is.
            self._expected = (self._expected or set()) | set(pending[2])
            self._pending = None
            if not pending[3]:
                self._write(pending)
        if self._pending is None:
            self._pending = [cycle.seq, cycle.host, {}, False]   # seq, host, texts, written
        pending = self._pending
        texts = pending[2]
        texts[cycle.category] = texts[cycle.category] + cycle.text \
            if cycle.category in texts else cycle.text
        if pending[3] or (self._expected is not None and self._expected <= set(texts)):
            pending[3] = True       # whole (or a late frame of a cycle already written)
            self._write(pending)

    def _write(self, pending) -> None:
        from owca.ship.exposition import merge, strip_timestamps
        seq, host, texts, _ = pending
        categories = [c for c in CATEGORIES if c in texts]
        text = strip_timestamps(merge(texts[c] for c in categories))
        data = (f"# owca cycle seq={seq} host={escape(host)} "
                f"categories={','.join(categories)}\n"
                f"{text}").encode()
        tmp = f"{self.path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            raise StorageError(f"{self.path}: {e.strerror}") from None

    def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending[3]:
            self._write(pending)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
