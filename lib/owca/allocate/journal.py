"""The allocation journal: what owca-allocate must write back, kept on disk so that a
restarted owca-allocate knows it after a SIGKILL, an OOM kill or a crash of the machine.

One file, `allocations.journal`, in the state directory (`--state-dir`, else
`$STATE_DIRECTORY`, which systemd sets from the unit's `StateDirectory=`, else
/var/lib/owca-allocate).  On-disk format, version 1 (docs/allocation.md, The journal):

    {"format": "owca-allocate-journal", "version": 1, "sha256": "<hex>", "body": BODY}

`sha256` is the SHA-256 of BODY encoded as compact JSON with sorted keys; BODY is

    {"host": str, "pid": int (of the run that saved it),
     "groups": [resctrl group names OWCA created],
     "tasks": {task_id: {"cgroup_path": str, "types": {type: ENTRY}}}}

and an ENTRY, for a cgroup type,

    {"path": the file, "identity": [st_dev, st_ino] of its cgroup directory,
     "original": the file's text before OWCA's first write, "value": the same, normalised,
     "ours": [the texts OWCA wrote to it: the last one and the one being written]}

and for `rdt` `{"original": "", "value": null, "ours": [group names]}` (the original
of a thread's group is always the default group).

`save()` writes the whole file under a temporary name, fsyncs it, renames it into
place and fsyncs the directory: from then on it survives a SIGKILL or a power cut;
a save cut short leaves the previous journal whole.  `load()` trusts nothing it
cannot check: a file that is not JSON, not this format and version, fails its
checksum or has an entry of the wrong shape is renamed aside
(`allocations.journal.corrupt-<UTC time>`), reported in one line, and counted;
nothing in it is restored.  The directory is locked (flock) from the first load
or save, so that a second owca-allocate cannot use the same journal.
"""
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import time
from typing import Any, Optional

from owca.core.allocation import (CPU_IDLE, CPU_QUOTA, CPU_SHARES, CPUSET_CPUS, CPUSET_MEMS,
                                  MEMORY_TYPES, RDT, RDT_GROUP_NAME)

log = logging.getLogger("owca.journal")

FORMAT = "owca-allocate-journal"
VERSION = 1
NAME = "allocations.journal"
DEFAULT_STATE_DIRECTORY = "/var/lib/owca-allocate"
MAX_BYTES = 64 << 20       # a journal larger than this is not read (thousands of tasks fit)
MAX_TEXT = 4096             # an original longer than this is no kernel value

# What each type's file can hold (v1 and v2 spellings), so that a journal cannot
# make OWCA write anything else to it.
PLAUSIBLE = {
    CPU_QUOTA: re.compile(r"(-?\d+|(max|\d+) \d+)\Z"),
    CPU_SHARES: re.compile(r"\d+\Z"),
    CPU_IDLE: re.compile(r"[01]( \d+)?\Z"),    # the original has the weight too
    CPUSET_CPUS: re.compile(r"[\d,-]*\Z"),
    CPUSET_MEMS: re.compile(r"[\d,-]*\Z"),
    **{type_: re.compile(r"(max|-?\d+)\Z") for type_ in MEMORY_TYPES},
}


class JournalError(Exception):
    """The journal cannot be written or locked (one line)."""


class Corrupt(ValueError):
    """A journal that cannot be trusted; str() says why."""


def state_directory(option: Optional[str] = None, environ=os.environ) -> str:
    """--state-dir, else the first of systemd's $STATE_DIRECTORY, else the default."""
    return option or environ.get("STATE_DIRECTORY", "").split(":")[0] \
        or DEFAULT_STATE_DIRECTORY


