"""The kernel's files and formats that more than one stage uses, in one place.

- kept-open files: `KeptFile` holds a file open between reads (one pread per
  read); `FDS` bounds how many stay open against RLIMIT_NOFILE.
- the one exception that says "it went away": `CgroupGone`, raised when a
  cgroup (or a file of it) is not there; `CgroupRefused` for a cgroup path that
  is never followed.
- which hierarchy holds a cgroup, v1 or v2: `cgroup_hierarchy()`, the one probe;
  `cgroup_dir()` finds a cgroup's directory below a mount without following links.
- thread lists: `read_thread_ids()`, a cgroup's threads (v1 `tasks`, v2
  `cgroup.threads`); `cgroup_thread_ids()`, those CPU allocation works on.
- the CPU-list format ("0-3,8", CPUs and NUMA nodes alike): `parse_cpu_list()`,
  `format_cpu_list()`; online CPUs and nodes: `online_cpus()`, `online_nodes()`.
"""
import errno
import logging
import os
import re
import resource
from typing import Dict, FrozenSet, Iterable, List, Optional, Sequence, Set

from owca.core.paths import CGROUP_V1_CONTROLLERS, Paths

log = logging.getLogger("owca.kernel")


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# Errors that say the open file no longer stands for a live kernel object:
# open it again once, and if that fails the cgroup is gone.
_REOPEN_ERRNOS = frozenset((errno.ENODEV, errno.ESTALE))


# Errors that, for a file of a cgroup, say "not there".
_MISSING_ERRNOS = frozenset((errno.ENOENT, errno.ENODEV, errno.ESTALE, errno.ENOTDIR))


_NO_FDS_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE))


class CgroupGone(Exception):
    """A cgroup, or the file of one, is not there: the cgroup went away (or never
    was on this node), or the file's controller is not enabled; str() says which."""


class CgroupRefused(Exception):
    """A cgroup path OWCA will not follow (nor write under); str() says why."""


class FdBudget:
    """How many kernel files may stay open: the soft RLIMIT_NOFILE less a reserve
    for everything else the process opens (pipes, sockets, transient reads)."""

    # may_keep() looks the limit up again after this many calls: opening 1000
    # tasks' files would otherwise make 8000 getrlimit calls.  Fewer than the
    # smallest reserve (32), so a limit lowered meanwhile is still respected.
    RECHECK_EVERY = 16

    def __init__(self):
        self.kept = 0        # files held open between reads
        self.not_kept = 0    # files opened, read and closed on each read
        self._warned = False
        self._limit = 0
        self._checks_left = 0

    @staticmethod
    def limit() -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        return soft - max(32, soft // 8)

    def may_keep(self) -> bool:
        if self._checks_left <= 0:
            self._limit = self.limit()
            self._checks_left = self.RECHECK_EVERY
        self._checks_left -= 1
        return self.kept < self._limit

    def forget_limit(self) -> None:
        """The limit changed (raised, or an open ran out of fds): look it up next time."""
        self._checks_left = 0

    def note_not_kept(self, path: str, reason: str) -> None:
        self.not_kept += 1
        if not self._warned:
            self._warned = True
            log.warning("%d kernel files held open, soft RLIMIT_NOFILE %d (%s): %s and files "
                        "after it are opened for each read (slower)", self.kept,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0], reason, path)

    def note_released(self) -> None:
        self.not_kept -= 1
        if self.not_kept == 0:
            self._warned = False


FDS = FdBudget()


