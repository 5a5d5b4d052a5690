"""Every metric OWCA emits: name, type, unit, levels, source.

docs/metrics.md is generated from this registry (`make docs`), and a test
checks both that the generated file is current and that every metric the tools
emit is registered here.  A metric with extra dimensions (per CPU, per NUMA
node) is nested in frames one level per dimension,
`{"platform_cpu_usage": {"0": 123, "1": 456}}`, and exported to Prometheus with
one label per level, named by `levels`.

Plug-ins may emit metrics that are not registered here; they are exported as
gauges (or with the type their sample gives), nested levels labelled `level1`,
`level2`, ...

Frames carry the names registered here (WCA's names, which detectors, allocators and
recordings use), in the units the kernel gives.  The Prometheus exposition, and only it,
follows Prometheus' naming rules (`promtool check metrics`, and
https://prometheus.io/docs/practices/naming/): a counter's name ends in `_total`, no
other metric's name ends in `_count`, `_sum` or `_bucket`, and a value is in a base unit
(seconds, bytes, a 0-1 ratio), the unit in the name.  `exposed` gives a metric's
name there where the rule does not, `divisor` turns a frame's value into the base unit
(USER_HZ ticks into seconds), and `deprecated` is the name the metric had there in
release 0.1, still written beside the new one (its value as the frame has it) until
release DEPRECATED_UNTIL.
"""
import os
from dataclasses import dataclass
from typing import Dict, Tuple

GAUGE, COUNTER = "gauge", "counter"

# The release that stops writing the deprecated exposition names.
DEPRECATED_SINCE, DEPRECATED_UNTIL = "0.2", "0.3"

# /proc/stat counts in USER_HZ, the kernel's clock ticks as user space sees them
# (sysconf(_SC_CLK_TCK)): 100 on every architecture OWCA runs on.
USER_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class MetricSpec:
    name: str
    type: str
    unit: str
    help: str
    source: str
    levels: Tuple[str, ...] = ()
    scope: str = "task"  # task, platform, internal, anomaly, allocation, apm
    exposed: str = ""    # the name in the Prometheus exposition, where the rule gives none
    divisor: float = 1   # exposition value = frame value / divisor (into the base unit)
    frame_unit: str = ""  # the unit in frames, where the divisor makes it another
    deprecated: str = ""  # the exposition name of release 0.1, written until DEPRECATED_UNTIL

    def __post_init__(self):
        assert (self.divisor != 1) == bool(self.frame_unit), self.name
        # Converted, the value must not appear under its frame name (a name release 0.1
        # exposed in the frame's unit, now `deprecated`; a metric new since has none).
        assert self.divisor == 1 or self.exposed_name != self.name, \
            f"{self.name}: a new unit needs a new name"

    @property
    def exposed_name(self) -> str:
        return self.exposed or exposed_name(self.name, self.type)


def _specs(*specs: MetricSpec) -> Dict[str, MetricSpec]:
    return {s.name: s for s in specs}


M = MetricSpec

# -- tasks: cgroups (owca-measure) ----------------------------------------------------
# Settings and slow-moving gauges whose files owca-measure reads less often
# (lib/owca/measure/sources/cgroup.py SLOW_FILES).
SLOW = ("read every `slow_metrics_every` cycles (default 10), the last value reported "
        "in between")
# The costly signals (lib/owca/measure/sources/cgroup.py TaskCgroup.costly_every).
COSTLY = ("; a BE task's every `be_costly_signals_every` cycles (default 1), the last "
          "value reported in between")
TASK_CGROUP = _specs(
    M("task_cpu_usage_seconds", COUNTER, "seconds", "CPU time consumed by the task's cgroup.",
      "v1: cpuacct.usage; v2: cpu.stat usage_usec"),
    M("task_cpu_periods", COUNTER, "periods", "CFS enforcement periods that have elapsed.",
      "v1: cpu.stat nr_periods; v2: cpu.stat nr_periods"),
    M("task_cpu_throttled_periods", COUNTER, "periods",
      "CFS periods in which the cgroup was throttled.",
      "v1: cpu.stat nr_throttled; v2: cpu.stat nr_throttled"),
    M("task_cpu_throttled_seconds", COUNTER, "seconds",
      "Time the cgroup's tasks spent throttled.",
      "v1: cpu.stat throttled_time (ns); v2: cpu.stat throttled_usec"),
    M("task_mem_usage_bytes", GAUGE, "bytes", "Memory charged to the cgroup.",
      "v1: memory.usage_in_bytes; v2: memory.current"),
    M("task_mem_max_usage_bytes", GAUGE, "bytes", "Highest memory usage recorded.",
      "v1: memory.max_usage_in_bytes; v2: memory.peak (kernel 5.19+)"),
    M("task_mem_limit_bytes", GAUGE, "bytes",
      "Memory limit (hard); absent when unlimited.",
      "v1: memory.limit_in_bytes; v2: memory.max; " + SLOW),
    M("task_mem_soft_limit_bytes", GAUGE, "bytes",
      "Memory soft limit (v2: the low protection); absent when unlimited.",
      "v1: memory.soft_limit_in_bytes; v2: memory.low; " + SLOW),
    M("task_mem_page_faults", COUNTER, "faults", "Page faults of the cgroup's tasks.",
      "v1: memory.stat total_pgfault (hierarchical); v2: memory.stat pgfault"),
    M("task_mem_working_set_bytes", GAUGE, "bytes",
      "The cgroup's working set: anonymous memory plus the active file pages (what it "
      "refaults when it loses it); the memory policy protects it.",
      "v1: memory.stat total_active_anon + total_inactive_anon + total_active_file; v2: "
      "memory.stat anon + active_file (the file task_mem_page_faults reads: no extra read)"),
    M("task_mem_workingset_refaults", COUNTER, "pages",
      "Pages the cgroup faulted back in soon after they were reclaimed (evicted from its "
      "working set); level type: anon, file.",
      "v2: memory.stat workingset_refault_anon, workingset_refault_file (before 5.9: "
      "workingset_refault, file pages); v1: the total_ keys where the kernel has them "
      "(absent on older v1 kernels)", levels=("type",)),
    M("task_mem_numa_pages", GAUGE, "pages", "Pages of the cgroup per NUMA node.",
      "v1: memory.numa_stat hierarchical_total=; v2: memory.numa_stat (anon + file) / page "
      "size; " + SLOW,
      levels=("numa_node",)),
    M("task_pressure_avg10_percent", GAUGE, "ratio (0-1)",
      "Share of the last 10 s in which some (or all) of the cgroup's tasks stalled on a "
      "resource (pressure stall information).",
      "v2 (on a hybrid host the task's cgroup2 group): cpu.pressure, memory.pressure, "
      "io.pressure avg10" + COSTLY,
      levels=("resource", "stall"), exposed="task_pressure_avg10_ratio", divisor=100,
      frame_unit="percent", deprecated="task_pressure_avg10_percent"),
    M("task_pressure_stall_seconds", COUNTER, "seconds",
      "Total time some (or all) of the cgroup's tasks stalled on a resource.",
      "v2 (on a hybrid host the task's cgroup2 group): cpu.pressure, memory.pressure, "
      "io.pressure total (us)" + COSTLY,
      levels=("resource", "stall")),
    M("task_run_queue_delay_seconds", COUNTER, "seconds",
      "Time the threads of the task's cgroup (and of its descendants) spent runnable but "
      "waiting for a CPU; an exited thread's last value is kept, so the counter never "
      "falls (cAdvisor's container_cpu_schedstat_run_queue_seconds_total).",
      "/proc/TID/schedstat, 2nd field (ns), of each thread in the v1 cpuacct `tasks` or "
      "the v2 `cgroup.threads`; measure `run_queue_delay: false` turns it off" + COSTLY),
    M("owca_files_not_kept_open", GAUGE, "files",
      "Kernel files (cgroup, /proc) opened, read and closed each cycle instead of held "
      "open, because the soft RLIMIT_NOFILE left no descriptors for them (slower).",
      "owca-measure", scope="internal"),
)

