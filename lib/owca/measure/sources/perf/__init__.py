"""Per-task perf counters, owca-measure's side of the owca-perf helper.

owca-measure owns one helper process (bin/owca-perf.c; its wire protocol is
written at the top of that file and explained in docs/perf.md).  The helper
holds, per task cgroup and per online CPU, one perf event group in cgroup
mode.  The modules here:

    events      the event grammar: names the helper knows, raw NAME=CONFIG
                events, their metrics and units (the C helper keeps the same
                table; tests/test_perf.py keeps the two equal)
    helper      the helper's wire protocol and its process
    metrics     what the counts become: counters in their units, scaling
                factors, ratios from the deltas between two cycles
    counters    PerfCounters: the tasks' slots in the helper, read per cycle,
                the helper restarted when it dies

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
from owca.measure.sources.perf.counters import PerfCounters, PerfSource
from owca.measure.sources.perf.events import Event, parse_events
from owca.measure.sources.perf.helper import HelperGone, find_helper

__all__ = ['Event', 'HelperGone', 'PerfCounters', 'PerfSource', 'find_helper', 'parse_events']
