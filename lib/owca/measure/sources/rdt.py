"""Intel RDT monitoring through resctrl: each task's L3 occupancy and memory bandwidth.

Kernel interface (Documentation/arch/x86/resctrl.rst, "Monitoring"):

- `info/L3_MON/num_rmids`: the RMIDs (monitoring ids) the platform has;
  `info/L3_MON/mon_features`: the events (llc_occupancy, mbm_total_bytes,
  mbm_local_bytes).  The default group holds one RMID, and so does every control
  (CTRL_MON) group; each monitoring (MON) group holds one more.
- `mkdir <ctrl>/mon_groups/<name>` makes a MON group below a control group (the
  root for the default one); it fails with ENOSPC when no RMID is free (RMIDs of
  removed groups may linger "in limbo" until their cache lines are evicted).
- a MON group's `tasks` holds the threads whose RMID is its own.  A thread id
  written there joins it only if the thread is in the parent control group
  already (else EINVAL), and leaves the group's sibling MON groups.  A thread
  written to a control group's `tasks` (as owca-allocate does for rdt) leaves
  every MON group.  A control group's `tasks` lists its MON groups' threads too.
- `mon_data/mon_L3_<cache id>/<event>` per group: llc_occupancy in bytes now,
  mbm_*_bytes in bytes since the RMID was allocated (the kernel widens the
  hardware counter to 64 bits); `Unavailable` when the hardware has no value for
  the RMID (a fresh one, for a while), `Error` on a failed read.  A control
  group's figures include those of its MON groups.
- `rmdir` of a MON group moves its threads back to the parent control group;
  `rmdir` of a control group removes its MON groups with it.

Per task this module keeps a MON group, `owca-mon-<digest of the task id>`,
below the control group that holds the task's threads (the default group, or
the `owca-*` group owca-allocate moved them to), moves in the threads that are
not there yet every cycle (new processes inherit it; those that join the
task's cgroup later come in the next cycle), reports occupancy and bandwidth
rates between cycles, and removes the group when the task goes and on stop.
It writes nothing else: not a control group's `tasks`, not another MON group.
Tasks beyond the RMID budget get no group, and are counted, not silently left
unmeasured.
"""
import errno
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from owca.core import frames
from owca.core.kernel import CgroupGone, CgroupRefused, cgroup_thread_ids, parse_thread_ids
from owca.core.resctrl import NOT_GROUPS, ResctrlFS
from owca.measure.sources.base import Cycle, Reading, Source, cgroup_paths

log = logging.getLogger("owca.rdt_monitor")

GROUP_PREFIX = "owca-mon-"
MON_GROUPS = "mon_groups"
MON_DATA = "mon_data"
DOMAIN_PREFIX = "mon_L3_"
LLC = "llc_occupancy"
MBM_TOTAL = "mbm_total_bytes"
MBM_LOCAL = "mbm_local_bytes"
# event file -> (counter metric, rate metric); occupancy is a gauge of its own.
MBM_METRICS = {MBM_TOTAL: ("mem_bandwidth_bytes", "mem_bandwidth_bytes_per_second"),
               MBM_LOCAL: ("mem_bandwidth_local_bytes", "mem_bandwidth_local_bytes_per_second")}


class MonitoringUnavailable(Exception):
    """resctrl is not mounted, or the platform has no L3 monitoring; str() says which."""


def group_name(task_id: str) -> str:
    # Task ids are the orchestrator's (paths, uuids): a digest is always a valid name.
    return GROUP_PREFIX + hashlib.sha256(task_id.encode()).hexdigest()[:16]


def parse_counter(text: str) -> Optional[int]:
    """A mon_data file's value; None for `Unavailable` or `Error`."""
    text = text.strip()
    return int(text) if text.isdigit() else None


def _sum_of_all(values: Sequence[Optional[float]]) -> Optional[float]:
    """The sum of `values` (of ints an int), None where one of them is None."""
    known = [v for v in values if v is not None]
    return sum(known) if len(known) == len(values) else None


@dataclass
class Counter:
    """One cumulative kernel counter turned into a rate and an OWCA-side counter that
    survives the group being made anew (a new RMID starts again near zero)."""
    last: Optional[int] = None
    last_ts: Optional[float] = None
    total: int = 0
    rate: Optional[float] = None

    def update(self, value: Optional[int], ts: float) -> None:
        if value is None:        # Unavailable: no rate this cycle, next one starts afresh
            self.last = self.last_ts = self.rate = None
            return
        last, last_ts = self.last, self.last_ts   # both None, or both set
        if last is not None and last_ts is not None and value >= last and ts > last_ts:
            self.total += value - last
            self.rate = (value - last) / (ts - last_ts)
        else:                    # first value, or the counter went back: wrapped or reset
            self.rate = None
        self.last, self.last_ts = value, ts