# -- tasks: bookkeeping (owca-measure) -------------------------------------------------
TASK_INTERNAL = _specs(
    M("task_up", GAUGE, "boolean", "1 for every task measured in this cycle.", "owca-measure"),
    M("task_last_seen", GAUGE, "seconds since the epoch",
      "When the task was last measured.", "owca-measure",
      exposed="task_last_seen_timestamp_seconds", deprecated="task_last_seen"),
)

# -- platform (owca-measure) -----------------------------------------------------------
PLATFORM = _specs(
    M("platform_topology_cpus", GAUGE, "cpus", "Online logical CPUs.",
      "/sys/devices/system/cpu/online", scope="platform"),
    M("platform_topology_cores", GAUGE, "cores", "Physical cores.",
      "/sys/devices/system/cpu/cpuN/topology", scope="platform"),
    M("platform_topology_sockets", GAUGE, "sockets", "Processor packages.",
      "/sys/devices/system/cpu/cpuN/topology/physical_package_id", scope="platform"),
    M("platform_topology_numa_nodes", GAUGE, "nodes", "NUMA nodes with CPUs or memory.",
      "/sys/devices/system/node/online", scope="platform"),
    M("platform_cpu_usage", COUNTER, "seconds",
      "Time each logical CPU spent busy (user, nice, system, irq, softirq, steal).",
      "/proc/stat cpuN", levels=("cpu",), scope="platform",
      exposed="platform_cpu_usage_seconds_total", divisor=USER_HZ,
      frame_unit=f"USER_HZ ticks (1/{USER_HZ} s)", deprecated="platform_cpu_usage_total"),
    M("platform_mem_usage_bytes", GAUGE, "bytes",
      "Memory in use: MemTotal - MemFree - Buffers - Cached.", "/proc/meminfo",
      scope="platform"),
    M("platform_mem_total_bytes", GAUGE, "bytes", "Memory installed (MemTotal).",
      "/proc/meminfo", scope="platform"),
    M("platform_mem_pressure_avg10_percent", GAUGE, "ratio (0-1)",
      "Share of the last 10 s in which some (or all) non-idle tasks of the node stalled "
      "on memory (pressure stall information).",
      "/proc/pressure/memory avg10 (absent on a kernel without PSI)", levels=("stall",),
      scope="platform", exposed="platform_mem_pressure_avg10_ratio", divisor=100,
      frame_unit="percent"),
    M("platform_mem_pressure_stall_seconds", COUNTER, "seconds",
      "Total time some (or all) non-idle tasks of the node stalled on memory.",
      "/proc/pressure/memory total (us)", levels=("stall",), scope="platform"),
    M("platform_mem_numa_free_bytes", GAUGE, "bytes", "Free memory per NUMA node.",
      "/sys/devices/system/node/nodeN/meminfo MemFree", levels=("numa_node",),
      scope="platform"),
    M("platform_mem_numa_used_bytes", GAUGE, "bytes", "Used memory per NUMA node.",
      "/sys/devices/system/node/nodeN/meminfo MemUsed", levels=("numa_node",),
      scope="platform"),
)

# -- the tools' own counters ------------------------------------------------------------
INTERNAL = _specs(
    M("owca_cycle_duration_seconds", GAUGE, "seconds",
      "Wall time a stage spent on its last cycle.", "every tool", levels=(),
      scope="internal"),
    M("owca_cpu_seconds_total", COUNTER, "seconds",
      "CPU time (user and system) the stage's process has used since it started; left "
      "out with --no-timing. owca-measure's perf helper is a process of its own, counted "
      "in owca_measure_cpu_share where a CPU budget is set.",
      "every tool: clock_gettime(CLOCK_PROCESS_CPUTIME_ID)", scope="internal"),
    M("owca_resident_memory_bytes", GAUGE, "bytes",
      "The stage's resident memory now; left out with --no-timing.",
      "every tool: /proc/self/statm, 2nd field x page size", scope="internal"),
    M("owca_open_descriptors", GAUGE, "descriptors",
      "Descriptors the stage's process holds open now; left out with --no-timing.",
      "every tool: the size of /proc/self/fd (Linux 6.2+), else its entries",
      scope="internal"),
    M("owca_measure_shed_level", GAUGE, "level",
      "How much optional work owca-measure sheds for its CPU budget "
      "(`cpu_budget_percent`): 0 none; 1 slow signals (slow metrics, PSI, run-queue "
      "delay) read 4 times less often; 2 and perf not read; 3 and every other cycle "
      "skipped (lib/owca/measure/budget.py). Absent without a budget.",
      "owca-measure", scope="internal"),
    M("owca_measure_cpu_share", GAUGE, "ratio",
      "The share of one CPU owca-measure and its perf helper used over its last cycles "
      "at the present shed level, as its CPU budget compares it (0.02 is 2 %); absent "
      "without a budget, left out with --no-timing.",
      "owca-measure", scope="internal"),
    M("owca_source_success", GAUGE, "boolean",
      "Per owca-measure source (label `source`: cgroup, platform, perf, apm, sli, rdt), 1 when "
      "it worked in the last cycle, 0 when it failed as a whole (what that is, the "
      "docstring of each source's class in lib/owca/measure/sources/ says: a task's "
      "cgroup gone is none), as node_exporter's node_scrape_collector_success.",
      "owca-measure",
      scope="internal"),
    M("owca_source_duration_seconds", GAUGE, "seconds",
      "Per owca-measure source (label `source`), wall time its read took in the last "
      "cycle; left out with --no-timing.", "owca-measure", scope="internal"),
    M("owca_frames_read_total", COUNTER, "frames", "Lines a stage read from its input.",
      "every tool", scope="internal"),
    M("owca_frames_written_total", COUNTER, "frames", "Frames a stage wrote to its output.",
      "every tool", scope="internal"),
    M("owca_bad_frames_total", COUNTER, "frames",
      "Lines a stage reported and skipped: invalid JSON, bad fields, too long, truncated.",
      "every tool", scope="internal"),
    M("owca_bad_metric_names_total", COUNTER, "metrics",
      "Metrics left out of the frames a stage read (or a plug-in returned) because their "
      "metric or label name is not valid in the exposition format; each name is reported "
      "once.", "every tool but owca-discover", scope="internal"),
    M("owca_skipped_frames_total", COUNTER, "frames",
      "Frames of an unknown kind or version that owca-ship could not store.",
      "owca-ship", scope="internal"),
    M("owca_tasks", GAUGE, "tasks", "Tasks a stage handled in its last cycle.",
      "owca-discover, owca-measure", scope="internal"),
    M("owca_tasks_dropped_total", COUNTER, "tasks",
      "Tasks left out of a cycle: cgroup missing or vanished, invalid orchestrator data.",
      "owca-discover, owca-measure", scope="internal"),
    M("owca_discovery_errors_total", COUNTER, "errors",
      "Failed attempts to list the tasks from a source.", "owca-discover", scope="internal"),
    M("owca_detector_errors_total", COUNTER, "errors",
      "Cycles in which the detector raised an error.", "owca-detect", scope="internal"),
    M("owca_allocator_errors_total", COUNTER, "errors",
      "Cycles in which the allocator raised an error.", "owca-allocate", scope="internal"),
    M("owca_storage_errors_total", COUNTER, "errors",
      "Failed writes to a storage.", "owca-ship", scope="internal"),
)

