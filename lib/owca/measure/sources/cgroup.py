"""A task's cgroup metrics, read from cgroup v1 or v2.

Interface: `TaskCgroup(paths, cgroup_path, version).read() -> {metric: value}`
with the names of `metrics.TASK_CGROUP`; `close()` releases its files.  A
metric whose file is absent (controller not enabled, older kernel) is absent
from the result, never zero.  `CgroupGone` is the one error that says the
task's cgroup went away.

Speed: owca-measure reads every task every cycle, so the files stay open
between cycles and each read is one pread(fd, size, 0): at offset 0 a cgroup
(seq) file regenerates its content.  Files are opened on the first read.  Open
files are bounded by the soft RLIMIT_NOFILE (`raise_fd_limit()` lifts it to the
hard limit): past the budget a file is opened, read and closed each cycle
instead, slower but correct, and `fd_usage()` counts them.  The files of
settings and slow-moving gauges (SLOW_FILES: memory limits, NUMA pages) are
read every few cycles only, when the reader is made with `slow_every` > 1:
memory.numa_stat alone costs as much as four single-number files.

Files read (v1 from the cpuacct, cpu and memory hierarchies; v2 from the
task's directory in the unified hierarchy):

| metric | v1 | v2 |
|---|---|---|
| task_cpu_usage_seconds | cpuacct.usage (ns) | cpu.stat usage_usec |
| task_cpu_periods, _throttled_periods | cpu.stat nr_periods, nr_throttled | cpu.stat |
| task_cpu_throttled_seconds | cpu.stat throttled_time (ns) | cpu.stat throttled_usec |
| task_mem_usage_bytes | memory.usage_in_bytes | memory.current |
| task_mem_max_usage_bytes | memory.max_usage_in_bytes | memory.peak |
| task_mem_limit_bytes | memory.limit_in_bytes | memory.max |
| task_mem_soft_limit_bytes | memory.soft_limit_in_bytes | memory.low |
| task_mem_page_faults | memory.stat total_pgfault | memory.stat pgfault |
| task_mem_numa_pages | memory.numa_stat hierarchical_total | memory.numa_stat anon + file |
| task_pressure_* | the task's cgroup2 group, where it has one (a hybrid host) | cpu.pressure, memory.pressure, io.pressure |
| task_run_queue_delay_seconds | /proc/TID/schedstat of the threads in cpuacct's `tasks` | the same, threads in `cgroup.threads` |

The v1 page faults and NUMA pages are the hierarchical ones, like
memory.usage_in_bytes, so that a task whose cgroup has children (a pod and its
containers) is measured whole.

On a hybrid host (v1 controllers, cgroup2 mounted at `unified/`) a task read from
v1 whose path also exists in the cgroup2 hierarchy gets its PSI from there: the
protocol names a task by one path in every hierarchy, and PSI exists only in v2.

The run-queue delay (RunQueueDelay) sums the second field of each thread's
/proc/TID/schedstat (nanoseconds spent runnable but waiting for a CPU) over the
threads of the cgroup and of its descendants (the descendants are listed again on
the slow cycles).  A thread that exits takes its delay with it; its last value is
kept, so that the counter never falls.
"""  # noqa: E501 (the table's rows cannot be wrapped)
import logging
import os
from typing import Dict, List, Optional, Tuple

from owca.core.kernel import (_MISSING_ERRNOS, PAGE_SIZE, THREADS_FILE, UNIFIED, CgroupGone,
                              KeptFile, cgroup_hierarchy)
from owca.core.paths import Paths
from owca.core.priority import BE, PRIORITY_LABEL
from owca.measure.sources.base import Cycle, Reading, Source

log = logging.getLogger("owca.cgroups")

VERSIONS = ("auto", "v1", "v2")
V1_CONTROLLERS = ("cpuacct", "cpu", "memory")

# v1 reports "no limit" as the largest page-aligned counter (9223372036854771712
# with 4 KiB pages); anything from 4 EiB up is read as unlimited.
V1_UNLIMITED_FROM = 1 << 62


