"""SloController: gives best-effort (BE) tasks what the high-priority (HP) tasks'
service levels leave, and takes it back when an HP task nears its SLO.

Every cycle it reads each HP task's SLI against its SLO (the wrappers'
`apm_sli_normalized`, 1 at the objective, below 1 broken), turns the worst
one into a slack (1 - SLI/SLO), and moves one BE level between 0 (the floor)
and `levels` (the ceiling).  The level sets, for every BE task at once, its CPU
quota, its cpu shares, its cpuset (whole cores: the HP tasks' cores are lent
to BE only at the upper levels) and, where the node has RDT, its L3 ways and
memory bandwidth.  docs/control.md states every parameter and why.

    slack < 0 (SLO broken)        cut: the antagonist a detector named to the floor
                                  first, every BE task to the floor if it persists
    slack < shrink_slack          shrink by shrink_step levels
    slack > grow_slack, HP load   grow by max_step; then watch verify_intervals new
      below load_threshold        SLI reports: worse beyond the noise -> roll back and
                                  back off (doubling) before growing again
    otherwise                     hold (the band between is the hysteresis)

It decides only on a fresh SLI: a missing or stale one holds BE where it is
and says why (`slo_controller_hold{reason}`).  A BE value that someone else
rewrote after OWCA had set it is reported and left to them for a while
(`slo_controller_overridden`), not re-applied every cycle.  On a Kubernetes
node it never gives BE a CPU that the kubelet's CPU manager gave a Guaranteed
pod exclusively (its checkpoint), nor one in `reserved_cpus`.

The allocator decides; owca-allocate writes, and restores every BE task's
original values when it stops (docs/allocation.md).
"""
import logging
import math
import os
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, FrozenSet, List, Optional, Set

from owca.core import frames
from owca.core.allocation import (CPU_IDLE, CPU_QUOTA, CPU_SHARES, CPUSET_CPUS, RDT,
                                  InvalidAllocation,
                                  SHARES_MAX, SHARES_MIN, format_cpu_list, parse_cpu_list,
                                  validate_cpuset_cpus)
from owca.plugin import Allocator
from owca.allocate.allocators.memory_protection import MemoryProtection
from owca.allocate.cpu_manager_state import CheckpointError, CheckpointReader
from owca.core.kernel import online_cpus
from owca.core.paths import Paths
from owca.allocate.resctrl import Resctrl
from owca.allocate.sli import (finite as _finite, matches as _matches,
                               pressure as _pressure, report_identity)
from owca.core.resctrl import ResctrlFS

log = logging.getLogger("owca.slo_controller")

KNOBS = (CPU_QUOTA, CPU_SHARES, CPU_IDLE, CPUSET_CPUS, RDT)

# Why a cycle made no decision (the label of slo_controller_hold).
HOLD_MISSING, HOLD_STALE, HOLD_NO_NEW = "missing_sli", "stale_sli", "no_new_sli"
# What a cycle did (the label of slo_controller_decision).
GROW, SHRINK, CUT, CUT_NAMED, ROLLBACK, HOLD = ("grow", "shrink", "cut", "cut_named",
                                               "rollback", "hold")


@dataclass
class SloRdt:
    """L3 ways and memory bandwidth of the BE tasks' resctrl group, floor to ceiling."""
    group: str = "owca-be"
    l3_ways_floor: int = 1
    l3_ways_ceiling: Optional[int] = None   # None: every way of info/L3/cbm_mask
    mb_floor: int = 10
    mb_ceiling: int = 100
    resctrlfs: str = "/sys/fs/resctrl"

    def __post_init__(self):
        if not self.group.startswith("owca-"):
            raise ValueError("group: must start with 'owca-' (OWCA writes only its own groups)")
        if self.l3_ways_floor < 1 or (self.l3_ways_ceiling is not None and
                                      self.l3_ways_ceiling < self.l3_ways_floor):
            raise ValueError("l3_ways_floor: at least 1, and not above l3_ways_ceiling")
        if not 0 < self.mb_floor <= self.mb_ceiling <= 100:
            raise ValueError("mb_floor, mb_ceiling: expected 0 < floor <= ceiling <= 100")


