"""A bounded, crash-safe, on-disk FIFO of records: what waits for a broker.

One file per record in one directory, named by a sequence number that only
grows (`00000000000000000042.rec`), so that listing the directory gives the
order back after a restart.  A record file is

    magic "OWSP" | version (1 byte) | 3 bytes zero | meta length (u32, big-endian)
    | payload length (u32) | CRC-32 of meta and payload (u32) | meta (JSON) | payload

`append()` writes the file under a temporary name, fsyncs it, renames it into
place and fsyncs the directory before it returns: from then on the record
survives a SIGKILL or a crash of the machine.  A write cut short by a kill
leaves only a temporary file, discarded at the next start; a record file whose
length or checksum does not match (a disk that lied) is discarded when it is
read, and counted.  Neither stops the spool.

Bounds: at most `max_records` records and `max_bytes` bytes of record files, and
at least `min_free_bytes` left free on the spool's filesystem after an append
(checked with statvfs before each write, so that the spool never takes what the
rest of the node needs).  `min_free_bytes=None` sizes that reserve from the
filesystem: 64 MiB, but at most 5 % of its size, so that on a small disk the
reserve does not take all the room and the spool still keeps what fits.  An
append that would break a bound drops the oldest records first, except the one a
sender holds (`take()` .. `release()`), which is kept so that a record on its way
to the broker is never reported as dropped.
The same holds when the filesystem fills before the bounds (ENOSPC, EDQUOT: other
files grew): the oldest records make room, and only when none is left to drop is
the new record itself dropped (SpoolFull).  Every drop is counted by reason.
A record larger than `max_bytes` on its own is refused.

Thread safety: one appender and one sender (`take`/`release`) may work at once.
A lock file (`flock`) keeps a second process off the same directory.
"""
import collections
import errno
import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Counter, Deque, Optional, Tuple

log = logging.getLogger("owca.spool")

MAGIC = b"OWSP"
VERSION = 1
HEADER = struct.Struct(">4sB3xIII")
SUFFIX = ".rec"
TMP_SUFFIX = ".tmp"
LOCK_NAME = "lock"
NAME_DIGITS = 20

# Reasons a record leaves the spool without being delivered.
FULL, TOO_LARGE, CORRUPT = "spool_full", "too_large", "corrupt"
DISK_FULL = "disk_full"          # the filesystem's free space (or the reserve) ran out

# The reserve when none is configured: this, or this share of the filesystem if less.
DEFAULT_RESERVE_BYTES = 64 * 1024 * 1024
DEFAULT_RESERVE_SHARE = 0.05
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class SpoolError(Exception):
    """The spool cannot be used or written (one line)."""


class SpoolFull(SpoolError):
    """The filesystem has no room for the record even with every older one dropped: the
    record itself was dropped (counted under disk_full)."""


class CorruptRecord(ValueError):
    """A record file that is not a whole, intact record."""


@dataclass
class Record:
    id: int
    meta: dict
    payload: bytes
    size: int          # bytes on disk


def encode_record(meta: dict, payload: bytes) -> bytes:
    meta_bytes = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    crc = zlib.crc32(payload, zlib.crc32(meta_bytes))
    return HEADER.pack(MAGIC, VERSION, len(meta_bytes), len(payload), crc) + meta_bytes + payload


def decode_record(data: bytes) -> Tuple[dict, bytes]:
    """(meta, payload) of a record file's bytes; CorruptRecord when they are not one."""
    if len(data) < HEADER.size:
        raise CorruptRecord(f"{len(data)} bytes, shorter than a header")
    magic, version, meta_len, payload_len, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptRecord("bad magic")
    if version != VERSION:
        raise CorruptRecord(f"unknown record version {version}")
    if len(data) != HEADER.size + meta_len + payload_len:
        raise CorruptRecord(f"{len(data)} bytes, expected "
                            f"{HEADER.size + meta_len + payload_len} (torn write?)")
    meta_bytes = data[HEADER.size:HEADER.size + meta_len]
    payload = data[HEADER.size + meta_len:]
    if zlib.crc32(payload, zlib.crc32(meta_bytes)) != crc:
        raise CorruptRecord("checksum mismatch")
    try:
        meta = json.loads(meta_bytes)
    except ValueError as e:
        raise CorruptRecord(f"bad meta: {e}") from None
    if not isinstance(meta, dict):
        raise CorruptRecord("bad meta: not an object")
    return meta, payload