def encode_body(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode()


class Journal:
    """The journal file of one state directory."""

    def __init__(self, directory: str, fsync: bool = True):
        self.directory = directory
        self.path = os.path.join(directory, NAME)
        self.fsync = fsync
        self.set_aside = 0          # corrupt journals renamed aside by this run
        self._dir_fd: Optional[int] = None   # the state directory, open and locked
        self._saved: Optional[bytes] = None  # the encoded body on disk (None: no file)

    # -- the directory -------------------------------------------------------------------

    def _open(self) -> int:
        """The state directory's descriptor, opened and locked on first use."""
        if self._dir_fd is not None:
            return self._dir_fd
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise JournalError(f"state directory {self.directory}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise JournalError(f"state directory {self.directory} is in use by another "
                               f"owca-allocate") from None
        self._dir_fd = fd
        tmp = self._tmp_path()
        if os.path.exists(tmp):   # a save cut short: the journal beside it is whole
            os.unlink(tmp)
        return fd

    def _tmp_path(self) -> str:
        return os.path.join(self.directory, f".{NAME}.tmp")

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    # -- reading -----------------------------------------------------------------------

    def load(self) -> Optional[dict]:
        """The body a previous run left, None when there is none (or it was set aside)."""
        if not os.path.exists(self.path):
            return None
        self._open()
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_BYTES + 1)
            body = parse(data)
        except (OSError, Corrupt) as e:
            self._set_aside(getattr(e, "strerror", None) or str(e))
            return None
        self._saved = encode_body(body)
        return body

    def _set_aside(self, reason: str) -> None:
        aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        try:
            os.rename(self.path, aside)
            where = f"set aside as {os.path.basename(aside)}"
        except OSError as e:
            where = f"cannot be set aside ({e.strerror}), ignored"
        self.set_aside += 1
        log.error("journal %s is corrupt (%s): %s; the original values it held are not "
                  "restored", self.path, reason, where)

    # -- writing -----------------------------------------------------------------------

    def save(self, body: dict) -> None:
        """Replace the journal by `body` durably; an empty journal is removed."""
        empty = not body.get("tasks") and not body.get("groups")
        encoded = None if empty else encode_body(body)
        if encoded == self._saved:
            return
        dir_fd = self._open()
        try:
            if encoded is None:
                os.unlink(self.path)
            else:
                self._write(encoded)
            if self.fsync:
                os.fsync(dir_fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise JournalError(f"journal {self.path}: {e.strerror}") from None
        self._saved = encoded

    def _write(self, encoded: bytes) -> None:
        digest = hashlib.sha256(encoded).hexdigest()
        data = (b'{"format":"%s","version":%d,"sha256":"%s","body":' %
                (FORMAT.encode(), VERSION, digest.encode()) + encoded + b"}\n")
        tmp = self._tmp_path()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


def body(host: str, tasks: dict, groups) -> dict:
    return {"host": host, "pid": os.getpid(), "groups": sorted(groups), "tasks": tasks}


# -- checking a journal ----------------------------------------------------------------

def parse(data: bytes) -> dict:
    """The body of a journal file's bytes; Corrupt says what is wrong with it."""
    if len(data) > MAX_BYTES:
        raise Corrupt(f"larger than {MAX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise Corrupt(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise Corrupt(f"not an {FORMAT}")
    if doc.get("version") != VERSION:
        raise Corrupt(f"version {doc.get('version')!r:.20}, this owca-allocate reads "
                      f"version {VERSION}")
    body_ = doc.get("body")
    if not isinstance(body_, dict):
        raise Corrupt("no body")
    if hashlib.sha256(encode_body(body_)).hexdigest() != doc.get("sha256"):
        raise Corrupt("checksum mismatch")
    check_body(body_)
    return body_


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise Corrupt(what)


def _is_text(value, limit=MAX_TEXT) -> bool:
    return isinstance(value, str) and len(value) <= limit and "\n" not in value \
        and "\0" not in value


def _is_value(value) -> bool:
    """A normalised allocation value (it goes into frames): null, a number, a list text."""
    return value is None or _is_text(value, 1024) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


def check_body(body_: dict) -> None:
    # JSON values of any type until checked.
    groups: Any = body_.get("groups")
    tasks: Any = body_.get("tasks")
    _expect(isinstance(groups, list) and all(isinstance(g, str) and RDT_GROUP_NAME.match(g)
                                             for g in groups), "groups: not OWCA's groups")
    _expect(isinstance(tasks, dict), "tasks: not an object")
    for task_id, task in tasks.items():
        what = f"task {task_id[:80]!r}"
        _expect(isinstance(task, dict) and _is_text(task.get("cgroup_path"))
                and task["cgroup_path"].startswith("/") and isinstance(task.get("types"), dict),
                f"{what}: no cgroup_path or types")
        for type_, entry in task["types"].items():
            _expect(isinstance(entry, dict) and isinstance(entry.get("ours"), list)
                    and 0 < len(entry["ours"]) <= 2 and _is_value(entry.get("value")),
                    f"{what}: {type_!r:.20}: bad entry")
            if type_ == RDT:
                _expect(entry.get("original") == "" and all(
                    isinstance(g, str) and RDT_GROUP_NAME.match(g) for g in entry["ours"]),
                    f"{what}: rdt: not OWCA's groups")
                continue
            _expect(type_ in PLAUSIBLE, f"{what}: unknown type {type_!r:.20}")
            plausible = PLAUSIBLE[type_]
            identity = entry.get("identity")
            _expect(_is_text(entry.get("path")) and entry["path"].startswith("/")
                    and isinstance(identity, list) and len(identity) == 2
                    and all(isinstance(i, int) and i >= 0 for i in identity),
                    f"{what}: {type_}: bad path or identity")
            _expect(all(_is_text(t) and plausible.match(t)
                        for t in [entry.get("original")] + entry["ours"]),
                    f"{what}: {type_}: a value its file cannot hold")