def fd_usage() -> Dict[str, int]:
    """Kernel files held open, and those read by open-read-close for want of fds."""
    return {"kept_open": FDS.kept, "not_kept_open": FDS.not_kept}


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        log.debug("RLIMIT_NOFILE: soft limit already at the hard limit %d", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        log.warning("RLIMIT_NOFILE: cannot raise the soft limit %d to %d: %s", soft, hard, e)
        return soft
    FDS.forget_limit()
    log.info("RLIMIT_NOFILE: soft limit raised from %d to the hard limit %d", soft, hard)
    return hard


class KeptFile:
    """A kernel file held open and re-read whole with pread at offset 0.

    read() returns its text or raises OSError (FileNotFoundError when it is not
    there).  An fd that went stale (ENODEV, ESTALE) is reopened once.  When the
    fd budget is spent the file is opened, read and closed on every read.
    """
    __slots__ = ("path", "fd", "size", "kept")

    def __init__(self, path: str, size: int = 4096):
        self.path = path
        self.fd: Optional[int] = None
        self.size = size     # grows to fit the file, so that one pread reads it all
        # None: not opened yet; True: held open; False: transient
        self.kept: Optional[bool] = None

    def read(self) -> str:
        return self.read_bytes().decode()

    def read_bytes(self) -> bytes:
        fd = self.fd
        if fd is None:
            fd = self._open()
            if fd is None:
                return self._read_transient()
        try:
            data = os.pread(fd, self.size, 0)
        except OSError as e:
            if e.errno not in _REOPEN_ERRNOS:
                raise
            self.close()
            fd = self._open()
            if fd is None:
                return self._read_transient()
            data = os.pread(fd, self.size, 0)
        if len(data) >= self.size:
            data = self._read_whole(fd)
        return data

    def _open(self) -> Optional[int]:
        """Open and keep the file; None when it must be read transiently."""
        if self.kept is False:
            if not FDS.may_keep():
                return None
            FDS.note_released()  # fds came back: keep it from now on
            self.kept = None
        if not FDS.may_keep():
            self.kept = False
            FDS.note_not_kept(self.path, "budget spent")
            return None
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno not in _NO_FDS_ERRNOS:
                raise
            FDS.forget_limit()
            self.kept = False
            FDS.note_not_kept(self.path, os.strerror(e.errno))
            return None
        self.fd, self.kept = fd, True
        FDS.kept += 1
        return fd

    def _read_whole(self, fd: int) -> bytes:
        while True:
            self.size *= 2
            data = os.pread(fd, self.size, 0)
            if len(data) < self.size:
                return data

    def _read_transient(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, self.size, 0)
            if len(data) >= self.size:
                data = self._read_whole(fd)
        finally:
            os.close(fd)
        return data

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            FDS.kept -= 1
            try:
                os.close(fd)
            except OSError:
                pass
        elif self.kept is False:
            FDS.note_released()
        self.kept = None


# -- which hierarchy holds a cgroup ---------------------------------------------------

UNIFIED = "unified"   # the cgroup2 hierarchy, named as CgroupDiscovery's `hierarchies` name it
# The v1 hierarchies of CPU allocation: a task is v1 to it where one of them holds it.
CPU_CONTROLLERS = ("cpu", "cpuset")


def cgroup_hierarchy(paths: Paths, cgroup_path: str,
                     controllers: Sequence[str] = CGROUP_V1_CONTROLLERS) -> Optional[str]:
    """Which hierarchy holds the cgroup: the first of the v1 `controllers` whose
    hierarchy has its directory, else UNIFIED where the cgroup2 hierarchy has it,
    else None.

    v1 comes first: on a hybrid host (v1 controllers, cgroup2 at `unified/`) a path
    can be in both, and there the controllers that account for a task are v1's.
    """
    for controller in controllers:
        if os.path.isdir(paths.cgroup_v1(controller, cgroup_path)):
            return controller
    if os.path.isdir(paths.cgroup_v2(cgroup_path)):
        return UNIFIED
    return None


def cpu_cgroup_version(paths: Paths, cgroup_path: str) -> str:
    """"v1" where the v1 cpu or cpuset hierarchy holds the cgroup, else "v2" (held
    by cgroup2 or by none: reading its files then says CgroupGone)."""
    held = cgroup_hierarchy(paths, cgroup_path, CPU_CONTROLLERS)
    return "v2" if held is None or held == UNIFIED else "v1"


def cgroup_dir(root: str, cgroup_path: object) -> str:
    """The real directory of `cgroup_path` below the hierarchy mounted at `root`.

    Raises CgroupRefused for anything but an absolute path string (whatever a caller
    passes), for the root cgroup, `.`/`..` components or a symlink anywhere below the
    mount point; CgroupGone when it is not a directory.
    """
    if not isinstance(cgroup_path, str) or not cgroup_path.startswith("/") \
            or "\0" in cgroup_path:
        raise CgroupRefused(f"cgroup path {cgroup_path!r:.80} is not absolute")
    parts = [p for p in cgroup_path.split("/") if p]
    if not parts:
        raise CgroupRefused("the root cgroup is never written")
    if any(p in (".", "..") for p in parts):
        raise CgroupRefused(f"cgroup path {cgroup_path!r:.80} has '.' or '..'")
    real_root = os.path.realpath(root)
    candidate = os.path.join(real_root, *parts)
    if os.path.realpath(candidate) != candidate:
        raise CgroupRefused(f"cgroup path {cgroup_path!r:.80} goes through a symlink")
    if not os.path.isdir(candidate):
        raise CgroupGone(f"no cgroup {cgroup_path} in {root}")
    return candidate


def read_at_most(fd: int, limit: int) -> bytes:
    """What `fd` holds, but no more than limit + 1 bytes: enough for the caller to tell
    a file over `limit` from one at it, without reading an endless one (a device, a
    growing file) whole."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(fd, min(1 << 16, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_file(path: str) -> str:
    """A small kernel file's text (its first 64 KiB), stripped; a link is not followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, 1 << 16).decode("ascii", "replace").strip()
    finally:
        os.close(fd)


# -- thread lists ----------------------------------------------------------------------

# A cgroup's thread ids, one per line: v1 names the file `tasks` in every hierarchy.
THREADS_FILE = {"v1": "tasks", "v2": "cgroup.threads"}


def parse_thread_ids(text: str) -> List[int]:
    """A thread list (a cgroup's or a resctrl group's `tasks`): "12\\n13\\n" -> [12, 13]."""
    return [int(t) for t in text.split()]


def read_thread_ids(directory: str, version: str) -> List[int]:
    """The ids of the threads of the cgroup whose directory (in a hierarchy of
    `version`, "v1" or "v2") is `directory`; OSError where the list is not there."""
    return parse_thread_ids(read_file(os.path.join(directory, THREADS_FILE[version])))


def cgroup_thread_ids(paths: Paths, cgroup_path: str) -> List[int]:
    """The threads of the cgroup as CPU allocation finds them (cpu_cgroup_version):
    v1 the cpu hierarchy's `tasks`, v2 `cgroup.threads`.  Raises CgroupRefused
    (see cgroup_dir), CgroupGone where the cgroup is not there, OSError where it
    went away while being read."""
    version = cpu_cgroup_version(paths, cgroup_path)
    root = paths.cgroup_v1("cpu") if version == "v1" else paths.cgroup_v2_root
    return read_thread_ids(cgroup_dir(root, cgroup_path), version)


# -- the CPU-list format, and the online CPUs and nodes --------------------------------

_LIST_ITEM = re.compile(r"(\d+)(?:-(\d+))?\Z")
# Ids from here up are refused: more than any kernel's CPUs or nodes, and a bound on
# the set a malformed (or hostile) list could make.
MAX_LIST_ID = 1 << 16


def parse_cpu_list(text: str) -> FrozenSet[int]:
    """The ids of a kernel CPU or node list, "0-3,8,10-11\\n" -> {0, 1, 2, 3, 8, 10, 11};
    "" is the empty set; ValueError when malformed."""
    ids: Set[int] = set()
    for item in text.strip().split(","):
        item = item.strip()
        if not item:
            continue
        m = _LIST_ITEM.match(item)
        if not m:
            raise ValueError(f"{item!r} is not a number or a range a-b")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if last < first or last >= MAX_LIST_ID:
            raise ValueError(f"bad range {item!r}")
        ids.update(range(first, last + 1))
    return frozenset(ids)


def format_cpu_list(ids: Iterable[int]) -> str:
    """The canonical kernel list: sorted, consecutive ids as ranges ("0-2,4,6-7")."""
    out: List[str] = []
    run: List[int] = []
    for i in sorted(set(ids)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(_range(run))
        run = [i]
    if run:
        out.append(_range(run))
    return ",".join(out)


def _range(run):
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def online_cpus(paths: Paths) -> FrozenSet[int]:
    """The online CPUs (sysfs cpu/online); OSError where sysfs does not say,
    ValueError where its list is malformed."""
    return _read_cpu_list(paths.online_cpus_file)


def online_nodes(paths: Paths) -> FrozenSet[int]:
    """The online NUMA nodes (sysfs node/online), raising as online_cpus() does; a
    kernel without NUMA support has no such file."""
    return _read_cpu_list(paths.online_nodes_file)


def _read_cpu_list(path: str) -> FrozenSet[int]:
    with open(path, encoding="ascii") as f:
        return parse_cpu_list(f.read())
