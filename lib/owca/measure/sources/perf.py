"""Per-task perf counters, owca-measure's side of the owca-perf helper.

owca-measure owns one helper process (bin/owca-perf.c; its wire protocol is
written at the top of that file and explained in docs/perf.md).  The helper
holds, per task cgroup and per online CPU, one perf event group in cgroup
mode; this module tells it which tasks to open and close, reads every task's
counters with one request per cycle, restarts a helper that died, and derives
ratios from the deltas between two cycles.

Metrics (per task; counters are cumulative since the task was opened):

    task_instructions, task_cycles, task_cache_misses, task_cache_references,
    task_branch_misses, task_branch_instructions       hardware events
    task_<name>                                       raw event NAME=CONFIG
    task_task_clock_seconds, task_context_switches,
    task_cpu_migrations, task_page_faults             software events
    task_scaling_factor_avg, task_scaling_factor_max  time_enabled/time_running
                                                      over the CPUs that counted
    task_ipc, task_ips, task_cache_hit_ratio,
    task_cache_misses_per_kilo_instructions           from deltas; absent when
                                                      an input is missing or a
                                                      denominator did not move
"""
import collections
import logging
import math
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from owca.core import frames
from owca.core.paths import DEFAULT_PATHS

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
HELPER_NAME = 'owca-perf'

HARDWARE_EVENTS = {
    'instructions': 'task_instructions',
    'cycles': 'task_cycles',
    'cache-misses': 'task_cache_misses',
    'cache-references': 'task_cache_references',
    'branch-misses': 'task_branch_misses',
    'branch-instructions': 'task_branch_instructions',
}
SOFTWARE_EVENTS = {
    'task-clock': 'task_task_clock_seconds',
    'context-switches': 'task_context_switches',
    'cpu-migrations': 'task_cpu_migrations',
    'page-faults': 'task_page_faults',
}
# task-clock counts nanoseconds; metric names carry seconds.
EVENT_UNIT_SCALE = {'task-clock': 1e-9}
SCALING_FACTOR_AVG = 'task_scaling_factor_avg'
SCALING_FACTOR_MAX = 'task_scaling_factor_max'
DERIVE_INPUTS = {'task_instructions', 'task_cycles', 'task_cache_misses',
                 'task_cache_references'}
DERIVED_METRICS = ('task_ipc', 'task_ips', 'task_cache_hit_ratio',
                   'task_cache_misses_per_kilo_instructions')

RAW_EVENT = re.compile(r'^([a-z0-9_]{1,63})=(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})$')
# Replies to at most this many requests are waiting in the pipe at once, so
# that neither side blocks writing while the other does (replies < 200 bytes).
REQUEST_CHUNK = 256
OUT_OF_FDS = ('EMFILE', 'ENFILE')
# Updates between two retries of opens that ran out of descriptors, unless
# tasks closed meanwhile.
RETRY_OUT_OF_FDS_EVERY = 30
# Cycles to wait before the next restart after 1, 2, 3... failed starts.
MAX_RESTART_BACKOFF_CYCLES = 64


class Event(collections.namedtuple('Event', 'name spec metric scale')):
    """One configured event: the helper's name for it, what the helper is
    given on its command line, the metric it becomes, and the unit factor."""


class HelperGone(Exception):
    """The helper died, closed its output, hung, or spoke out of protocol."""


Hello = collections.namedtuple('Hello', 'version ncpus events skipped')
Skipped = collections.namedtuple('Skipped', 'name errno text')
Reply = collections.namedtuple('Reply', 'slot errno text')
Record = collections.namedtuple(
    'Record', 'slot cpus_counted cpus_unknown values scale_avg scale_max')


def parse_events(specs):
    """Validates event specs from the configuration; returns [Event].

    Hardware and raw events come first: the first one leads each group, and a
    hardware leader keeps the group in the PMU's context.  Raises ValueError
    naming the bad spec.
    """
    hardware, software, seen = [], [], set()
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError('perf event must be a string, not %r' % (spec,))
        if spec in HARDWARE_EVENTS:
            event = Event(spec, spec, HARDWARE_EVENTS[spec], 1)
        elif spec in SOFTWARE_EVENTS:
            event = Event(spec, spec, SOFTWARE_EVENTS[spec], EVENT_UNIT_SCALE.get(spec, 1))
        else:
            match = RAW_EVENT.match(spec)
            if not match:
                raise ValueError(
                    'unknown perf event %r: expected one of %s, or NAME=CONFIG for a raw '
                    'event (NAME of a-z0-9_, CONFIG in hex or decimal)'
                    % (spec, ', '.join(list(HARDWARE_EVENTS) + list(SOFTWARE_EVENTS))))
            if int(match.group(2), 0) >= 1 << 64:
                raise ValueError('perf event %r: CONFIG does not fit in 64 bits' % spec)
            name = match.group(1)
            event = Event(name, spec, 'task_' + name, 1)
        if event.name in seen or event.metric in {e.metric for e in hardware + software}:
            raise ValueError('perf event %r given twice' % spec)
        seen.add(event.name)
        (software if spec in SOFTWARE_EVENTS else hardware).append(event)
    if len(hardware) + len(software) > 16:
        raise ValueError('at most 16 perf events, got %d' % (len(hardware) + len(software)))
    return hardware + software


