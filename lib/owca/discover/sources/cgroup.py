"""`!CgroupDiscovery`: every cgroup with processes under a root is a task."""
import os
from dataclasses import dataclass, field
from typing import Dict, List

from owca.core import frames
from owca.core.kernel import UNIFIED, cgroup_hierarchy
from owca.core.paths import CGROUP_V1_CONTROLLERS, Paths
from owca.plugin import TaskSource


def cgroup_exists(paths: Paths, cgroup_path: str) -> bool:
    """Whether the cgroup exists in any hierarchy OWCA measures.

    A directory of the cgroup2 hierarchy counts with its cgroup.procs only, the
    file every cgroup2 directory has (a tree that stands in for the mount must
    have it too)."""
    held = cgroup_hierarchy(paths, cgroup_path)
    if held == UNIFIED:
        return os.path.exists(os.path.join(paths.cgroup_v2(cgroup_path), "cgroup.procs"))
    return held is not None


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
            if h != UNIFIED and h not in CGROUP_V1_CONTROLLERS:
                raise ValueError(f"hierarchies: unknown hierarchy {h!r}")

    def _mount(self, paths: Paths, hierarchy: str) -> str:
        return paths.cgroup_v2_root if hierarchy == UNIFIED else paths.cgroup_v1(hierarchy)

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
