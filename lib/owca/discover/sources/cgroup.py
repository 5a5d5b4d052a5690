"""`!CgroupDiscovery`: every cgroup with processes under a root is a task."""
import fnmatch
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca.core import frames
from owca.core.kernel import UNIFIED, cgroup_hierarchy
from owca.core.paths import CGROUP_V1_CONTROLLERS, Paths
from owca.core.priority import BE, HP
from owca.plugin import TaskSource

log = logging.getLogger("owca.discover")

# What a scan found under the root; a change of it is said once (see _say).
ROOT_MISSING, ROOT_EMPTY, ROOT_TASKS = "missing", "empty", "tasks"


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
    hp_cgroups, be_cgroups: shell patterns of cgroup paths (`*` matches `/` too):
    a task whose path matches one is labelled `priority: hp` (be_cgroups: `be`;
    hp wins where both match).  A task that matches neither keeps `labels`:
    a cgroup's path says nothing of its service level, so nothing is HP or BE
    unless the configuration says so (docs/discovery.md).
    """
    root: str = "/"
    max_depth: int = 3
    hierarchies: List[str] = field(default_factory=lambda: ["cpuacct", "memory", "unified"])
    include_root: bool = False
    include_empty: bool = False
    labels: Dict[str, str] = field(default_factory=dict)
    hp_cgroups: List[str] = field(default_factory=list)
    be_cgroups: List[str] = field(default_factory=list)

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
        for name, patterns in (("hp_cgroups", self.hp_cgroups), ("be_cgroups", self.be_cgroups)):
            for pattern in patterns:
                # A relative pattern would match no cgroup path, silently.
                if not pattern.startswith("/"):
                    raise ValueError(f"{name}: {pattern!r} is not an absolute cgroup path "
                                     f"pattern (one starts with /)")
        self._root_state: Optional[str] = None

    def priority_of(self, cgroup_path: str) -> Optional[str]:
        """hp or be where a pattern names the cgroup, else None."""
        if any(fnmatch.fnmatchcase(cgroup_path, p) for p in self.hp_cgroups):
            return HP
        if any(fnmatch.fnmatchcase(cgroup_path, p) for p in self.be_cgroups):
            return BE
        return None

    def _mount(self, paths: Paths, hierarchy: str) -> str:
        return paths.cgroup_v2_root if hierarchy == UNIFIED else paths.cgroup_v1(hierarchy)

    def list_tasks(self, paths: Paths) -> List[dict]:
        found = set()
        scanned = []
        for hierarchy in self.hierarchies:
            mount = self._mount(paths, hierarchy)
            top = os.path.join(mount, self.root.lstrip("/"))
            if not os.path.isdir(top):
                continue
            scanned.append(hierarchy)
            for cgroup_path in _walk(top, mount, self.max_depth):
                if cgroup_path == self.root and not self.include_root:
                    continue
                if self.include_empty or _has_processes(os.path.join(mount,
                                                                     cgroup_path.lstrip("/"))):
                    found.add(cgroup_path)
        self._say(ROOT_MISSING if not scanned else ROOT_EMPTY if not found else ROOT_TASKS,
                  paths, len(found))
        return [{"id": p, "name": p.rstrip("/").rsplit("/", 1)[-1] or "root",
                 "cgroup_path": p, "labels": self._labels(p), "resources": {}}
                for p in sorted(found)]

    def _labels(self, cgroup_path: str) -> Dict[str, str]:
        labels = dict(self.labels)
        verdict = self.priority_of(cgroup_path)
        if verdict is not None:
            labels["priority"] = verdict
        return labels

    def _say(self, state: str, paths: Paths, ntasks: int) -> None:
        """A root that lists no task is a mistake that would pass in silence (a
        `root: /kubepods` on a node whose kubelet uses /kubepods.slice): warned once
        when it starts, told once when it ends, not every cycle."""
        before, self._root_state = self._root_state, state
        if state == before:
            return
        if state == ROOT_MISSING:
            if self._warned(state):
                log.warning("cgroup: root %s exists in none of the hierarchies scanned (%s, "
                            "under %s): no tasks until it appears", self.root,
                            ", ".join(self.hierarchies), paths.cgroupfs)
        elif state == ROOT_EMPTY:
            log.warning("cgroup: no cgroup under %s holds processes (max_depth %d%s): no "
                        "tasks until one does", self.root, self.max_depth,
                        "" if self.include_root else ", the root itself left out")
        elif before is not None and self._warned(before):
            log.info("cgroup: %d tasks under %s again", ntasks, self.root)

    def _warned(self, state: str) -> bool:
        # A missing "/" is no root's mistake: no hierarchy is mounted at --cgroupfs at
        # all (a bare test tree, a container without cgroups).
        return state == ROOT_EMPTY or (state == ROOT_MISSING and self.root != "/")


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
