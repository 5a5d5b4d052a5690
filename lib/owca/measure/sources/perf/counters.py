"""PerfCounters: a changing set of tasks counted through one owned owca-perf helper.

owca-measure tells the helper which task cgroups to open and close (each task
under a slot number of its own), reads every task's counters with one request
per cycle, restarts a helper that died, and derives ratios from the deltas
between two cycles.  Also here: where the task cgroups are found for perf (the
hierarchy that carries the perf_event controller) and the online CPUs the
helper counts on.
"""
import collections
import logging
import os
import time
from typing import Dict, List, Optional

from owca.core import frames
from owca.core.config import ConfigError
from owca.core.kernel import format_cpu_list, online_cpus as read_online_cpus
from owca.core.paths import DEFAULT_PATHS
from owca.measure.sources.base import Cycle, Reading, Source, cgroup_paths
from owca.measure.sources.perf.events import parse_events
from owca.measure.sources.perf.helper import Helper, HelperGone, find_helper
from owca.measure.sources.perf.metrics import DERIVE_INPUTS, counter_metrics, derive

log = logging.getLogger(__name__)

OUT_OF_FDS = ('EMFILE', 'ENFILE')
# Updates between two retries of opens that ran out of descriptors, unless
# tasks closed meanwhile.
RETRY_OUT_OF_FDS_EVERY = 30
# Cycles to wait before the next restart after 1, 2, 3... failed starts.
MAX_RESTART_BACKOFF_CYCLES = 64


def parse_proc_cgroups(text):
    """/proc/cgroups as {controller: (hierarchy id, cgroups, enabled)}; hierarchy
    0 means the controller is on the cgroup2 hierarchy (or nowhere)."""
    controllers = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith('#') and all(f.isdigit() for f in fields[1:]):
            controllers[fields[0]] = tuple(int(f) for f in fields[1:])
    return controllers


def perf_event_hierarchy(paths):
    """(hierarchy id, cgroups) of perf_event, or None when the kernel lacks it."""
    with open(paths.proc('cgroups')) as f:
        found = parse_proc_cgroups(f.read()).get('perf_event')
    return found[:2] if found else None


def default_cgroup_root(paths):
    """Where task cgroups are found for perf: the v1 perf_event mount when the
    controller is bound to v1, else the cgroup2 mount (where perf_event is
    implicit).  Raises ValueError when neither can carry perf events."""
    hierarchy = perf_event_hierarchy(paths)
    if hierarchy is None:
        raise ValueError('this kernel has no perf_event cgroup controller')
    if hierarchy[0] == 0:
        return paths.cgroup_v2_root
    root = paths.cgroup_v1('perf_event').rstrip('/')
    if not os.path.isdir(root) or not os.path.exists(os.path.join(root, 'cgroup.procs')):
        raise ValueError('the perf_event controller is bound to a cgroup v1 hierarchy that '
                         'is not mounted at %s; set perf_cgroup_root' % root)
    return root


def online_cpus(paths):
    """The online CPU list ("0-3,8") as the kernel writes it."""
    return format_cpu_list(read_online_cpus(paths))