# -- anomalies (owca-detect, owca-ship) ------------------------------------------------------
ANOMALY = _specs(
    M("anomaly", GAUGE, "boolean",
      "1 for each anomaly of the cycle; labels type, resource, contended_task_id, "
      "contending_task_id (one sample per contending task) and uuid.", "owca-detect",
      scope="anomaly"),
    M("anomaly_count", GAUGE, "anomalies", "Anomalies the detector found in the cycle "
      "(one per contended task: the `anomaly` series of one count once).",
      "owca-detect", scope="anomaly", exposed="anomalies", deprecated="anomalies_found"),
)

# -- the built-in detector (owca-detect: !ContentionDetector, docs/detection.md) ---------
_CD = "owca-detect: !ContentionDetector"
CONTENTION = _specs(
    M("contention_score", GAUGE, "robust standard deviations",
      "How far the HP task's decision signal (its SLI, else its worst stall signal) is "
      "above its normal at the current load, in MADs scaled to a standard deviation; "
      "label task_id.  Absent in a cycle the task could not be judged.", _CD,
      scope="anomaly"),
    M("contention_undecided", GAUGE, "boolean",
      "1 for an HP task the detector refused to judge this cycle; labels task_id, reason "
      "(history, missing, few_requests, stale, cpu_floor, multiplexed, no_signal).", _CD,
      scope="anomaly"),
    M("contention_undecided_total", COUNTER, "task cycles",
      "HP task cycles left undecided since the start, per reason (label reason).", _CD,
      scope="anomaly"),
    M("contention_signal_refused", GAUGE, "boolean",
      "1 for each signal of an HP task left out this cycle for poor data; labels "
      "task_id, signal, reason (history, few_requests, stale, cpu_floor, multiplexed).",
      _CD, scope="anomaly"),
    M("contention_unexplained", GAUGE, "boolean",
      "1 for an HP task flagged as degraded whose degradation no best-effort task's usage "
      "change explains (no anomaly is reported for it unless report_unexplained); labels "
      "task_id, resource, cause (own_usage: the task's own usage rose most, a load the "
      "wrapper does not see; outside: nobody's did).", _CD, scope="anomaly"),
    M("contention_tracked_tasks", GAUGE, "tasks",
      "Tasks whose state the detector keeps (bounded: absent ones are forgotten).", _CD,
      scope="anomaly"),
    M("contention_signal_z", GAUGE, "robust standard deviations",
      "In an anomaly's metrics: each judged signal's distance from its normal; labels "
      "contended_task_id, signal.", _CD, scope="anomaly"),
    M("contention_contender_score", GAUGE, "ratio",
      "In an anomaly's metrics: how well a contending task's usage change explains the "
      "degradation, 0 to 1; labels contended_task_id, contending_task_id.", _CD,
      scope="anomaly"),
    M("contention_confidence", GAUGE, "ratio",
      "In an anomaly's metrics: the best contender's score minus the best score of a task "
      "not named, 0 to 1 (0 when none is named); label contended_task_id.", _CD,
      scope="anomaly"),
    M("contention_episode_cycles", GAUGE, "cycles",
      "In an anomaly's metrics: cycles since the episode's first degraded cycle; label "
      "contended_task_id.", _CD, scope="anomaly"),
    M("contention_fleet_prior", GAUGE, "boolean",
      "1 for each signal of an HP task judged this cycle against the fleet profile's "
      "normal (its own history is shorter than profile_history); labels task_id, signal.",
      _CD, scope="anomaly"),
    M("contention_profile_loads", COUNTER, "reads",
      "Times the fleet profile (`profile:`) was read, the first included.", _CD,
      scope="anomaly"),
    M("contention_profile_errors", COUNTER, "reads",
      "Times a changed fleet profile could not be read (the previous one stays in use).",
      _CD, scope="anomaly"),
    M("fleet_bad_neighbour_episodes", GAUGE, "episodes",
      "From the fleet profile: anomaly episodes of the victim workload that named a task "
      "of the antagonist workload; labels victim_workload, antagonist_workload.", _CD,
      scope="anomaly"),
    M("fleet_bad_neighbour_share", GAUGE, "ratio",
      "From the fleet profile: the share of the victim workload's anomaly episodes that "
      "named the antagonist workload; labels victim_workload, antagonist_workload.", _CD,
      scope="anomaly"),
    M("fleet_bad_neighbour_confidence", GAUGE, "ratio",
      "From the fleet profile: the lower bound of the share's 95 % Wilson interval, the "
      "pairs' ranking; labels victim_workload, antagonist_workload.", _CD,
      scope="anomaly"),
)

