"""The perf event grammar: the events owca-measure can be configured with, and
the metric each one becomes, in its unit."""
import collections
import re


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
    if len(hardware) + len(software) > MAX_EVENTS:
        raise ValueError('at most %d perf events, got %d'
                         % (MAX_EVENTS, len(hardware) + len(software)))
    return hardware + software