def record_name(record_id: int) -> str:
    return f"{record_id:0{NAME_DIGITS}d}{SUFFIX}"


def parse_name(name: str) -> Optional[int]:
    """The record id of a record file's name, None for any other name."""
    stem = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else ""
    return int(stem) if len(stem) == NAME_DIGITS and stem.isdigit() else None


def _private(path: str, flags: int) -> int:
    """open()'s opener: records are readable by their owner only."""
    return os.open(path, flags | os.O_CLOEXEC, 0o600)


def _fsync_dir(fd: int):
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory
        log.debug("fsync of the spool directory: %s", e.strerror)


class Spool:
    """Records in `directory`, oldest first, bounded by records and bytes."""

    def __init__(self, directory: str, max_bytes: int, max_records: int, fsync: bool = True,
                 min_free_bytes: Optional[int] = 0):
        if max_bytes <= 0 or max_records <= 0 or (min_free_bytes or 0) < 0:
            raise SpoolError("spool bounds must be positive")
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_records = max_records
        self.min_free_bytes = min_free_bytes
        self.fsync = fsync
        self.dropped: Counter[str] = collections.Counter()   # reason -> records
        self.bytes = 0
        self._index: Deque[Tuple[int, int]] = collections.deque()  # (id, size), oldest first
        self._held: Optional[int] = None
        self._closed = False
        self._cond = threading.Condition()
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise SpoolError(f"spool directory {directory}: {e.strerror}") from None
        self._lock_fd: Optional[int] = None
        try:
            self._lock()
            self._next_id = self._scan() + 1
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------

    def _lock(self):
        path = os.path.join(self.directory, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise SpoolError(f"spool directory {self.directory}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpoolError(f"spool directory {self.directory} is in use "
                             f"(locked by pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _scan(self) -> int:
        """Index the records a previous run left, drop its unfinished writes; the last id."""
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                record_id = parse_name(entry.name)
                if record_id is not None:
                    found.append((record_id, entry.stat().st_size))
                elif entry.name.endswith(TMP_SUFFIX):
                    # A write that never reached its rename was never acknowledged.
                    log.warning("spool: discarding unfinished write %s (interrupted run)",
                                entry.name)
                    os.unlink(entry.path)
                elif entry.name != LOCK_NAME:
                    log.warning("spool: ignoring unknown file %s", entry.name)
        found.sort()
        self._index.extend(found)
        self.bytes = sum(size for _, size in found)
        if found:
            log.info("spool: resuming with %d records (%d bytes) in %s",
                     len(found), self.bytes, self.directory)
        self._enforce_bounds(0)
        return found[-1][0] if found else 0

    # -- the appender's side ----------------------------------------------------------

    def append(self, meta: dict, payload: bytes) -> int:
        """Store a record durably; returns how many older records were dropped for it."""
        data = encode_record(meta, payload)
        if len(data) > self.max_bytes:
            with self._cond:
                self.dropped[TOO_LARGE] += 1
            raise SpoolError(f"record of {len(data)} bytes exceeds the spool's "
                             f"{self.max_bytes} bytes")
        with self._cond:
            if self._closed:
                raise SpoolError("spool is closed")
            record_id = self._next_id
            self._next_id += 1
        tmp = os.path.join(self.directory, f".{record_id}{TMP_SUFFIX}")
        final = os.path.join(self.directory, record_name(record_id))
        dropped = self._make_room(len(data))
        while True:
            try:
                self._write(tmp, final, data)
                break
            except OSError as e:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                if e.errno not in _NO_SPACE:
                    raise SpoolError(f"spool {self.directory}: cannot write a record: "
                                     f"{e.strerror}") from None
                with self._cond:     # the disk filled before the bounds: the oldest go
                    if not self._drop_oldest(DISK_FULL):
                        self.dropped[DISK_FULL] += 1
                        raise SpoolFull(f"spool {self.directory}: no room on its filesystem "
                                        f"({e.strerror}) with no older cycle left to drop: "
                                        f"this one is dropped") from None
                    dropped += 1
        with self._cond:
            dropped += self._enforce_bounds(len(data))
            self._index.append((record_id, len(data)))
            self.bytes += len(data)
            self._cond.notify_all()
        return dropped

    def _write(self, tmp: str, final: str, data: bytes):
        with open(tmp, "xb", opener=_private) as f:
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.rename(tmp, final)
        if self.fsync:
            _fsync_dir(self._dir_fd)

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the spool's filesystem."""
        st = os.fstatvfs(self._dir_fd)
        return st.f_bavail * st.f_frsize

    def reserve_bytes(self) -> int:
        """The free space the spool leaves on its filesystem: min_free_bytes, or when it
        is None, the default reserve bounded by the filesystem's size."""
        if self.min_free_bytes is not None:
            return self.min_free_bytes
        st = os.fstatvfs(self._dir_fd)
        return min(DEFAULT_RESERVE_BYTES, int(st.f_blocks * st.f_frsize * DEFAULT_RESERVE_SHARE))

    def _make_room(self, size: int) -> int:
        """Drop the oldest records until `size` more bytes leave the reserve free."""
        reserve = self.reserve_bytes()
        if not reserve:
            return 0
        # A file takes whole blocks; a little more for its directory entry.
        need = size + 2 * os.fstatvfs(self._dir_fd).f_frsize + reserve
        dropped = 0
        with self._cond:
            while self.free_bytes() < need and self._drop_oldest(DISK_FULL):
                dropped += 1
        return dropped

    def _drop_oldest(self, reason: str) -> bool:
        """Drop the oldest record the sender does not hold (under the lock); False when
        there is none."""
        for i, (record_id, size) in enumerate(self._index):
            if record_id != self._held:
                del self._index[i]
                self.bytes -= size
                self._unlink(record_id)
                self.dropped[reason] += 1
                return True
        return False

    def _enforce_bounds(self, incoming: int) -> int:
        """Drop the oldest records not held by the sender until `incoming` more fits."""
        extra = 1 if incoming else 0
        dropped = 0
        while (len(self._index) + extra > self.max_records
               or self.bytes + incoming > self.max_bytes) and self._drop_oldest(FULL):
            dropped += 1
        return dropped

    def _unlink(self, record_id: int):
        try:
            os.unlink(os.path.join(self.directory, record_name(record_id)))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("spool: cannot remove record %d: %s", record_id, e.strerror)

    # -- the sender's side --------------------------------------------------------------

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait up to `timeout` for a record; True when there is one (none is held)."""
        with self._cond:
            if not self._index and not self._closed:
                self._cond.wait(timeout)
            return bool(self._index) and not self._closed

    def take(self, timeout: Optional[float] = None) -> Optional[Record]:
        """The oldest record, held until release(); None when none came within `timeout`
        or after wake()."""
        with self._cond:
            if not self._index and not self._closed:
                self._cond.wait(timeout)
            while self._index and not self._closed:
                record_id, size = self._index[0]
                path = os.path.join(self.directory, record_name(record_id))
                try:
                    with open(path, "rb") as f:
                        meta, payload = decode_record(f.read())
                except (OSError, CorruptRecord) as e:
                    reason = e.strerror if isinstance(e, OSError) else str(e)
                    log.error("spool: discarding record %s: %s", record_name(record_id), reason)
                    self._index.popleft()
                    self.bytes -= size
                    self._unlink(record_id)
                    self.dropped[CORRUPT] += 1
                    continue
                self._held = record_id
                return Record(record_id, meta, payload, size)
            return None

    def release(self, record: Record, delivered: bool) -> None:
        """Let go of a taken record: removed when delivered, else kept at the head."""
        with self._cond:
            if self._held == record.id:
                self._held = None
            if not delivered:
                return
            if self._index and self._index[0][0] == record.id:
                self._index.popleft()
                self.bytes -= record.size
                self._unlink(record.id)

    def drop(self, record: Record, reason: str) -> None:
        """Remove a taken record that can never be delivered, counted under `reason`."""
        self.release(record, delivered=True)
        with self._cond:
            self.dropped[reason] += 1

    def wake(self) -> None:
        """Make a waiting take() return."""
        with self._cond:
            self._cond.notify_all()

    # -- both -------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._cond:
            return len(self._index)

    def depth(self) -> Tuple[int, int]:
        """(records, bytes) waiting."""
        with self._cond:
            return len(self._index), self.bytes

    def close(self) -> None:
        """Release the directory; what is left stays on disk for the next run."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None
        if getattr(self, "_dir_fd", None) is not None:  # absent if never opened, or closed
            os.close(self._dir_fd)
            del self._dir_fd
