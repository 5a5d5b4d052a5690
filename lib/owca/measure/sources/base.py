"""The one interface of owca-measure's sources, and what a source gives a cycle.

A source is one kind of thing owca-measure reads: the tasks' cgroups, the platform,
perf counters, the workload wrappers' APM files, RDT monitoring.  The stage builds
those its configuration turns on (BUILTINS and SWITCHES in this package's
__init__) as `cls(cfg, paths)`, and drives each the same way:

    update(tasks)  the task set changed: {task id: task} as the tasks frame lists
                   them (`cgroup_path`, `name`, ...); open what new tasks need and
                   release what the gone ones held
    read(cycle)    this cycle's Reading: task metrics, platform metrics, the source's
                   own owca_* samples, and whether it worked at all
    close()        release everything: files, the perf helper, resctrl groups

The stage reads the sources in the order of BUILTINS and merges in that order:
each Reading's `platform` into the frame's platform metrics, its `tasks` into each
task's metrics.  The source that `lists_tasks` (the cgroup source) names the tasks
of the cycle: a task it left out, because its cgroup went away, is left out of the
frame whatever the other sources read for it.

Success and duration, as node_exporter's collectors report them
(node_scrape_collector_success, node_scrape_collector_duration_seconds): the stage
times each read() and writes per source and cycle `owca_source_success{source}`
(1, or 0 when `Reading.ok` is false) and `owca_source_duration_seconds{source}`
(left out under --no-timing, so that replays stay byte-identical).  `ok` is false
only when the source failed as a whole this cycle; what is lost for one task (its
cgroup removed, its perf group not opened, its APM file malformed) is the source
working, and has its own counters and log lines.  What a failure as a whole is,
each source's module says.
"""
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List


@dataclass
class Cycle:
    """What a source knows of the cycle it reads for."""
    seq: int
    labels: Dict[str, str]  # the stage's labels, for the source's own samples


@dataclass
class Reading:
    """What one source read in one cycle."""
    tasks: Dict[str, dict] = field(default_factory=dict)  # task id -> {metric: value}
    platform: dict = field(default_factory=dict)          # platform metric -> value
    samples: List[dict] = field(default_factory=list)     # its own owca_* samples
    ok: bool = True  # false: the source failed as a whole this cycle
    # Metrics this source speaks for in the tasks it read: an earlier source's values
    # of them are dropped from those tasks, whether or not this source has one this
    # cycle (the sli source's SLI replaces a wrapper's, and its absence is no wrapper's).
    replaces: FrozenSet[str] = frozenset()


class Source:
    """One of owca-measure's sources (the module docstring says how the stage drives it)."""

    name = "source"  # the `source` label of its success and duration samples
    lists_tasks = False

    def update(self, tasks: Dict[str, dict]) -> None:
        """The tasks to measure from now on, {task id: task}."""

    def read(self, cycle: Cycle) -> Reading:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the source holds; called once, at the end of the stream."""


def cgroup_paths(tasks: Dict[str, dict]) -> Dict[str, str]:
    """{task id: cgroup path}: what the perf and RDT sources follow of a task."""
    return {task_id: task["cgroup_path"] for task_id, task in tasks.items()}
