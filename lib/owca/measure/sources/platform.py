"""The platform's metrics: topology, CPU time per CPU, memory, memory per NUMA node.

Interface: `PlatformReader(paths).read() -> {metric: value}` with the names of
`metrics.PLATFORM`; `close()` releases its files.  /proc/stat, /proc/meminfo
and the nodes' meminfo stay open and are re-read with pread each cycle.  The
topology (cores, sockets) does not change at runtime, so it is read once and
again only when the online CPU or node list changes (a cheap check each cycle).
A source that is absent (no NUMA support in the kernel) leaves its metrics out.

Sources:
- platform_topology_*: /sys/devices/system/cpu/online, cpuN/topology/
  {physical_package_id,die_id,core_id}, /sys/devices/system/node/online
- platform_cpu_usage: /proc/stat cpuN lines, user+nice+system+irq+softirq+steal
  (USER_HZ ticks; guest time is already inside user and nice)
- platform_mem_usage_bytes, platform_mem_total_bytes: /proc/meminfo
- platform_mem_numa_free_bytes, _used_bytes: /sys/devices/system/node/nodeN/meminfo
"""
import logging
import os
from typing import Dict, List, Optional, Set, Tuple

from owca.core.kernel import KeptFile, parse_cpu_list
from owca.core.paths import Paths
from owca.measure.sources.base import Cycle, Reading, Source

log = logging.getLogger("owca.platform")

_CPU_DIR = ("devices", "system", "cpu")
_NODE_DIR = ("devices", "system", "node")


# -- parsers ---------------------------------------------------------------------------

def parse_proc_stat(text: str) -> Dict[str, int]:
    """/proc/stat: busy USER_HZ ticks per CPU, {"0": ticks, ...}.

    Columns of a cpuN line: user nice system idle iowait irq softirq steal guest
    guest_nice; guest and guest_nice are already counted in user and nice.
    """
    out = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            break  # the cpu lines come first
        if line[3] == " ":
            continue  # the all-CPU total
        f = line.split()
        out[f[0][3:]] = (int(f[1]) + int(f[2]) + int(f[3]) + int(f[6]) + int(f[7])
                         + (int(f[8]) if len(f) > 8 else 0))
    return out