# -- perf counters (owca-measure, owca-perf) ----------------------------------------------
# Counted per task cgroup on every CPU by the owca-perf helper (docs/perf.md);
# counters are cumulative since owca-measure opened the task (they restart from
# zero when the helper is restarted), scaled by time_enabled / time_running.
_PERF = "perf_event_open, cgroup mode, via owca-perf"
_PERF_DELTA = "owca-measure, from the deltas of two cycles; absent when an input is missing"
PERF = _specs(
    M("task_instructions", COUNTER, "instructions", "Instructions retired.",
      _PERF + ": instructions"),
    M("task_cycles", COUNTER, "cycles", "CPU cycles while the task ran.", _PERF + ": cycles"),
    M("task_cache_misses", COUNTER, "misses", "Last-level cache misses.",
      _PERF + ": cache-misses"),
    M("task_cache_references", COUNTER, "references", "Last-level cache references.",
      _PERF + ": cache-references"),
    M("task_branch_misses", COUNTER, "branches", "Mispredicted branches.",
      _PERF + ": branch-misses"),
    M("task_branch_instructions", COUNTER, "branches", "Branch instructions retired.",
      _PERF + ": branch-instructions"),
    M("task_stalled_mem_loads", COUNTER, "cycles",
      "Cycles stalled on memory loads: a raw event, configured as "
      "stalled_mem_loads=CONFIG for the CPU model (any raw NAME=CONFIG becomes task_NAME).",
      _PERF + ": raw event"),
    M("task_task_clock_seconds", COUNTER, "seconds", "CPU time of the task, as perf counts it.",
      _PERF + ": task-clock (ns)"),
    M("task_context_switches", COUNTER, "switches", "Context switches of the task's threads.",
      _PERF + ": context-switches"),
    M("task_cpu_migrations", COUNTER, "migrations",
      "Moves of the task's threads from one CPU to another.", _PERF + ": cpu-migrations"),
    M("task_page_faults", COUNTER, "faults", "Page faults, as perf counts them.",
      _PERF + ": page-faults"),
    M("task_scaling_factor_avg", GAUGE, "ratio",
      "Mean over the CPUs that counted of time_enabled / time_running: 1 when the "
      "task's group was never multiplexed off the PMU.", _PERF),
    M("task_scaling_factor_max", GAUGE, "ratio",
      "Largest time_enabled / time_running over the CPUs that counted.", _PERF),
    M("task_ipc", GAUGE, "instructions per cycle", "Instructions per cycle over the last cycle.",
      _PERF_DELTA),
    M("task_ips", GAUGE, "instructions per second",
      "Instructions per second of wall time over the last cycle.", _PERF_DELTA),
    M("task_cache_hit_ratio", GAUGE, "ratio",
      "(cache references - cache misses) / cache references over the last cycle.", _PERF_DELTA),
    M("task_cache_misses_per_kilo_instructions", GAUGE, "misses per 1000 instructions",
      "Cache misses per thousand instructions over the last cycle.", _PERF_DELTA),
    M("owca_perf_helper_restarts_total", COUNTER, "restarts",
      "Times owca-measure restarted its perf helper (it died, hung or spoke out of protocol).",
      "owca-measure", scope="internal"),
    M("owca_perf_tasks_not_counted", GAUGE, "tasks",
      "Tasks whose perf counters could not be opened, one sample per errno label (EMFILE: "
      "open file limit, ENOENT: no perf cgroup).", "owca-measure", scope="internal"),
    M("owca_perf_events_missing", GAUGE, "events",
      "Configured perf events this machine lacks (left out, warned once).", "owca-measure",
      scope="internal"),
)

# -- allocations (owca-allocate) ----------------------------------------------------------
# (section of the allocation engineer)
ALLOCATION = _specs(
    M("allocation_cpu_quota", GAUGE, "share of the platform (1.0 = every online CPU)",
      "The task's CPU quota after the cycle; label task_id.",
      "v1: cpu.cfs_quota_us / cpu.cfs_period_us; v2: cpu.max", scope="allocation"),
    M("allocation_cpu_shares", GAUGE, "weight (1.0 = the kernel's default)",
      "The task's CPU weight after the cycle; label task_id.",
      "v1: cpu.shares / 1024; v2: cpu.weight / 100", scope="allocation"),
    M("allocation_cpu_idle", GAUGE, "boolean",
      "1 when the task's cgroup runs as the idle scheduling class (it gets CPU time only "
      "when no other task wants it); label task_id.", "cpu.idle (Linux 5.15 and later)",
      scope="allocation"),
    M("allocation_cpuset_cpus", GAUGE, "cpus",
      "How many CPUs the task may run on; labels task_id, cpus (the list).",
      "cpuset.cpus (v2: cpuset.cpus.effective when empty)", scope="allocation"),
    M("allocation_cpuset_mems", GAUGE, "nodes",
      "How many NUMA nodes the task may allocate from; labels task_id, mems (the list).",
      "cpuset.mems (v2: cpuset.mems.effective when empty)", scope="allocation"),
    M("allocation_rdt_l3_mask", GAUGE, "bit mask (cache ways)",
      "L3 ways of the task's resctrl group; labels task_id, group_name, cache_id.",
      "resctrl <group>/schemata L3", scope="allocation"),
    M("allocation_rdt_mb_percent", GAUGE, "ratio (0-1)",
      "Memory bandwidth of the task's resctrl group; labels task_id, group_name, cache_id.",
      "resctrl <group>/schemata MB", scope="allocation", exposed="allocation_rdt_mb_ratio",
      divisor=100, frame_unit="percent", deprecated="allocation_rdt_mb_percent"),
    *[M(f"allocation_memory_{kind}_bytes", GAUGE, "bytes", f"{what}; label task_id; absent "
        f"when unlimited (max) or never set by OWCA.", source, scope="allocation")
      for kind, what, source in (
          ("min", "Memory the kernel never reclaims from the task", "v2: memory.min"),
          ("low", "Memory the kernel reclaims from the task only when no unprotected "
                  "memory is left (v1: the soft limit)",
           "v1: memory.soft_limit_in_bytes; v2: memory.low"),
          ("high", "Memory above which the task is throttled and reclaimed",
           "v2: memory.high"),
          ("max", "The task's hard memory limit (OOM kill above it)",
           "v1: memory.limit_in_bytes; v2: memory.max"))],
    M("allocation_memory_reclaim_requested_bytes_total", COUNTER, "bytes",
      "Bytes asked of memory.reclaim (proactive reclaim) since the start; absent where the "
      "kernel has no memory.reclaim.", "owca-allocate: v2 memory.reclaim", scope="allocation"),
    M("allocation_memory_reclaim_writes_total", COUNTER, "writes",
      "Writes to memory.reclaim since the start.", "owca-allocate: v2 memory.reclaim",
      scope="allocation"),
    M("allocation_memory_reclaim_short_total", COUNTER, "writes",
      "Writes to memory.reclaim after which the kernel had reclaimed less than asked "
      "(EAGAIN; not an error).", "owca-allocate: v2 memory.reclaim", scope="allocation"),
    M("allocations_count", COUNTER, "changes",
      "Allocation changes written (and restores), since the start; with --dry-run, the "
      "changes that would have been written.", "owca-allocate", scope="allocation",
      exposed="allocations_total"),
    M("allocation_errors_count", COUNTER, "errors",
      "Allocations refused (invalid) or failed (write error), since the start.",
      "owca-allocate", scope="allocation", exposed="allocation_errors_total"),
    M("allocation_error", GAUGE, "boolean",
      "1 for each allocation refused or failed in the cycle; labels task_id, type, reason.",
      "owca-allocate", scope="allocation"),
    M("allocation_external_changes_total", COUNTER, "changes",
      "Values OWCA wrote that another writer (the kubelet, systemd, an operator) changed, "
      "counted once per change, since the start; labels task_id, type, file.",
      "owca-allocate", scope="allocation"),
    M("allocation_journal_errors_total", COUNTER, "errors",
      "Journal problems since the start; label reason: corrupt (a journal set aside at "
      "start, its originals not restored), write (a save that failed: the cycle's "
      "changes were not written).", "owca-allocate", scope="allocation"),
)

