"""The tasks' cgroups as one source: a TaskCgroup reader (cgroup.py) per task.

Readers are kept between cycles, so that their files stay open and a cycle costs
reads, not opens; a task whose cgroup path changes gets a new reader.  Readers are
made with consecutive phases, so that their slow metrics' reads spread evenly over
the cycles.  This source names the tasks of a cycle (`lists_tasks`): a task whose
cgroup went away (CgroupGone) is left out of it, with a warning.

Failure as a whole: none of the hierarchies it reads tasks from is there (the
cgroup mount is gone, or --cgroupfs holds neither the v1 cpuacct, cpu and memory
hierarchies nor a cgroup2 one), so that every task would be left out for the
mount's sake, not its own.  A task whose cgroup was removed is not a failure.
"""
import logging
import os
from typing import Dict, List

from owca.core.kernel import CgroupGone
from owca.measure.sources.base import Cycle, Reading, Source
from owca.measure.sources.cgroup import V1_CONTROLLERS, TaskCgroup

log = logging.getLogger("owca.measure")


class CgroupSource(Source):
    name = "cgroup"
    lists_tasks = True

    def __init__(self, cfg, paths):
        self.paths = paths
        self.version = cfg.cgroup_version
        self.slow_every = cfg.slow_metrics_every
        self.run_queue_delay = cfg.run_queue_delay
        self.readers: Dict[str, TaskCgroup] = {}
        self.readers_created = 0  # the next reader's phase for its slow metrics

    def update(self, tasks: Dict[str, dict]) -> None:
        for task_id in list(self.readers):
            task = tasks.get(task_id)
            if task is None or task["cgroup_path"] != self.readers[task_id].cgroup_path:
                self.readers.pop(task_id).close()
        for task_id, task in tasks.items():
            if task_id not in self.readers:
                self.readers[task_id] = TaskCgroup(
                    self.paths, task["cgroup_path"], self.version,
                    slow_every=self.slow_every, phase=self.readers_created,
                    run_queue_delay=self.run_queue_delay)
                self.readers_created += 1

    def read(self, cycle: Cycle) -> Reading:
        measured = {}
        for task_id, reader in self.readers.items():
            try:
                measured[task_id] = reader.read()
            except CgroupGone as e:
                log.warning("task %s left out of cycle %d: %s", task_id, cycle.seq, e)
        # A cycle that read every task has seen the hierarchies; only one that left
        # tasks out, or had none, looks whether they are there at all.
        ok = bool(measured) and len(measured) == len(self.readers) \
            or any(os.path.isdir(root) for root in self._hierarchies())
        return Reading(tasks=measured, ok=ok)

    def _hierarchies(self) -> List[str]:
        roots = []
        if self.version in ("auto", "v1"):
            roots += [self.paths.cgroup_v1(controller) for controller in V1_CONTROLLERS]
        if self.version in ("auto", "v2"):
            roots.append(self.paths.cgroup_v2_root)
        return roots

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()
