"""Headroom: how much best-effort (BE) work this node can take now, and why that much.

owca-allocate computes it each cycle, after its allocator (`allocate: headroom:
!Headroom {...}`), and puts it, with every term of its derivation, into the
allocations frame's metrics; owca-ship carries it to every storage, and
`!KubernetesNodeStatusStorage` (lib/owca/ship/storages/kubernetes_node.py) onto the
Node as extended resources.  docs/headroom.md is the user's description.

Per zone (the node, or each NUMA node where the platform has several), for CPU
(cores) and memory (bytes):

    headroom = capacity - hp - system - reserve - risk

    capacity  the zone's online CPUs; its memory (MemTotal)
    hp        a high percentile (`percentile`, over `window` seconds) of what the HP
              tasks used: CPU time per second, memory in use
    system    the same percentile of what no task accounts for: the zone's busy CPU
              and used memory less every task's
    reserve   `reserve_ratio` of the capacity, plus `reserve_cpus` /
              `reserve_memory_bytes` (shared among zones by capacity)
    risk      what OWCA withholds: the share of the rest that the HP tasks' slack, a
              broken SLO, the detector's contention flag or the controller's cut
              take (`headroom_risk_ratio`), and growth not yet earned (up by at most
              `grow_step_ratio` of the capacity a cycle, after `grow_after` calm
              seconds)

Each term is clamped to what the terms before it leave, so none is negative and the
sum holds exactly.  Headroom shrinks at once; it grows by bounded steps.  An input
missing (the platform's CPU or memory figures, an HP task's SLI) holds it where it is;
missing or unchanged for `stale_after` seconds takes it to zero.  `headroom_reason{
reason}` says what limits it.  Time is the frames' `ts`: a replayed recording gives
the same figures.
"""
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, FrozenSet, List, Optional, Set, Tuple

from owca.core import frames
from owca.core.allocation import CPUSET_CPUS, parse_cpu_list
from owca.core.paths import Paths
from owca.allocate.sli import matches as _matches, pressure as _pressure, report_identity

log = logging.getLogger("owca.headroom")

USER_HZ = 100          # platform_cpu_usage is in USER_HZ ticks (docs/metrics.md)
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
NODE = ""              # the zone of a platform without several NUMA nodes
RESOURCES = ("cpu", "memory")
UNIT = {"cpu": "cores", "memory": "bytes"}
TERMS = ("capacity", "hp", "system", "reserve", "risk")

# Why the headroom is what it is (the label of headroom_reason).
STALE_CPU, STALE_MEMORY, STALE_SLI = "stale_cpu", "stale_memory", "stale_sli"
HOLD_INPUT = "input_missing"
SLO_BROKEN, SLACK, CONTENTION, CONTROLLER = "slo_broken", "slack", "contention", "controller"
GROWTH_STEP, GROWTH_WAIT = "growth_step", "growth_wait"
# What stops growth for grow_after seconds (a narrow slack only lowers the target).
ALARMS = {SLO_BROKEN, CONTENTION, CONTROLLER}
# The controller's decisions that say BE hurt an HP task (slo_controller_decision{action}).
CONTROLLER_ALARMS = {"cut": 1.0, "cut_named": None, "rollback": None}


def metric_name(resource: str, term: Optional[str], numa: bool = False) -> str:
    """`headroom_cpu_cores`, `headroom_memory_hp_bytes`, `headroom_numa_cpu_risk_cores`."""
    parts = ["headroom"] + (["numa"] if numa else []) + [resource] + ([term] if term else [])
    return "_".join(parts + [UNIT[resource]])


def percentile(values, p: float) -> float:
    """The p-th percentile (0-100) of `values`, by linear interpolation between ranks."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Zone:
    """What one zone has: its CPUs and its memory."""
    cpus: FrozenSet[str]
    memory_bytes: float


@dataclass
class Usage:
    """One cycle's usage of a zone (cores, bytes)."""
    hp_cpu: float = 0.0
    system_cpu: float = 0.0
    hp_memory: float = 0.0
    system_memory: float = 0.0


@dataclass
class Derivation:
    """One zone's terms for one resource; headroom = capacity - hp - system - reserve - risk."""
    capacity: float
    hp: float
    system: float
    reserve: float
    risk: float
    headroom: float

    def terms(self) -> Dict[str, float]:
        return {"capacity": self.capacity, "hp": self.hp, "system": self.system,
                "reserve": self.reserve, "risk": self.risk}


