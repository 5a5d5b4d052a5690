"""cpu_quota, cpu_shares and cpusets, read from and written to a task's own cgroup.

| type | v1 file (hierarchy) | v2 file | written as |
|---|---|---|---|
| cpu_quota | cpu.cfs_quota_us (cpu) | cpu.max | quota x period x online CPUs, in us; 1.0 is -1 / max |
| cpu_shares | cpu.shares (cpu) | cpu.weight | x 1024 (v1), x 100 (v2) |
| cpu_idle | cpu.idle (cpu) | cpu.idle | 1 or 0 (Linux 5.15 and later); its original keeps the weight too |
| cpuset_cpus | cpuset.cpus (cpuset) | cpuset.cpus | the kernel's list format |
| cpuset_mems | cpuset.mems (cpuset) | cpuset.mems | the kernel's list format |

Safety: a task's directory is found below the hierarchy's real mount point by
its cgroup path alone (owca.core.kernel.cgroup_dir); a path with `.` or `..`,
the root cgroup, and any symlink below the mount point are refused
(CgroupRefused).  Files are opened without O_CREAT and with O_NOFOLLOW, so
nothing is ever created and no link is followed.  The period (cpu.cfs_period_us,
the second field of cpu.max) is read, never written.  The memory types' files are
memory_files.py's; their hierarchy is the one that holds the task's memory cgroup.
"""  # noqa: E501 (the table's rows cannot be wrapped)
import errno
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

from owca.core.allocation import (CPU_IDLE, CPU_QUOTA, CPU_SHARES, CPUSET_CPUS, CPUSET_MEMS,
                                  MEMORY_RECLAIM, MEMORY_TYPES, SHARES_V1_DEFAULT,
                                  WEIGHT_V2_DEFAULT, InvalidAllocation, Topology)
from owca.core.kernel import (CgroupGone, CgroupRefused, cgroup_dir, cgroup_hierarchy,
                              cpu_cgroup_version, format_cpu_list, parse_cpu_list, read_file,
                              read_thread_ids)
from owca.core.paths import CGROUP_V1_CONTROLLERS, Paths
from owca.allocate.memory_files import V1_FILES as MEMORY_V1_FILES
from owca.allocate.memory_files import V2_FILES as MEMORY_V2_FILES
from owca.allocate.memory_files import memory_text, parse_memory

# The kernel refuses a CFS quota below 1 ms per period.
QUOTA_MIN_US = 1000
V1_SHARES_RANGE = (2, 262144)
V2_WEIGHT_RANGE = (1, 10000)

V1_FILES = {
    CPU_QUOTA: ("cpu", "cpu.cfs_quota_us"),
    CPU_SHARES: ("cpu", "cpu.shares"),
    CPU_IDLE: ("cpu", "cpu.idle"),
    CPUSET_CPUS: ("cpuset", "cpuset.cpus"),
    CPUSET_MEMS: ("cpuset", "cpuset.mems"),
}
V2_FILES = {
    CPU_QUOTA: "cpu.max",
    CPU_SHARES: "cpu.weight",
    CPU_IDLE: "cpu.idle",
    CPUSET_CPUS: "cpuset.cpus",
    CPUSET_MEMS: "cpuset.mems",
}
# A cgroup named so is a systemd unit's own; systemd writes its attributes.
SYSTEMD_UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".mount", ".swap")
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")
# The first Linux release with the type's file: an older kernel's lack of it is said so.
SINCE_KERNEL = {CPU_IDLE: "5.15"}
# What a v2 cpuset inherits when its own file is empty.
V2_EFFECTIVE = {CPUSET_CPUS: "cpuset.cpus.effective", CPUSET_MEMS: "cpuset.mems.effective"}


# -- pure conversions ------------------------------------------------------------------