@dataclass
class Hp:
    """One HP task's SLI history."""
    last_report: Optional[tuple] = None    # None: no SLI in the last cycle
    repeats: int = 0
    loads: deque = field(default_factory=lambda: deque(maxlen=8))
    last_load_report: Optional[tuple] = None


@dataclass
class Trial:
    """A growth step under watch."""
    from_level: int
    to_level: int
    baseline: float
    noise: float
    after: List[float] = field(default_factory=list)


@dataclass
class SloController(Allocator):
    # -- which tasks ---------------------------------------------------------------
    hp_labels: Dict[str, str] = field(default_factory=lambda: {"priority": "hp"})
    be_labels: Dict[str, str] = field(default_factory=lambda: {"priority": "be"})
    # -- the level ---------------------------------------------------------------------
    levels: int = 10
    start_level: int = 0
    # -- when to move ----------------------------------------------------------------
    grow_slack: float = 0.35
    shrink_slack: float = 0.15
    load_metric: str = "apm_load_target_rate_per_second"
    load_threshold: float = 0.85
    surge_ratio: float = 0.25
    peak_loads: Dict[str, float] = field(default_factory=dict)
    max_step: int = 1
    shrink_step: int = 2
    min_dwell: int = 2
    # -- is a step kept ----------------------------------------------------------------
    verify_intervals: int = 3
    noise_k: float = 2.0
    noise_floor: float = 0.15
    backoff: int = 8
    backoff_max: int = 128
    # -- trusting the SLI --------------------------------------------------------------
    stale_cycles: int = 6
    # -- what a level gives BE -------------------------------------------------------
    knobs: List[str] = field(default_factory=lambda: [CPU_QUOTA, CPU_SHARES, CPUSET_CPUS])
    quota_floor: float = 0.05
    quota_ceiling: float = 1.0
    shares_floor: float = 0.02
    shares_ceiling: float = 0.5
    lend_level: int = 5
    be_cpus: Optional[str] = None
    rdt: Optional[SloRdt] = None
    # Memory, on its own signals and at its own pace (docs/control.md, "Memory").
    memory: Optional[MemoryProtection] = None
    # -- the antagonist a detector names ---------------------------------------------
    named_hold: int = 10
    # -- other managers --------------------------------------------------------------
    reserved_cpus: Optional[str] = None
    cpu_manager_state: Optional[str] = None
    override_backoff: int = 30
    sysfs: str = "/sys"

    def __post_init__(self):
        def need(ok, what):
            if not ok:
                raise ValueError(what)
        need(self.levels >= 1, "levels: at least 1")
        need(0 <= self.start_level <= self.levels, "start_level: between 0 and levels")
        need(0 <= self.shrink_slack < self.grow_slack < 1,
             "shrink_slack, grow_slack: expected 0 <= shrink_slack < grow_slack < 1 "
             "(the band between is the hysteresis)")
        need(0 < self.load_threshold <= 1, "load_threshold: in (0, 1]")
        need(self.surge_ratio >= 0, "surge_ratio: not negative")
        need(self.max_step >= 1 and self.shrink_step >= 1, "max_step, shrink_step: at least 1")
        for name in ("min_dwell", "backoff", "named_hold", "override_backoff"):
            need(getattr(self, name) >= 0, f"{name}: not negative")
        need(self.verify_intervals >= 1, "verify_intervals: at least 1")
        need(self.backoff_max >= self.backoff, "backoff_max: not below backoff")
        need(self.stale_cycles >= 2, "stale_cycles: at least 2")
        need(self.noise_k >= 0 and self.noise_floor >= 0, "noise_k, noise_floor: not negative")
        need(0 < self.quota_floor <= self.quota_ceiling <= 1,
             "quota_floor, quota_ceiling: expected 0 < floor <= ceiling <= 1 (share of the "
             "platform)")
        need(SHARES_MIN <= self.shares_floor <= self.shares_ceiling <= SHARES_MAX,
             f"shares_floor, shares_ceiling: expected {SHARES_MIN:g} <= floor <= ceiling <= "
             f"{SHARES_MAX:g}")
        need(0 <= self.lend_level <= self.levels + 1, "lend_level: between 0 and levels + 1")
        unknown = set(self.knobs) - set(KNOBS)
        need(not unknown, f"knobs: unknown {sorted(unknown)} (knobs: {', '.join(KNOBS)})")
        need(not {CPU_IDLE, CPU_SHARES} <= set(self.knobs),
             "knobs: cpu_idle or cpu_shares, not both (the kernel fixes an idle cgroup's "
             "weight)")
        need((RDT in self.knobs) == (self.rdt is not None),
             "knobs: rdt needs the rdt section, and the rdt section needs rdt in knobs")
        for name in ("be_cpus", "reserved_cpus"):
            value = getattr(self, name)
            if value is not None:
                try:
                    setattr(self, name, validate_cpuset_cpus(value))
                except InvalidAllocation as e:
                    raise ValueError(f"{name}: {e}") from None
        self.level = self.start_level
        self.cycle = 0
        self._hp: Dict[str, Hp] = {}
        self._trial: Optional[Trial] = None
        # The worst HP pressure of each fresh cycle.
        self._worst: Deque[float] = deque(maxlen=16)
        self._cut_named: Set[str] = set()
        self._last_change = -10 ** 9
        self._backoff_until = -1
        self._consecutive_rollbacks = 0
        self._violating = 0             # consecutive cycles with a broken SLO
        self._named: Dict[str, int] = {}   # BE task named by a detector -> cycle until cut
        self._anomalies: list = []
        self._sent: Dict[str, Dict[str, object]] = {}
        self._confirmed: Dict[str, Dict[str, object]] = {}
        self._overridden: Dict[str, Dict[str, int]] = {}   # task -> type -> cycle until
        self._override_count: Dict[tuple, int] = {}
        self._logged: Set[tuple] = set()   # keys of the warnings logged once
        self.changes_total = self.rollbacks_total = self.overrides_total = 0
        self.checkpoint_errors_total = 0
        self._checkpoint = CheckpointReader(self.cpu_manager_state) \
            if self.cpu_manager_state else None
        self._resctrl = Resctrl(ResctrlFS(self.rdt.resctrlfs)) if self.rdt else None

    # -- inputs from other stages ----------------------------------------------------

    def observe_anomalies(self, anomalies: List[dict]) -> None:
        """The detector's anomalies (owca-allocate hands over each anomalies frame's)."""
        self._anomalies = list(anomalies)

    # -- the cycle ---------------------------------------------------------------------

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        self.cycle += 1
        hp = sorted(t for t, labels in tasks_labels.items() if _matches(labels, self.hp_labels))
        be = sorted(t for t, labels in tasks_labels.items()
                    if _matches(labels, self.be_labels) and t not in hp)
        metrics: List[dict] = []
        self._note_named(be)
        self._cut_named = set(self._named)
        for gone in set(self._hp) - set(hp):
            del self._hp[gone]
        decision, hold = self._decide(hp, tasks_measurements, tasks_labels, metrics)
        metrics.append(frames.sample("slo_controller_be_level", self.level))
        metrics.append(frames.sample("slo_controller_decision", 1, {"action": decision}))
        if hold:
            metrics.append(frames.sample("slo_controller_hold", 1, {"reason": hold}))
        allocations = self._allocations(platform, hp, be, tasks_allocations, metrics)
        metrics += [
            frames.sample("slo_controller_changes_total", self.changes_total, type="counter"),
            frames.sample("slo_controller_rollbacks_total", self.rollbacks_total,
                          type="counter"),
            frames.sample("slo_controller_overrides_total", self.overrides_total,
                          type="counter")]
        if self._checkpoint:
            metrics.append(frames.sample("slo_controller_cpu_manager_state_errors_total",
                                         self.checkpoint_errors_total, type="counter"))
        if self.memory is not None:     # memory types: none of the CPU knobs'
            memory, _, memory_metrics = self.memory.allocate(
                platform, tasks_measurements, tasks_resources, tasks_labels, {})
            for task_id, values in memory.items():
                allocations.setdefault(task_id, {}).update(values)
            metrics += memory_metrics
        return allocations, [], metrics

    @property
    def memory_types(self):
        return self.memory.memory_types if self.memory is not None else ()

    # -- deciding the level --------------------------------------------------------------

    def _decide(self, hp, tasks_measurements, tasks_labels, metrics):
        """(action, hold reason or None); moves self.level."""
        pressures, fresh, hold, busy = [], False, None, False
        for task_id in hp:
            state = self._hp.setdefault(task_id, Hp())
            m = tasks_measurements.get(task_id, {})
            pressure = _pressure(m)
            if pressure is None:
                hold = hold or HOLD_MISSING
                state.last_report, state.repeats = None, 0
                continue
            report = report_identity(m, self.load_metric)
            if report == state.last_report:
                state.repeats += 1
            else:
                state.last_report, state.repeats = report, 0
                fresh = True
            if state.repeats >= self.stale_cycles:
                hold = hold or HOLD_STALE
            pressures.append(pressure)
            metrics.append(frames.sample("slo_controller_hp_pressure", round(pressure, 6),
                                         {"task_id": task_id}))
            busy = busy or self._load_busy(task_id, state, m, tasks_labels.get(task_id, {}))
        if hold:
            # Holding, not cutting: the last safe setting stays.  A broken SLO that is
            # still measured (another HP task) is acted on all the same.
            if pressures and max(pressures) > 1.0 and fresh:
                return self._violation(), hold
            return HOLD, hold
        if not hp:
            # Nothing to protect: BE may have the node, step by step.
            return self._grow(None), None
        worst = max(pressures)
        slack = 1.0 - worst
        metrics.append(frames.sample("slo_controller_slack", round(slack, 6)))
        if not fresh:
            return HOLD, HOLD_NO_NEW
        self._worst.append(worst)
        if worst > 1.0:
            return self._violation(), None
        self._violating = 0
        if self._trial is not None:
            verdict = self._watch(self._trial, worst)
            if verdict is not None:
                return verdict, None
        if slack < self.shrink_slack:
            return self._shrink(), None
        if slack > self.grow_slack and not busy:
            return self._grow(worst), None
        return HOLD, None

    def _load_busy(self, task_id, state, m, labels) -> bool:
        """Whether the HP's load forbids growth: above `load_threshold` of its peak (from
        `peak_loads`), or, without a known peak, rising: more than `surge_ratio` above
        the mean of its last reports."""
        load = m.get(self.load_metric)
        if not _finite(load):
            return False
        peak = self.peak_loads.get(task_id) or self.peak_loads.get(labels.get("workload", ""))
        if peak:
            return load >= self.load_threshold * peak
        recent = list(state.loads)
        if state.last_load_report != state.last_report:
            state.last_load_report = state.last_report
            state.loads.append(load)
        return bool(recent) and load > (1.0 + self.surge_ratio) * statistics.fmean(recent)

    def _dwelt(self) -> bool:
        return self.cycle - self._last_change >= self.min_dwell

    def _set(self, level: int) -> None:
        level = max(0, min(self.levels, level))
        if level != self.level:
            self.level = level
            self._last_change = self.cycle
            self.changes_total += 1

    def _grow(self, worst: Optional[float]) -> str:
        if self.level >= self.levels or not self._dwelt() or self.cycle < self._backoff_until \
                or self._trial is not None:
            return HOLD
        before = self.level
        self._set(before + self.max_step)
        if worst is not None:
            recent = list(self._worst)
            baseline = statistics.fmean(recent[-self.verify_intervals:])
            noise = statistics.pstdev(recent[-8:]) if len(recent) > 1 else 0.0
            self._trial = Trial(before, self.level, baseline, noise)
        return GROW

    def _shrink(self) -> str:
        self._trial = None
        if self.level == 0 or not self._dwelt():
            return HOLD
        self._set(self.level - self.shrink_step)
        return SHRINK

    def _violation(self) -> str:
        self._violating += 1
        if self._trial is not None:
            self._rolled_back()   # the step we were watching broke the SLO
        named = [t for t, until in self._named.items() if until >= self.cycle]
        if named and self._violating == 1:
            # The antagonist the detector named is at the floor already; the rest of
            # BE shrinks.  If the SLO is still broken next cycle, everything is cut.
            if self.level > 0:
                self._set(self.level - self.shrink_step)
            return CUT_NAMED
        self._set(0)
        return CUT

    def _watch(self, trial: Trial, worst: float) -> Optional[str]:
        """The verdict on the step under watch (`trial`, self._trial) once it has been
        watched long enough: ROLLBACK, or None when it is kept or still watched."""
        trial.after.append(worst)
        if len(trial.after) < self.verify_intervals:
            return None
        self._trial = None
        after = statistics.fmean(trial.after)
        allowed = max(self.noise_k * trial.noise, self.noise_floor * trial.baseline)
        if after > trial.baseline + allowed:
            self._set(trial.from_level)
            self._rolled_back()
            return ROLLBACK
        self._consecutive_rollbacks = 0
        return None

    def _rolled_back(self) -> None:
        self._trial = None
        self.rollbacks_total += 1
        self._consecutive_rollbacks += 1
        wait = min(self.backoff_max, self.backoff * 2 ** (self._consecutive_rollbacks - 1))
        self._backoff_until = self.cycle + wait

    def _note_named(self, be: List[str]) -> None:
        """BE tasks a detector named as contending, cut for `named_hold` cycles."""
        for a in self._anomalies:
            for task_id in a.get("contending_task_ids") or ():
                if task_id in be:
                    self._named[task_id] = self.cycle + self.named_hold
        self._anomalies = []
        for task_id in [t for t, until in self._named.items()
                        if until < self.cycle or t not in be]:
            del self._named[task_id]

    # -- what the level gives ------------------------------------------------------------

    def _allocations(self, platform, hp, be, current, metrics) -> Dict[str, dict]:
        if not be:
            return {}
        fraction = self.level / self.levels
        cut = self._cut_named if self.level > 0 else set()
        wanted = {}
        cpus = self._cpusets(platform, hp, current, metrics) if CPUSET_CPUS in self.knobs \
            else None
        rdt = self._rdt_values(fraction, metrics) if RDT in self.knobs else None
        for task_id in be:
            f = 0.0 if task_id in cut else fraction
            values = {}
            if CPU_QUOTA in self.knobs:
                values[CPU_QUOTA] = self._quota(0 if task_id in cut else self.level, len(be),
                                                cpus[2] if cpus else None)
            if CPU_IDLE in self.knobs:
                # At every level: an idle-class task takes only CPU time no HP task wants,
                # so the level's quota and cpus bound it, and the scheduler keeps it out of
                # the HP's way within them.
                values[CPU_IDLE] = 1
            if CPU_SHARES in self.knobs:
                values[CPU_SHARES] = round(self.shares_floor * (
                    self.shares_ceiling / self.shares_floor) ** f, 4)
            if cpus is not None:
                values[CPUSET_CPUS] = cpus[0] if task_id in cut else cpus[1]
            if rdt is not None:
                values[RDT] = rdt[0] if task_id in cut else rdt[1]
            wanted[task_id] = values
            if task_id in cut:
                metrics.append(frames.sample("slo_controller_named_cut", 1,
                                             {"task_id": task_id}))
        return self._respect_others(wanted, current, metrics)

    def _quota(self, level: int, n_be: int, home_share: Optional[float]) -> float:
        """Each BE task's quota at `level`: the BE total, shared equally.  With cpusets the
        total rises from the floor to the BE home cores' share of the platform at
        lend_level - 1 (BE has its own cores in full, as static isolation gives it), then
        on to the ceiling as HP cores are lent; without, straight from floor to ceiling."""
        if level >= self.levels and self.quota_ceiling >= 1.0:
            return 1.0
        floor, ceiling = self.quota_floor, self.quota_ceiling
        if home_share is None or not floor < home_share < ceiling \
                or self.lend_level > self.levels:
            total = floor + (ceiling - floor) * level / self.levels
        elif level < self.lend_level:
            total = floor + (home_share - floor) * level / max(1, self.lend_level - 1)
        else:
            total = home_share + (ceiling - home_share) * (level - self.lend_level + 1) / \
                (self.levels - self.lend_level + 1)
        return round(min(1.0, total / n_be), 4)

    def _cpusets(self, platform, hp, current, metrics):
        """(floor cpus, this level's cpus, the floor cpus' share of the platform) for BE, or
        None when cpusets are left alone."""
        online = self._online(platform)
        excluded = frozenset(parse_cpu_list(self.reserved_cpus)) if self.reserved_cpus \
            else frozenset()
        if self._checkpoint:
            try:
                state = self._checkpoint.read()
            except (CheckpointError, OSError, UnicodeDecodeError) as e:
                self.checkpoint_errors_total += 1
                self._log_once(("checkpoint", str(e)), "%s: %s: BE cpusets left as they are",
                               self._checkpoint.path, getattr(e, "strerror", None) or e)
                metrics.append(frames.sample("slo_controller_hold", 1,
                                             {"reason": "cpu_manager_state"}))
                return None
            if state is not None:
                excluded |= state.exclusive_cpus
        allowed = online - excluded
        metrics.append(frames.sample("slo_controller_excluded_cpus", len(online & excluded),
                                     {"cpus": format_cpu_list(online & excluded)}))
        if not allowed:
            self._log_once(("no cpus",), "every online CPU is exclusive or reserved: BE "
                                         "cpusets left as they are")
            return None
        cores = self._cores(allowed)
        hp_cpus: FrozenSet[int] = frozenset()
        for task_id in hp:
            try:
                hp_cpus |= parse_cpu_list(str(current.get(task_id, {}).get(CPUSET_CPUS) or ""))
            except ValueError:
                continue
        if self.be_cpus is not None:
            home = parse_cpu_list(self.be_cpus) & allowed
        else:
            home = frozenset().union(*(c for c in cores if not c & hp_cpus))
        if not home:
            home = cores[-1]   # every core runs HP: BE keeps to the last one
        lendable = [c for c in cores if not c <= home]
        lent = 0
        if lendable and self.level >= self.lend_level:
            span = self.levels - self.lend_level + 1
            lent = math.ceil((self.level - self.lend_level + 1) / span * len(lendable))
        # The cores farthest from the first ones (where HP tasks usually start) go first.
        given = frozenset(home).union(*lendable[len(lendable) - lent:])
        return format_cpu_list(home), format_cpu_list(given), len(home) / len(online)

    def _online(self, platform) -> FrozenSet[int]:
        try:
            return online_cpus(Paths(sysfs=self.sysfs))
        except (OSError, ValueError):
            return frozenset(range(max(1, int(platform.cpus or 1))))

    def _cores(self, cpus: FrozenSet[int]) -> List[FrozenSet[int]]:
        """`cpus` grouped by physical core (hyperthreads together), in CPU order."""
        groups: Dict[int, Set[int]] = {}   # the core's first CPU -> its CPUs
        for cpu in sorted(cpus):
            path = os.path.join(self.sysfs, f"devices/system/cpu/cpu{cpu}/topology/"
                                            f"thread_siblings_list")
            try:
                with open(path) as f:
                    siblings = parse_cpu_list(f.read())
            except (OSError, ValueError):
                siblings = frozenset((cpu,))
            groups.setdefault(min(siblings), set()).add(cpu)
        return [frozenset(groups[k]) for k in sorted(groups)]

    def _rdt_values(self, fraction: float, metrics):
        """(floor, this level's) rdt values of the BE group, or None without resctrl."""
        rdt, resctrl = self.rdt, self._resctrl
        assert rdt is not None and resctrl is not None, "rdt in knobs needs the rdt section"
        try:
            if not resctrl.available():
                raise FileNotFoundError(f"resctrl is not mounted at {rdt.resctrlfs}")
            info = resctrl.info()
        except (OSError, ValueError) as e:
            self._log_once(("rdt", str(e)), "rdt left out: %s",
                           getattr(e, "strerror", None) or e)
            return None
        def at(f):
            value: Dict[str, object] = {}
            if info.l3 is not None:
                ways = bin(info.l3.cbm_mask).count("1")
                top = min(ways, rdt.l3_ways_ceiling or ways)
                low = min(top, max(rdt.l3_ways_floor, info.l3.min_cbm_bits))
                value["l3"] = format((1 << round(low + (top - low) * f)) - 1, "x")
            if info.mb is not None:
                least, gran = info.mb.min_bandwidth, info.mb.bandwidth_gran
                low = max(rdt.mb_floor, least)
                mb = low + (max(low, rdt.mb_ceiling) - low) * f
                # A step the hardware takes: min_bandwidth + n x bandwidth_gran.
                value["mb"] = int(min(100, least + gran * round((mb - least) / gran)))
            return value

        floor, level = at(0.0), at(fraction)
        if not level:
            return None
        # Tasks in one group share its values: a cut antagonist needs a group of its own.
        return {"name": rdt.group + "-floor", **floor}, {"name": rdt.group, **level}

    # -- not fighting other managers ---------------------------------------------------

    def _respect_others(self, wanted, current, metrics) -> Dict[str, dict]:
        """A value OWCA had set, read back as OWCA set it, and then found changed while
        OWCA still wants it, was rewritten by someone else: reported, and kept as they
        set it for `override_backoff` cycles (doubling each time it happens again)."""
        for task_id in set(self._sent) - set(wanted):
            self._sent.pop(task_id, None)
            self._confirmed.pop(task_id, None)
            self._overridden.pop(task_id, None)
        out = {}
        for task_id, values in wanted.items():
            now = current.get(task_id, {})
            sent = self._sent.setdefault(task_id, {})
            confirmed = self._confirmed.setdefault(task_id, {})
            overridden = self._overridden.setdefault(task_id, {})
            result = {}
            for type_, value in values.items():
                have = now.get(type_)
                if type_ in overridden:
                    if self.cycle < overridden[type_] and have is not None:
                        result[type_] = _as_wanted(type_, have)
                        metrics.append(frames.sample("slo_controller_overridden", 1,
                                                     {"task_id": task_id, "type": type_}))
                        continue
                    del overridden[type_]      # its time is up: OWCA's value again
                    confirmed.pop(type_, None)
                if type_ in sent and _same(type_, have, sent[type_]):
                    confirmed[type_] = sent[type_]
                elif (type_ in confirmed and type_ in sent and
                      _same(type_, confirmed[type_], sent[type_]) and have is not None):
                    key = (task_id, type_)
                    self._override_count[key] = self._override_count.get(key, 0) + 1
                    self.overrides_total += 1
                    wait = self.override_backoff * 2 ** (self._override_count[key] - 1)
                    overridden[type_] = self.cycle + wait
                    confirmed.pop(type_, None)
                    log.warning("task %s: %s was changed to %s by someone else (OWCA had set "
                                "%s): left as it is for %d cycles", task_id, type_, have,
                                sent[type_], wait)
                    result[type_] = _as_wanted(type_, have)
                    metrics.append(frames.sample("slo_controller_overridden", 1,
                                                 {"task_id": task_id, "type": type_}))
                    continue
                result[type_] = value
                sent[type_] = value
            out[task_id] = result
        return out

    def _log_once(self, key, message, *args) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.warning(message, *args)


def _same(type_: str, a, b) -> bool:
    if a is None or b is None:
        return False
    if type_ in (CPU_QUOTA, CPU_SHARES):
        # Read back through the kernel's integer units: equal within their rounding.
        return abs(float(a) - float(b)) <= 0.002 * max(1.0, abs(float(b)))
    if type_ == CPUSET_CPUS:
        try:
            return parse_cpu_list(str(a)) == parse_cpu_list(str(b))
        except ValueError:
            return False
    if type_ == RDT:
        return isinstance(a, dict) and isinstance(b, dict) and a.get("name") == b.get("name")
    return a == b


def _as_wanted(type_: str, have):
    """Someone else's value, as an allocation that writes nothing."""
    if type_ == CPU_QUOTA:
        return min(1.0, float(have))
    return have
