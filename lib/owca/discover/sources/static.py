"""`!StaticDiscovery`: a fixed list of tasks, inline or in a YAML file."""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca.core import config, frames
from owca.core.paths import Paths
from owca.plugin import DiscoveryError, TaskSource


@dataclass
class StaticTask:
    cgroup_path: str
    name: Optional[str] = None
    id: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    resources: Dict[str, float] = field(default_factory=dict)
    subcgroup_paths: List[str] = field(default_factory=list)


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
        # A configuration's limits: a FIFO put there must not block discovery, nor
        # an alias bomb or a huge file exhaust it.
        data = config.load_yaml_data(path) or []
    except config.ConfigError as e:
        raise DiscoveryError(str(e)) from None
    except yaml.YAMLError as e:
        raise DiscoveryError(f"{path}: {e}") from None
    if not isinstance(data, list):
        raise DiscoveryError(f"{path}: expected a list of tasks")
    try:
        return [StaticTask(**item) for item in data]
    except TypeError as e:
        raise DiscoveryError(f"{path}: {e}") from None