def parse_hello(text):
    """Parses the helper's hello (up to and including "ready")."""
    lines = text.splitlines()
    if not lines or lines[-1] != 'ready':
        raise HelperGone('hello does not end with "ready": %r' % text[-80:])
    first = lines[0].split()
    if len(first) != 3 or first[0] != HELPER_NAME or not first[1].isdigit() or not first[2].isdigit():
        raise HelperGone('bad hello line %r' % lines[0])
    events, skipped = [], []
    for line in lines[1:-1]:
        parts = line.split(' ', 3)
        if parts[0] == 'event' and len(parts) == 3 and parts[1] == str(len(events)):
            events.append(parts[2])
        elif parts[0] == 'skip' and len(parts) >= 3:
            skipped.append(Skipped(parts[1], parts[2], parts[3] if len(parts) > 3 else ''))
        else:
            raise HelperGone('bad hello line %r' % line)
    return Hello(int(first[1]), int(first[2]), events, skipped)


def parse_reply(line):
    """Parses "ok SLOT" or "error SLOT|- ERRNO TEXT" into a Reply."""
    parts = line.split(' ', 3)
    if parts[0] == 'ok' and len(parts) == 2 and parts[1].isdigit():
        return Reply(int(parts[1]), None, '')
    if parts[0] == 'error' and len(parts) >= 3 and (parts[1].isdigit() or parts[1] == '-'):
        slot = int(parts[1]) if parts[1].isdigit() else None
        return Reply(slot, parts[2], parts[3] if len(parts) > 3 else '')
    raise HelperGone('bad reply %r' % line)