class PerfCounters:
    """Perf counters for a changing set of tasks, through one owned helper.

    events: specs as in parse_events; cgroup_root: the directory under which
    the tasks' cgroup paths live in the hierarchy that carries perf_event
    (default: found from paths, see default_cgroup_root); cpus: the online CPU
    list ("0-3"), default read from paths' sysfs; wrapper: argv prefix for the
    helper (valgrind in tests).  Raises ValueError or FileNotFoundError on a
    configuration it cannot use, HelperGone when the helper does not start.
    """

    def __init__(self, events, helper_path=None, paths=None, cgroup_root=None, cpus=None,
                 wrapper=(), timeout=10.0):
        paths = paths or DEFAULT_PATHS
        self.events = parse_events(events)
        helper = find_helper(helper_path)
        self.cgroup_root = os.path.abspath(cgroup_root or default_cgroup_root(paths))
        self.argv = list(wrapper) + [helper, '-c', cpus or online_cpus(paths)]
        self.argv += [event.spec for event in self.events]
        self.timeout = timeout
        self.restarts = 0
        self.failed_tasks = {}     # task_id -> errno name of its last failed open
        self._updates = 0
        self._tasks = None         # the last update()'s argument
        self._wanted = {}          # task_id -> cgroup directory, from the last update()
        self._dirs = {}            # cgroup path -> directory, checked once per task
        self._opened = {}          # task_id -> (slot, cgroup path)
        self._slot_task = {}       # helper slot -> task_id
        self._free_slots = []
        self._next_slot = 0
        self._previous = {}        # task_id -> counter metrics of the last read
        self._previous_time = 0.0  # time.monotonic() of the last read
        self._warned_events = set()
        self._warned_unknown = False
        self._reported_failures = None
        self._start_failures = 0
        self._cycles_until_start = 0
        self.helper: Optional[Helper] = None   # None while stopped or backing off
        self._start()

    # -- helper lifecycle ---------------------------------------------------

    def _start(self):
        self.helper = Helper(self.argv, self.timeout)
        by_name = {event.name: event for event in self.events}
        self.active_events = [by_name[name] for name in self.helper.hello.events]
        self.missing_events = [skipped.name for skipped in self.helper.hello.skipped]
        self._derives = bool({e.metric for e in self.active_events} & DERIVE_INPUTS)
        for skipped in self.helper.hello.skipped:
            if skipped.name not in self._warned_events:
                self._warned_events.add(skipped.name)
                log.warning('perf event %s is not available here (%s: %s); counting '
                            'the other events without it', skipped.name, skipped.errno,
                            skipped.text)
        self._opened.clear()
        self.failed_tasks = {}     # a new helper has all its descriptors free
        self._slot_task.clear()
        self._free_slots.clear()
        self._next_slot = 0
        self._previous.clear()
        self._sync()

    def _stop(self):
        if self.helper is not None:
            helper, self.helper = self.helper, None
            try:
                helper.close()
            except OSError:
                pass

    def _restart(self, reason):
        assert self.helper is not None, 'only a started helper fails'
        log.warning('perf helper (pid %d) failed: %s; restarting it, this cycle has no '
                    'perf metrics', self.helper.pid, reason)
        self._stop()
        self.restarts += 1
        self._try_start()

    def _try_start(self):
        try:
            self._start()
            self._start_failures = 0
        except (OSError, HelperGone) as e:
            self._stop()
            self._start_failures += 1
            self._cycles_until_start = min(2 ** self._start_failures, MAX_RESTART_BACKOFF_CYCLES)
            log.warning('perf helper did not start (%s); next try in %d cycles',
                        e, self._cycles_until_start)

    def close(self):
        self._stop()

    def samples(self, labels):
        """The counters' own health, as owca_perf_* samples of owca-measure."""
        not_counted = collections.Counter(self.failed_tasks.values())
        return [
            frames.sample('owca_perf_helper_restarts_total', self.restarts, labels, 'counter'),
            frames.sample('owca_perf_events_missing', len(self.missing_events), labels),
        ] + [frames.sample('owca_perf_tasks_not_counted', count, dict(labels, errno=errno))
             for errno, count in sorted(not_counted.items())]

    # -- tasks --------------------------------------------------------------

    def _cgroup_dir(self, cgroup_path):
        path = os.path.normpath(os.path.join(self.cgroup_root, cgroup_path.lstrip('/')))
        if '\n' in path or os.path.commonpath([path, self.cgroup_root]) != self.cgroup_root:
            raise ValueError('cgroup path %r leaves %s' % (cgroup_path, self.cgroup_root))
        return path

    def update(self, tasks):
        """Opens counters for new tasks (task_id -> cgroup path relative to the
        cgroup root), closes those of tasks that went, and retries opens that
        failed before."""
        if tasks == self._tasks and not self.failed_tasks and self.helper is not None:
            return  # the common cycle: nothing to open, close or retry
        self._tasks = dict(tasks)
        wanted, dirs = {}, {}
        for task_id, cgroup_path in tasks.items():
            directory = self._dirs.get(cgroup_path)
            if directory is None:
                try:
                    directory = self._cgroup_dir(cgroup_path)
                except ValueError as e:
                    log.warning('perf: task %s: %s', task_id, e)
                    continue
            wanted[task_id] = dirs[cgroup_path] = directory
        self._wanted, self._dirs = wanted, dirs
        if self.helper is not None:
            try:
                self._sync()
            except HelperGone as e:
                self._restart(e)

    def _sync(self):
        assert self.helper is not None, 'called once the helper has started'
        requests, pending = [], []
        for task_id, (slot, path) in list(self._opened.items()):
            if self._wanted.get(task_id) != path:
                requests.append('close %d' % slot)
                pending.append(('close', task_id, slot))
        # Opens that ran out of descriptors are tried again when some were
        # freed, or now and then: each costs the helper a round of failures.
        self._updates += 1
        retry_out_of_fds = bool(requests) or self._updates % RETRY_OUT_OF_FDS_EVERY == 0
        failed = {task_id: errno for task_id, errno in self.failed_tasks.items()
                  if task_id in self._wanted}
        for task_id, path in self._wanted.items():
            opened = self._opened.get(task_id)
            if opened is None or opened[1] != path:
                if not retry_out_of_fds and failed.get(task_id) in OUT_OF_FDS:
                    continue
                slot = self._allocate_slot()
                self._slot_task[slot] = task_id
                requests.append('open %d %s' % (slot, path))
                pending.append(('open', task_id, slot))
        if not requests:
            self.failed_tasks = failed
            self._report_failures()
            return
        # One reply per request, in order (Helper.request).
        replies = self.helper.request(requests)
        for (what, task_id, slot), reply in zip(pending, replies, strict=True):
            if reply.slot != slot:
                raise HelperGone('reply for slot %s to a request for slot %d' % (reply.slot, slot))
            if what == 'close':
                del self._opened[task_id]
                del self._slot_task[slot]
                self._free_slots.append(slot)
                self._previous.pop(task_id, None)
            elif reply.errno is None:
                self._opened[task_id] = (slot, self._wanted[task_id])
                failed.pop(task_id, None)
            else:
                del self._slot_task[slot]
                self._free_slots.append(slot)
                if failed.get(task_id) != reply.errno:
                    log.info('perf: task %s not counted: %s %s', task_id, reply.errno, reply.text)
                failed[task_id] = reply.errno
        self.failed_tasks = failed
        self._report_failures()

    def _allocate_slot(self):
        if self._free_slots:
            return self._free_slots.pop()
        self._next_slot += 1
        return self._next_slot - 1

    def _report_failures(self):
        by_errno = collections.Counter(self.failed_tasks.values())
        if by_errno == self._reported_failures:
            return
        self._reported_failures = by_errno
        for errno, count in sorted(by_errno.items()):
            reason = {'EMFILE': 'the open file limit is reached',
                      'ENFILE': 'the system file table is full',
                      'ENOENT': 'their perf cgroup does not exist'}.get(errno, errno)
            log.warning('perf: %d tasks could not be counted: %s (%s)', count, reason, errno)

    # -- reading ------------------------------------------------------------

    def read(self):
        """Returns {task_id: {metric: value}} for every counted task: counters,
        scaling factors, and ratios over the last cycle. {} in a cycle where the
        helper was (re)started."""
        if self.helper is None:
            self._cycles_until_start -= 1
            if self._cycles_until_start <= 0:
                self.restarts += 1
                self._try_start()
            return {}
        now = time.monotonic()
        try:
            records = self.helper.read()
        except HelperGone as e:
            self._restart(e)
            return {}
        result, current = {}, {}
        previous_all = self._previous
        elapsed = now - self._previous_time
        for record in records:
            task_id = self._slot_task.get(record.slot)
            if task_id is None:
                continue
            counters = counter_metrics(record, self.active_events)
            if not counters:
                if not self._warned_unknown:
                    self._warned_unknown = True
                    log.warning('perf: task %s: its group never got onto the PMU on %d CPUs '
                                '(too many hardware events for the counters?); such tasks '
                                'have no perf metrics', task_id, record.cpus_unknown)
                continue
            current[task_id] = counters
            metrics = dict(counters)
            previous = previous_all.get(task_id) if self._derives else None
            if previous is not None:
                metrics.update(derive(previous, counters, elapsed))
            result[task_id] = metrics
        self._previous, self._previous_time = current, now
        return result