# -- the memory policy (owca-allocate: !MemoryProtection, or SloController's `memory`) -----
_MEM = "owca-allocate: !MemoryProtection"
MEMORY_PROTECTION = _specs(
    M("memory_protection_decision", GAUGE, "boolean",
      "1 for each decision of the cycle; labels task_id, action (protect, lower, raise, "
      "release, hold, reclaim) and reason (working_set, request, hp_pressure, hp_refaults, "
      "node_pressure, calm, waiting, floor, be_pressure, no_signal).", _MEM,
      scope="allocation"),
    M("memory_protection_triggered", GAUGE, "boolean",
      "1 when HP or node memory pressure asks BE memory to shrink this cycle.", _MEM,
      scope="allocation"),
    M("memory_protection_trigger", GAUGE, "boolean",
      "1 for each reason the trigger is on; label reason: hp_pressure, hp_refaults, "
      "node_pressure.", _MEM, scope="allocation"),
    M("memory_protection_hp_protected_bytes", GAUGE, "bytes",
      "The memory.min (or memory.low) the policy gives an HP task; label task_id.", _MEM,
      scope="allocation"),
    M("memory_protection_hp_refault_pages", GAUGE, "pages",
      "An HP task's refaults (anon + file) since the last cycle; label task_id.", _MEM,
      scope="allocation"),
    M("memory_protection_be_high_bytes", GAUGE, "bytes",
      "The memory.high (v1: the limit) the policy gives a BE task; label task_id; absent "
      "while the task has its own.", _MEM, scope="allocation"),
    M("memory_protection_lowered_total", COUNTER, "changes",
      "BE memory.high values lowered since the start.", _MEM, scope="allocation"),
    M("memory_protection_raised_total", COUNTER, "changes",
      "BE memory.high values raised since the start.", _MEM, scope="allocation"),
    M("memory_protection_reclaim_requested_bytes_total", COUNTER, "bytes",
      "Proactive reclaim the policy asked of BE tasks since the start.", _MEM,
      scope="allocation"),
)

# -- the SLO controller (owca-allocate: !SloController) ----------------------------------
# (section of the control engineer; docs/control.md)
_CTL = "owca-allocate: !SloController"
CONTROL = _specs(
    M("slo_controller_be_level", GAUGE, "level",
      "The BE level after the cycle: 0 is the floor, `levels` the ceiling.", _CTL,
      scope="allocation"),
    M("slo_controller_decision", GAUGE, "boolean",
      "1, with label action: grow, shrink, cut, cut_named, rollback or hold.", _CTL,
      scope="allocation"),
    M("slo_controller_hold", GAUGE, "boolean",
      "1 when the cycle made no decision or left a knob alone; label reason: missing_sli, "
      "stale_sli, no_new_sli, cpu_manager_state.", _CTL, scope="allocation"),
    M("slo_controller_hp_pressure", GAUGE, "SLI / SLO",
      "An HP task's SLI against its SLO, lower is better: 1 at the objective; label task_id.",
      _CTL, scope="allocation"),
    M("slo_controller_slack", GAUGE, "fraction",
      "1 - the worst HP pressure: negative when an SLO is broken.", _CTL, scope="allocation"),
    M("slo_controller_changes_total", COUNTER, "changes",
      "Changes of the BE level since the start.", _CTL, scope="allocation"),
    M("slo_controller_rollbacks_total", COUNTER, "rollbacks",
      "Growth steps taken back because the HP's SLI worsened beyond its noise (or broke "
      "the SLO) while they were watched.", _CTL, scope="allocation"),
    M("slo_controller_named_cut", GAUGE, "boolean",
      "1 for a BE task held at the floor because a detector named it as contending; label "
      "task_id.", _CTL, scope="allocation"),
    M("slo_controller_overridden", GAUGE, "boolean",
      "1 while a BE value someone else rewrote is left as they set it; labels task_id, type.",
      _CTL, scope="allocation"),
    M("slo_controller_overrides_total", COUNTER, "overrides",
      "BE values found rewritten by someone else after OWCA had set them.", _CTL,
      scope="allocation"),
    M("slo_controller_excluded_cpus", GAUGE, "cpus",
      "Online CPUs never given to BE: the kubelet's exclusive ones and reserved_cpus; label "
      "cpus (the list).", _CTL, scope="allocation"),
    M("slo_controller_cpu_manager_state_errors_total", COUNTER, "errors",
      "Cycles in which the kubelet's CPU manager checkpoint could not be used (BE cpusets "
      "then left alone).", _CTL, scope="allocation"),
)

# -- headroom (owca-allocate: headroom:) -------------------------------------------------
# (docs/headroom.md) headroom = capacity - hp - system - reserve - risk, for the node and,
# where the platform has several NUMA nodes, per NUMA node (headroom_numa_*{numa_node}).
_HR = "owca-allocate: headroom"
_HR_TERMS = {
    None: "What best-effort work may use now: capacity - hp - system - reserve - risk.",
    "capacity": "The {what}'s {resource}: online CPUs, or MemTotal.",
    "hp": "The HP tasks' use of {resource}: the configured percentile over the window.",
    "system": "What no task accounts for: the {what}'s use of {resource} less every task's, "
              "the configured percentile over the window.",
    "reserve": "{resource} kept back: reserve_ratio of the capacity plus the absolute "
               "reserve.",
    "risk": "{resource} OWCA withholds: the share the HP slack, a broken SLO, contention or "
            "the controller's cut take, and growth not yet earned (bounded steps).",
}


def _headroom_specs() -> Dict[str, MetricSpec]:
    out = {}
    for resource, unit in (("cpu", "cores"), ("memory", "bytes")):
        for numa in (False, True):
            for term, text in _HR_TERMS.items():
                name = "_".join(["headroom"] + (["numa"] if numa else []) + [resource] +
                                ([term] if term else []) + [unit])
                what = "NUMA node" if numa else "node"
                help_ = text.format(what=what, resource="CPU" if resource == "cpu" else
                                    "memory")
                help_ = help_[0].upper() + help_[1:]
                if numa:
                    help_ += " Per NUMA node (label numa_node)."
                out[name] = M(name, GAUGE, unit, help_, _HR, scope="allocation")
    return out


