"""The host's own load while a scenario runs, one sample per interval.

A reader of a recording must tell interference from a busy host: the machine
the lab runs on is shared.  Each sample says, over the interval just ended,

- `cpu_some_percent`, `memory_some_percent`, `io_some_percent`: the host's
  pressure stall information (/proc/pressure/*, `some` total), as a share of
  the interval;
- `other_cpu_cores`: CPU time used by everything outside the scenario's
  cgroups (/proc/stat's busy time less the scenario parent's cpuacct usage),
  in cores, and `other_cpu_on_hp_cpus` the same on the HP task's cores;
- `loadavg1`: the 1-minute load average at the sample's time (/proc/loadavg);
- `oom_kills`: processes the kernel's OOM killer killed in the interval, anywhere on
  the node (/proc/vmstat oom_kill, Linux 4.13+).
"""
import os
import time
from typing import Dict, Optional

from owca.core.paths import Paths

CLK_TCK = os.sysconf("SC_CLK_TCK")
PSI_RESOURCES = ("cpu", "memory", "io")


def cpu_busy_seconds(stat_text: str) -> Dict[int, float]:
    """/proc/stat per-CPU busy time (user nice system irq softirq steal), seconds."""
    out = {}
    for line in stat_text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            f = line.split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f[1:9])
            out[int(f[0][3:])] = (user + nice + system + irq + softirq + steal) / CLK_TCK
    return out


def psi_some_total_seconds(text: str) -> Optional[float]:
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split()[1:]:
                if field.startswith("total="):
                    return int(field[6:]) / 1e6
    return None


class HostLoad:
    """Samples the host's load; `sample()` returns the interval since the last call."""

    def __init__(self, paths: Paths, parent_cgroup: str, hp_cpus: set):
        self.paths = paths
        self.usage_file = os.path.join(paths.cgroup_v1("cpuacct", parent_cgroup),
                                       "cpuacct.usage_percpu")
        self.hp_cpus = set(hp_cpus)
        self.last = None

    def _read(self) -> dict:
        with open(self.paths.proc("stat")) as f:
            busy = cpu_busy_seconds(f.read())
        try:
            with open(self.usage_file) as f:
                own = {i: int(v) / 1e9 for i, v in enumerate(f.read().split())}
        except OSError:
            own = {}
        psi = {}
        for resource in PSI_RESOURCES:
            try:
                with open(self.paths.proc("pressure", resource)) as f:
                    psi[resource] = psi_some_total_seconds(f.read())
            except OSError:
                psi[resource] = None
        try:
            with open(self.paths.proc("loadavg")) as f:
                load1 = float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            load1 = None
        return {"t": time.monotonic(), "ts": time.time(), "busy": busy, "own": own, "psi": psi,
                "loadavg1": load1, "oom_kill": self._oom_kills()}

    def _oom_kills(self) -> Optional[int]:
        try:
            with open(self.paths.proc("vmstat")) as f:
                for line in f:
                    if line.startswith("oom_kill "):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def sample(self) -> Optional[dict]:
        now = self._read()
        last, self.last = self.last, now
        if last is None:
            return None
        dt = now["t"] - last["t"]
        if dt <= 0:
            return None
        others = {}
        for cpu, busy in now["busy"].items():
            used = busy - last["busy"].get(cpu, busy)
            own = now["own"].get(cpu, 0.0) - last["own"].get(cpu, now["own"].get(cpu, 0.0))
            others[cpu] = max(0.0, used - own) / dt
        out = {"ts": now["ts"],
               "other_cpu_cores": round(sum(others.values()), 4),
               "other_cpu_on_hp_cpus": round(sum(v for c, v in others.items()
                                                 if c in self.hp_cpus), 4)}
        for resource in PSI_RESOURCES:
            a, b = last["psi"][resource], now["psi"][resource]
            if a is not None and b is not None:
                out[f"{resource}_some_percent"] = round(100.0 * (b - a) / dt, 3)
        if now["loadavg1"] is not None:
            out["loadavg1"] = now["loadavg1"]
        if now["oom_kill"] is not None and last["oom_kill"] is not None:
            out["oom_kills"] = now["oom_kill"] - last["oom_kill"]
        return out
