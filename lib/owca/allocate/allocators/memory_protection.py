"""MemoryProtection: high-priority (HP) tasks keep their pages; best-effort (BE) memory
is reclaimed by pressure.

Every cycle, from the measurements alone:

- each HP task is protected with memory.min (or memory.low; v1: the soft limit) at its
  measured working set times `protect_margin`, or at its request (`protect: request`);
  the value is rewritten only when it moved by more than `protect_hysteresis`;
- the trigger is on when an HP task's memory pressure (PSI some avg10) or its refaults
  per cycle pass their thresholds, or the node's memory pressure does;
- trigger on: every BE task's memory.high is lowered at once by `lower_fraction` (from
  its usage, the first time), never below `be_floor_bytes`: the kernel throttles and
  reclaims the BE task instead of the HP one;
- trigger off for `calm_cycles` in a row: memory.high is raised by `raise_fraction`,
  one step per `calm_cycles`; above the node's memory it is withdrawn (the task's own
  value is restored).  Fast down, slow up: the shape of openEuler rubik's and Meta
  Senpai's controllers, so that a pressure spike is answered in one cycle and an
  easing one does not let BE refill the node at once;
- optional proactive reclaim (`reclaim: true`, v2 with memory.reclaim): a BE task whose
  own memory pressure stays under `reclaim_pressure_target` gives back
  `reclaim_fraction` of its usage a cycle (memory_reclaim), cold pages first.

Every decision is a sample of memory_protection_decision{task_id, action, reason}.

It works beside the SloController, or inside it (`SloController.memory`): memory
pressure moves at its own pace, on its own signals (PSI, refaults), not on the HP
SLI the CPU levels follow; docs/control.md says why.  On cgroup v1 there is no
memory.high: BE tasks are limited with memory.limit_in_bytes only where
`v1_be_limit` says so (a task at a v1 limit it cannot reclaim under is OOM-killed,
not throttled).
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca.core import frames
from owca.core.allocation import (MEMORY_HIGH, MEMORY_LOW, MEMORY_MAX, MEMORY_MIN,
                                  MEMORY_RECLAIM)
from owca.core.kernel import PAGE_SIZE
from owca.core.paths import Paths
from owca.plugin import Allocator
from owca.allocate.memory_files import memory_support

log = logging.getLogger("owca.memory_protection")

# What a decision was (label action) and why (label reason).
PROTECT, LOWER, RAISE, RELEASE, HOLD, RECLAIM = ("protect", "lower", "raise", "release",
                                                 "hold", "reclaim")
HP_PRESSURE, HP_REFAULTS, NODE_PRESSURE = "hp_pressure", "hp_refaults", "node_pressure"
CALM, WAITING, FLOOR, WORKING_SET, REQUEST = "calm", "waiting", "floor", "working_set", \
    "request"
NO_SIGNAL, BE_PRESSURE = "no_signal", "be_pressure"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pages(n: float) -> int:
    return int(n) // PAGE_SIZE * PAGE_SIZE


@dataclass
class Be:
    high: Optional[int] = None    # what OWCA set (None: nothing, the task's own value)
    calm: int = 0                 # cycles in a row without the trigger


@dataclass
class MemoryProtection(Allocator):
    hp_labels: Dict[str, str] = field(default_factory=lambda: {"priority": "hp"})
    be_labels: Dict[str, str] = field(default_factory=lambda: {"priority": "be"})
    # -- protecting HP ---------------------------------------------------------------
    protect: str = WORKING_SET          # working_set | request | none
    protect_with: str = "min"           # min | low (v1: always the soft limit)
    protect_margin: float = 1.1
    protect_hysteresis: float = 0.1
    # -- the trigger ------------------------------------------------------------------
    hp_pressure_percent: float = 5.0    # HP memory PSI some avg10
    hp_refault_pages: int = 256         # HP refaults (anon + file) in one cycle
    node_pressure_percent: float = 10.0  # node memory PSI some avg10
    # -- BE memory.high ---------------------------------------------------------------
    be_floor_bytes: int = 64 << 20
    lower_fraction: float = 0.2
    raise_fraction: float = 0.05
    calm_cycles: int = 3
    v1_be_limit: bool = False
    # -- proactive reclaim of BE cold memory -----------------------------------------
    reclaim: bool = False
    reclaim_fraction: float = 0.01
    reclaim_pressure_target: float = 0.1   # BE's own memory PSI some avg10, percent
    # -- where the kernel is ---------------------------------------------------------
    hierarchy: str = "auto"             # auto | v1 | v2
    cgroupfs: str = "/sys/fs/cgroup"

    reads_current_allocations = False
    memory_types = (MEMORY_MIN, MEMORY_LOW, MEMORY_HIGH, MEMORY_RECLAIM)

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(what)
        need(self.protect in (WORKING_SET, REQUEST, "none"),
             "protect: working_set, request or none")
        need(self.protect_with in ("min", "low"), "protect_with: min or low")
        need(self.protect_margin >= 1, "protect_margin: at least 1")
        need(0 <= self.protect_hysteresis < 1, "protect_hysteresis: in [0, 1)")
        need(self.hp_pressure_percent > 0 and self.node_pressure_percent > 0,
             "hp_pressure_percent, node_pressure_percent: above 0")
        need(self.hp_refault_pages > 0, "hp_refault_pages: above 0")
        need(self.be_floor_bytes >= PAGE_SIZE, "be_floor_bytes: at least a page")
        need(0 < self.lower_fraction < 1 and 0 < self.raise_fraction < 1,
             "lower_fraction, raise_fraction: in (0, 1)")
        need(self.raise_fraction < self.lower_fraction,
             "raise_fraction: below lower_fraction (down fast, up slowly)")
        need(self.calm_cycles >= 1, "calm_cycles: at least 1")
        need(0 < self.reclaim_fraction < 1, "reclaim_fraction: in (0, 1)")
        need(self.reclaim_pressure_target >= 0, "reclaim_pressure_target: not negative")
        need(self.hierarchy in ("auto", "v1", "v2"), "hierarchy: auto, v1 or v2")
        self._be: Dict[str, Be] = {}
        self._protected: Dict[str, int] = {}        # HP task -> bytes set
        self._refaults: Dict[str, float] = {}       # HP task -> last refault counter
        self._refused: Optional[set] = None         # types this kernel lacks
        self.lowered_total = self.raised_total = self.reclaimed_bytes_total = 0

    # -- the kernel ----------------------------------------------------------------------

    def _kernel(self) -> set:
        """The types the node cannot be given, looked up once."""
        if self._refused is None:
            if self.hierarchy == "auto":
                support = memory_support(Paths(cgroupfs=self.cgroupfs))
                self.hierarchy = support.hierarchy or "v2"
                self._refused = set(support.refused)
            else:
                self._refused = {MEMORY_MIN, MEMORY_HIGH, MEMORY_RECLAIM} \
                    if self.hierarchy == "v1" else set()
        return self._refused

    def _protect_type(self) -> str:
        return MEMORY_LOW if self.protect_with == "low" or MEMORY_MIN in self._kernel() \
            else MEMORY_MIN

    def _be_type(self) -> Optional[str]:
        if MEMORY_HIGH not in self._kernel():
            return MEMORY_HIGH
        return MEMORY_MAX if self.v1_be_limit and MEMORY_MAX not in self._kernel() else None

    # -- the cycle -------------------------------------------------------------------

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        self._kernel()
        platform = getattr(platform, "metrics", None) or {}    # owca.plugin.Platform's
        hp = sorted(t for t, labels in tasks_labels.items() if _matches(labels, self.hp_labels))
        be = sorted(t for t, labels in tasks_labels.items()
                    if _matches(labels, self.be_labels) and t not in hp)
        allocations: Dict[str, dict] = {}
        metrics: List[dict] = []
        self._withdraw_gone(hp, be, tasks_labels, allocations)
        for task_id in hp:
            self._protect(task_id, tasks_measurements.get(task_id, {}),
                          tasks_resources.get(task_id, {}), allocations, metrics)
        reasons = self._trigger(hp, platform, tasks_measurements, metrics)
        for task_id in be:
            self._limit(task_id, tasks_measurements.get(task_id, {}), reasons, platform,
                        allocations, metrics)
        metrics += [
            frames.sample("memory_protection_triggered", int(bool(reasons))),
            frames.sample("memory_protection_lowered_total", self.lowered_total,
                          type="counter"),
            frames.sample("memory_protection_raised_total", self.raised_total, type="counter"),
            frames.sample("memory_protection_reclaim_requested_bytes_total",
                          self.reclaimed_bytes_total, type="counter")]
        metrics += [frames.sample("memory_protection_trigger", 1, {"reason": r})
                    for r in reasons]
        return allocations, [], metrics

    def _withdraw_gone(self, hp, be, tasks_labels, allocations) -> None:
        """A task that is no longer HP (or BE) gets its own values back; one that went
        is restored by owca-allocate: its state is only forgotten here."""
        for task_id in sorted(set(self._protected) - set(hp)):
            del self._protected[task_id]
            self._refaults.pop(task_id, None)
            if task_id in tasks_labels:
                allocations.setdefault(task_id, {})[self._protect_type()] = None
        for task_id in sorted(set(self._refaults) - set(hp)):
            del self._refaults[task_id]
        for task_id in sorted(set(self._be) - set(be)):
            state = self._be.pop(task_id)
            be_type = self._be_type()
            if task_id in tasks_labels and state.high is not None and be_type:
                allocations.setdefault(task_id, {})[be_type] = None

    # -- HP ----------------------------------------------------------------------------

    def _protect(self, task_id, m, resources, allocations, metrics) -> None:
        if self.protect == "none" or self._protect_type() in self._kernel():
            return      # (no memory controller at all: nothing to protect with)
        if self.protect == REQUEST:
            want, reason = resources.get("mem_bytes"), REQUEST
        else:
            ws = m.get("task_mem_working_set_bytes")
            want, reason = (ws * self.protect_margin if _finite(ws) else None), WORKING_SET
        if not _finite(want) or want <= 0:
            metrics.append(_decision(task_id, HOLD, NO_SIGNAL))
            return
        target = _pages(want)
        had = self._protected.get(task_id)
        if had is not None and abs(target - had) <= self.protect_hysteresis * had:
            target = had
        else:
            self._protected[task_id] = target
            allocations.setdefault(task_id, {})[self._protect_type()] = target
            metrics.append(_decision(task_id, PROTECT, reason))
        metrics.append(frames.sample("memory_protection_hp_protected_bytes", target,
                                     {"task_id": task_id}))

    def _trigger(self, hp, platform, tasks_measurements, metrics) -> List[str]:
        """Why BE memory must shrink this cycle (empty: calm)."""
        reasons = set()
        for task_id in hp:
            m = tasks_measurements.get(task_id, {})
            some = _memory_psi(m.get("task_pressure_avg10_percent"))
            if some is not None and some > self.hp_pressure_percent:
                reasons.add(HP_PRESSURE)
            refaults = m.get("task_mem_workingset_refaults")
            if isinstance(refaults, dict):
                total = sum(v for v in refaults.values() if _finite(v))
                last = self._refaults.get(task_id)
                self._refaults[task_id] = total
                if last is not None and total >= last:
                    delta = total - last
                    metrics.append(frames.sample("memory_protection_hp_refault_pages", delta,
                                                 {"task_id": task_id}))
                    if delta > self.hp_refault_pages:
                        reasons.add(HP_REFAULTS)
        node = platform.get("platform_mem_pressure_avg10_percent")
        if isinstance(node, dict) and _finite(node.get("some")) and \
                node["some"] > self.node_pressure_percent:
            reasons.add(NODE_PRESSURE)
        return sorted(reasons)

    # -- BE ----------------------------------------------------------------------------

    def _limit(self, task_id, m, reasons, platform, allocations, metrics) -> None:
        be_type = self._be_type()
        state = self._be.setdefault(task_id, Be())
        usage = m.get("task_mem_usage_bytes")
        if be_type is not None:
            if reasons:
                state.calm = 0
                self._lower(task_id, state, usage, be_type, reasons, allocations, metrics)
            elif state.high is not None:
                state.calm += 1
                self._raise(task_id, state, be_type, platform, allocations, metrics)
            if state.high is not None:
                metrics.append(frames.sample("memory_protection_be_high_bytes", state.high,
                                             {"task_id": task_id}))
        if self.reclaim and MEMORY_RECLAIM not in self._kernel() and not reasons:
            self._reclaim(task_id, m, usage, allocations, metrics)

    def _lower(self, task_id, state, usage, be_type, reasons, allocations, metrics):
        base = state.high if state.high is not None else usage
        if not _finite(base):
            metrics.append(_decision(task_id, HOLD, NO_SIGNAL))
            return
        new = max(self.be_floor_bytes, _pages(base * (1 - self.lower_fraction)))
        if state.high is not None and new >= state.high:
            metrics.append(_decision(task_id, HOLD, FLOOR))
            return
        state.high = new
        allocations.setdefault(task_id, {})[be_type] = new
        self.lowered_total += 1
        for reason in reasons:
            metrics.append(_decision(task_id, LOWER, reason))

    def _raise(self, task_id, state, be_type, platform, allocations, metrics):
        if state.calm < self.calm_cycles:
            metrics.append(_decision(task_id, HOLD, WAITING))
            return
        state.calm = 0
        ceiling = platform.get("platform_mem_total_bytes")
        new = _pages(state.high * (1 + self.raise_fraction))
        if _finite(ceiling) and new >= ceiling:
            state.high = None
            allocations.setdefault(task_id, {})[be_type] = None   # its own value back
            metrics.append(_decision(task_id, RELEASE, CALM))
            return
        state.high = new
        allocations.setdefault(task_id, {})[be_type] = new
        self.raised_total += 1
        metrics.append(_decision(task_id, RAISE, CALM))

    def _reclaim(self, task_id, m, usage, allocations, metrics):
        own = _memory_psi(m.get("task_pressure_avg10_percent"))
        if own is None or not _finite(usage):
            return      # no pressure figure (v1, or no PSI): never reclaimed blind
        if own > self.reclaim_pressure_target:
            metrics.append(_decision(task_id, HOLD, BE_PRESSURE))
            return
        amount = _pages(usage * self.reclaim_fraction)
        if amount <= 0 or usage - amount < self.be_floor_bytes:
            return
        allocations.setdefault(task_id, {})[MEMORY_RECLAIM] = amount
        self.reclaimed_bytes_total += amount
        metrics.append(_decision(task_id, RECLAIM, CALM))


def _memory_psi(pressure) -> Optional[float]:
    """The memory `some` avg10 of a task's task_pressure_avg10_percent."""
    if isinstance(pressure, dict) and isinstance(pressure.get("memory"), dict):
        some = pressure["memory"].get("some")
        if _finite(some):
            return float(some)
    return None


def _decision(task_id: str, action: str, reason: str) -> dict:
    return frames.sample("memory_protection_decision", 1,
                         {"task_id": task_id, "action": action, "reason": reason})


def _matches(labels: dict, wanted: Dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())