@dataclass
class Headroom:
    # -- which tasks -----------------------------------------------------------------
    hp_labels: Dict[str, str] = field(default_factory=lambda: {"priority": "hp"})
    # -- usage -------------------------------------------------------------------------
    percentile: float = 95.0
    window: float = 300.0
    # -- reserve -----------------------------------------------------------------------
    reserve_ratio: float = 0.05
    reserve_cpus: float = 0.0
    reserve_memory_bytes: float = 0.0
    # -- risk --------------------------------------------------------------------------
    calm_slack: float = 0.35
    contention_cut: float = 0.5
    contention_hold: float = 30.0
    # -- steps -------------------------------------------------------------------------
    grow_step_ratio: float = 0.02
    grow_after: float = 30.0
    # -- trust -------------------------------------------------------------------------
    stale_after: float = 60.0
    require_sli: bool = True
    numa: bool = True
    # The CPUs BE work may run on (a cpuset list); default: every online CPU.  Tasks'
    # CPU time counts against them; other CPUs' busy time is not the headroom's.
    cpus: Optional[str] = None
    sysfs: str = "/sys"

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(what)
        need(0 < self.percentile <= 100, "percentile: in (0, 100]")
        need(self.window > 0, "window: a positive number of seconds")
        need(0 <= self.reserve_ratio < 1, "reserve_ratio: in [0, 1)")
        need(self.reserve_cpus >= 0 and self.reserve_memory_bytes >= 0,
             "reserve_cpus, reserve_memory_bytes: not negative")
        need(0 < self.calm_slack <= 1, "calm_slack: in (0, 1]")
        need(0 <= self.contention_cut <= 1, "contention_cut: in [0, 1]")
        need(0 < self.grow_step_ratio <= 1, "grow_step_ratio: in (0, 1]")
        for name in ("contention_hold", "grow_after"):
            need(getattr(self, name) >= 0, f"{name}: not negative")
        need(self.stale_after > 0, "stale_after: a positive number of seconds")
        self._cpus: Optional[FrozenSet[str]] = None
        if self.cpus is not None:
            try:
                self._cpus = frozenset(str(c) for c in parse_cpu_list(str(self.cpus)))
            except ValueError as e:
                raise ValueError(f"cpus: {e}") from None
            need(bool(self._cpus), "cpus: at least one CPU")
        self._prev: Optional[Tuple[float, Dict[str, float], Dict[str, float]]] = None
        self._history: Dict[str, Deque[Tuple[float, Usage]]] = {}
        self._published: Dict[Tuple[str, str], float] = {}
        self._started: Optional[float] = None
        self._last_good: Dict[str, float] = {}     # input -> ts it was last usable
        # HP task -> (its last SLI report, the ts it last changed)
        self._sli: Dict[str, Tuple[Optional[tuple], float]] = {}
        self._last_alarm = -math.inf               # ts of the last risk above 0
        self._flagged_until = -math.inf            # contention counts until this ts
        self._controller_alarm: Optional[float] = None
        self._sli_missing = False
        self._reasons: Tuple[str, ...] = ()
        self._numa_cpus: Optional[Dict[str, FrozenSet[str]]] = None

    # -- inputs from other stages ----------------------------------------------------

    def observe_anomalies(self, anomalies: list, hp: Set[str], ts: float) -> None:
        """The detector's verdict: an anomaly whose contended task is HP flags the node
        for `contention_hold` seconds."""
        if any(isinstance(a, dict) and a.get("contended_task_id") in hp for a in anomalies):
            self._flagged_until = ts + self.contention_hold

    def observe_allocator(self, samples: list) -> None:
        """The controller's state, from its samples of this cycle (any allocator that
        emits slo_controller_decision)."""
        self._controller_alarm = None
        for s in samples:
            if isinstance(s, dict) and s.get("name") == "slo_controller_decision":
                action = (s.get("labels") or {}).get("action")
                if action in CONTROLLER_ALARMS:
                    self._controller_alarm = CONTROLLER_ALARMS[action] or self.contention_cut

    # -- the cycle ---------------------------------------------------------------------

    def hp_tasks(self, frame: dict) -> Set[str]:
        return {t for t, task in frame["tasks"].items()
                if _matches(task.get("labels") or {}, self.hp_labels)}

    def cycle(self, frame: dict, current: Optional[Dict[str, dict]] = None) -> List[dict]:
        """This cycle's samples: the headroom and its terms, per zone and for the node."""
        ts = float(frame["ts"])
        if self._started is None:
            self._started = ts
        platform = frame.get("platform") or {}
        tasks = frame["tasks"]
        hp = self.hp_tasks(frame)
        zones = self._zones(platform)
        usage = self._usage(ts, platform, tasks, hp, zones, current or {})
        slack, risk_ratio, reasons = self._risk(ts, tasks, hp)
        stale = self._stale(ts, reasons)
        holding = HOLD_INPUT in reasons
        if ALARMS & set(reasons):
            self._last_alarm = ts
        calm = ts - self._last_alarm >= self.grow_after
        derivations: Dict[Tuple[str, str], Derivation] = {}
        total_cpus = sum(len(z.cpus) for z in zones.values()) or 1
        total_memory = sum(z.memory_bytes for z in zones.values()) or 1
        grew_limited = waited = False
        for name, zone in zones.items():
            window = self._window(name, ts, usage.get(name))
            for resource in RESOURCES:
                capacity = float(len(zone.cpus)) if resource == "cpu" else zone.memory_bytes
                share = capacity / (total_cpus if resource == "cpu" else total_memory)
                absolute = self.reserve_cpus if resource == "cpu" else self.reserve_memory_bytes
                hp_used = percentile([getattr(u, f"hp_{resource}") for u in window],
                                     self.percentile) if window else 0.0
                system = percentile([getattr(u, f"system_{resource}") for u in window],
                                    self.percentile) if window else 0.0
                hp_used = min(max(0.0, hp_used), capacity)
                system = min(max(0.0, system), capacity - hp_used)
                reserve = min(self.reserve_ratio * capacity + absolute * share,
                              capacity - hp_used - system)
                available = capacity - hp_used - system - reserve
                target = 0.0 if stale or not window else available * (1 - risk_ratio)
                before = self._published.get((name, resource), 0.0)
                if target <= before:
                    now = target
                elif holding:
                    now = before
                elif not calm:
                    now, waited = before, True
                else:
                    now = min(target, before + self.grow_step_ratio * capacity)
                    grew_limited = grew_limited or now < target
                self._published[(name, resource)] = now
                derivations[(name, resource)] = Derivation(
                    capacity, hp_used, system, reserve, available - now, now)
        if grew_limited:
            reasons.append(GROWTH_STEP)
        if waited:
            reasons.append(GROWTH_WAIT)
        if stale:
            reasons = [r for r in reasons if r.startswith("stale_")]
        self._log(derivations, zones, reasons, slack)
        return self._samples(derivations, zones, reasons, slack, risk_ratio, ts)

    # -- usage -------------------------------------------------------------------------

    def _zones(self, platform: dict) -> Dict[str, Zone]:
        usage = platform.get("platform_cpu_usage")
        cpus = frozenset(usage) if isinstance(usage, dict) and usage else frozenset(
            str(i) for i in range(int(_number(platform.get("platform_topology_cpus")) or 0)))
        if self._cpus is not None:
            cpus = cpus & self._cpus
        memory = _number(platform.get("platform_mem_total_bytes")) or 0.0
        free = platform.get("platform_mem_numa_free_bytes")
        used = platform.get("platform_mem_numa_used_bytes")
        if self.numa and isinstance(free, dict) and isinstance(used, dict) and len(free) > 1:
            node_cpus = self._node_cpus()
            if node_cpus and set(node_cpus) >= set(free):
                return {n: Zone(node_cpus[n] & cpus,
                                (_number(free.get(n)) or 0.0) + (_number(used.get(n)) or 0.0))
                        for n in sorted(free, key=_numeric)}
        return {NODE: Zone(cpus, memory)}

    def _node_cpus(self) -> Dict[str, FrozenSet[str]]:
        """NUMA node -> its CPUs, from sysfs (read once: CPUs do not change node)."""
        if self._numa_cpus is None:
            self._numa_cpus = {}
            base = os.path.join(Paths(sysfs=self.sysfs).sysfs, "devices/system/node")
            try:
                names = os.listdir(base)
            except OSError:
                names = []
            for entry in names:
                if entry.startswith("node") and entry[4:].isdigit():
                    try:
                        with open(os.path.join(base, entry, "cpulist")) as f:
                            cpus = parse_cpu_list(f.read().strip() or "")
                    except (OSError, ValueError):
                        continue
                    self._numa_cpus[entry[4:]] = frozenset(str(c) for c in cpus)
        return self._numa_cpus

    def _usage(self, ts, platform, tasks, hp, zones, current) -> Dict[str, Usage]:
        """This cycle's usage per zone; {} (and the input marked missing) when a rate
        cannot be had yet."""
        cpu_now = platform.get("platform_cpu_usage")
        cpu_now = {c: v for c, v in cpu_now.items() if _number(v) is not None} \
            if isinstance(cpu_now, dict) else {}
        task_cpu = {t: _number((task.get("metrics") or {}).get("task_cpu_usage_seconds"))
                    for t, task in tasks.items()}
        prev, self._prev = self._prev, (ts, cpu_now, {t: v for t, v in task_cpu.items()
                                                      if v is not None})
        out = {name: Usage() for name in zones}
        all_cpus = frozenset().union(*(z.cpus for z in zones.values()))
        cpu_ok = False
        # Rates across a gap longer than stale_after (the measurements stopped) would
        # average what nobody saw: the input counts as missing over the gap.
        # A rate needs the CPU figures of both frames: the first after a gap has none.
        if prev is not None and cpu_now and prev[1] and 0 < ts - prev[0] <= self.stale_after:
            dt = ts - prev[0]
            for name, zone in zones.items():
                busy = sum(max(0, cpu_now[c] - prev[1][c]) for c in zone.cpus
                           if c in cpu_now and c in prev[1]) / USER_HZ / dt
                out[name].system_cpu = busy
            for task_id, used in task_cpu.items():
                before = prev[2].get(task_id)
                if used is None or before is None or used < before:
                    continue   # a new task, or a counter that restarted: no rate this cycle
                rate = (used - before) / dt
                for name, part in self._shares(task_id, current, zones, all_cpus).items():
                    out[name].system_cpu -= rate * part
                    if task_id in hp:
                        out[name].hp_cpu += rate * part
            cpu_ok = True
        if cpu_ok:
            self._last_good["cpu"] = ts
        memory_ok = _number(platform.get("platform_mem_usage_bytes")) is not None
        if memory_ok:
            self._last_good["memory"] = ts
            numa_used = platform.get("platform_mem_numa_used_bytes")
            for name in zones:
                if name == NODE:
                    out[name].system_memory = _number(platform["platform_mem_usage_bytes"]) or 0
                else:
                    out[name].system_memory = _number((numa_used or {}).get(name)) or 0.0
            total = sum(z.memory_bytes for z in zones.values()) or 1.0
            for task_id, task in tasks.items():
                m = task.get("metrics") or {}
                used = _number(m.get("task_mem_usage_bytes"))
                if used is None:
                    continue
                pages = m.get("task_mem_numa_pages")
                for name, zone in zones.items():
                    if name != NODE and isinstance(pages, dict) and \
                            _number(pages.get(name)) is not None:
                        part = (_number(pages[name]) or 0.0) * PAGE_SIZE
                    else:
                        part = used * zone.memory_bytes / total
                    out[name].system_memory -= part
                    if task_id in hp:
                        out[name].hp_memory += part
        if not (cpu_ok and memory_ok):
            return {}
        return out

    def _shares(self, task_id, current, zones, all_cpus) -> Dict[str, float]:
        """Which part of a task's CPU time each zone holds: by its cpuset where owca-allocate
        read one, else by the zones' sizes."""
        cpus = all_cpus
        cpuset = (current.get(task_id) or {}).get(CPUSET_CPUS)
        if cpuset and len(zones) > 1:
            try:
                cpus = frozenset(str(c) for c in parse_cpu_list(str(cpuset))) & all_cpus
            except ValueError:
                cpus = all_cpus
        cpus = cpus or all_cpus
        if not cpus:   # `cpus` names none of the online CPUs: nothing to share
            return {name: 0.0 for name in zones}
        return {name: len(zone.cpus & cpus) / len(cpus) for name, zone in zones.items()}

    def _window(self, zone: str, ts: float, usage: Optional[Usage]) -> List[Usage]:
        history = self._history.setdefault(zone, deque())
        if usage is not None:
            history.append((ts, usage))
        while history and history[0][0] <= ts - self.window:
            history.popleft()
        return [u for _, u in history]

    # -- risk --------------------------------------------------------------------------

    def _risk(self, ts: float, tasks: dict, hp: Set[str]) -> Tuple[float, float, List[str]]:
        """(the worst HP slack, the share withheld for risk, the reasons).  Notes when the
        SLIs were last all fresh: a report missing, or repeated unchanged (a stalled
        wrapper), ages the input."""
        reasons: List[str] = []
        worst = None
        missing = False
        for task_id in sorted(hp):
            m = tasks[task_id].get("metrics") or {}
            pressure = _pressure(m)
            seen = self._sli.get(task_id)
            if pressure is None:
                missing = True
                if seen is None:
                    self._sli[task_id] = (None, ts)   # a new HP task: its SLI ages from now
                continue
            report = report_identity(m)
            if seen is None or seen[0] != report:
                self._sli[task_id] = (report, ts)
            worst = pressure if worst is None else max(worst, pressure)
        for gone in set(self._sli) - hp:
            del self._sli[gone]
        self._sli_missing = missing and self.require_sli
        if hp and self.require_sli:
            self._last_good["sli"] = min(self._sli[t][1] for t in hp)
        else:
            self._last_good["sli"] = ts
        slack = 1.0 - worst if worst is not None else 1.0
        ratio = 0.0
        if worst is not None and worst > 1:
            ratio = 1.0
            reasons.append(SLO_BROKEN)
        elif slack < self.calm_slack:
            ratio = (self.calm_slack - slack) / self.calm_slack
            reasons.append(SLACK)
        if ts < self._flagged_until:
            ratio = max(ratio, self.contention_cut)
            reasons.append(CONTENTION)
        if self._controller_alarm is not None:
            ratio = max(ratio, self._controller_alarm)
            reasons.append(CONTROLLER)
        return slack, min(1.0, ratio), reasons

    def _stale(self, ts: float, reasons: List[str]) -> bool:
        """Whether an input has been missing (or frozen) for stale_after: reasons get
        stale_*; one missing now but not for so long holds the headroom (input_missing)."""
        assert self._started is not None, "cycle() sets it first"
        stale = False
        for name, reason in (("cpu", STALE_CPU), ("memory", STALE_MEMORY), ("sli", STALE_SLI)):
            last = self._last_good.get(name, self._started)
            missing_now = self._sli_missing if name == "sli" else \
                self._last_good.get(name) != ts
            if ts - last > self.stale_after:
                reasons.append(reason)
                stale = True
            elif missing_now and HOLD_INPUT not in reasons:
                reasons.append(HOLD_INPUT)
        return stale

    # -- what is said ------------------------------------------------------------------

    def _samples(self, derivations, zones, reasons, slack, risk_ratio, ts) -> List[dict]:
        out: List[dict] = []
        numa = len(zones) > 1
        for resource in RESOURCES:
            node = Derivation(0, 0, 0, 0, 0, 0)
            for name in zones:
                d = derivations[(name, resource)]
                for term in TERMS + ("headroom",):
                    setattr(node, term, getattr(node, term) + getattr(d, term))
                if numa:
                    labels = {"numa_node": name}
                    out.append(frames.sample(metric_name(resource, None, True),
                                             _round(d.headroom), labels))
                    for term, value in d.terms().items():
                        out.append(frames.sample(metric_name(resource, term, True),
                                                 _round(value), labels))
            out.append(frames.sample(metric_name(resource, None), _round(node.headroom)))
            for term, value in node.terms().items():
                out.append(frames.sample(metric_name(resource, term), _round(value)))
        out.append(frames.sample("headroom_slack", round(slack, 6)))
        out.append(frames.sample("headroom_risk_ratio", round(risk_ratio, 6)))
        for name in ("cpu", "memory", "sli"):
            last = self._last_good.get(name, self._started)
            out.append(frames.sample("headroom_input_age_seconds", round(ts - last, 3),
                                     {"input": name}))
        for reason in reasons or ["none"]:
            out.append(frames.sample("headroom_reason", 1, {"reason": reason}))
        return out

    def _log(self, derivations, zones, reasons, slack) -> None:
        """One line when what limits the headroom changes, with the node's derivation."""
        key = tuple(sorted(reasons))
        if key == self._reasons:
            return
        self._reasons = key
        parts = []
        for resource in RESOURCES:
            sums = [sum(getattr(derivations[(z, resource)], t) for z in zones)
                    for t in TERMS + ("headroom",)]
            scale, unit = (1, "cores") if resource == "cpu" else (2 ** -20, "MiB")
            parts.append(f"{resource} {sums[5] * scale:.2f} = " + " - ".join(
                f"{t} {v * scale:.2f}" for t, v in zip(TERMS, sums[:5], strict=True)) + f" {unit}")
        log.info("headroom %s (slack %.2f; %s)", "; ".join(parts), slack,
                 ", ".join(reasons) or "no limit")


def _number(x) -> Optional[float]:
    if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x):
        return float(x)
    return None


def _numeric(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)


def _round(value: float) -> float:
    return round(value, 6) if abs(value) < 1e6 else float(round(value))

