"""owca-discover: which tasks run on this node, one `tasks` frame per interval.

A source lists the tasks (`TaskSource.list_tasks()`); this module validates what
it returns, keeps ids stable, drops tasks whose cgroup does not exist on this
node, and writes the frame.  Sources: `CgroupDiscovery` and `StaticDiscovery`
here; Mesos and Kubernetes in their own modules.
"""
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca import frames
from owca.config import register
from owca.paths import CGROUP_V1_CONTROLLERS, Paths
from owca.stage import Stage

log = logging.getLogger("owca.discover")


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


_LABEL_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label_name(name: str) -> str:
    """Orchestrator label keys (`app.kubernetes.io/name`) as Prometheus label names."""
    clean = _LABEL_BAD_CHARS.sub("_", name)
    return clean if clean and not clean[0].isdigit() else "_" + clean


def cgroup_exists(paths: Paths, cgroup_path: str) -> bool:
    """Whether the cgroup exists in any hierarchy OWCA measures."""
    if os.path.isdir(paths.cgroup_v2(cgroup_path)) and \
            os.path.exists(os.path.join(paths.cgroup_v2(cgroup_path), "cgroup.procs")):
        return True
    return any(os.path.isdir(paths.cgroup_v1(c, cgroup_path)) for c in CGROUP_V1_CONTROLLERS)


@register
@dataclass
class CgroupDiscovery(TaskSource):
    """Every cgroup under `root` that holds processes is a task, its path its id.

    hierarchies: which trees to scan: v1 controller names and/or `unified`
    (cgroup v2); the union of what they hold is reported.
    """
    root: str = "/"
    max_depth: int = 3
    hierarchies: List[str] = field(default_factory=lambda: ["cpuacct", "memory", "unified"])
    include_root: bool = False
    include_empty: bool = False
    labels: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        try:
            frames.check_cgroup_path(self.root, "root")
        except frames.FrameError as e:
            raise ValueError(str(e)) from None
        if self.max_depth < 0:
            raise ValueError("max_depth: expected 0 or more")
        for h in self.hierarchies:
            if h != "unified" and h not in CGROUP_V1_CONTROLLERS:
                raise ValueError(f"hierarchies: unknown hierarchy {h!r}")

    def _mount(self, paths: Paths, hierarchy: str) -> str:
        return paths.cgroup_v2_root if hierarchy == "unified" else paths.cgroup_v1(hierarchy)

    def list_tasks(self, paths: Paths) -> List[dict]:
        found = set()
        for hierarchy in self.hierarchies:
            mount = self._mount(paths, hierarchy)
            top = os.path.join(mount, self.root.lstrip("/"))
            if not os.path.isdir(top):
                continue
            for cgroup_path in _walk(top, mount, self.max_depth):
                if cgroup_path == self.root and not self.include_root:
                    continue
                if self.include_empty or _has_processes(os.path.join(mount,
                                                                     cgroup_path.lstrip("/"))):
                    found.add(cgroup_path)
        return [{"id": p, "name": p.rstrip("/").rsplit("/", 1)[-1] or "root",
                 "cgroup_path": p, "labels": dict(self.labels), "resources": {}}
                for p in sorted(found)]


def _walk(top: str, mount: str, max_depth: int):
    """Cgroup paths (relative to the mount, absolute form) of `top` and below."""
    base_depth = top.rstrip("/").count("/")
    for dirpath, dirnames, _files in os.walk(top):
        depth = dirpath.rstrip("/").count("/") - base_depth
        if depth >= max_depth:
            dirnames[:] = []
        rel = "/" + os.path.relpath(dirpath, mount).lstrip(".").lstrip("/")
        yield rel if rel != "/" else "/"


def _has_processes(cgroup_dir: str) -> bool:
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs"), "rb") as f:
            return bool(f.read(1))
    except OSError:
        return False


@dataclass
class StaticTask:
    cgroup_path: str
    name: Optional[str] = None
    id: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    resources: Dict[str, float] = field(default_factory=dict)
    subcgroup_paths: List[str] = field(default_factory=list)


@register
@dataclass
class StaticDiscovery(TaskSource):
    """A fixed list of tasks, given inline (`tasks:`) or in a YAML file (`file:`)."""
    tasks: List[StaticTask] = field(default_factory=list)
    file: Optional[str] = None

    def __post_init__(self):
        if self.tasks and self.file:
            raise ValueError("give either tasks or file, not both")
        for t in self.tasks:
            frames.check_cgroup_path(t.cgroup_path, "tasks[].cgroup_path")

    def list_tasks(self, paths: Paths) -> List[dict]:
        tasks = self.tasks
        if self.file:
            tasks = load_static_tasks(self.file)
        return [{"id": t.id or t.cgroup_path, "name": t.name or t.cgroup_path.rsplit("/", 1)[-1],
                 "cgroup_path": t.cgroup_path, "subcgroup_paths": list(t.subcgroup_paths),
                 "labels": dict(t.labels), "resources": dict(t.resources)} for t in tasks]


