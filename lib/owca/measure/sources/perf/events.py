"""The perf event grammar: the events owca-measure can be configured with, what
each one counts in the kernel's terms, and the metric it becomes.

bin/owca-perf.c opens these events from the same table (its known_events);
tests/test_perf.py reads that table out of the C source and keeps the two equal.
"""
import collections
import re
from typing import List, Set


class KnownEvent(collections.namedtuple('KnownEvent', 'name perf_type perf_config metric scale')):
    """An event the helper knows by name: the perf_event_attr type and config it
    opens, as linux/perf_event.h names them, the metric it becomes, and the
    factor from the kernel's unit to the metric's."""


HARDWARE = 'PERF_TYPE_HARDWARE'
SOFTWARE = 'PERF_TYPE_SOFTWARE'
# What a NAME=CONFIG event is opened as.
RAW = 'PERF_TYPE_RAW'

KNOWN_EVENTS = (
    KnownEvent('instructions', HARDWARE, 'PERF_COUNT_HW_INSTRUCTIONS', 'task_instructions', 1),
    KnownEvent('cycles', HARDWARE, 'PERF_COUNT_HW_CPU_CYCLES', 'task_cycles', 1),
    KnownEvent('cache-misses', HARDWARE, 'PERF_COUNT_HW_CACHE_MISSES', 'task_cache_misses', 1),
    KnownEvent('cache-references', HARDWARE, 'PERF_COUNT_HW_CACHE_REFERENCES',
               'task_cache_references', 1),
    KnownEvent('branch-misses', HARDWARE, 'PERF_COUNT_HW_BRANCH_MISSES', 'task_branch_misses',
               1),
    KnownEvent('branch-instructions', HARDWARE, 'PERF_COUNT_HW_BRANCH_INSTRUCTIONS',
               'task_branch_instructions', 1),
    # task-clock counts nanoseconds; metric names carry seconds.
    KnownEvent('task-clock', SOFTWARE, 'PERF_COUNT_SW_TASK_CLOCK', 'task_task_clock_seconds',
               1e-9),
    KnownEvent('context-switches', SOFTWARE, 'PERF_COUNT_SW_CONTEXT_SWITCHES',
               'task_context_switches', 1),
    KnownEvent('cpu-migrations', SOFTWARE, 'PERF_COUNT_SW_CPU_MIGRATIONS', 'task_cpu_migrations',
               1),
    KnownEvent('page-faults', SOFTWARE, 'PERF_COUNT_SW_PAGE_FAULTS', 'task_page_faults', 1),
)
KNOWN_BY_NAME = {event.name: event for event in KNOWN_EVENTS}
HARDWARE_EVENTS = {e.name: e.metric for e in KNOWN_EVENTS if e.perf_type == HARDWARE}
SOFTWARE_EVENTS = {e.name: e.metric for e in KNOWN_EVENTS if e.perf_type == SOFTWARE}

# The helper's limits: events per group (MAX_EVENTS) and the length of a raw
# event's name (its char name[64], less the terminating NUL).
MAX_EVENTS = 16
RAW_EVENT = re.compile(r'^([a-z0-9_]{1,63})=(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})$')


class Event(collections.namedtuple('Event', 'name spec metric scale')):
    """One configured event: the helper's name for it, what the helper is
    given on its command line, the metric it becomes, and the unit factor."""


def parse_events(specs):
    """Validates event specs from the configuration; returns [Event].

    Hardware and raw events come first: the first one leads each group, and a
    hardware leader keeps the group in the PMU's context.  Raises ValueError
    naming the bad spec.
    """
    hardware: List[Event] = []
    software: List[Event] = []
    seen: Set[str] = set()
    for spec in specs:
        if not isinstance(spec, str):
            raise ValueError('perf event must be a string, not %r' % (spec,))
        known = KNOWN_BY_NAME.get(spec)
        if known is not None:
            event = Event(spec, spec, known.metric, known.scale)
        else:
            match = RAW_EVENT.match(spec)
            if not match:
                raise ValueError(
                    'unknown perf event %r: expected one of %s, or NAME=CONFIG for a raw '
                    'event (NAME of a-z0-9_, CONFIG in hex or decimal)'
                    % (spec, ', '.join(KNOWN_BY_NAME)))
            if int(match.group(2), 0) >= 1 << 64:
                raise ValueError('perf event %r: CONFIG does not fit in 64 bits' % spec)
            name = match.group(1)
            event = Event(name, spec, 'task_' + name, 1)
        if event.name in seen or event.metric in {e.metric for e in hardware + software}:
            raise ValueError('perf event %r given twice' % spec)
        seen.add(event.name)
        (software if spec in SOFTWARE_EVENTS else hardware).append(event)
    if len(hardware) + len(software) > MAX_EVENTS:
        raise ValueError('at most %d perf events, got %d'
                         % (MAX_EVENTS, len(hardware) + len(software)))
    return hardware + software
