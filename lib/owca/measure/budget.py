"""owca-measure's CPU budget: what it sheds when its cycles cost more than allowed.

`cpu_budget_percent` in the measure section is the share of one CPU owca-measure may
take, its own process and the perf helper together (2 is 2 % of one CPU).  After each
cycle the stage tells the budget the CPU time used so far and the time; the budget
compares the mean share of the last `WINDOW` cycles at the present level (the CPU used
from one cycle's end to the next's, decoding and encoding frames included, over the
wall time between them) with the limit, and sheds one level more while it is over
(each level sheds what the one before did, and more):

    0  nothing: full work
    1  slow signals less often: the slow metrics, PSI and the run-queue delay are
       read `STRIDE` times less often (their last values in between)
    2  and the optional perf events: the perf source is not read (its groups stay
       open, counting; its metrics are absent from the frames meanwhile)
    3  and a longer interval: every other cycle is skipped (no frame)

Each change is a one-line warning (shedding) or info line (back), and the level is the
metric `owca_measure_shed_level`.  It comes back one level at a time when there is
room: when what the level below cost per task, at the number of tasks measured now,
fits in `RESTORE_AT` of the budget; and, so that a host that became quiet does not
stay shed for ever on an old figure, every `PROBE_EVERY` cycles at a shed level it
tries the level below again.

A cycle after new tasks came opens their files and perf groups: the stage does not
count it (`observe(..., opening=True)`).
"""
import logging
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("owca.measure")

LEVELS = ("full work", "slow signals less often", "perf not read",
          "every other cycle skipped")
FULL, SLOW_SIGNALS, NO_PERF, LONGER_INTERVAL = range(len(LEVELS))
# How many times less often the slow signals are read from level 1 on.
STRIDE = 4
WINDOW = 5
RESTORE_AT = 0.8
PROBE_EVERY = 300


class CpuBudget:
    """The level of shedding, decided from observed cycles (no clock of its own: the
    stage passes the times, so that a test drives it with made-up ones)."""

    def __init__(self, percent: float, window: int = WINDOW):
        if not percent > 0:
            raise ValueError("cpu_budget_percent: expected a positive share of one CPU")
        self.percent = percent
        self.limit = percent / 100.0
        self.window = window
        self.level = FULL
        self.share = 0.0          # mean share of one CPU over the window, last computed
        self._shares: List[float] = []   # this level's recent cycles
        # level -> CPU share per task (over one base period) last seen there
        self._per_task: Dict[int, float] = {}
        self._last: Optional[Tuple[float, float]] = None   # (now, CPU seconds) last seen
        self._cycles_at_level = 0

    def observe(self, now: float, cpu_seconds: float, tasks: int,
                opening: bool = False) -> Optional[int]:
        """At the end of a cycle: `now` (seconds, monotonic), the CPU time used so
        far (seconds, cumulative), the tasks measured, and whether new tasks were
        opened since the last call (that period is not counted).  The share is the
        CPU used between two calls over the time between them.  Returns the new
        level when it changed, else None."""
        previous, self._last = self._last, (now, cpu_seconds)
        if previous is None or opening or now <= previous[0]:
            return None
        share = max(0.0, cpu_seconds - previous[1]) / (now - previous[0])
        self._cycles_at_level += 1
        self._shares.append(share)
        del self._shares[:-self.window]
        self.share = sum(self._shares) / len(self._shares)
        if tasks:
            self._per_task[self.level] = self.share / tasks
        if len(self._shares) < self.window:
            return None
        if self.share > self.limit and self.level < LONGER_INTERVAL:
            return self._set(self.level + 1, tasks)
        if self.level > FULL:
            below = self._per_task.get(self.level - 1)
            room = below is not None and below * tasks <= RESTORE_AT * self.limit
            if room or self._cycles_at_level >= PROBE_EVERY:
                return self._set(self.level - 1, tasks)
        return None

    def _set(self, level: int, tasks: int) -> int:
        shed = level > self.level
        if shed:
            log.warning("CPU budget of %g %% of one CPU exceeded (%.2f %% over the last %d "
                        "cycles, %d tasks): shedding to level %d, %s",
                        self.percent, self.share * 100, len(self._shares), tasks, level,
                        LEVELS[level])
        else:
            log.info("CPU budget of %g %% of one CPU has room: back to level %d, %s",
                     self.percent, level, LEVELS[level])
        self.level = level
        self._shares = []
        self._cycles_at_level = 0
        self._per_task.pop(level, None)   # measured afresh there
        return level