def load_static_tasks(path: str) -> List[StaticTask]:
    """Tasks from a YAML file holding a list of StaticTask mappings (re-read each cycle)."""
    import yaml  # only for this source: a few MB that other sources do without
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or []
    except (OSError, yaml.YAMLError) as e:
        raise DiscoveryError(f"{path}: {e}") from None
    if not isinstance(data, list):
        raise DiscoveryError(f"{path}: expected a list of tasks")
    try:
        return [StaticTask(**item) for item in data]
    except TypeError as e:
        raise DiscoveryError(f"{path}: {e}") from None


@dataclass
class DiscoverConfig:
    source: TaskSource = field(default_factory=lambda: CgroupDiscovery(include_root=True))
    interval: float = 5.0
    # Labels added to every task (for example the node's role).
    labels: Dict[str, str] = field(default_factory=dict)
    # Tasks whose cgroup is missing on this node are dropped unless false.
    require_cgroup: bool = True
    # While the source fails, the last good list is kept (its vanished
    # cgroups dropped) for this many seconds, then emptied; null: kept forever.
    max_staleness: Optional[float] = 60.0


class Discover(Stage):
    name = "discover"

    def __init__(self, cfg: DiscoverConfig, options: dict):
        super().__init__(cfg, options)
        from owca.paths import paths_from_options
        self.paths = paths_from_options(cgroupfs=options.get("--cgroupfs"))
        self.seq = 0
        self.errors = 0
        self.dropped = 0
        self.last_tasks = []
        self.last_success = None  # monotonic time of the last good answer
        self.fresh = False

    def produce(self) -> list:
        self.seq += 1
        try:
            tasks = self.cfg.source.list_tasks(self.paths)
        except DiscoveryError as e:
            self.errors += 1
            self.fresh = False
            tasks = self._stale(str(e))
        else:
            tasks = self._checked(tasks)
            self.last_tasks = tasks
            self.last_success = time.monotonic()
            self.fresh = True
        return [frames.tasks_frame(self.seq, tasks, metrics=self._samples(len(tasks)))]

    def _stale(self, error: str) -> List[dict]:
        """The failure policy (docs/discovery.md): keep the last list, bounded, then empty."""
        name = source_name(self.cfg.source)
        if self.last_success is None:
            log.error("%s: %s (no good answer yet: no tasks)", name, error)
            return []
        age = time.monotonic() - self.last_success
        limit = self.cfg.max_staleness
        if limit is not None and age > limit:
            log.error("%s: %s (no good answer for %.0f s: no tasks until it recovers)",
                      name, error, age)
            self.last_tasks = []
            return []
        if self.cfg.require_cgroup:  # a task that ended meanwhile is not kept
            kept = [t for t in self.last_tasks if cgroup_exists(self.paths, t["cgroup_path"])]
            self.dropped += len(self.last_tasks) - len(kept)
            self.last_tasks = kept
        log.error("%s: %s (keeping the %d tasks of the last good answer, %.0f s old)",
                  name, error, len(self.last_tasks), age)
        return self.last_tasks

    def _age(self) -> float:
        """Seconds since the listed tasks were fetched: 0 when they are fresh."""
        if self.fresh or self.last_success is None:
            return 0.0
        return round(time.monotonic() - self.last_success, 3)

    def _checked(self, tasks: List[dict]) -> List[dict]:
        good, seen = [], set()
        for task in tasks:
            if self.cfg.labels:
                task["labels"] = {**self.cfg.labels, **task.get("labels", {})}
            try:
                frames.check_task_id(task.get("id"))
                frames.check_cgroup_path(task.get("cgroup_path"), "cgroup_path")
                frames.check_labels(task.get("labels", {}), "labels")
                frames.check_resources(task.get("resources", {}), "resources")
                if task["id"] in seen:
                    raise frames.FrameError(f"duplicate task id {task['id']!r}")
            except frames.FrameError as e:
                self.dropped += 1
                log.warning("task %r left out: %s", task.get("id"), e)
                continue
            if self.cfg.require_cgroup and not cgroup_exists(self.paths, task["cgroup_path"]):
                self.dropped += 1
                log.warning("task %s left out: its cgroup %s does not exist on this node",
                            task["id"], task["cgroup_path"])
                continue
            seen.add(task["id"])
            good.append(task)
        return good

    def _samples(self, ntasks: int) -> list:
        labels = {"stage": self.name}
        source = {"stage": self.name, "source": source_name(self.cfg.source)}
        return self.stats.samples() + [
            frames.sample("owca_tasks", ntasks, labels),
            frames.sample("owca_tasks_dropped_total", self.dropped, labels, "counter"),
            frames.sample("owca_discovery_errors_total", self.errors, source, "counter"),
            frames.sample("owca_discovery_tasks_age_seconds", self._age(), source),
        ] + self.cfg.source.samples()


# The orchestrator sources register their configuration tags (!MesosDiscovery,
# !KubernetesDiscovery, !PriorityRule); they import this module, hence last.
from owca import kubernetes, mesos  # noqa: E402,F401