def quota_to_us(quota: float, period_us: int, ncpus: int) -> int:
    """Normalised quota to a CFS quota in us; -1 (no limit) for the whole platform."""
    if quota >= 1.0:
        return -1
    quota_us = round(quota * period_us * ncpus)
    if quota_us < QUOTA_MIN_US:
        raise InvalidAllocation(
            f"{CPU_QUOTA} {quota:g} is {quota_us} us per {period_us} us period on {ncpus} "
            f"CPUs, below the kernel's minimum of {QUOTA_MIN_US} us")
    return quota_us


def us_to_quota(quota_us: int, period_us: int, ncpus: int) -> float:
    if quota_us < 0:
        return 1.0
    return round(quota_us / (period_us * ncpus), 6)


def parse_cpu_max(text: str) -> Tuple[int, int]:
    """v2 cpu.max "max 100000" or "20000 100000" to (quota us or -1, period us)."""
    fields = text.split()
    if len(fields) != 2:
        raise ValueError(f"cpu.max: expected 'QUOTA PERIOD', got {text!r:.40}")
    return (-1 if fields[0] == "max" else int(fields[0])), int(fields[1])


def format_cpu_max(quota_us: int, period_us: int) -> str:
    return f"{'max' if quota_us < 0 else quota_us} {period_us}"


def shares_to_kernel(shares: float, version: str) -> int:
    default, (low, high) = ((SHARES_V1_DEFAULT, V1_SHARES_RANGE) if version == "v1"
                            else (WEIGHT_V2_DEFAULT, V2_WEIGHT_RANGE))
    return min(high, max(low, round(shares * default)))


def kernel_to_shares(value: int, version: str) -> float:
    return round(value / (SHARES_V1_DEFAULT if version == "v1" else WEIGHT_V2_DEFAULT), 6)


# -- safe paths and writes -----------------------------------------------------------

