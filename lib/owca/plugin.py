"""Everything a plug-in author imports: the interfaces and what they are handed.

A plug-in is a class built from the configuration (`!ClassName`, docs/plugins.md)
that one stage calls each cycle:

- a detector (owca-detect): `AnomalyDetector.detect(platform, tasks_measurements,
  tasks_resources, tasks_labels) -> (anomalies, extra_metrics)`;
- an allocator (owca-allocate): `Allocator.allocate(platform, tasks_measurements,
  tasks_resources, tasks_labels, tasks_allocations) -> (allocations, anomalies,
  extra_metrics)`;
- a task source (owca-discover): `TaskSource.list_tasks(paths) -> [task dict]`;
- a storage (owca-ship): `Storage.store(cycle)`.

This module imports only the core, so a plug-in loads no stage with it.  The
names plug-ins used before the package had one folder per stage
(`owca.detect.AnomalyDetector`, `owca.config.register`, ...) still resolve, with
a DeprecationWarning (owca/__init__.py).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from owca.core import allocation, frames  # noqa: F401  (re-exported for plug-ins)
from owca.core.config import ConfigError, Range, Seconds, register  # noqa: F401  (re-exported)
from owca.core.digest import hexdigest
from owca.core.paths import Paths


@dataclass
class Platform:
    """What a plug-in knows of the node: topology and the platform_* metrics."""
    cpus: int
    cores: int
    sockets: int
    numa_nodes: int
    metrics: Dict[str, object]

    @classmethod
    def from_frame(cls, frame: dict) -> "Platform":
        m = frame.get("platform", {})
        return cls(cpus=int(m.get("platform_topology_cpus", 0)),
                   cores=int(m.get("platform_topology_cores", 0)),
                   sockets=int(m.get("platform_topology_sockets", 0)),
                   numa_nodes=int(m.get("platform_topology_numa_nodes", 0)),
                   metrics=m)


def anomaly_uuid(type: str, resource: str, contended: str, contending: List[str]) -> str:
    """The same contention gets the same id in every cycle and every replay."""
    key = "\0".join([type, resource, contended, *sorted(contending)])
    return hexdigest(key, 16)


@dataclass
class ContentionAnomaly:
    """`contended_task_id` suffers on `resource` because of `contending_task_ids`."""
    resource: str
    contended_task_id: str
    contending_task_ids: List[str]
    metrics: List[dict] = field(default_factory=list)
    type: str = "contention"

    def to_dict(self) -> dict:
        return {"type": self.type, "resource": self.resource,
                "contended_task_id": self.contended_task_id,
                "contending_task_ids": list(self.contending_task_ids),
                "uuid": anomaly_uuid(self.type, self.resource, self.contended_task_id,
                                     self.contending_task_ids),
                "metrics": list(self.metrics)}


class AnomalyDetector:
    """Base class of detector plug-ins."""

    def detect(self, platform: Platform, tasks_measurements: Dict[str, dict],
               tasks_resources: Dict[str, dict], tasks_labels: Dict[str, dict]):
        raise NotImplementedError


@dataclass
class NOPAnomalyDetector(AnomalyDetector):
    """Finds nothing: the pipeline's default, and the baseline of benchmarks."""

    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        return [], []


def plugin_inputs(frame: dict) -> Tuple[Platform, Dict[str, dict], Dict[str, dict],
                                        Dict[str, dict]]:
    """The plug-in API's arguments, out of a measurements frame: the platform, and
    per task its metrics, resources and labels."""
    tasks = frame["tasks"]
    return (Platform.from_frame(frame),
            {i: t.get("metrics", {}) for i, t in tasks.items()},
            {i: t.get("resources", {}) for i, t in tasks.items()},
            {i: t.get("labels", {}) for i, t in tasks.items()})


def anomaly_dicts(anomalies) -> List[dict]:
    out = []
    for a in anomalies:
        d = a.to_dict() if hasattr(a, "to_dict") else dict(a)
        d.setdefault("uuid", anomaly_uuid(d.get("type", "contention"), d.get("resource", ""),
                                          d.get("contended_task_id", ""),
                                          d.get("contending_task_ids", [])))
        out.append(d)
    return out


class Allocator:
    """Base class of allocator plug-ins."""

    # Whether allocate() looks at tasks_allocations.  Reading them back costs a
    # few cgroup files per task per cycle; an allocator that never looks (and
    # owns nothing yet) is handed empty ones, and the cycle reads nothing.
    reads_current_allocations = True

    # Other managers write the same files (the kubelet resets a pod's CFS quota on its
    # own schedule, systemd rewrites the values of the units it owns).  When a value
    # OWCA wrote for this allocator is found changed, OWCA counts it
    # (allocation_external_changes_total), logs it once, and asks this: True writes
    # the allocator's value again at once; False leaves the other writer's value in
    # place until the allocator asks for another value or the file changes again (and
    # OWCA does not restore over it).  Either way the other writer's value is never
    # taken for the task's original.
    reapply_external_changes = True

    def reapply_external_change(self, task_id: str, type_: str, wanted, found) -> bool:
        """Whether OWCA writes `wanted` again over `found` (both in the units of the
        allocation types; rdt: the group's schemata lines); this cycle's answer."""
        return self.reapply_external_changes

    def allocate(self, platform, tasks_measurements: Dict[str, dict],
                 tasks_resources: Dict[str, dict], tasks_labels: Dict[str, dict],
                 tasks_allocations: Dict[str, dict]):
        raise NotImplementedError


@dataclass
class NOPAllocator(Allocator):
    """Allocates nothing."""

    reads_current_allocations = False

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        return {}, [], []


CATEGORIES = ("metrics", "anomalies", "allocations")


@dataclass
class Cycle:
    category: str   # metrics, anomalies or allocations
    seq: int
    ts: float
    host: str
    text: str       # exposition text, newline-terminated lines


@dataclass(kw_only=True)
class Storage:
    """Base of every storage.  store() may raise StorageError; close() flushes."""
    categories: List[str] = field(default_factory=lambda: list(CATEGORIES))

    def __post_init__(self):
        for c in self.categories:
            if c not in CATEGORIES:
                raise ValueError(f"categories: unknown category {c!r} "
                                 f"(expected {', '.join(CATEGORIES)})")

    def wants(self, category: str) -> bool:
        return category in self.categories

    def start(self) -> None:
        """Called once by owca-ship before the first cycle, to take what the storage holds
        while it runs (a spool, a listening socket): building one from the configuration
        has no side effects, so a configuration can be checked on its own."""

    def store(self, cycle: Cycle) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StorageError(Exception):
    """A storage could not take a cycle (one line, counted)."""


class DiscoveryError(Exception):
    """The source could not list its tasks this cycle (one line, counted)."""


class TaskSource:
    """A source of tasks.  list_tasks() returns task dicts as in a `tasks` frame."""

    def list_tasks(self, paths: Paths) -> List[dict]:
        raise NotImplementedError

    def samples(self) -> list:
        """The source's own metric samples, added to each frame."""
        return []


def source_name(source: TaskSource) -> str:
    """`mesos` for MesosDiscovery: the `source` label of the discovery metrics."""
    name = type(source).__name__
    return (name[:-len("Discovery")] if name.endswith("Discovery") else name).lower()