HEADROOM = {
    **_headroom_specs(),
    **_specs(
        M("headroom_slack", GAUGE, "fraction",
          "1 - the worst HP pressure (SLI / SLO) the headroom saw this cycle; 1 without HP "
          "SLIs.", _HR, scope="allocation"),
        M("headroom_risk_ratio", GAUGE, "fraction",
          "The share of what capacity, HP, system and reserve leave that risk withholds this "
          "cycle (before the growth steps): 1 on a broken SLO.", _HR, scope="allocation"),
        M("headroom_input_age_seconds", GAUGE, "seconds",
          "Since an input of the headroom was last usable (label input: cpu, memory, sli); "
          "beyond stale_after the headroom is 0.", _HR, scope="allocation"),
        M("headroom_reason", GAUGE, "boolean",
          "1 for each reason that limits the headroom this cycle; label reason: none, "
          "slack, slo_broken, contention, controller, growth_step, growth_wait, "
          "input_missing, stale_cpu, stale_memory, stale_sli.", _HR, scope="allocation"),
        M("headroom_errors_total", COUNTER, "cycles",
          "Cycles whose headroom could not be computed (logged; the cycle went on).", _HR,
          scope="allocation"),
        M("owca_ship_node_status_patches_total", COUNTER, "requests",
          "PATCH requests of the Node's status to the Kubernetes API; label result: ok, or "
          "the HTTP status or failure that answered.",
          "owca-ship: KubernetesNodeStatusStorage", scope="internal"),
        M("owca_ship_node_status_published", GAUGE, "resource units",
          "The value last accepted by the Kubernetes API for each extended resource (label "
          "resource): milli-cores for CPU, bytes for memory.",
          "owca-ship: KubernetesNodeStatusStorage", scope="internal"),
    ),
}

# -- shipping (owca-ship) --------------------------------------------------------------------
# (section of the storage engineer)
SHIP = _specs(
    M("owca_ship_bad_values_total", COUNTER, "values",
      "Metric values owca-ship left out of what it stored because they were not finite "
      "numbers (NaN, a string, a boolean, null, an integer beyond float64).", "owca-ship",
      scope="internal"),
    M("owca_ship_bad_labels_total", COUNTER, "labels",
      "Labels owca-ship changed so that the exposition stays valid, counted in every cycle "
      "they come; label reason: reserved (a name Prometheus reserves, `__*`: left out), "
      "clashing (named like a label the exposition sets itself, `host` in a sample's "
      "labels or a nested metric's level in a task's: renamed exported_<name>).",
      "owca-ship", scope="internal"),
    M("owca_ship_dropped_samples_total", COUNTER, "samples",
      "Samples owca-ship left out because the cycle already had their series; label "
      "reason: duplicate (given twice upstream: the first kept), forged (an upstream sample "
      "with the name and labels of one of owca-ship's own, which wins).", "owca-ship",
      scope="internal"),
    M("owca_ship_bad_timestamps_total", COUNTER, "frames",
      "Frames whose ts is beyond the exposition's int64 milliseconds (1e300; seconds "
      "mistaken for milliseconds): their samples were stored without a timestamp.",
      "owca-ship", scope="internal"),
    M("owca_ship_dropped_cycles_total", COUNTER, "cycles",
      "Cycles that left a storage's spool undelivered; label reason: spool_full (the oldest, "
      "to keep spool_max_cycles and spool_max_bytes), disk_full (the oldest, or at worst "
      "the new one, when the filesystem's free space or spool_min_free_bytes ran out), "
      "too_large (bigger than the spool), rejected (refused by the broker), "
      "corrupt (a damaged spool file).", "owca-ship: KafkaStorage", scope="internal"),
    M("owca_ship_spool_cycles", GAUGE, "cycles",
      "Cycles waiting in a storage's spool for the broker.", "owca-ship: KafkaStorage",
      scope="internal"),
    M("owca_ship_spool_bytes", GAUGE, "bytes",
      "Bytes of the cycles waiting in a storage's spool.", "owca-ship: KafkaStorage",
      scope="internal"),
    M("owca_ship_sent_cycles_total", COUNTER, "cycles",
      "Cycles the broker acknowledged.", "owca-ship: KafkaStorage", scope="internal"),
    M("owca_ship_send_errors_total", COUNTER, "errors",
      "Failed attempts to deliver a cycle (broker unreachable, timeout, error); each is "
      "retried with backoff.", "owca-ship: KafkaStorage", scope="internal"),
    M("owca_ship_unanswered_sends_total", COUNTER, "attempts",
      "Attempts to deliver a cycle (connecting included) the broker left unanswered for "
      "answer_timeout_seconds, counted when that passes: a broker that accepts "
      "connections and never answers shows here long before the client's own timeout "
      "fails the attempt.", "owca-ship: KafkaStorage", scope="internal"),
    M("owca_ship_connection_errors_total", COUNTER, "connections",
      "Connections to the broker that the Kafka client reported refused or lost, counted "
      "as they happen (a send in flight then fails at once).", "owca-ship: KafkaStorage",
      scope="internal"),
    M("owca_ship_scrapes_total", COUNTER, "requests",
      "HTTP requests to the Prometheus endpoint.", "owca-ship: PrometheusStorage",
      scope="internal"),
)

# -- discovery from orchestrators (owca-discover) --------------------------------------------
# (section of the orchestrator engineer)
ORCHESTRATOR = _specs(
    M("owca_orchestrator_requests_total", COUNTER, "requests",
      "HTTP requests (attempts, retries included) to the orchestrator's node agent; "
      "label source (mesos, kubernetes).", "owca-discover", scope="internal"),
    M("owca_orchestrator_request_failures_total", COUNTER, "requests",
      "Attempts that failed: no connection, timeout, TLS, HTTP error status, malformed "
      "or truncated answer.", "owca-discover", scope="internal"),
    M("owca_orchestrator_retries_total", COUNTER, "requests",
      "Attempts repeated after a backoff.", "owca-discover", scope="internal"),
    M("owca_orchestrator_request_duration_seconds", GAUGE, "seconds",
      "Wall time of the last successful request, retries included.", "owca-discover",
      scope="internal"),
    M("owca_orchestrator_invalid_entries_total", COUNTER, "entries",
      "Tasks, containers or labels of the orchestrator's answers left out as invalid "
      "(counted every cycle they recur).", "owca-discover", scope="internal"),
    M("owca_discovery_tasks_age_seconds", GAUGE, "seconds",
      "Age of the task list in the frame: 0 when fresh, else the time since the source's "
      "last good answer (docs/discovery.md).", "owca-discover", scope="internal"),
)

