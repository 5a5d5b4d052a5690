"""The built-in allocator plug-ins: NOPAllocator and StaticAllocator.

Allocator API (DESIGN.md):

    allocate(platform, tasks_measurements, tasks_resources, tasks_labels,
             tasks_allocations) -> (allocations, anomalies, extra_metrics)

`tasks_allocations` is what each task has now, read back from its cgroup and
resctrl group this cycle: {task_id: {type: value}} in the units of
lib/owca/core/allocation.py.  `allocations` is {task_id: {type: value}}: a value sets
the type, None withdraws it (OWCA restores what the task had before), a type
left out stays as it is.  OWCA keeps applying the last value set until it is
withdrawn or the task goes.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List

from owca.core import allocation
from owca.plugin import Allocator


@dataclass
class StaticRule:
    """Tasks whose labels include every `labels` pair get `allocations`."""
    allocations: Dict[str, Any]
    labels: Dict[str, str] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        if not self.allocations:
            raise ValueError("allocations: empty")
        # Form and ranges now, so that a bad rule fails at start with its line;
        # CPUs, NUMA nodes and RDT limits are checked on the node, each cycle.
        self.allocations = {type_: allocation.validate(type_, value)
                            for type_, value in self.allocations.items()}

    def matches(self, labels: Dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels.items())


@dataclass
class StaticAllocator(Allocator):
    """Allocations from fixed rules: each matching rule's allocations, in order (a later
    rule wins a type both set).  A type a task stops matching is withdrawn."""
    rules: List[StaticRule]
    # False: a value another writer changed is left as it is (Allocator above).
    reapply_external_changes: bool = True
    _given: Dict[str, set] = field(default_factory=dict, init=False, repr=False)

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        allocations = {}
        given = {}
        for task_id, labels in tasks_labels.items():
            wanted = {}
            for rule in self.rules:
                if rule.matches(labels):
                    wanted.update(rule.allocations)
            for type_ in self._given.get(task_id, set()) - wanted.keys():
                wanted[type_] = None
            if wanted:
                allocations[task_id] = wanted
            kept = {t for t, v in wanted.items() if v is not None}
            if kept:
                given[task_id] = kept
        self._given = given
        return allocations, [], []
