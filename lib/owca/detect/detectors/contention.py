"""!ContentionDetector: interference found from what each HP task normally does at its load.

docs/detection.md explains the method, every parameter and its default, the resource
names and how to read an anomaly; this docstring is the map of the code.

Each cycle, for each high-priority (HP) task:

1. `_signals` turns the task's metrics (and the previous cycle's counters) into signals,
   each a number where higher is worse: the SLI (p99 latency), run-queue delay, PSI
   stalls (cpu, memory, io), CFS throttling, CPU seconds per request, CPI and cache
   misses per instruction (only where a PMU counts them unmultiplexed).  A signal the task
   lacks, or whose data is too poor to judge on, is left out with its reason.
2. `_Baseline` keeps, per load bucket (the APM wrapper's target request rate, buckets
   `load_bucket_ratio` wide), the last `history` normal values of each signal, and
   scores a new value in robust z units: (value - median) / (1.4826 MAD), on a log scale
   for ratios (latency, CPI) and a linear one for shares of time (stalls).
3. `_judge` turns the z values into evidence and `_step` accumulates it as a CUSUM:
   each cycle adds the SLI's z above `allowance` (capped at `threshold`, and only when the
   rise is also a physically meaningful amount), plus the best resource signal's when it
   rose with the SLI; the task is flagged when the sum reaches `evidence`, and cleared
   after `clear_after` cycles below `clear_threshold`.
4. `_resource` names the resource from the groups of signals that moved, `unknown` when
   none did or when they cannot be told apart; `_rank` orders the best-effort tasks by how
   well the change of their usage (CPU, memory, page faults, cache misses) follows the
   victim's degradation, before and during the episode.

State is bounded: `history` values per signal and load bucket, at most `max_load_buckets`
buckets per task, `window` cycles of usage per task, and tasks absent for `forget_after`
cycles are dropped.  Nothing depends on the wall clock or on hash order: the same stream
gives the same anomalies frames, byte for byte.
"""
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca.core import frames
from owca.core.priority import HP, PriorityRule
from owca.detect.fleet_prior import FleetPrior
from owca.plugin import AnomalyDetector, ContentionAnomaly

# Where the run-queue delay comes from: owca-measure's per-task sum of the second field of
# /proc/PID/task/TID/schedstat (docs/metrics.md).
RUN_QUEUE_METRIC = "task_run_queue_delay_seconds"
# When owca-wrap parsed the load generator's latest report: the same value twice means the
# SLI was not refreshed, and a repeated value is not new evidence.
APM_TS_METRIC = "apm_report_timestamp_seconds"

# MAD of a normal distribution is 0.6745 sigma: this makes a robust z comparable to a z.
MAD_TO_SIGMA = 1.4826

# Signal -> (group, scale).  `log` signals are ratios (latency, cost per request): they are
# compared on a log scale, and must rise by `min_ratio`.  `lin` signals are shares of time
# (seconds stalled per second, threads waiting): they must rise by `min_stall`.
SIGNALS = {
    "sli": ("sli", "log"),
    "run_queue": ("cpu", "lin"),
    "psi_cpu": ("cpu", "lin"),
    "throttling": ("cpu", "lin"),
    "psi_memory": ("memory", "lin"),
    "psi_io": ("io", "lin"),
    "cpu_per_request": ("cache_memory", "log"),
    "cpi": ("cache_memory", "log"),
    "mpki": ("cache_memory", "log"),
    "stalled_loads_per_instruction": ("cache_memory", "log"),
    "llc_loss": ("cache_memory", "log"),
}
# Signals that do not fall when the load rises (queueing only grows with load); a cost per
# request may (fixed costs are shared by more requests), and CPI with it.
MONOTONE = ("sli", "run_queue", "psi_cpu", "throttling", "psi_memory", "psi_io")
RESOURCE_GROUPS = ("cpu", "memory", "io", "cache_memory")
# A MAD of zero (a signal that sat still) would make any wiggle infinite: the scale is
# at least this much (log units: 5 %; lin units: 1 % of the time).
MIN_SCALE = {"log": math.log(1.05), "lin": 0.01}

# Reasons a signal, or a whole task, is not judged in a cycle (contention_refused{reason}).
REASONS = ("missing", "history", "cpu_floor", "multiplexed", "few_requests", "stale",
           "no_signal")