# A file that is absent (controller not enabled yet) is tried again after this
# many reads: controllers can be enabled while a task runs.
RETRY_ABSENT_AFTER = 60


# -- parsers: a file's bytes -> task metrics -----------------------------------------------
# They take the bytes the kernel gives: the files every cycle reads are parsed
# without decoding them first.

def _keyed_int(data: bytes, key: bytes) -> Optional[int]:
    """The value of the `key value` line of a flat keyed file, None if absent."""
    probe = b"\n" + key + b" "
    if data.startswith(probe[1:]):
        i = 0
    else:
        i = data.find(probe)
        if i < 0:
            return None
        i += 1
    start = i + len(probe) - 1
    end = data.find(b"\n", start)
    return int(data[start:end] if end >= 0 else data[start:])


# cpu.stat key -> (metric, divisor to seconds or 1); v1 and v2 keys never clash.
_CPU_STAT = {
    b"usage_usec": ("task_cpu_usage_seconds", 10 ** 6),
    b"nr_periods": ("task_cpu_periods", 1),
    b"nr_throttled": ("task_cpu_throttled_periods", 1),
    b"throttled_time": ("task_cpu_throttled_seconds", 10 ** 9),
    b"throttled_usec": ("task_cpu_throttled_seconds", 10 ** 6),
}


def parse_cpu_stat(data: bytes) -> Dict[str, float]:
    """cpu.stat (v1: nr_periods, nr_throttled, throttled_time ns; v2: usage_usec,
    and with the cpu controller nr_periods, nr_throttled, throttled_usec)."""
    out = {}
    fields = data.split()
    for i in range(0, len(fields) - 1, 2):
        spec = _CPU_STAT.get(fields[i])
        if spec is not None:
            name, divisor = spec
            out[name] = int(fields[i + 1]) / divisor if divisor != 1 else int(fields[i + 1])
    return out


def parse_memory_limit(data: bytes) -> Optional[int]:
    """A memory limit in bytes; None for unlimited (v2 `max`, v1 the counter's maximum)."""
    data = data.strip()
    if data == b"max":
        return None
    value = int(data)
    return None if value >= V1_UNLIMITED_FROM else value


# memory.stat keys, hierarchical: v1's total_* (v1's own keys are the cgroup's alone),
# v2's plain keys (all hierarchical).  Kernels before 5.9 had one workingset_refault
# (file pages: anonymous pages were not tracked yet).
_MEMORY_STAT_KEYS = {
    b"total_pgfault": "faults", b"pgfault": "faults",
    b"total_active_anon": "anon", b"total_inactive_anon": "anon", b"anon": "anon",
    b"total_active_file": "active_file", b"active_file": "active_file",
    b"total_workingset_refault_anon": "refault_anon",
    b"workingset_refault_anon": "refault_anon",
    b"total_workingset_refault_file": "refault_file",
    b"workingset_refault_file": "refault_file",
    b"total_workingset_refault": "refault_file", b"workingset_refault": "refault_file",
}


def parse_memory_stat(data: bytes) -> Dict[str, object]:
    """memory.stat in one pass: page faults, working set (anonymous plus active file
    pages) and refaults, hierarchical."""
    found: Dict[str, Dict[bytes, int]] = {}
    v1 = data.startswith(b"cache ")    # v1's first key; v2 starts with anon
    for line in data.split(b"\n"):
        key, _, value = line.partition(b" ")
        what = _MEMORY_STAT_KEYS.get(key)
        # On v1 the plain keys are the cgroup's own: only total_* counts there.
        if what is not None and (not v1 or key.startswith(b"total_")):
            found.setdefault(what, {})[key] = int(value)
    out: Dict[str, object] = {}
    if "faults" in found:
        out["task_mem_page_faults"] = sum(found["faults"].values())
    if "anon" in found and "active_file" in found:
        out["task_mem_working_set_bytes"] = sum(found["anon"].values()) + \
            sum(found["active_file"].values())
    refaults = {kind: sum(found[f"refault_{kind}"].values()) for kind in ("anon", "file")
                if f"refault_{kind}" in found}
    if refaults:
        out["task_mem_workingset_refaults"] = refaults
    return out