@dataclass
class Monitored:
    """A task's MON group and its counters per cache id."""
    ctrl: str                                 # "" for the default control group
    name: str
    counters: Dict[Tuple[str, str], Counter] = field(default_factory=dict)  # (event, id)

    @property
    def parts(self) -> Tuple[str, ...]:
        return tuple(p for p in (self.ctrl, MON_GROUPS, self.name) if p)


class RdtMonitor:
    """The measure source: `update(tasks)` each tasks frame, `read()` each cycle."""

    def __init__(self, fs: ResctrlFS, thread_ids: Callable[[str], List[int]],
                 clock: Callable[[], float] = time.monotonic):
        # thread_ids(cgroup_path) -> the ids of the threads of that cgroup.
        self.fs = fs
        self.thread_ids = thread_ids
        self.clock = clock
        if not fs.mounted():
            raise MonitoringUnavailable(f"resctrl is not mounted at {fs.root}")
        try:
            self.num_rmids = int(fs.read("info", "L3_MON", "num_rmids"))
            self.events = fs.read("info", "L3_MON", "mon_features").split()
        except FileNotFoundError:
            raise MonitoringUnavailable(f"{fs.root}: no info/L3_MON: the platform (or the "
                                        f"kernel) has no L3 monitoring") from None
        self.tasks: Dict[str, str] = {}               # task id -> cgroup path
        self.groups: Dict[str, Monitored] = {}
        # control group -> {(event, cache id): Counter}
        self.platform_counters: Dict[str, Dict[Tuple[str, str], Counter]] = {}
        self.unmonitored: List[str] = []
        self.move_failures = 0
        self._warned_budget = False
        self.failing = False     # the last read_cycle() found resctrl unreadable
        self._remove_leftovers()

    # -- the groups -------------------------------------------------------------------

    def _control_groups(self) -> List[str]:
        return [""] + sorted(n for n in self.fs.directories() if n not in NOT_GROUPS)

    def _mon_groups(self, ctrl: str) -> List[str]:
        try:
            return self.fs.directories(*(p for p in (ctrl, MON_GROUPS) if p))
        except FileNotFoundError:
            return []

    def _remove_leftovers(self) -> None:
        """OWCA's MON groups left by a run that could not clean up (SIGKILL)."""
        for ctrl in self._control_groups():
            for name in self._mon_groups(ctrl):
                if name.startswith(GROUP_PREFIX):
                    self._rmdir(Monitored(ctrl, name))

    def _rmdir(self, group: Monitored) -> None:
        try:
            self.fs.rmdir(os.path.join(*group.parts))
        except FileNotFoundError:
            pass      # its control group went, and the kernel removed it with it
        except OSError as e:
            log.error("cannot remove resctrl group %s: %s", "/".join(group.parts),
                      e.strerror or e)

    def update(self, tasks: Dict[str, str]) -> None:
        """The tasks to monitor: {task id: cgroup path}; the groups of tasks that went
        are removed."""
        for task_id in list(self.groups):
            if task_id not in tasks:
                self._rmdir(self.groups.pop(task_id))
        self.tasks = dict(tasks)

    def _rmids_in_use(self, ctrls: List[str]) -> int:
        # The default group and every control group hold one RMID, every MON group one.
        return len(ctrls) + sum(len(self._mon_groups(c)) for c in ctrls)

    def _place(self, ctrls: List[str], members: Dict[int, str]) -> None:
        """Give each task a MON group in the control group holding its threads, within
        the RMID budget; move in the threads not there yet."""
        in_use = self._rmids_in_use(ctrls)
        self.unmonitored = []
        # Tasks that have a group keep it before new ones get one; then by id.
        order = sorted(self.tasks, key=lambda t: (t not in self.groups, t))
        for task_id in order:
            try:
                threads = self.thread_ids(self.tasks[task_id])
            except (OSError, ValueError) as e:
                log.debug("task %s: threads unreadable: %s", task_id, e)
                continue
            held = [members[t] for t in threads if t in members]
            if not held:
                continue     # no thread left (or none seen yet)
            ctrl = max(set(held), key=held.count)
            group = self.groups.get(task_id)
            if group is not None and (group.ctrl != ctrl or not self._exists(group)):
                # Moved to another control group (owca-allocate's rdt), or its control
                # group was removed: the RMID changes, the counters start again.
                if self._exists(group):
                    self._rmdir(group)
                    in_use -= 1
                del self.groups[task_id]
                group = None
            if group is None:
                if in_use >= self.num_rmids:
                    self.unmonitored.append(task_id)
                    continue
                group = Monitored(ctrl, group_name(task_id))
                try:
                    self.fs.mkdir(os.path.join(*group.parts))
                except FileExistsError:
                    pass
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        log.error("task %s: cannot create resctrl group %s: %s", task_id,
                                  "/".join(group.parts), e.strerror or e)
                    self.unmonitored.append(task_id)   # ENOSPC: RMIDs in limbo
                    continue
                in_use += 1
                self.groups[task_id] = group
            self._move_in(group, [t for t in threads if members.get(t) == ctrl])
        if self.unmonitored and not self._warned_budget:
            log.warning("%d task(s) not monitored by RDT: num_rmids %d is spent (first: %s)",
                        len(self.unmonitored), self.num_rmids, self.unmonitored[0])
        self._warned_budget = bool(self.unmonitored)

    def _exists(self, group: Monitored) -> bool:
        return os.path.isdir(self.fs.path(*group.parts))

    def _move_in(self, group: Monitored, threads: List[int]) -> None:
        try:
            there = set(parse_thread_ids(self.fs.read(*group.parts, "tasks")))
        except FileNotFoundError:
            return
        for thread_id in threads:
            if thread_id in there:
                continue
            try:
                self.fs.write(f"{thread_id}\n", *group.parts, "tasks")
            except ProcessLookupError:
                pass      # the thread ended
            except OSError as e:
                # EINVAL: it moved to another control group since we read; next cycle.
                self.move_failures += 1
                log.debug("thread %d into %s: %s", thread_id, "/".join(group.parts),
                          e.strerror or e)

    # -- reading ----------------------------------------------------------------------

    def _members(self, ctrls: List[str]) -> Dict[int, str]:
        """thread id -> the control group holding it (its `tasks` lists its MON groups' too)."""
        members = {}
        for ctrl in ctrls:
            try:
                text = self.fs.read(*(p for p in (ctrl, "tasks") if p))
            except FileNotFoundError:
                continue
            for thread_id in parse_thread_ids(text):
                members[thread_id] = ctrl
        return members

    def _read_events(self, parts: Tuple[str, ...]) -> Dict[Tuple[str, str], Optional[int]]:
        """{(event, cache id): value or None} of a group's mon_data."""
        out: Dict[Tuple[str, str], Optional[int]] = {}
        try:
            domains = self.fs.directories(*parts, MON_DATA)
        except FileNotFoundError:
            return out
        for domain in domains:
            if not domain.startswith(DOMAIN_PREFIX):
                continue
            cache_id = str(int(domain[len(DOMAIN_PREFIX):]))
            for event in self.events:
                try:
                    out[(event, cache_id)] = parse_counter(
                        self.fs.read(*parts, MON_DATA, domain, event))
                except (FileNotFoundError, ValueError):
                    continue
                except OSError as e:   # EIO and the like: as the kernel's "Error"
                    log.debug("%s: %s", "/".join(parts + (domain, event)), e)
                    out[(event, cache_id)] = None
        return out

    def read(self) -> Tuple[Dict[str, dict], dict]:
        """({task id: metrics}, platform metrics) of this cycle."""
        ctrls = self._control_groups()
        self._place(ctrls, self._members(ctrls))
        ts = self.clock()
        tasks = {}
        for task_id, group in self.groups.items():
            values = self._read_events(group.parts)
            if values:
                tasks[task_id] = self._metrics("task_", values, group.counters, ts)
        platform = {}
        for ctrl in ctrls:
            values = self._read_events(tuple(p for p in (ctrl,) if p))
            counters = self.platform_counters.setdefault(ctrl, {})
            platform[ctrl] = (values, counters)
        for ctrl in set(self.platform_counters) - set(ctrls):
            del self.platform_counters[ctrl]    # a control group that was removed
        return tasks, self._platform_metrics(platform, ts)

    @staticmethod
    def _metrics(prefix: str, values: dict, counters: dict, ts: float) -> dict:
        """A task's metrics, summed over cache ids; a figure some id lacks is left out."""
        out: Dict[str, float] = {}
        occupancy = [v for (e, _), v in values.items() if e == LLC]
        if occupancy and None not in occupancy:
            out[prefix + "llc_occupancy_bytes"] = sum(occupancy)
        for event, (counter_name, rate_name) in MBM_METRICS.items():
            keys = [k for k in values if k[0] == event]
            if not keys:
                continue
            for key in keys:
                counters.setdefault(key, Counter()).update(values[key], ts)
            rates = [counters[k].rate for k in keys]
            out[prefix + counter_name] = sum(counters[k].total for k in keys)
            if None not in rates:
                out[prefix + rate_name] = sum(rates)
        return out

    @staticmethod
    def _platform_metrics(platform: dict, ts: float) -> dict:
        """Per cache id, the sum over the control groups (the default one included),
        each of which counts its MON groups too: the whole platform."""
        out: Dict[str, Dict[str, float]] = {}   # metric -> cache id -> value
        occupancy: Dict[str, List[Optional[int]]] = {}   # cache id -> each group's bytes
        # (event, cache id) -> each group's rate
        rates: Dict[Tuple[str, str], List[Optional[float]]] = {}
        for values, counters in platform.values():
            for (event, cache_id), value in values.items():
                if event == LLC:
                    occupancy.setdefault(cache_id, []).append(value)
                elif event in MBM_METRICS:
                    counter = counters.setdefault((event, cache_id), Counter())
                    counter.update(value, ts)
                    rates.setdefault((event, cache_id), []).append(counter.rate)
        for cache_id, sizes in sorted(occupancy.items()):
            size = _sum_of_all(sizes)
            if size is not None:
                out.setdefault("platform_llc_occupancy_bytes", {})[cache_id] = size
        for (event, cache_id), group_rates in sorted(rates.items()):
            # A group made since the last cycle has no rate yet: the sum would be short.
            rate = _sum_of_all(group_rates)
            if rate is not None:
                out.setdefault("platform_" + MBM_METRICS[event][1], {})[cache_id] = rate
        return out

    def samples(self, labels: dict) -> list:
        return [frames.sample("owca_rdt_monitored_tasks", len(self.groups), labels),
                frames.sample("owca_rdt_unmonitored_tasks", len(self.unmonitored), labels),
                frames.sample("owca_rdt_rmids", self.num_rmids, labels)]

    def read_cycle(self) -> Tuple[Dict[str, dict], dict]:
        """read(), or nothing this cycle when resctrl went away (logged once)."""
        try:
            out = self.read()
        except OSError as e:
            log.log(logging.DEBUG if self.failing else logging.WARNING,
                    "rdt monitoring left out until resctrl is readable again: %s", e)
            self.failing = True
            return {}, {}
        self.failing = False
        return out

    def close(self) -> None:
        for task_id in list(self.groups):
            self._rmdir(self.groups.pop(task_id))


