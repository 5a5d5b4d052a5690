"""Where the kernel's interfaces are mounted.

The only module that names /proc, /sys and the cgroup mounts.  Every root is
settable, so that a recorded tree (tests/fixtures/<scenario>/) can stand in for
the real one.
"""
import os
from dataclasses import dataclass

DEFAULT_PROCFS = "/proc"
DEFAULT_SYSFS = "/sys"
DEFAULT_CGROUPFS = "/sys/fs/cgroup"
DEFAULT_RESCTRLFS = "/sys/fs/resctrl"

CGROUP_V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "perf_event")


@dataclass(frozen=True)
class Paths:
    """The roots of the kernel interfaces OWCA reads and writes."""
    procfs: str = DEFAULT_PROCFS
    sysfs: str = DEFAULT_SYSFS
    cgroupfs: str = DEFAULT_CGROUPFS
    resctrlfs: str = DEFAULT_RESCTRLFS

    def proc(self, *parts: str) -> str:
        return os.path.join(self.procfs, *parts)

    def sys(self, *parts: str) -> str:
        return os.path.join(self.sysfs, *parts)

    def resctrl(self, *parts: str) -> str:
        return os.path.join(self.resctrlfs, *parts)

    @property
    def online_cpus_file(self) -> str:
        """The kernel's list of online CPUs ("0-3,8")."""
        return self.sys("devices", "system", "cpu", "online")

    @property
    def online_nodes_file(self) -> str:
        """The kernel's list of online NUMA nodes ("0-1")."""
        return self.sys("devices", "system", "node", "online")

    def cgroup_v1(self, controller: str, cgroup_path: str = "/") -> str:
        """Directory of `cgroup_path` in the v1 hierarchy of `controller`."""
        return os.path.join(self.cgroupfs, controller, cgroup_path.lstrip("/"))

    @property
    def cgroup_v2_root(self) -> str:
        """The cgroup2 mount: the root itself on a unified host, `unified/` on a hybrid one."""
        if os.path.exists(os.path.join(self.cgroupfs, "cgroup.controllers")):
            return self.cgroupfs
        return os.path.join(self.cgroupfs, "unified")

    def cgroup_v2(self, cgroup_path: str = "/") -> str:
        return os.path.join(self.cgroup_v2_root, cgroup_path.lstrip("/"))


DEFAULT_PATHS = Paths()


def paths_from_options(procfs=None, sysfs=None, cgroupfs=None, resctrlfs=None) -> Paths:
    return Paths(procfs=procfs or DEFAULT_PROCFS, sysfs=sysfs or DEFAULT_SYSFS,
                 cgroupfs=cgroupfs or DEFAULT_CGROUPFS, resctrlfs=resctrlfs or DEFAULT_RESCTRLFS)