# -- application performance metrics (workloads/) ---------------------------------------------
# (section of the workloads engineer)
# Written by workloads/owca-wrap into the APM directory, merged by owca-measure
# into the task the wrapper measures (lib/owca/measure/sources/apm.py).
_WRAP = "owca-wrap (APM file, merged by owca-measure)"
# The same meaning where owca-measure's sli source reads a service's own metrics.
_WRAP_OR_SLI = _WRAP + "; or owca-measure's sli source (docs/control.md)"
APM = _specs(
    M("apm_latency_p50_seconds", GAUGE, "seconds",
      "Median request latency the load generator measured in its last report.", _WRAP,
      scope="apm"),
    M("apm_latency_p75_seconds", GAUGE, "seconds",
      "75th percentile of request latency in the last report.", _WRAP, scope="apm"),
    M("apm_latency_p90_seconds", GAUGE, "seconds",
      "90th percentile of request latency in the last report.", _WRAP, scope="apm"),
    M("apm_latency_p95_seconds", GAUGE, "seconds",
      "95th percentile of request latency in the last report.", _WRAP, scope="apm"),
    M("apm_latency_p99_seconds", GAUGE, "seconds",
      "99th percentile of request latency in the last report.", _WRAP, scope="apm"),
    M("apm_latency_avg_seconds", GAUGE, "seconds",
      "Mean request latency in the last report.", _WRAP, scope="apm"),
    M("apm_latency_max_seconds", GAUGE, "seconds",
      "Longest request latency in the last report.", _WRAP, scope="apm"),
    M("apm_throughput_per_second", GAUGE, "requests per second",
      "Requests (operations, transactions) completed per second in the last report.", _WRAP_OR_SLI,
      scope="apm"),
    M("apm_errors_per_second", GAUGE, "errors per second",
      "Failed requests (socket errors, error responses) per second in the last report.",
      _WRAP, scope="apm"),
    M("apm_load_target_rate_per_second", GAUGE, "requests per second",
      "Request rate owca-sine asked of the load generator for the current step: "
      "base + amplitude * sin(2*pi*t/period), averaged over the step.", _WRAP, scope="apm"),
    M("apm_sli", GAUGE, "unit of the SLI metric",
      "Service level indicator: the value of the metric named by owca-wrap --sli-metric; "
      "from the sli source, the interval's latency quantile in seconds, or the request "
      "rate for a throughput SLI.",
      _WRAP_OR_SLI, scope="apm"),
    M("apm_slo", GAUGE, "unit of the SLI metric",
      "Service level objective for apm_sli (owca-wrap --slo, or the sli source's slo).",
      _WRAP_OR_SLI, scope="apm"),
    M("apm_sli_normalized", GAUGE, "ratio",
      "apm_sli / apm_slo, inverted (apm_slo / apm_sli) where lower is better: "
      "1 is the objective, below 1 violates it.", _WRAP_OR_SLI, scope="apm"),
    M("apm_unparsed_lines_total", COUNTER, "lines",
      "Lines of the wrapped command's output that no parser understood.", _WRAP, scope="apm"),
    M("apm_parse_errors_total", COUNTER, "lines",
      "Lines a parser recognised but could not use (a value that is not a number).", _WRAP,
      scope="apm"),
    M("apm_child_exits_total", COUNTER, "exits",
      "Times the wrapped command exited or crashed.", _WRAP, scope="apm"),
    M("apm_child_restarts_total", COUNTER, "restarts",
      "Times owca-wrap restarted the wrapped command (--restart).", _WRAP, scope="apm"),
    M("apm_child_up", GAUGE, "boolean", "1 while the wrapped command runs.", _WRAP,
      scope="apm"),
    M("apm_report_timestamp_seconds", GAUGE, "seconds since the epoch",
      "When the latest SLI report was taken: owca-wrap's parse of the workload's report "
      "(the end of the span its latency describes), an sli source's read, or an APM "
      "file's ts where the file has none; the frame's ts is when owca-measure read it.",
      _WRAP_OR_SLI,
      scope="apm"),
    M("owca_apm_files", GAUGE, "files",
      "Fresh APM files owca-measure merged in its last cycle.", "owca-measure",
      scope="internal"),
    M("owca_apm_stale_files", GAUGE, "files",
      "APM files owca-measure ignored in its last cycle because they were older than "
      "apm_max_age.", "owca-measure", scope="internal"),
    M("owca_apm_malformed_files_total", COUNTER, "files",
      "Versions of APM files owca-measure could not parse (each reported once).",
      "owca-measure", scope="internal"),
    M("owca_apm_read_errors_total", COUNTER, "errors",
      "Failed reads of the APM directory or of one of its files.", "owca-measure",
      scope="internal"),
)

# -- service levels from the services' own metrics (owca-measure, sli section) ---------
_SLI = "owca-measure's sli source (lib/owca/measure/sources/sli.py)"
SLI = _specs(
    M("apm_sli_up", GAUGE, "boolean",
      "1 when the task's SLI source gave its SLI this cycle, 0 when it gave none "
      "(apm_sli_missing says why); absent for a task without an SLI source.", _SLI,
      scope="apm"),
    M("apm_sli_missing", GAUGE, "boolean",
      "1 for the reason the task got no SLI this cycle: down, timeout, hung, too_large, "
      "no_histogram, layout_changed, counter_reset, too_few_requests, first_read, "
      "no_value, rate_limited, bad_spec (docs/control.md).", _SLI, levels=("reason",),
      scope="apm"),
    M("apm_sli_failures_total", COUNTER, "cycles",
      "Cycles the task got no SLI from its source, by reason (first_read and "
      "rate_limited not counted).", _SLI, levels=("reason",), scope="apm"),
    M("owca_sli_tasks", GAUGE, "tasks",
      "Tasks with an SLI source that owca-measure reads.", "owca-measure", scope="internal"),
    M("owca_sli_reads_total", COUNTER, "reads",
      "Reads of the services' metrics started (endpoints, Prometheus queries, redis).",
      "owca-measure", scope="internal"),
    M("owca_sli_failures_total", COUNTER, "cycles",
      "Task cycles without an SLI, by reason (label `reason`, as apm_sli_missing).",
      "owca-measure", scope="internal"),
)

# -- RDT monitoring through resctrl (owca-measure, rdt_monitoring: true) --------------
_MON = "resctrl mon_data/mon_L3_<cache id>/"
_RATE = ("; the change since the last cycle over its duration (absent the first cycle of a "
         "group, after `Unavailable`, and when the counter went back)")
_SUM_TASK = ("the task's monitoring group (owca-mon-*), summed over cache ids; absent while "
             "any reads `Unavailable`")