# -- as a source of owca-measure --------------------------------------------------

class PerfSource(Source):
    """Perf counters (perf.py's PerfCounters, through the owca-perf helper) as a source.

    Imported only when the configuration sets `perf_events`.  The helper is started
    with the source: a configuration it cannot count here (no helper binary, no
    perf_event cgroup controller, an event the grammar refuses) is a ConfigError.

    Failure as a whole: the cycle has no perf metrics because of the helper: it died,
    hung or spoke out of protocol during the read and was restarted, or it is not
    running (a restart failed and the next try is cycles away).  A task whose counters
    could not be opened (owca_perf_tasks_not_counted) or an event this machine lacks
    (owca_perf_events_missing) is not a failure.
    """

    name = "perf"

    def __init__(self, cfg, paths):
        try:
            self.counters = PerfCounters(cfg.perf_events, helper_path=cfg.perf_helper,
                                         paths=paths, cgroup_root=cfg.perf_cgroup_root)
        except (OSError, ValueError, HelperGone) as e:
            raise ConfigError(f"perf_events: cannot count perf events here: {e}") from None

    def update(self, tasks: Dict[str, dict]) -> None:
        self.counters.update(cgroup_paths(tasks))

    def read(self, cycle: Cycle) -> Reading:
        restarts = self.counters.restarts
        tasks = self.counters.read()
        # read() restarts a helper that failed, or tries to start a missing one; both
        # count a restart, and give this cycle no perf metrics.
        ok = self.counters.restarts == restarts and self.counters.helper is not None
        return Reading(tasks=tasks, samples=self.counters.samples(cycle.labels), ok=ok)

    def cgroups_counted(self) -> List[str]:
        """The cgroup directories whose groups the helper holds open (for the same-work
        floor of benchmarks/measure_cycle.py)."""
        return [directory for _slot, directory in self.counters._opened.values()]

    def helper_cpu_seconds(self) -> float:
        """CPU time the running helper has used (its schedstat's first field, ns); 0
        while none runs.  For owca-measure's CPU budget: the helper's reads are its
        cost too."""
        helper = self.counters.helper
        if helper is None:
            return 0.0
        try:
            # the helper is this process's child: the real /proc, whatever --procfs says
            with open(f"/proc/{helper.pid}/schedstat", "rb") as f:
                return int(f.read().split()[0]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        self.counters.close()