def write_file(path: str, text: str) -> None:
    """One write of `text` and a newline to an existing kernel file (or a fixture's)."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def restore_file(path: str, text: str) -> str:
    """Write back a file's original `text`; returns what was written.

    A v2 cpuset that was empty (it used its parent's) cannot be emptied again while the
    cgroup has processes: the kernel says ENOSPC.  What the empty file meant, the
    parent's effective set, is written instead."""
    try:
        write_file(path, text)
        return text
    except OSError as e:
        name = os.path.basename(path)
        if e.errno != errno.ENOSPC or text or name not in ("cpuset.cpus", "cpuset.mems"):
            raise
    parent = os.path.join(os.path.dirname(os.path.dirname(path)), name + ".effective")
    inherited = read_file(parent)
    write_file(path, inherited)
    return inherited


@dataclass
class Reading:
    """One type's file as read this cycle: `text` is what a restore writes back."""
    path: str
    text: str
    value: object
    period_us: Optional[int] = None   # cpu_quota's only: the CFS period it is a share of


# -- a task's cgroup ----------------------------------------------------------------

class TaskCgroupFiles:
    """The allocation files of one task's cgroup, v1 (cpu and cpuset hierarchies) or v2."""

    def __init__(self, paths: Paths, cgroup_path: str):
        self.paths = paths
        self.cgroup_path = cgroup_path
        self.version = cpu_cgroup_version(paths, cgroup_path)
        if self.version == "v1":
            self._roots = {t: paths.cgroup_v1(c) for t, (c, _) in V1_FILES.items()}
        else:
            self._roots = {t: paths.cgroup_v2_root for t in V2_FILES}
        # hierarchy root -> the cgroup's directory in it, or why there is none
        self._dirs: Dict[str, Union[str, Exception]] = {}
        self._memory_version: Optional[str] = None

    @property
    def memory_version(self) -> str:
        """"v1" where the v1 memory hierarchy holds the cgroup, else "v2" (looked up
        only for a memory type)."""
        if self._memory_version is None:
            held = cgroup_hierarchy(self.paths, self.cgroup_path, ("memory",))
            self._memory_version = "v1" if held == "memory" else "v2"
            for type_ in MEMORY_TYPES + (MEMORY_RECLAIM,):
                self._roots[type_] = (self.paths.cgroup_v1("memory")
                                      if self._memory_version == "v1"
                                      else self.paths.cgroup_v2_root)
        return self._memory_version

    def directory(self, type_: str) -> str:
        # Resolved once per object: owca-allocate makes one per task per cycle, so a
        # symlink put in place later is still caught by the next cycle's check.
        if type_ not in self._roots:
            self.memory_version    # noqa: B018 (sets the memory types' roots)
        root = self._roots[type_]
        if root not in self._dirs:
            try:
                self._dirs[root] = cgroup_dir(root, self.cgroup_path)
            except (CgroupRefused, CgroupGone) as e:
                self._dirs[root] = e
        found = self._dirs[root]
        if isinstance(found, CgroupGone):
            raise self._gone(type_, found)
        if isinstance(found, Exception):
            raise found
        return found

    def _gone(self, type_: str, gone: CgroupGone) -> CgroupGone:
        """Where the cgroup is, when it is not where the type's file would be.

        On a v1 node a cgroup that lives in the memory hierarchy alone (made by a
        tool that knows memory only) is in neither the cpu nor the cpuset one, and
        then not in cgroup2 either: "no cgroup /X in /sys/fs/cgroup/unified" would
        send its reader to look in the wrong place."""
        held = [c for c in CGROUP_V1_CONTROLLERS
                if os.path.isdir(self.paths.cgroup_v1(c, self.cgroup_path))]
        if os.path.isdir(self.paths.cgroup_v2(self.cgroup_path)):
            held.append("cgroup2")
        if not held:
            return gone
        controller = V1_FILES[type_][0] if type_ in V1_FILES else "memory"
        wanted = f"the {controller} hierarchy ({self.paths.cgroup_v1(controller).rstrip('/')})"
        if self.version == "v2":
            wanted += f" or cgroup2 ({self.paths.cgroup_v2_root})"
        return CgroupGone(f"no cgroup {self.cgroup_path} in {wanted}, where {type_} is "
                          f"written; it exists in: {', '.join(held)}")

    def file(self, type_: str) -> str:
        if type_ not in V1_FILES:
            names = (MEMORY_V1_FILES if self.memory_version == "v1"
                     else MEMORY_V2_FILES)
            if type_ not in names:
                raise InvalidAllocation(f"{type_}: cgroup v1 has no such file (the task's "
                                        f"memory cgroup is v1)")
            return os.path.join(self.directory(type_), names[type_])
        name = V1_FILES[type_][1] if self.version == "v1" else V2_FILES[type_]
        return os.path.join(self.directory(type_), name)

    def identity(self, type_: str) -> Tuple[int, int]:
        """Tells this cgroup from one created later at the same path."""
        st = os.stat(self.directory(type_))
        return st.st_dev, st.st_ino

    def systemd_unit(self) -> str:
        """The systemd unit whose own cgroup this is, unless a cgroup above it is
        delegated (Delegate=yes, marked by systemd with a delegate xattr): "" when
        the cgroup is not systemd's to write.  systemd rewrites a unit's cpu.max,
        cpu.weight and cpuset files on daemon-reload and set-property, so OWCA
        writing them would be a tug of war (v2 only: systemd owns the unified tree)."""
        name = os.path.basename(self.cgroup_path.rstrip("/"))
        if self.version != "v2" or not name.endswith(SYSTEMD_UNIT_SUFFIXES):
            return ""
        directory = os.path.dirname(self.directory(CPU_QUOTA))
        root = os.path.realpath(self._roots[CPU_QUOTA])
        while len(directory) > len(root):
            for attr in DELEGATE_XATTRS:
                try:
                    if os.getxattr(directory, attr, follow_symlinks=False) == b"1":
                        return ""
                except OSError:
                    continue
            directory = os.path.dirname(directory)
        return name

    def thread_ids(self) -> list:
        """The ids of every thread in the cgroup (for resctrl, which groups threads)."""
        return read_thread_ids(self.directory(CPU_QUOTA), self.version)

    def read(self, type_: str, topology: Topology) -> Reading:
        """The type's current value; CgroupGone when the cgroup or its file is absent."""
        path = self.file(type_)
        try:
            text = _read_existing(path)
        except CgroupGone:
            if type_ in SINCE_KERNEL and os.path.isdir(os.path.dirname(path)):
                raise CgroupGone(f"{path} does not exist: {type_} needs Linux "
                                 f"{SINCE_KERNEL[type_]} or later") from None
            raise
        directory = os.path.dirname(path)
        if type_ == CPU_QUOTA:
            ncpus = max(1, len(topology.cpus))
            if self.version == "v1":
                period = int(_read_existing(os.path.join(directory, "cpu.cfs_period_us")))
                quota_us = int(text)
            else:
                quota_us, period = parse_cpu_max(text)
            return Reading(path, text, us_to_quota(quota_us, period, ncpus), period)
        if type_ == CPU_SHARES:
            return Reading(path, text, kernel_to_shares(int(text), self.version))
        if type_ == CPU_IDLE:
            # Clearing cpu.idle resets the weight to the kernel's default, so what a
            # restore writes back is both: "IDLE WEIGHT" (idle_text, weight_text).
            weight = _read_existing(os.path.join(directory, self.weight_file()))
            return Reading(path, f"{int(text)} {int(weight)}", int(text))
        if type_ in MEMORY_TYPES:
            return Reading(path, text, parse_memory(text))
        ids = text
        if not ids and self.version == "v2":
            ids = _read_existing(os.path.join(directory, V2_EFFECTIVE[type_]))
        return Reading(path, text, format_cpu_list(parse_cpu_list(ids)))

    def target(self, type_: str, value, topology: Topology, current: Reading) -> str:
        """The text that gives the task `value` (validated already) in this cgroup."""
        if type_ == CPU_QUOTA:
            period_us = current.period_us
            assert period_us is not None, "read() gives a cpu_quota reading its period"
            quota_us = quota_to_us(value, period_us, max(1, len(topology.cpus)))
            if self.version == "v1":
                return str(quota_us)
            return format_cpu_max(quota_us, period_us)
        if type_ == CPU_SHARES:
            return str(shares_to_kernel(value, self.version))
        if type_ == CPU_IDLE:
            return str(value)
        if type_ in MEMORY_TYPES:
            return memory_text(value, self.memory_version)
        if self.version == "v1":
            self._check_parent_cpuset(type_, value, current.path)
        return value

    def weight_file(self) -> str:
        return V1_FILES[CPU_SHARES][1] if self.version == "v1" else V2_FILES[CPU_SHARES]

    @staticmethod
    def _check_parent_cpuset(type_, value, path):
        # v1 refuses a cpuset wider than the parent's (EINVAL); say which ids instead.
        parent_file = os.path.join(os.path.dirname(os.path.dirname(path)),
                                   os.path.basename(path))
        try:
            parent = parse_cpu_list(read_file(parent_file))
        except (OSError, ValueError):
            return
        wanted = parse_cpu_list(value)
        if not wanted <= parent:
            raise InvalidAllocation(f"{type_} {value}: {format_cpu_list(wanted - parent)} not in "
                                    f"the parent cgroup's {os.path.basename(path)} "
                                    f"{format_cpu_list(parent)}")


def _read_existing(path: str) -> str:
    try:
        return read_file(path)
    except FileNotFoundError:
        raise CgroupGone(f"{path} does not exist (cgroup gone, or controller not "
                            f"enabled)") from None


def current_allocations(files: TaskCgroupFiles, topology: Topology,
                        types=tuple(V2_FILES)) -> Dict[str, Reading]:
    """Readings of every type this cgroup has; types whose file is absent are left out."""
    out = {}
    for type_ in types:
        try:
            out[type_] = files.read(type_, topology)
        except (CgroupGone, CgroupRefused, OSError, ValueError):
            continue
    return out