def parse_numa_stat(data: bytes, page_size: int = PAGE_SIZE) -> Dict[str, Dict[str, int]]:
    """memory.numa_stat as pages per node.

    v1: `hierarchical_total=P N0=P N1=P` (pages; `total=` where the kernel has no
    hierarchical lines).  v2: `anon N0=B ...` and `file N0=B ...` in bytes,
    summed and turned into pages.
    """
    text = data.decode()
    first = text.split(" ", 1)[0]
    if "=" in first:  # v1
        line = _line_starting(text, "hierarchical_total=") or _line_starting(text, "total=")
        if line is None:
            return {}
        return {"task_mem_numa_pages": _per_node(line.split()[1:])}
    pages: Dict[str, int] = {}   # node -> bytes
    for kind in ("anon", "file"):
        line = _line_starting(text, kind + " ")
        if line is None:
            continue
        for node, value in _per_node(line.split()[1:]).items():
            pages[node] = pages.get(node, 0) + value
    if not pages:
        return {}
    return {"task_mem_numa_pages": {n: b // page_size for n, b in pages.items()}}


def _line_starting(text: str, prefix: str) -> Optional[str]:
    if text.startswith(prefix):
        i = 0
    else:
        i = text.find("\n" + prefix)
        if i < 0:
            return None
        i += 1
    j = text.find("\n", i)
    return text[i:j if j >= 0 else len(text)]


def _per_node(fields: List[str]) -> Dict[str, int]:
    """["N0=12", "N1=3"] -> {"0": 12, "1": 3}"""
    out = {}
    for field in fields:
        node, _, value = field.partition("=")
        out[node[1:]] = int(value)
    return out


def parse_pressure(data: bytes) -> Dict[str, Dict[str, float]]:
    """A PSI file (cpu.pressure ...): {"task_pressure_avg10_percent": {"some": x,
    "full": y}, "task_pressure_stall_seconds": {...}}; `full` only where the
    kernel writes it."""
    avg10: Dict[str, float] = {}
    stall: Dict[str, float] = {}
    _pressure_lines(data, avg10, stall)
    return {"task_pressure_avg10_percent": avg10, "task_pressure_stall_seconds": stall}


# PSI lines' first words, decoded once
_PRESSURE_KINDS = {b"some": "some", b"full": "full"}


def _pressure_lines(data: bytes, avg10: dict, stall: dict) -> None:
    # Parsed as bytes, without decoding the file first: three PSI files per task
    # each cycle made this parser the largest Python cost of a v2 cycle.  The
    # kernel's usual file, a `some` and a `full` line, is split once; anything
    # else line by line.
    f = data.split()
    if len(f) == 10 and f[1][:6] == b"avg10=" and f[4][:6] == b"total=" \
            and f[6][:6] == b"avg10=" and f[9][:6] == b"total=" and data.count(b"\n") == 2:
        for i in (0, 5):
            kind = _PRESSURE_KINDS.get(f[i]) or f[i].decode()
            avg10[kind] = float(f[i + 1][6:])
            stall[kind] = int(f[i + 4][6:]) / 1e6
        return
    for line in data.split(b"\n"):
        # "some avg10=0.12 avg60=0.05 avg300=0.01 total=12345" (total in us)
        f = line.split()
        if len(f) == 5 and f[1].startswith(b"avg10=") and f[4].startswith(b"total="):
            kind = _PRESSURE_KINDS.get(f[0]) or f[0].decode()
            avg10[kind] = float(f[1][6:])
            stall[kind] = int(f[4][6:]) / 1e6


# What a file yields, written into a task's metrics: into(data: bytes, out: dict).
# The single-number files, most of them, are stored without a parser's dict.

# A single-number file is read with a small buffer: one that fits the small
# object allocator is cheaper than a page (and grows when a file needs more).
# Its `into` function carries the size as an attribute, `buffer`, that _Source
# reads (mypy has no type for an attribute set on a function: ignored there).
SINGLE_NUMBER_BUFFER = 64


def _number_into(name: str, divisor: int = 1):
    if divisor == 1:
        def number_into(data: bytes, out: dict) -> None:
            out[name] = int(data)
    else:
        def number_into(data: bytes, out: dict) -> None:
            out[name] = int(data) / divisor
    number_into.buffer = SINGLE_NUMBER_BUFFER  # type: ignore[attr-defined]
    return number_into


def _limit_into(name: str):
    def limit_into(data: bytes, out: dict) -> None:
        value = parse_memory_limit(data)
        if value is not None:
            out[name] = value
    limit_into.buffer = SINGLE_NUMBER_BUFFER  # type: ignore[attr-defined]
    return limit_into


def _parsed_into(parse):
    """A parser's metrics; per file (`per_file`, as _pressure_into's), the bytes of
    the last read are kept, and unchanged bytes (cpu.stat of a task without a CPU
    quota, every cycle) are not parsed again."""
    def per_file():
        last: list = [None, None]   # bytes, what they parsed into

        def parsed_into(data: bytes, out: dict) -> None:
            if data != last[0]:
                last[:] = data, parse(data)
            out.update(last[1])
        return parsed_into

    into = per_file()
    into.per_file = per_file
    return into


def _pressure_into(resource_: str):
    """A PSI file's metrics, under its resource (cpu, memory, io).

    Each file gets its own function (`per_file`, which _Source calls) that keeps
    the last bytes it parsed: a file whose bytes did not change since the last
    read (an idle task's memory and io pressure, most cycles) yields the values
    parsed then, not parsed again.
    """
    def per_file():
        last: list = [None, None, None]   # bytes, avg10, stall

        def pressure_into(data: bytes, out: dict) -> None:
            if data == last[0]:
                avg10, stall = last[1], last[2]
            else:
                avg10, stall = {}, {}
                _pressure_lines(data, avg10, stall)
                last[:] = data, avg10, stall
            if avg10:
                out.setdefault("task_pressure_avg10_percent", {})[resource_] = avg10
                out.setdefault("task_pressure_stall_seconds", {})[resource_] = stall
        return pressure_into

    into = per_file()
    into.per_file = per_file
    return into


# (controller, or None for v2; file; into).  SLOW_FILES change rarely (limits are
# written by the orchestrator, NUMA placement moves slowly) and cost a third of a
# v1 cycle's reads (numa_stat alone is a sixth): TaskCgroup reads them every
# `slow_every` reads, and carries their last values in between.
SLOW_FILES = frozenset(("memory.limit_in_bytes", "memory.soft_limit_in_bytes",
                        "memory.numa_stat", "memory.max", "memory.low"))
V1_FILES = (
    ("cpuacct", "cpuacct.usage", _number_into("task_cpu_usage_seconds", 10 ** 9)),
    ("cpu", "cpu.stat", _parsed_into(parse_cpu_stat)),
    ("memory", "memory.usage_in_bytes", _number_into("task_mem_usage_bytes")),
    ("memory", "memory.max_usage_in_bytes", _number_into("task_mem_max_usage_bytes")),
    ("memory", "memory.limit_in_bytes", _limit_into("task_mem_limit_bytes")),
    ("memory", "memory.soft_limit_in_bytes", _limit_into("task_mem_soft_limit_bytes")),
    ("memory", "memory.stat", _parsed_into(parse_memory_stat)),
    ("memory", "memory.numa_stat", _parsed_into(parse_numa_stat)),
)
V2_FILES = (
    (None, "cpu.stat", _parsed_into(parse_cpu_stat)),
    (None, "memory.current", _number_into("task_mem_usage_bytes")),
    (None, "memory.peak", _number_into("task_mem_max_usage_bytes")),
    (None, "memory.max", _limit_into("task_mem_limit_bytes")),
    (None, "memory.low", _limit_into("task_mem_soft_limit_bytes")),
    (None, "memory.stat", _parsed_into(parse_memory_stat)),
    (None, "memory.numa_stat", _parsed_into(parse_numa_stat)),
    (None, "cpu.pressure", _pressure_into("cpu")),
    (None, "memory.pressure", _pressure_into("memory")),
    (None, "io.pressure", _pressure_into("io")),
)


def _read_once(path: str, size: int = 4096) -> bytes:
    # os-level calls: Python's buffered file object costs more than the read
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = [os.read(fd, size)]
        while len(chunks[-1]) == size:
            chunks.append(os.read(fd, size))
    finally:
        os.close(fd)
    return b"".join(chunks) if len(chunks) > 1 else chunks[0]


def _has_no_subdirectories(directory: str) -> bool:
    """True where one stat() says so: a directory without subdirectories has two links
    on cgroupfs (kernfs counts a directory's subdirectories in its links), as on most
    file systems.  Any other count (btrfs gives 1 always), or an error, says nothing:
    the caller walks the directory.  A leaf cgroup's walk cost more than its reads."""
    try:
        return os.stat(directory).st_nlink == 2
    except OSError:
        return False


class RunQueueDelay:
    """Seconds the threads of a cgroup (and its descendants) waited on a run queue.

    Each thread's /proc/TID/schedstat is held open (a KeptFile) while the thread is
    in the cgroup; a thread that left or exited adds its last value to `retired`.
    """

    def __init__(self, paths: Paths, directory: str, version: str):
        self.paths = paths
        self.directory = directory
        self.threads_file = THREADS_FILE[version]
        self.keep_lists = version != "v1"
        self.lists = [KeptFile(os.path.join(directory, self.threads_file))]
        self.threads: Dict[bytes, list] = {}   # tid -> [KeptFile, last ns]
        self.retired = 0
        self.relist()

    def relist(self) -> None:
        """Find the descendants' thread files again (new containers of a pod)."""
        own = self.lists[0].path
        found = [own]
        if not _has_no_subdirectories(self.directory):
            found += [os.path.join(d, self.threads_file)
                      for d, _dirs, _files in os.walk(self.directory)
                      if os.path.normpath(d) != os.path.normpath(self.directory)]
        kept = {f.path: f for f in self.lists}
        for f in self.lists:
            if f.path not in found:
                f.close()
        self.lists = [kept.get(path) or KeptFile(path) for path in found]

    def read(self) -> Optional[float]:
        """The counter in seconds; None when the cgroup's thread list is unreadable or
        no thread was ever seen in it."""
        tids = set()
        for i, listing in enumerate(self.lists):
            try:
                # v1's `tasks` is opened afresh: on a held fd the kernel may serve the
                # pid list it built for an earlier read (kept for a second after it)
                data = listing.read_bytes() if self.keep_lists else _read_once(listing.path)
                tids.update(data.split())
            except OSError:
                if i == 0:
                    return None  # the cgroup itself: the caller learns why from its files
        threads = self.threads
        if not tids and not threads and not self.retired:
            return None  # no thread seen yet: nothing waited, and nothing to say
        for tid in list(threads):
            if tid not in tids:
                kept, last = threads.pop(tid)
                kept.close()
                self.retired += last
        total = self.retired
        for tid in tids:
            entry = threads.get(tid)
            if entry is None:
                entry = threads[tid] = [KeptFile(self.paths.proc(tid.decode(), "schedstat"),
                                                 SINGLE_NUMBER_BUFFER), 0]
            try:
                entry[1] = int(entry[0].read_bytes().split()[1])
            except (OSError, IndexError, ValueError):
                pass  # exited since the listing: its last value stands
            total += entry[1]
        return total / 1e9

    def close(self) -> None:
        for listing in self.lists:
            listing.close()
        for kept, _last in self.threads.values():
            kept.close()
        self.threads.clear()


class _Source(KeptFile):
    """One file of a task's cgroup and what it yields.

    dir_existed: whether its directory was there (None: not known yet; learnt
    from the first read, whether it succeeds or finds no file).  A file that
    cannot be found where its directory existed says the cgroup was removed.
    """
    __slots__ = ("directory", "into", "dir_existed", "retry_at", "warned")

    def __init__(self, directory, name, into, dir_existed):
        super().__init__(f"{directory}/{name}", getattr(into, "buffer", 4096))
        self.directory = directory
        per_file = getattr(into, "per_file", None)
        self.into = into if per_file is None else per_file()
        self.dir_existed = dir_existed
        self.retry_at = 0
        self.warned = False


class TaskCgroup:
    """Reads one task's cgroup, v1 or v2, each cycle; files held open between reads.

    The SLOW_FILES are read on the first read and then every `slow_every`
    reads, on the reads where (reads + phase) is a multiple of slow_every;
    readers created with consecutive phases spread those reads evenly over
    the cycles.  Their last values are in every read's result.
    """

    def __init__(self, paths: Paths, cgroup_path: str, version: str = "auto",
                 slow_every: int = 1, phase: int = 0, run_queue_delay: bool = True,
                 costly_every: int = 1):
        if version not in VERSIONS:
            raise ValueError(f"cgroup version: expected one of {', '.join(VERSIONS)}, "
                             f"got {version!r}")
        if slow_every < 1:
            raise ValueError(f"slow_every: expected at least 1, got {slow_every}")
        self.paths = paths
        self.cgroup_path = cgroup_path
        self.requested_version = version
        self.slow_every = slow_every
        self.phase = phase % slow_every
        self.version: Optional[str] = None   # v1 or v2, once the first read found the cgroup
        # The files read every time; None until the first read found the cgroup.
        self._sources: Optional[List[_Source]] = None
        self._slow_sources: List[_Source] = []    # read every slow_every times
        self._slow_values: Dict[str, object] = {}
        self._reads = 0
        self.run_queue_delay = run_queue_delay
        self._rq: Optional[RunQueueDelay] = None
        # The costly signals (PSI files, the run-queue delay) are read every
        # costly_every reads (a BE task's rate may be lower than an HP one's), and
        # both cadences are stretched `stride` times while owca-measure sheds work
        # for its CPU budget (lib/owca/measure/budget.py); last values in between.
        self.costly_every = costly_every
        self.stride = 1
        self._costly_sources: List[_Source] = []
        self._costly_values: Dict[str, object] = {}
        self._rq_value: Optional[float] = None

    def _setup(self) -> None:
        paths, cgroup_path = self.paths, self.cgroup_path
        requested = self.requested_version
        # One stat() where the first controller holds the task (the usual case);
        # whether the other directories exist is learnt from their files' first
        # reads, see _Source.dir_existed.
        found = cgroup_hierarchy(paths, cgroup_path,
                                 V1_CONTROLLERS if requested != "v2" else ())
        if requested == "v1" and found in (None, UNIFIED):
            raise CgroupGone(f"cgroup {cgroup_path}: not in the v1 hierarchies "
                             f"{', '.join(V1_CONTROLLERS)}")
        if found is None:
            where = "v1 or v2" if requested == "auto" else "v2"
            raise CgroupGone(f"cgroup {cgroup_path}: not in the {where} hierarchy")
        if found != UNIFIED:
            version = "v1"
            dirs = {c: paths.cgroup_v1(c, cgroup_path) for c in V1_CONTROLLERS}
            sources = [(name, _Source(dirs[c], name, into, True if c == found else None))
                       for c, name, into in V1_FILES]
            hybrid = paths.cgroup_v2(cgroup_path)
            if paths.cgroup_v2_root != paths.cgroupfs and os.path.isdir(hybrid):
                sources += [(name, _Source(hybrid, name, into, True))
                            for _, name, into in V2_FILES if name.endswith(".pressure")]
            threads_dir = dirs[found]
        else:
            version = "v2"
            threads_dir = paths.cgroup_v2(cgroup_path)
            sources = [(name, _Source(threads_dir, name, into, True))
                       for _, name, into in V2_FILES]
        if self.run_queue_delay:
            self._rq = RunQueueDelay(paths, threads_dir, version)
        slow = SLOW_FILES if self.slow_every > 1 else frozenset()
        self._sources = [src for name, src in sources
                         if name not in slow and not name.endswith(".pressure")]
        self._slow_sources = [src for name, src in sources if name in slow]
        self._costly_sources = [src for name, src in sources if name.endswith(".pressure")]
        self._slow_values = {}
        self._costly_values = {}
        self._rq_value = None
        self.version = version

    def read(self) -> dict:
        """This cycle's metrics; raises CgroupGone when the cgroup went away."""
        if self._sources is None:
            self._setup()
        sources = self._sources
        assert sources is not None, "_setup() found the cgroup, or raised CgroupGone"
        self._reads = reads = self._reads + 1
        out: Dict[str, object] = {}
        slow_every = self.slow_every * self.stride
        if self._slow_sources and (reads == 1 or (reads + self.phase) % slow_every == 0):
            slow: Dict[str, object] = {}
            self._read_all(self._slow_sources, slow)
            self._slow_values = slow
        costly_every = self.costly_every * self.stride
        costly = reads == 1 or costly_every == 1 or (reads + self.phase) % costly_every == 0
        self._read_all(sources, out)
        if costly and self._costly_sources:
            values: Dict[str, object] = {}
            self._read_all(self._costly_sources, values)
            self._costly_values = values
        out.update(self._costly_values)
        out.update(self._slow_values)
        if self._rq is not None:
            if costly:
                if (reads + self.phase) % max(self.slow_every, 10) == 0:
                    self._rq.relist()
                self._rq_value = self._rq.read()
            if self._rq_value is not None:
                out["task_run_queue_delay_seconds"] = self._rq_value
        return out

    def files_read(self) -> List[Tuple[str, int, bool]]:
        """(path, every, kept) of each file a steady read() reads: every how many reads
        (the read counted from 1, phase included: read when (reads + phase) % every
        is 0), and whether it is held open (False: opened afresh each time).  The
        same-work floor of benchmarks/measure_cycle.py reads these files.  Empty
        before the first read()."""
        if self._sources is None:
            return []
        costly = self.costly_every * self.stride
        out = []
        for every, sources in ((1, self._sources), (self.slow_every * self.stride,
                                                    self._slow_sources),
                               (costly, self._costly_sources)):
            # a file that was not there (fd None, never kept) is not read: left out
            out += [(src.path, every, src.fd is not None) for src in sources
                    if src.fd is not None or src.kept is False]
        if self._rq is not None:
            out += [(f.path, costly, self._rq.keep_lists) for f in self._rq.lists]
            out += [(kept.path, costly, True) for kept, _last in self._rq.threads.values()]
        return out

    def _read_all(self, sources: list, out: dict) -> None:
        pread = os.pread
        for src in sources:
            # The common case inline, a file held open read whole by one pread
            # (a whole cycle is a microsecond or two per file); _read_slow()
            # handles the rest: first open, a stale fd, a file larger than its
            # buffer, no fds left, a file left out for now.
            fd = src.fd
            if fd is not None:
                try:
                    data = pread(fd, src.size, 0)
                except OSError:
                    data = None
                if data is not None and len(data) < src.size:
                    try:
                        src.into(data, out)
                    except (ValueError, IndexError) as e:
                        self._warn_once(src, f"cannot parse: {e}")
                    continue
            self._read_slow(src, out)

    def _read_slow(self, src: _Source, out: dict) -> None:
        if src.retry_at > self._reads:
            return
        try:
            data = src.read_bytes()
        except OSError as e:
            self._unreadable(src, e)
            return
        src.dir_existed = True
        try:
            src.into(data, out)
        except (ValueError, IndexError) as e:
            self._warn_once(src, f"cannot parse: {e}")

    def _unreadable(self, src: _Source, e: OSError) -> None:
        src.close()
        if e.errno in _MISSING_ERRNOS:
            exists = os.path.isdir(src.directory)
            if src.dir_existed and not exists:
                self.close()
                raise CgroupGone(f"cgroup {self.cgroup_path}: {src.directory} was removed")
            if src.dir_existed is None:
                src.dir_existed = exists
        else:
            self._warn_once(src, e.strerror or str(e))
        src.retry_at = self._reads + RETRY_ABSENT_AFTER

    def _warn_once(self, src: _Source, reason: str) -> None:
        if not src.warned:
            src.warned = True
            log.warning("%s: %s (left out; tried again every %d reads)",
                        src.path, reason, RETRY_ABSENT_AFTER)

    def close(self) -> None:
        """Release every file; a later read() starts afresh."""
        if self._sources is not None:
            for src in self._sources + self._slow_sources + self._costly_sources:
                src.close()
        if self._rq is not None:
            self._rq.close()
            self._rq = None
        self._sources = None
        self._slow_sources = []
        self._slow_values = {}
        self._costly_sources = []
        self._costly_values = {}
        self._rq_value = None
        self._reads = 0
        self.version = None



# -- as a source of owca-measure --------------------------------------------------

log = logging.getLogger("owca.measure")


class CgroupSource(Source):
    """The tasks' cgroups as one source: a TaskCgroup reader (cgroup.py) per task.

    Readers are kept between cycles, so that their files stay open and a cycle costs
    reads, not opens; a task whose cgroup path changes gets a new reader.  Readers are
    made with consecutive phases, so that their slow metrics' reads spread evenly over
    the cycles.  This source names the tasks of a cycle (`lists_tasks`): a task whose
    cgroup went away (CgroupGone) is left out of it, with a warning.

    Failure as a whole: none of the hierarchies it reads tasks from is there (the
    cgroup mount is gone, or --cgroupfs holds neither the v1 cpuacct, cpu and memory
    hierarchies nor a cgroup2 one), so that every task would be left out for the
    mount's sake, not its own.  A task whose cgroup was removed is not a failure.
    """

    name = "cgroup"
    lists_tasks = True

    def __init__(self, cfg, paths):
        self.paths = paths
        self.version = cfg.cgroup_version
        self.slow_every = cfg.slow_metrics_every
        self.run_queue_delay = cfg.run_queue_delay
        self.be_costly_every = cfg.be_costly_signals_every
        self.stride = 1   # the CPU budget's (Measure.apply_level)
        self.readers: Dict[str, TaskCgroup] = {}
        self.readers_created = 0  # the next reader's phase for its slow metrics

    def update(self, tasks: Dict[str, dict]) -> None:
        for task_id in list(self.readers):
            task = tasks.get(task_id)
            if task is None or task["cgroup_path"] != self.readers[task_id].cgroup_path:
                self.readers.pop(task_id).close()
        for task_id, task in tasks.items():
            if task_id not in self.readers:
                be = task.get("labels", {}).get(PRIORITY_LABEL) == BE
                reader = self.readers[task_id] = TaskCgroup(
                    self.paths, task["cgroup_path"], self.version,
                    slow_every=self.slow_every, phase=self.readers_created,
                    run_queue_delay=self.run_queue_delay,
                    costly_every=self.be_costly_every if be else 1)
                reader.stride = self.stride
                self.readers_created += 1

    def files_read(self) -> Dict[str, List[Tuple[str, int, int, bool]]]:
        """{task id: [(path, every, phase, kept)]}: what each task's reader reads
        (TaskCgroup.files_read), for the same-work floor."""
        return {task_id: [(path, every, reader.phase, kept)
                          for path, every, kept in reader.files_read()]
                for task_id, reader in self.readers.items()}

    def set_stride(self, stride: int) -> None:
        """Read the slow and costly signals `stride` times less often (1: as configured)."""
        self.stride = stride
        for reader in self.readers.values():
            reader.stride = stride

    def read(self, cycle: Cycle) -> Reading:
        measured = {}
        for task_id, reader in self.readers.items():
            try:
                measured[task_id] = reader.read()
            except CgroupGone as e:
                log.warning("task %s left out of cycle %d: %s", task_id, cycle.seq, e)
        # A cycle that read every task has seen the hierarchies; only one that left
        # tasks out, or had none, looks whether they are there at all.
        ok = bool(measured) and len(measured) == len(self.readers) \
            or any(os.path.isdir(root) for root in self._hierarchies())
        return Reading(tasks=measured, ok=ok)

    def _hierarchies(self) -> List[str]:
        roots = []
        if self.version in ("auto", "v1"):
            roots += [self.paths.cgroup_v1(controller) for controller in V1_CONTROLLERS]
        if self.version in ("auto", "v2"):
            roots.append(self.paths.cgroup_v2_root)
        return roots

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