def parse_meminfo(text: str) -> Dict[str, int]:
    """/proc/meminfo or a node's meminfo: {"MemTotal": bytes, ...}; counts without
    a unit (HugePages_Total) as they are.  A node's lines start "Node N "."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "Node":
            fields = fields[2:]
        if len(fields) < 2 or not fields[0].endswith(":"):
            continue
        value = int(fields[1])
        if len(fields) > 2 and fields[2] == "kB":
            value *= 1024
        out[fields[0][:-1]] = value
    return out


def memory_metrics(meminfo: Dict[str, int]) -> Dict[str, int]:
    total = meminfo["MemTotal"]
    used = total - meminfo["MemFree"] - meminfo.get("Buffers", 0) - meminfo.get("Cached", 0)
    return {"platform_mem_total_bytes": total, "platform_mem_usage_bytes": used}


def memory_pressure_metrics(text: str) -> Dict[str, Dict[str, float]]:
    """/proc/pressure/memory: "some avg10=0.12 avg60=0.05 avg300=0.01 total=12345" and a
    `full` line (total in us)."""
    avg10, stall = {}, {}
    for line in text.splitlines():
        f = line.split()
        if len(f) == 5 and f[1].startswith("avg10=") and f[4].startswith("total="):
            avg10[f[0]] = float(f[1][6:])
            stall[f[0]] = int(f[4][6:]) / 1e6
    return {"platform_mem_pressure_avg10_percent": avg10,
            "platform_mem_pressure_stall_seconds": stall} if avg10 else {}


def count_topology(cpus: List[Tuple[str, str, str]]) -> Dict[str, int]:
    """(package, die, core) ids of each online CPU -> cores and sockets.

    A core id is unique only within its die (within its package on kernels
    without die_id, whose die is ""), so a core is the whole triple.
    """
    return {"platform_topology_cores": len(set(cpus)),
            "platform_topology_sockets": len({c[0] for c in cpus})}


# -- the reader -------------------------------------------------------------------------

def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError:
        return None


class PlatformReader:
    """Platform metrics each cycle; the files stay open between cycles."""

    def __init__(self, paths: Paths):
        self.paths = paths
        self._stat = KeptFile(paths.proc("stat"))
        self._meminfo = KeptFile(paths.proc("meminfo"))
        self._cpus_online = KeptFile(paths.online_cpus_file, size=256)
        self._nodes_online = KeptFile(paths.online_nodes_file, size=256)
        # The online lists as last read (None: not readable), to see them change.
        self._cpus_text: Optional[str] = None
        self._nodes_text: Optional[str] = None
        self._topology: Dict[str, int] = {}
        self._node_meminfo: Dict[str, KeptFile] = {}
        self._warned: Set[str] = set()   # paths whose failure was logged
        # The node's memory pressure (PSI): looked for once; a kernel without PSI
        # (CONFIG_PSI off, or psi=0) costs no read a cycle.
        pressure = paths.proc("pressure", "memory")
        self._pressure = KeptFile(pressure) if os.path.exists(pressure) else None

    def read(self) -> dict:
        out: Dict[str, object] = {}
        self._check_topology()
        out.update(self._topology)
        text = self._try(self._stat)
        if text is not None:
            out["platform_cpu_usage"] = parse_proc_stat(text)
        text = self._try(self._meminfo)
        if text is not None:
            out.update(memory_metrics(parse_meminfo(text)))
        free: Dict[str, int] = {}    # NUMA node -> bytes
        used: Dict[str, int] = {}
        for node, f in self._node_meminfo.items():
            text = self._try(f)
            if text is not None:
                info = parse_meminfo(text)
                free[node] = info["MemFree"]
                used[node] = info["MemUsed"]
        if free:
            out["platform_mem_numa_free_bytes"] = free
            out["platform_mem_numa_used_bytes"] = used
        text = self._try(self._pressure) if self._pressure is not None else None
        if text is not None:
            out.update(memory_pressure_metrics(text))
        return out

    def _try(self, f: KeptFile) -> Optional[str]:
        try:
            return f.read()
        except OSError as e:
            f.close()
            if f.path not in self._warned:
                self._warned.add(f.path)
                log.warning("%s: %s (its metrics are left out)", f.path, e.strerror or e)
            return None

    def _check_topology(self) -> None:
        cpus_text = self._try(self._cpus_online)
        nodes_text = self._try(self._nodes_online)
        if cpus_text == self._cpus_text and nodes_text == self._nodes_text:
            return
        if self._cpus_text is not None:
            log.info("online CPUs or NUMA nodes changed: reading the topology again")
        self._cpus_text, self._nodes_text = cpus_text, nodes_text
        self._topology = {}
        if cpus_text is not None:
            cpus = sorted(parse_cpu_list(cpus_text))
            self._topology["platform_topology_cpus"] = len(cpus)
            ids = self._core_ids(cpus)
            if ids is not None:
                self._topology.update(count_topology(ids))
        for f in self._node_meminfo.values():
            f.close()
        self._node_meminfo = {}
        if nodes_text is not None:
            nodes = sorted(parse_cpu_list(nodes_text))
            self._topology["platform_topology_numa_nodes"] = len(nodes)
            self._node_meminfo = {
                str(n): KeptFile(self.paths.sys(*_NODE_DIR, f"node{n}", "meminfo"))
                for n in nodes}

    def _core_ids(self, cpus: List[int]) -> Optional[List[Tuple[str, str, str]]]:
        """(package, die, core) of each CPU; None where the kernel does not say."""
        out = []
        for cpu in cpus:
            topology = self.paths.sys(*_CPU_DIR, f"cpu{cpu}", "topology")
            package = _read_text(os.path.join(topology, "physical_package_id"))
            core = _read_text(os.path.join(topology, "core_id"))
            if package is None or core is None:
                log.warning("%s: no package or core id: cores and sockets left out", topology)
                return None
            die = _read_text(os.path.join(topology, "die_id")) or ""
            out.append((package.strip(), die.strip(), core.strip()))
        return out

    def close(self) -> None:
        for f in (self._stat, self._meminfo, self._cpus_online, self._nodes_online,
                  *self._node_meminfo.values(), *filter(None, [self._pressure])):
            f.close()



# -- as a source of owca-measure --------------------------------------------------

# One metric from each file every Linux has.
ALWAYS_THERE = ("platform_cpu_usage", "platform_mem_total_bytes", "platform_topology_cpus")


class PlatformSource(Source):
    """The platform (platform.py's PlatformReader) as a source: platform metrics only.

    Failure as a whole: one of the files every Linux has was unreadable this cycle,
    so that its figures are missing: /proc/stat (platform_cpu_usage), /proc/meminfo
    (platform_mem_*) or /sys/devices/system/cpu/online (platform_topology_cpus).  The
    CPUs' core and package ids and the NUMA nodes' files are not there on every
    machine (a kernel without NUMA has no node directory): their absence is no failure.
    """

    name = "platform"

    def __init__(self, cfg, paths):
        self.reader = PlatformReader(paths)

    def read(self, cycle: Cycle) -> Reading:
        platform = self.reader.read()
        return Reading(platform=platform, ok=all(name in platform for name in ALWAYS_THERE))

    def close(self) -> None:
        self.reader.close()