def start_rdt_monitor(paths) -> RdtMonitor:
    """owca-measure's monitor on `paths`' resctrl mount; ConfigError where there is none."""
    from owca.core.config import ConfigError
    try:
        return RdtMonitor(ResctrlFS(paths.resctrlfs), task_threads(paths))
    except (OSError, MonitoringUnavailable) as e:
        raise ConfigError(f"rdt_monitoring: cannot monitor here: {e}") from None


def task_threads(paths) -> Callable[[str], List[int]]:
    """thread_ids(cgroup_path) for RdtMonitor: the threads owca-allocate would move
    into a control group (kernel.cgroup_thread_ids: v1 the cpu tasks file, v2
    cgroup.threads); none for a cgroup that is gone or never followed."""

    def thread_ids(cgroup_path: str) -> List[int]:
        try:
            return cgroup_thread_ids(paths, cgroup_path)
        except (CgroupGone, CgroupRefused):
            return []     # gone since the tasks frame: owca-measure drops it itself
    return thread_ids



# -- as a source of owca-measure --------------------------------------------------

class RdtSource(Source):
    """Intel RDT monitoring through resctrl (rdt.py's RdtMonitor) as a source.

    Imported only when the configuration sets `rdt_monitoring`; a host without resctrl
    or L3 monitoring is a ConfigError at start.

    Failure as a whole: resctrl could not be read or written this cycle (unmounted
    since the start, or failing), so that the cycle has no RDT figures.  A task left
    without a monitoring group because the RMIDs are spent (owca_rdt_unmonitored_tasks)
    or because its cgroup went away is not a failure.
    """

    name = "rdt"

    def __init__(self, cfg, paths):
        self.monitor = start_rdt_monitor(paths)

    def update(self, tasks: Dict[str, dict]) -> None:
        self.monitor.update(cgroup_paths(tasks))

    def read(self, cycle: Cycle) -> Reading:
        tasks, platform = self.monitor.read_cycle()
        return Reading(tasks=tasks, platform=platform,
                       samples=self.monitor.samples(cycle.labels), ok=not self.monitor.failing)

    def close(self) -> None:
        self.monitor.close()