def parse_values_header(line):
    """Parses "values NTASKS NBYTES"; returns (ntasks, nbytes)."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != 'values' or not parts[1].isdigit() or not parts[2].isdigit():
        raise HelperGone('bad values header %r' % line)
    return int(parts[1]), int(parts[2])


def record_struct(nevents):
    return struct.Struct('=IHH%dQdd' % nevents)


def parse_values(blob, nevents, ntasks):
    """Decodes the binary records of a read reply into [Record]."""
    layout = record_struct(nevents)
    if len(blob) != layout.size * ntasks:
        raise HelperGone('values: %d bytes for %d records of %d bytes'
                         % (len(blob), ntasks, layout.size))
    return [Record(r[0], r[1], r[2], r[3:3 + nevents], r[-2], r[-1])
            for r in layout.iter_unpack(blob)]


def counter_metrics(record, events):
    """The metrics of one record; {} when some CPU's counts are unknown
    (absent rather than an undercount)."""
    if record.cpus_unknown:
        return {}
    metrics = {event.metric: value * event.scale if event.scale != 1 else value
               for event, value in zip(events, record.values)}
    if record.cpus_counted:
        metrics[SCALING_FACTOR_AVG] = record.scale_avg
        metrics[SCALING_FACTOR_MAX] = record.scale_max
    return metrics


def derive(previous, current, elapsed_seconds):
    """Ratios over one cycle from two counter samples of the same task.

    A ratio is absent when an input is missing, a counter went backwards
    (restart), or its denominator did not move.
    """
    def delta(metric):
        if metric in previous and metric in current and current[metric] >= previous[metric]:
            return current[metric] - previous[metric]
        return None

    derived = {}
    instructions = delta('task_instructions')
    cycles = delta('task_cycles')
    misses = delta('task_cache_misses')
    references = delta('task_cache_references')
    if instructions is not None and cycles:
        derived['task_ipc'] = instructions / cycles
    if instructions is not None and elapsed_seconds > 0:
        derived['task_ips'] = instructions / elapsed_seconds
    if misses is not None and references:
        derived['task_cache_hit_ratio'] = (references - misses) / references
    if misses is not None and instructions:
        derived['task_cache_misses_per_kilo_instructions'] = misses * 1000 / instructions
    return derived


def find_helper(configured=None):
    """Path of the helper binary: the configured one, else beside the Python
    executable (a venv's bin), else build/ of this source tree, else PATH."""
    if configured:
        if not os.access(configured, os.X_OK):
            raise FileNotFoundError('perf helper %s is not an executable file' % configured)
        return configured
    candidates = [os.path.join(os.path.dirname(sys.executable), HELPER_NAME),
                  str(Path(__file__).resolve().parents[2] / 'build' / HELPER_NAME)]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(HELPER_NAME)
    if found:
        return found
    raise FileNotFoundError('perf helper %s not found beside %s, in build/ (make helper) '
                            'or on PATH' % (HELPER_NAME, sys.executable))


class Helper:
    """One running helper process and its protocol; raises HelperGone."""

    def __init__(self, argv, timeout=10.0):
        self.timeout = timeout
        self._buffer = bytearray()
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        close_fds=True)
        self._stdin = self.process.stdin.fileno()
        self._stdout = self.process.stdout.fileno()
        # Writes wait with a deadline too: a hung helper must not hang us.
        os.set_blocking(self._stdin, False)
        # poll, not select: a helper restarted while owca-measure holds
        # thousands of cgroup files gets pipe fds above select's 1024.
        self._readable = select.poll()
        self._readable.register(self._stdout, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self._stdin, select.POLLOUT)
        try:
            lines = []
            while not lines or lines[-1] != 'ready':
                lines.append(self._line())
            self.hello = parse_hello('\n'.join(lines) + '\n')
            if self.hello.version != PROTOCOL_VERSION:
                raise HelperGone('speaks protocol %d, owca-measure %d'
                                 % (self.hello.version, PROTOCOL_VERSION))
        except HelperGone:
            self.close()
            raise

    @property
    def pid(self):
        return self.process.pid

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._readable.poll(math.ceil(remaining * 1000)):
            raise HelperGone('no answer within %.1f s' % self.timeout)
        chunk = os.read(self._stdout, 1 << 16)
        if not chunk:
            raise HelperGone('exited (status %s)' % self.process.poll())
        self._buffer += chunk

    def _line(self, deadline=None):
        deadline = deadline or time.monotonic() + self.timeout
        while True:
            end = self._buffer.find(b'\n')
            if end >= 0:
                line = self._buffer[:end].decode('utf-8', 'replace')
                del self._buffer[:end + 1]
                return line
            self._fill(deadline)

    def _exactly(self, nbytes, deadline):
        while len(self._buffer) < nbytes:
            self._fill(deadline)
        data = bytes(self._buffer[:nbytes])
        del self._buffer[:nbytes]
        return data

    def _send(self, text):
        data = memoryview(text.encode())
        deadline = time.monotonic() + self.timeout
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._writable.poll(math.ceil(remaining * 1000)):
                raise HelperGone('not reading its input within %.1f s' % self.timeout)
            try:
                data = data[os.write(self._stdin, data):]
            except BlockingIOError:
                continue
            except OSError as e:
                raise HelperGone('stdin closed: %s' % e.strerror) from None

    def request(self, lines):
        """Sends request lines, in chunks; returns one Reply per line."""
        replies = []
        for start in range(0, len(lines), REQUEST_CHUNK):
            chunk = lines[start:start + REQUEST_CHUNK]
            self._send(''.join(line + '\n' for line in chunk))
            deadline = time.monotonic() + self.timeout
            replies.extend(parse_reply(self._line(deadline)) for _ in chunk)
        return replies

    def read(self):
        """Sends "read"; returns [Record]."""
        self._send('read\n')
        deadline = time.monotonic() + self.timeout
        ntasks, nbytes = parse_values_header(self._line(deadline))
        return parse_values(self._exactly(nbytes, deadline), len(self.hello.events), ntasks)

    def close(self):
        """Asks the helper to quit, kills it if it does not; reaps it."""
        if self.process.poll() is None:
            try:
                os.write(self._stdin, b'quit\n')
            except OSError:
                pass  # gone already, or hung with a full pipe: killed below
            try:
                self.process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


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


def mount_perf_event_v1(mountpoint):
    """Mounts the perf_event v1 controller (tests, benchmarks); raises OSError."""
    done = subprocess.run(['mount', '-t', 'cgroup', '-o', 'perf_event', 'cgroup', mountpoint],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError('mount perf_event at %s: %s' % (mountpoint, done.stderr.strip()))


def unmount_perf_event_v1(mountpoint, paths, timeout=20.0):
    """Unmounts what mount_perf_event_v1 mounted and gives perf_event back to
    cgroup2; returns False when it is still bound to v1 after `timeout`.

    A v1 hierarchy outlives its mount while removed child cgroups are still
    being freed, and stays after that: perf_event then remains bound to v1 and
    cgroup2 fds get ENOENT.  Mounting and unmounting it once it holds only its
    root releases it.  Call it only if perf_event was on cgroup2 before.
    """
    subprocess.run(['umount', mountpoint], check=True)
    remounted = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hierarchy, cgroups = perf_event_hierarchy(paths)
        if hierarchy == 0:
            return True
        if cgroups == 1 and remounted != hierarchy:
            mount_perf_event_v1(mountpoint)
            subprocess.run(['umount', mountpoint], check=True)
            remounted = hierarchy
        time.sleep(0.05)
    return False


def online_cpus(paths):
    """The online CPU list ("0-3,8") as the kernel writes it."""
    from owca.core.kernel import format_cpu_list, online_cpus as read_online_cpus
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
        self.helper = None
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
        for (what, task_id, slot), reply in zip(pending, self.helper.request(requests)):
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