# The usage of a contending task that each resource is explained by.
USAGE_FEATURES = {
    "cpu": ("cpu",),
    "memory": ("mem", "faults", "psi_memory"),
    "io": ("psi_io", "cpu"),
    "llc": ("llc", "cache_misses", "cpu"),
    "memory_bandwidth": ("mem_bw", "cache_misses", "cpu"),
    "unknown": ("cpu", "mem", "faults", "cache_misses", "llc", "mem_bw", "psi_memory",
                "psi_io"),
}


def _num(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if math.isnan(value) or math.isinf(value):
        return None
    return float(value)


def _nested(metrics: dict, name: str, *keys) -> Optional[float]:
    value = metrics.get(name)
    for k in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(k)
    return _num(value)


def _dt(cur: dict, prev: Optional[dict]) -> Optional[float]:
    """Seconds between the two measurements of a task (owca-measure's task_last_seen)."""
    if prev is None:
        return None
    a, b = _num(prev.get("task_last_seen")), _num(cur.get("task_last_seen"))
    if a is None or b is None or b <= a:
        return None
    return b - a


def _rate(cur: dict, prev: Optional[dict], dt: Optional[float], name: str,
          *keys) -> Optional[float]:
    """A counter's increase per second; None without a previous value or after a reset."""
    if prev is None or not dt:
        return None
    a, b = _nested(prev, name, *keys), _nested(cur, name, *keys)
    if a is None or b is None or b < a:
        return None
    return (b - a) / dt


def _delta(cur: dict, prev: Optional[dict], name: str) -> Optional[float]:
    if prev is None:
        return None
    a, b = _num(prev.get(name)), _num(cur.get(name))
    if a is None or b is None or b < a:
        return None
    return b - a


def _median(values: List[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _pearson(xs: List[float], ys: List[float]) -> float:
    n = len(xs)
    if n < 3:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


class _Baseline:
    """Normal values of each signal per load bucket, bounded, scored robustly."""

    def __init__(self, history: int, max_buckets: int):
        self.history = history
        self.max_buckets = max_buckets
        self.buckets: Dict[object, Dict[str, deque]] = {}
        self.used: Dict[object, int] = {}  # bucket -> cycle last learnt (for eviction)

    def learn(self, bucket, signals: Dict[str, float], cycle: int):
        rings = self.buckets.get(bucket)
        if rings is None:
            if len(self.buckets) >= self.max_buckets:
                oldest = min(self.used, key=lambda b: (self.used[b], str(b)))
                del self.buckets[oldest], self.used[oldest]
            rings = self.buckets[bucket] = {}
        for name, value in signals.items():
            rings.setdefault(name, deque(maxlen=self.history)).append(value)
        self.used[bucket] = cycle

    def values(self, bucket, name: str, min_history: int,
               monotone: bool) -> Optional[List[float]]:
        """The bucket's values, pooled with its neighbours when it has too few.  For a
        signal that does not fall when load rises (latency, stalls), the nearest higher
        load's values stand in as an upper bound: what is abnormal at a higher load is
        abnormal at this one.  A load above all those seen is never judged."""
        own = list(self.buckets.get(bucket, {}).get(name, ()))
        if len(own) >= min_history:
            return own
        if not isinstance(bucket, int):
            return None
        for b in (bucket - 1, bucket + 1):
            own += list(self.buckets.get(b, {}).get(name, ()))
        if len(own) >= min_history:
            return own
        if monotone:
            higher = sorted(b for b in self.buckets if isinstance(b, int) and b > bucket + 1
                            and len(self.buckets[b].get(name, ())) >= min_history)
            if higher:
                return list(self.buckets[higher[0]][name])
        return None


@dataclass
class _Evidence:
    z: Dict[str, float]           # signal -> robust z, for the signals judged this cycle
    change: Dict[str, float]      # signal -> rise above the median (ratio-1 or absolute)
    refused: Dict[str, str]       # signal -> reason it was left out
    decided: bool                 # the decision signal(s) could be judged
    gain: float                   # evidence this cycle adds to the task's CUSUM
    score: float                  # the decision's z (0 when not decided)


class _Task:
    """One task's memory: previous counters, baseline, usage history, episode state."""

    def __init__(self, det: "ContentionDetector"):
        self.prev: Optional[dict] = None
        self.last_seen_cycle = 0
        self.baseline = _Baseline(det.history, det.max_load_buckets)
        # (cycle, usage features) of the last `window` cycles: read when another task's
        # degradation is attributed.
        self.usage: deque = deque(maxlen=det.window)
        # (cycle, degradation score or None, flagged) of the last `window` cycles (HP).
        self.scores: deque = deque(maxlen=det.window)
        self.evidence = 0.0     # the CUSUM of the evidence
        self.since = 0          # the cycle it last rose from zero
        self.calm = 0           # consecutive cycles below clear_threshold while flagged
        self.blind = 0          # consecutive cycles it could not be judged
        self.has_sli = False    # an SLI was seen once: it is the task's decision signal
        self.workload: Optional[str] = None  # its workload label, for a fleet profile
        self.fleet_judged: List[str] = []    # signals judged on the fleet's normal now
        self.cpu_model = "unknown"
        self.own_load = False   # its own usage change explained its degradation best
        self.flagged = False
        self.onset: Optional[int] = None  # cycle of the run that raised the flag
        self.pre: List[tuple] = []  # the victim's (cycle, score) before the onset
        # Other tasks' (cycle, usage) before the onset, frozen then: their own rings
        # move on while a long episode lasts.
        self.pre_usage: Dict[str, Dict[int, dict]] = {}
        # Each resource group's best z in the episode's last `recent` cycles.
        self.group_z: deque = deque(maxlen=det.recent)

    def episode_onset(self) -> int:
        """The cycle of the run that raised the flag: only a flagged task has one."""
        assert self.onset is not None, "asked of a task that is not flagged"
        return self.onset


@dataclass
class ContentionDetector(AnomalyDetector):
    """Flags an HP task whose service level (or resource stalls) left its normal range
    at its current load, names the resource, and ranks the best-effort tasks whose usage
    change explains it.  Parameters and defaults: docs/detection.md."""
    sli_metric: str = "apm_sli"
    load_metric: str = "apm_load_target_rate_per_second"
    throughput_metric: str = "apm_throughput_per_second"
    load_bucket_ratio: float = 1.25
    history: int = 60
    min_history: int = 8
    threshold: float = 4.0
    clear_threshold: float = 2.0
    min_ratio: float = 1.3
    min_stall: float = 0.05
    allowance: float = 0.5
    evidence: float = 5.0
    clear_after: int = 2
    min_cpu: float = 0.25
    min_requests: float = 100.0
    max_scaling_factor: float = 2.0
    window: int = 30
    recent: int = 5
    max_contending: int = 3
    min_contender_score: float = 0.3
    report_unexplained: bool = False
    forget_after: int = 30
    max_load_buckets: int = 32
    priority: Optional[PriorityRule] = None
    # A fleet profile (owca-profile; docs/detection.md, "Fleet profiles"): the prior.
    profile: Optional[str] = None
    workload_label: str = "workload"
    cpu_model_label: str = "cpu_model"
    profile_history: int = 8
    profile_drift: float = 1.5
    profile_pairs: int = 10

    _prior: Optional[FleetPrior] = field(default=None, init=False, repr=False)
    _tasks: Dict[str, _Task] = field(default_factory=dict, init=False, repr=False)
    _cycle: int = field(default=0, init=False, repr=False)
    _refusals: Dict[str, int] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        positive = ("load_bucket_ratio", "threshold", "clear_threshold", "min_ratio",
                    "max_scaling_factor", "allowance", "evidence")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive number")
        if self.load_bucket_ratio <= 1:
            raise ValueError("load_bucket_ratio: expected more than 1 (1.25: 25 % wide)")
        if self.min_ratio < 1:
            raise ValueError("min_ratio: expected at least 1 (1.3: a 30 % rise)")
        if self.max_scaling_factor < 1:
            raise ValueError("max_scaling_factor: expected at least 1 (1: never multiplexed)")
        if self.allowance >= self.threshold:
            raise ValueError("allowance: expected less than threshold")
        if self.clear_threshold > self.threshold:
            raise ValueError("clear_threshold: expected at most threshold (hysteresis)")
        for name in ("history", "min_history", "clear_after", "window", "recent",
                     "max_contending", "forget_after", "max_load_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1")
        if self.min_history > self.history:
            raise ValueError("min_history: expected at most history")
        if self.window < 3:
            raise ValueError("window: expected at least 3 (a correlation needs points)")
        for name in ("min_stall", "min_cpu", "min_requests", "min_contender_score"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0")
        self._refusals = {r: 0 for r in REASONS}
        if self.profile is not None:
            if self.profile_history < 1 or self.profile_pairs < 0 or self.profile_drift <= 0:
                raise ValueError("profile_history, profile_pairs, profile_drift: expected "
                                 "at least 1, at least 0, a positive number")
            self._prior = FleetPrior(self.profile, self.load_bucket_ratio, self.min_history)

    # -- which tasks ---------------------------------------------------------------------
    def _is_hp(self, labels: dict) -> bool:
        if "priority" in labels or self.priority is None:
            return labels.get("priority") == HP
        return self.priority.classify(labels) == HP

    # -- signals -------------------------------------------------------------------------
    def _signals(self, cur: dict, prev: Optional[dict]):
        """(signals, refused, load): signals are higher when worse; refused maps a signal
        left out to why; load is the offered load the normal is conditioned on."""
        signals, refused = {}, {}
        dt = _dt(cur, prev)
        cpu = _rate(cur, prev, dt, "task_cpu_usage_seconds")

        sli = _num(cur.get(self.sli_metric))
        throughput = _num(cur.get(self.throughput_metric))
        if sli is None or sli <= 0:
            refused["sli"] = "missing"
        elif prev is not None and _num(cur.get(APM_TS_METRIC)) is not None and \
                _num(cur.get(APM_TS_METRIC)) == _num(prev.get(APM_TS_METRIC)):
            refused["sli"] = "stale"
        elif throughput is not None and dt and throughput * dt < self.min_requests:
            refused["sli"] = "few_requests"  # a p99 of a few requests is one request
        else:
            signals["sli"] = math.log(sli)

        for name, value in (("run_queue", _rate(cur, prev, dt, RUN_QUEUE_METRIC)),
                            ("psi_cpu", _rate(cur, prev, dt, "task_pressure_stall_seconds",
                                              "cpu", "some")),
                            ("psi_memory", _rate(cur, prev, dt, "task_pressure_stall_seconds",
                                                 "memory", "some")),
                            ("psi_io", _rate(cur, prev, dt, "task_pressure_stall_seconds",
                                             "io", "some")),
                            ("throttling", _rate(cur, prev, dt,
                                                 "task_cpu_throttled_seconds"))):
            if value is None:
                refused[name] = "missing"
            else:
                signals[name] = value

        # Signals per unit of CPU work are noise for a task that hardly runs (CPI² ignores
        # tasks under a quarter CPU for the same reason).
        busy = cpu is not None and cpu >= self.min_cpu
        if cpu is None or not throughput:
            refused["cpu_per_request"] = "missing"
        elif not busy:
            refused["cpu_per_request"] = "cpu_floor"
        else:
            signals["cpu_per_request"] = math.log(cpu / throughput)

        instructions = _delta(cur, prev, "task_instructions")
        perf = {"cpi": _delta(cur, prev, "task_cycles"),
                "mpki": _delta(cur, prev, "task_cache_misses"),
                "stalled_loads_per_instruction": _delta(cur, prev, "task_stalled_mem_loads")}
        scaling = _num(cur.get("task_scaling_factor_max"))
        for name, count in perf.items():
            if count is None or not instructions:
                refused[name] = "missing"
            elif scaling is not None and scaling > self.max_scaling_factor:
                refused[name] = "multiplexed"
            elif not busy:
                refused[name] = "cpu_floor"
            else:
                per = count / instructions * (1000.0 if name == "mpki" else 1.0)
                signals[name] = math.log(max(per, 1e-9))

        # RDT monitoring: the share of the L3 the task's lines hold.  Less of it is worse
        # (its lines were evicted by someone else's); a task too idle to hold any is not
        # judged on it.
        occupancy = _num(cur.get("task_llc_occupancy_bytes"))
        if occupancy is None:
            refused["llc_loss"] = "missing"
        elif not busy:
            refused["llc_loss"] = "cpu_floor"
        else:
            signals["llc_loss"] = -math.log(max(occupancy, 1.0))

        load = _num(cur.get(self.load_metric))
        return signals, refused, load

    def _bucket(self, load: Optional[float]):
        if load is None or load <= 0:
            return "all"
        return math.floor(math.log(load) / math.log(self.load_bucket_ratio))

    # -- judging one HP task -------------------------------------------------------------
    def _judge(self, task: _Task, signals: dict, refused: dict, bucket) -> _Evidence:
        z, change = {}, {}
        task.has_sli = task.has_sli or "sli" in signals or refused.get("sli") != "missing"
        for name in sorted(signals):
            values = task.baseline.values(bucket, name, self.min_history,
                                          monotone=name in MONOTONE)
            scale_kind = SIGNALS[name][1]
            fleet = None if self._prior is None else self._prior.normal(
                task.workload, task.cpu_model, bucket, name)
            if fleet is not None and (values is None or len(values) < self.profile_history):
                # A task too young to know its own normal is judged against the fleet's.
                med, scale = fleet[0], max(fleet[1], MIN_SCALE[scale_kind])
                task.fleet_judged.append(name)
            elif values is None:
                refused[name] = "history"
                continue
            else:
                med = _median(values)
                mad = _median([abs(v - med) for v in values])
                scale = max(MAD_TO_SIGMA * mad, MIN_SCALE[scale_kind])
                if fleet is not None:
                    # The fleet's spread bounds how far this node's normal may drift: a
                    # normal that crept up with a contention learnt as normal is pulled
                    # back to what the workload is elsewhere.
                    bound = self.profile_drift * max(fleet[1], MIN_SCALE[scale_kind])
                    med = min(max(med, fleet[0] - bound), fleet[0] + bound)
            z[name] = (signals[name] - med) / scale
            change[name] = (math.exp(signals[name] - med) - 1.0 if scale_kind == "log"
                            else signals[name] - med)

        def gain(name):
            """What the signal adds to the CUSUM: its z above the allowance, capped at
            `threshold` so that one wild interval cannot make an episode alone, and
            nothing above the allowance when the rise is too small to matter."""
            needed = (self.min_ratio - 1.0 if SIGNALS[name][1] == "log" else self.min_stall)
            big_enough = change[name] >= needed
            return min(z[name], self.threshold if big_enough else self.allowance) \
                - self.allowance

        side = max((gain(n) for n in z if n != "sli"), default=None)
        if "sli" in z:
            decided, score = True, z["sli"]
            total = gain("sli")
            # A resource signal that rose with the SLI is independent evidence of the same
            # thing; one that rose alone is something the service does not feel.
            if total > 0 and side is not None and side > 0:
                total += side
        elif not task.has_sli:
            # No SLI at all: the resource signals are all there is to go by.
            decided = side is not None
            score = max((z[n] for n in z if n != "sli"), default=0.0)
            total = side if decided else 0.0
        else:
            # The task has (had) an SLI but it cannot be judged this cycle: do not decide
            # on the side signals alone, they would flag what the service does not feel.
            decided, score, total = False, 0.0, 0.0
        return _Evidence(z, change, refused, decided, total, score if decided else 0.0)

    def _step(self, task: _Task, ev: _Evidence):
        """Persistence to raise the flag, hysteresis to clear it."""
        if not ev.decided:
            # No evidence either way: the state stays as it was, but a flag is not kept
            # up on old evidence for longer than it would take to clear it.  A report
            # read a second time is the latest evidence still, not an absence of it.
            if ev.refused.get("sli") == "stale":
                return
            task.blind += 1
            if task.flagged and task.blind >= self.clear_after:
                self._clear(task)
            return
        task.blind = 0
        # Page's CUSUM: evidence accumulates while the signals stay above the allowance
        # and drains while they do not; the onset is where it last started from zero.
        if task.evidence <= 0 and ev.gain > 0:
            task.since = self._cycle
        task.evidence = max(0.0, task.evidence + ev.gain)
        if not task.flagged:
            if task.evidence >= self.evidence:
                task.flagged, task.calm = True, 0
                task.onset = task.since
                # The cycles before the onset that were normal: an earlier episode's
                # cycles would correlate with its own contender, not this one's.
                # A cycle not judged (too little history yet) counts as normal: it is what
                # the task's normal was learnt from.
                task.pre = [(c, 0.0 if s is None else s) for c, s, flagged in task.scores
                            if c < task.onset and not flagged
                            and (s is None or s < self.threshold)]
                wanted = {c for c, _ in task.pre}
                task.pre_usage = {tid: {c: u for c, u in other.usage if c in wanted}
                                  for tid, other in self._tasks.items()}
                task.group_z.clear()
        elif ev.score < self.clear_threshold:
            task.calm += 1
            if task.calm >= self.clear_after:
                self._clear(task)
        else:
            task.calm = 0

    @staticmethod
    def _clear(task: _Task):
        task.flagged, task.onset, task.pre, task.pre_usage = False, None, [], {}
        task.evidence = 0.0

    # -- naming the resource -------------------------------------------------------------
    def _resource(self, task: _Task, ev: _Evidence) -> str:
        """The group whose signals rose most, on average over the episode's last `recent`
        cycles (so that it follows an episode whose cause changes, without flapping);
        `unknown` unless one group clearly leads (half again the next) and its signals
        can name it."""
        task.group_z.append({g: max([0.0] + [ev.z[n] for n in ev.z if SIGNALS[n][0] == g])
                             for g in RESOURCE_GROUPS})
        mean = {g: sum(c[g] for c in task.group_z) / len(task.group_z)
                for g in RESOURCE_GROUPS}
        ranked = sorted(((v, g) for g, v in mean.items() if v >= self.threshold),
                        reverse=True)
        if not ranked:
            return "unknown"
        best, group = ranked[0]
        if len(ranked) > 1 and ranked[1][0] * 1.5 > best:
            return "unknown"  # two kinds of stall rose together: cannot tell which
        if group != "cache_memory":
            return group
        # Without a PMU, a rising cost per request says the memory hierarchy got slower,
        # not whether the cache was taken or the bandwidth: say so.
        mpki, stalls = ev.z.get("mpki"), ev.z.get("stalled_loads_per_instruction")
        if mpki is not None and mpki >= self.threshold:
            return "llc"  # the victim misses more: its lines were evicted
        if ev.z.get("llc_loss", 0.0) >= self.threshold:
            return "llc"  # RDT: the victim holds less of the cache than usual
        if mpki is not None and stalls is not None and stalls >= self.threshold:
            return "memory_bandwidth"  # as many misses, each waits longer
        return "unknown"

    # -- ranking contenders ---------------------------------------------------------------
    def _rank(self, victim: _Task, resource: str, candidates: List[str]):
        """[(score, task_id)] best first: how well each candidate's usage follows the
        victim's degradation (Pearson r over the normal cycles before the episode and its
        last `recent` cycles) times how large its change was, relative to the largest
        among candidates.  The recent cycles, not the whole episode: who hurts now."""
        onset = victim.episode_onset()
        series = victim.pre[-self.window:] + [
            (c, s) for c, s, _ in victim.scores if c >= onset and s is not None
        ][-self.recent:]
        cycles = [c for c, _ in series]
        ys = [s for _, s in series]
        episode = [c >= onset for c in cycles]
        raw: Dict[str, Dict[str, tuple]] = {}   # feature -> task id -> (r, rise)
        for tid in candidates:
            # A task absent at a cycle (not started yet) used nothing then.
            by_cycle = {**victim.pre_usage.get(tid, {}), **dict(self._tasks[tid].usage)}
            for feature in USAGE_FEATURES[resource]:
                xs = [by_cycle.get(c, {}).get(feature, 0.0) for c in cycles]
                if not any(xs):
                    continue
                before = [x for x, e in zip(xs, episode, strict=True) if not e]
                during = [x for x, e in zip(xs, episode, strict=True) if e]
                if not before or not during:
                    continue
                rise = _median(during) - _median(before)
                if rise <= 0:
                    continue
                r = _pearson(xs, ys)
                if r > 0:
                    raw.setdefault(feature, {})[tid] = (r, rise)
        scores: Dict[str, float] = {}
        for per_task in raw.values():
            top = max(rise for _, rise in per_task.values())
            for tid, (r, rise) in per_task.items():
                scores[tid] = max(scores.get(tid, 0.0), r * rise / top)
        return sorted(((s, t) for t, s in scores.items()), key=lambda p: (-p[0], p[1]))

    # -- the plug-in API -----------------------------------------------------------------
    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        self._cycle += 1
        cycle = self._cycle
        if self._prior is not None:
            self._prior.refresh()
        anomalies, extra = [], []
        hp_ids: List[str] = []
        be_ids: List[str] = []
        for tid in sorted(tasks_measurements):
            (hp_ids if self._is_hp(tasks_labels.get(tid, {})) else be_ids).append(tid)

        # Every task's usage, for attribution (HP tasks may be measured too).
        for tid in sorted(tasks_measurements):
            cur = tasks_measurements[tid]
            task = self._tasks.get(tid)
            if task is None:
                task = self._tasks[tid] = _Task(self)
            task.usage.append((cycle, self._usage(cur, task.prev)))

        for tid in hp_ids:
            task = self._tasks[tid]
            cur = tasks_measurements[tid]
            if self._prior is not None:
                self._profile_task(task, tasks_labels.get(tid, {}))
            signals, refused, load = self._signals(cur, task.prev)
            bucket = self._bucket(load)
            ev = self._judge(task, signals, refused, bucket)
            self._step(task, ev)
            task.scores.append((cycle, min(ev.score, 3 * self.threshold) if ev.decided
                                else None, task.flagged))
            if not ev.decided:
                reason = self._task_reason(task, ev)
                self._refusals[reason] += 1
                extra.append(frames.sample("contention_undecided", 1,
                                           {"task_id": tid, "reason": reason}))
            for name in sorted(ev.refused):
                if ev.refused[name] != "missing":
                    extra.append(frames.sample("contention_signal_refused", 1,
                                               {"task_id": tid, "signal": name,
                                                "reason": ev.refused[name]}))
            if ev.decided:
                extra.append(frames.sample("contention_score", round(ev.score, 6),
                                           {"task_id": tid}))
            for name in task.fleet_judged:
                extra.append(frames.sample("contention_fleet_prior", 1,
                                           {"task_id": tid, "signal": name}))
            # Learn only what is normal: a flagged task or a clearly risen SLI must not
            # teach that it is.  (Values between the allowance and the threshold are
            # learnt: leaving them out would truncate the distribution, and the median
            # would creep down cycle after cycle.)  While the SLI is fine, whatever the
            # side signals show is compatible with a fine service, and is learnt; without
            # an SLI, only values below the threshold are.
            if not task.flagged:
                judged_sli = "sli" in ev.z
                if not (judged_sli and ev.z["sli"] >= self.threshold):
                    task.baseline.learn(bucket, {
                        n: v for n, v in signals.items()
                        if ev.z.get(n, 0.0) < self.threshold or (judged_sli and n != "sli")},
                        cycle)
            if task.flagged:
                anomaly = self._anomaly(tid, task, ev, be_ids)
                # Contention needs a contender: a degradation no measured task's usage
                # follows is reported as such, not as contention, unless asked for.
                if anomaly.contending_task_ids or self.report_unexplained:
                    anomalies.append(anomaly)
                else:
                    extra.append(frames.sample(
                        "contention_unexplained", 1,
                        {"task_id": tid, "resource": anomaly.resource,
                         "cause": "own_usage" if task.own_load else "outside"}))
                if not anomaly.contending_task_ids and ev.decided:
                    # What no task on the node explains is the node's normal now (a
                    # host that got busier, a heavier mix of requests): learnt, so that
                    # the flag clears when the new level is known instead of staying up.
                    task.baseline.learn(bucket, signals, cycle)

        for tid in sorted(tasks_measurements):
            task = self._tasks[tid]
            task.prev = self._kept(tasks_measurements[tid])
            task.last_seen_cycle = cycle
        for tid in [t for t, s in self._tasks.items()
                    if cycle - s.last_seen_cycle >= self.forget_after]:
            del self._tasks[tid]

        extra.append(frames.sample("contention_tracked_tasks", len(self._tasks)))
        if self._prior is not None:
            extra += self._prior_samples()
        for reason in REASONS:
            extra.append(frames.sample("contention_undecided_total", self._refusals[reason],
                                       {"reason": reason}, "counter"))
        return anomalies, extra

    def _profile_task(self, task: _Task, labels: dict) -> None:
        task.fleet_judged = []
        workload, model = labels.get(self.workload_label), labels.get(self.cpu_model_label)
        task.workload = workload if isinstance(workload, str) else None
        task.cpu_model = model if isinstance(model, str) and model else "unknown"

    def _prior_samples(self) -> list:
        assert self._prior is not None
        out = [frames.sample("contention_profile_loads", self._prior.loads, None,
                             "counter"),
               frames.sample("contention_profile_errors", self._prior.errors, None,
                             "counter")]
        for pair in self._prior.bad_neighbours(self.profile_pairs):
            labels = {"victim_workload": str(pair.get("victim_workload")),
                      "antagonist_workload": str(pair.get("antagonist_workload"))}
            for name, key in (("fleet_bad_neighbour_episodes", "count"),
                              ("fleet_bad_neighbour_share", "share"),
                              ("fleet_bad_neighbour_confidence", "confidence")):
                value = _num(pair.get(key))
                if value is not None:
                    out.append(frames.sample(name, value, labels))
        return out

    def _task_reason(self, task: _Task, ev: _Evidence) -> str:
        if task.has_sli and "sli" in ev.refused:
            return ev.refused["sli"]
        reasons = sorted(set(ev.refused.values()) - {"missing"})
        return reasons[0] if reasons else "no_signal"

    def _anomaly(self, tid: str, task: _Task, ev: _Evidence, be_ids: List[str]):
        resource = self._resource(task, ev)
        # The victim competes with the candidates: when its own usage rose more than
        # anyone's, with its degradation, it is doing more work (a load the wrapper does
        # not see), not suffering from someone else's.
        ranked = self._rank(task, resource, be_ids + [tid])
        best = ranked[0][0] if ranked else 0.0
        task.own_load = bool(ranked) and ranked[0][1] == tid
        ranked = [(s, t) for s, t in ranked if t != tid]
        named = [] if task.own_load else [
            (s, t) for s, t in ranked
            if s >= self.min_contender_score and s >= best / 3][:self.max_contending]
        runner_up = max([s for s, t in ranked if (s, t) not in named] + [0.0])
        confidence = max(0.0, best - runner_up) if named else 0.0
        labels = {"contended_task_id": tid}
        metrics = [frames.sample("contention_confidence", round(confidence, 6), labels),
                   frames.sample("contention_episode_cycles",
                                 self._cycle - task.episode_onset() + 1, labels)]
        for name in sorted(ev.z):
            metrics.append(frames.sample("contention_signal_z", round(ev.z[name], 6),
                                         {**labels, "signal": name}))
        for score, other in named:
            metrics.append(frames.sample("contention_contender_score", round(score, 6),
                                         {**labels, "contending_task_id": other}))
        return ContentionAnomaly(resource=resource, contended_task_id=tid,
                                 contending_task_ids=[t for _, t in named], metrics=metrics)

    @staticmethod
    def _usage(cur: dict, prev: Optional[dict]) -> dict:
        """What a task used in the cycle, in the features attribution compares."""
        dt = _dt(cur, prev)
        out = {}
        for feature, value in (
                ("cpu", _rate(cur, prev, dt, "task_cpu_usage_seconds")),
                ("mem", _num(cur.get("task_mem_usage_bytes"))),
                ("faults", _rate(cur, prev, dt, "task_mem_page_faults")),
                ("cache_misses", _rate(cur, prev, dt, "task_cache_misses")),
                # RDT monitoring (docs/metrics.md), where the platform has it.
                ("llc", _num(cur.get("task_llc_occupancy_bytes"))),
                ("mem_bw", _num(cur.get("task_mem_bandwidth_bytes_per_second"))),
                ("psi_memory", _rate(cur, prev, dt, "task_pressure_stall_seconds",
                                     "memory", "some")),
                ("psi_io", _rate(cur, prev, dt, "task_pressure_stall_seconds", "io",
                                 "some"))):
            if value is not None:
                out[feature] = value
        return out

    @staticmethod
    def _kept(cur: dict) -> dict:
        """The metrics the next cycle's rates need, not the whole entry."""
        return {k: cur[k] for k in KEPT if k in cur}


KEPT = ("task_last_seen", APM_TS_METRIC, "task_cpu_usage_seconds", RUN_QUEUE_METRIC,
        "task_pressure_stall_seconds", "task_cpu_throttled_seconds", "task_instructions",
        "task_cycles", "task_cache_misses", "task_stalled_mem_loads", "task_mem_page_faults")