_SUM_PLATFORM = "every control group (the default one included; each counts its MON groups)"
RDT_MONITORING = _specs(
    M("task_llc_occupancy_bytes", GAUGE, "bytes", "L3 cache the task's threads occupy.",
      _MON + "llc_occupancy of " + _SUM_TASK),
    M("task_mem_bandwidth_bytes", COUNTER, "bytes",
      "Memory traffic of the task's threads (local and remote) since OWCA began "
      "monitoring it; a counter that went back (a new RMID) adds nothing.",
      _MON + "mbm_total_bytes of " + _SUM_TASK),
    M("task_mem_bandwidth_local_bytes", COUNTER, "bytes",
      "Memory traffic of the task's threads to their local NUMA node, as "
      "task_mem_bandwidth_bytes.", _MON + "mbm_local_bytes of " + _SUM_TASK),
    M("task_mem_bandwidth_bytes_per_second", GAUGE, "bytes per second",
      "Memory bandwidth of the task's threads (local and remote).",
      _MON + "mbm_total_bytes of " + _SUM_TASK + _RATE),
    M("task_mem_bandwidth_local_bytes_per_second", GAUGE, "bytes per second",
      "Memory bandwidth of the task's threads to their local NUMA node.",
      _MON + "mbm_local_bytes of " + _SUM_TASK + _RATE),
    M("platform_llc_occupancy_bytes", GAUGE, "bytes", "L3 cache occupied, per cache.",
      _MON + "llc_occupancy summed over " + _SUM_PLATFORM, levels=("cache_id",),
      scope="platform"),
    M("platform_mem_bandwidth_bytes_per_second", GAUGE, "bytes per second",
      "Memory bandwidth (local and remote), per L3 cache domain.",
      _MON + "mbm_total_bytes summed over " + _SUM_PLATFORM + _RATE,
      levels=("cache_id",), scope="platform"),
    M("platform_mem_bandwidth_local_bytes_per_second", GAUGE, "bytes per second",
      "Memory bandwidth to the local NUMA node, per L3 cache domain.",
      _MON + "mbm_local_bytes summed over " + _SUM_PLATFORM + _RATE,
      levels=("cache_id",), scope="platform"),
    M("owca_rdt_monitored_tasks", GAUGE, "tasks",
      "Tasks with a resctrl monitoring group of OWCA's.", "owca-measure", scope="internal"),
    M("owca_rdt_unmonitored_tasks", GAUGE, "tasks",
      "Tasks left without a monitoring group in the last cycle: the RMIDs "
      "(info/L3_MON/num_rmids) are spent, or the kernel refused one.",
      "owca-measure", scope="internal"),
    M("owca_rdt_rmids", GAUGE, "RMIDs", "The platform's monitoring ids, every group's "
      "included.", "resctrl info/L3_MON/num_rmids", scope="internal"),
)

SECTIONS = {
    "Tasks: cgroups": TASK_CGROUP,
    "Tasks: bookkeeping": TASK_INTERNAL,
    "Tasks: perf counters": PERF,
    "Platform": PLATFORM,
    "Tasks and platform: RDT monitoring": RDT_MONITORING,
    "Anomalies": ANOMALY,
    "Detection: !ContentionDetector": CONTENTION,
    "Allocations": ALLOCATION,
    "Allocations: the SLO controller": CONTROL,
    "Allocations: headroom": HEADROOM,
    "Allocations: the memory policy": MEMORY_PROTECTION,
    "Application performance (workload wrappers)": APM,
    "Application performance: the services' own metrics": SLI,
    "Internal: every tool": INTERNAL,
    "Internal: discovery from orchestrators": ORCHESTRATOR,
    "Internal: shipping": SHIP,
}

REGISTRY: Dict[str, MetricSpec] = {}
for _section in SECTIONS.values():
    for _name, _spec in _section.items():
        assert _name not in REGISTRY, f"metric {_name} registered twice"
        REGISTRY[_name] = _spec


PLUGIN_HELP = "Emitted by a plug-in; not in OWCA's metric registry."


def exposed_name(name: str, type_: str) -> str:
    """A metric's name in the Prometheus exposition, by Prometheus' rules: a counter's
    ends in `_total`; `_count`, `_sum`, `_bucket` belong to histograms and summaries."""
    if type_ == COUNTER:
        return name if name.endswith("_total") else name + "_total"
    for suffix in ("_count", "_sum", "_bucket"):
        if name.endswith(suffix):
            return name[:-len(suffix)] + "_" + suffix[1:] + "_value"
    return name


def spec_for(name: str) -> MetricSpec:
    """The registered spec, or a gauge with generic level names for a plug-in's metric."""
    spec = REGISTRY.get(name)
    if spec is None:
        spec = MetricSpec(name, GAUGE, "", PLUGIN_HELP, "plug-in", scope="plugin")
    return spec


def renamed() -> Dict[str, str]:
    """{frame name: exposition name} of the registered metrics whose names differ."""
    return {name: spec.exposed_name for name, spec in REGISTRY.items()
            if spec.exposed_name != name}


def deprecated() -> Dict[str, MetricSpec]:
    """{deprecated exposition name: the metric's spec}."""
    return {spec.deprecated: spec for spec in REGISTRY.values() if spec.deprecated}


def _frame_cell(s: MetricSpec) -> str:
    if s.name == s.exposed_name and not s.frame_unit:
        return "same"
    return f"`{s.name}`" + (f" ({s.frame_unit})" if s.frame_unit else "")


def render_markdown() -> str:
    """docs/metrics.md's tables, one per section."""
    out = []
    for title, section in SECTIONS.items():
        if not section:
            continue
        out.append(f"## {title}\n")
        out.append("| name (Prometheus) | name in frames | type | unit | levels (labels) | source "
                   "| description |")
        out.append("|---|---|---|---|---|---|---|")
        for s in section.values():
            levels = ", ".join(s.levels) or "—"
            name = f"`{s.exposed_name}`"
            if s.deprecated:
                name += f" (until {DEPRECATED_UNTIL} also `{s.deprecated}`, deprecated)"
            out.append(f"| {name} | {_frame_cell(s)} | {s.type} | {s.unit} | {levels} | "
                       f"{s.source} | {s.help} |")
        out.append("")
    out.append("## Names in frames and names in the exposition\n")
    out.append("The first column of the tables above is the name a Prometheus server scrapes "
               "(the endpoint, the files and the Kafka messages carry the same text); the "
               "second is the name in frames (docs/protocol.md), which the stages, plug-ins "
               "and recordings see. The exposition follows "
               "Prometheus' naming rules (https://prometheus.io/docs/practices/naming/), so "
               "that `promtool check metrics` passes: a counter's name ends in `_total`, "
               "only histograms and summaries end in `_count`, timestamps end in "
               "`_timestamp_seconds`, and values are in base units (seconds, bytes, ratios "
               "from 0 to 1) named in the metric. Frames keep the names and units of "
               "release 0.1 (the kernel's: USER_HZ ticks, percent), so that detectors, "
               "allocators and recordings are unchanged; owca-ship converts at the "
               "exposition. The guide's single application prefix is the one rule not "
               "followed: the names keep WCA's prefixes (`task_`, `platform_`, `apm_`, "
               "`allocation_`; OWCA's own `owca_`), which dashboards built for WCA "
               "query.\n")
    out.append(f"### Deprecated names (written until release {DEPRECATED_UNTIL})\n")
    out.append(f"Release {DEPRECATED_SINCE} renamed these exposition names. owca-ship writes "
               "each old name beside the new one, with the value and unit it had, until "
               f"release {DEPRECATED_UNTIL} removes them; `ship: {{deprecated_names: false}}` "
               "stops them now (docs/shipping.md). Change dashboards, recording rules and "
               "alerts to the new names:\n")
    out.append("| deprecated name | unit | new name | unit |")
    out.append("|---|---|---|---|")
    for old, spec in deprecated().items():
        out.append(f"| `{old}` | {spec.frame_unit or spec.unit} | `{spec.exposed_name}` | "
                   f"{spec.unit} |")
    out.append("")
    out.append("A plug-in's unregistered metric keeps its name (with `_total` added when its "
               "sample says `counter`); its HELP is the sample's `help`, or a line saying "
               "it comes from a plug-in.\n")
    return "\n".join(out)
