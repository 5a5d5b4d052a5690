"""owca-discover: which tasks run on this node, one `tasks` frame per interval.

A source lists the tasks (`TaskSource.list_tasks()`); this module validates what
it returns, keeps ids stable, drops tasks whose cgroup does not exist on this
node, and writes the frame.  The sources are in `owca.discover.sources`, one
module each.
"""
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca.core import config, frames
from owca.core.stage import Stage
from owca.discover.sources import BUILTINS
from owca.discover.sources.cgroup import CgroupDiscovery, cgroup_exists
from owca.plugin import DiscoveryError, TaskSource, source_name

config.add_builtins(BUILTINS)

log = logging.getLogger("owca.discover")


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
        from owca.core.paths import paths_from_options
        self.paths = paths_from_options(cgroupfs=options.get("--cgroupfs"))
        self.seq = 0
        self.errors = 0
        self.dropped = 0
        self.last_tasks: List[dict] = []
        self.last_success: Optional[float] = None  # monotonic time of the last good answer
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
                _encodable(task)
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


def _encodable(task: dict) -> None:
    """FrameError unless the frame can carry the task as it is.

    The orchestrator sources check their strings; a static file or a plug-in
    may still hand over a lone surrogate (`"\\ud800"` in YAML or JSON), which
    UTF-8 cannot encode: left out here, it costs its task, not the frame.
    """
    try:
        json.dumps(task, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError) as e:  # UnicodeEncodeError is a ValueError
        raise frames.FrameError(f"it cannot be encoded in a frame: {e}") from None
