"""owca-allocate: hands each `measurements` frame to an allocator plug-in and applies
what it decides to the tasks' own cgroups and OWCA's own resctrl groups.

The measurements frame is forwarded unchanged, followed by an `allocations`
frame of the same cycle (and an `anomalies` frame when the allocator reports
any).  The allocator API is in lib/owca/allocate/allocators/static.py, the allocation types in
lib/owca/core/allocation.py, the writers in lib/owca/allocate/cgroup_files.py and
lib/owca/allocate/resctrl.py; docs/allocation.md is the user's description.

A cycle:
1. read what every task has now (its cgroup files, its resctrl group);
2. ask the allocator; validate each (task, type) it sets; an invalid one is
   reported (one line, `allocation_error{task_id,type,reason} 1`) and the
   others go on;
3. restore the types withdrawn (None) and those of tasks that went;
4. compare what is wanted with what was read; write the differences, at most
   `max_changes_per_cycle` of them (restores are never held back);
5. write the allocations frame: what changed (in --dry-run: what would have),
   the errors, and the allocation metrics of every task.

What OWCA wants for a task is kept until it is withdrawn or the task goes.  Before
its first write of a type to a task OWCA records the file's content in the journal
(lib/owca/allocate/journal.py: on disk, fsync'd, before the write); that is what a
withdrawal, the task's disappearance (if its cgroup is still the same one) and
shutdown write back, also after a restart that followed a crash.  A value OWCA
wrote that another writer changed is counted and logged once, and written again
only as the allocator's policy says (Allocator.reapply_external_change); a file
another writer holds is not restored over.

The modules beside this one, each with one job: cycle.py (what a cycle read, the
Changes it makes, the Original of a file), allocator_calls.py (the plug-in, its
failures counted), planning.py (steps 2 and 4), originals.py (the originals, the
journal, the restores of step 3), writing.py (the writes, or in --dry-run their
report), rdt_groups.py (OWCA's resctrl groups), external_changes.py (values another
writer changed).  This module ties them into the cycle and writes the frames.
"""
import atexit
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

from owca.core import config, frames
from owca.core.allocation import (CPU_IDLE, CPU_QUOTA, CPU_SHARES, CPUSET_CPUS, CPUSET_MEMS,
                                  MEMORY_TYPES, MEMORY_UNLIMITED, RDT, Topology, parse_cpu_list)
from owca.core.kernel import online_cpus, online_nodes
from owca.core.paths import paths_from_options
from owca.core.resctrl import ResctrlFS
from owca.core.stage import Stage
from owca.plugin import Allocator, NOPAllocator
from owca.allocate.allocator_calls import AllocatorCalls
from owca.allocate.allocators import BUILTINS
from owca.allocate.cgroup_files import TaskCgroupFiles, current_allocations
from owca.allocate.cycle import Change, Cycle
from owca.allocate.external_changes import ExternalChanges
from owca.allocate.headroom import Headroom
from owca.allocate.journal import Journal, state_directory
from owca.allocate.memory_files import memory_support
from owca.allocate.originals import Originals
from owca.allocate.planning import Planner
from owca.allocate.rdt_groups import RdtGroups
from owca.allocate.resctrl import Resctrl
from owca.allocate.writing import Writer

config.add_builtins(BUILTINS)
config.add_builtins({"Headroom": "owca.allocate.headroom:Headroom"})
log = logging.getLogger("owca.allocate")


@dataclass
class AllocateConfig:
    allocator: Allocator = field(default_factory=NOPAllocator)
    # No interval unless configured; the annotation stays `float`, not Optional, because
    # the configuration is checked against it: `interval: null` is refused.
    interval: float = None  # type: ignore[assignment]
    # At most this many changes (one type of one task) are written per cycle; the
    # rest wait for the next cycle, so that one bad decision cannot rewrite a
    # whole node at once.  Restores are never held back.
    max_changes_per_cycle: int = 20
    # A v2 cgroup that is a systemd unit's own (not below a delegated one) is
    # systemd's: it rewrites cpu.max, cpu.weight and the cpusets on daemon-reload
    # and set-property.  False refuses to write there (reported per task);
    # true writes anyway (systemd's resets are then another writer's changes).
    write_systemd_units: bool = False
    # How much BE work the node can take, with its derivation, in every allocations
    # frame (docs/headroom.md); none unless configured.
    headroom: Optional[Headroom] = None
    # The most one memory_reclaim writes to one task's memory.reclaim in one cycle: a
    # reclaim runs in the writer's context, so it is bounded to keep the cycle short.
    memory_reclaim_max_bytes: int = 256 << 20

    def __post_init__(self):
        # Checked as any value: the configuration's loader checks the type, but an
        # AllocateConfig made in code skips it.
        count: object = self.max_changes_per_cycle
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"max_changes_per_cycle: expected a positive integer, got "
                             f"{self.max_changes_per_cycle!r}")
        reclaim: object = self.memory_reclaim_max_bytes
        if not isinstance(reclaim, int) or reclaim < 4096:
            raise ValueError(f"memory_reclaim_max_bytes: expected bytes (at least a page), "
                             f"got {self.memory_reclaim_max_bytes!r}")


class Allocate(Stage):
    name = "allocate"
    consumes: Tuple[str, ...] = ("measurements",)

    def __init__(self, cfg: AllocateConfig, options: dict,
                 resctrl_fs: Optional[ResctrlFS] = None):
        super().__init__(cfg, options)
        self.dry_run = bool(options.get("--dry-run"))
        self.paths = paths_from_options(sysfs=options.get("--sysfs"),
                                        cgroupfs=options.get("--cgroupfs"),
                                        resctrlfs=options.get("--resctrlfs"))
        self.allocator = AllocatorCalls(cfg.allocator)
        self.external = ExternalChanges(self.allocator)
        self.rdt = RdtGroups(Resctrl(resctrl_fs or ResctrlFS(self.paths.resctrlfs)),
                             self.paths.resctrlfs, self.dry_run, self.external)
        # --dry-run writes nothing, the journal neither.
        self.journal = None if self.dry_run else \
            Journal(state_directory(options.get("--state-dir")))
        self.store = Originals(self.paths, self.journal, self.rdt)   # what OWCA writes back
        # What the kernel cannot express is said once, never tried: at the start for an
        # allocator that declares memory types, else when one is first asked for.
        self.memory = memory_support(self.paths)
        self.planner = Planner(cfg.max_changes_per_cycle, cfg.write_systemd_units,
                               self.store, self.rdt, self.external, self.memory,
                               cfg.memory_reclaim_max_bytes)
        if set(getattr(cfg.allocator, "memory_types", ())) & set(self.memory.refused):
            self.planner.say_memory_support()
        self.writer = Writer(self.dry_run, self.store)
        self.allocation_errors_total = 0
        self._logged: Set[Tuple[str, str, str]] = set()   # (task, type, reason) logged
        # seq, ts, host of the last cycle
        self._last: Tuple[int, Optional[float], Optional[str]] = (0, None, None)
        self._last_frame: Optional[dict] = None
        self._values_shipped = False    # whether the frames carried per-task values
        self._closed = False
        self.store.adopt()
        self.headroom = cfg.headroom
        self.headroom_errors = 0
        self._hp: Set[str] = set()   # the last cycle's HP tasks, for the headroom
        if self.allocator.observes_anomalies or self.headroom is not None:
            # An allocator that uses the detector's anomalies gets each anomalies frame
            # (forwarded unchanged); it sees them in the next cycle, as they follow
            # their cycle's measurements frame.
            self.consumes = ("measurements", "anomalies")
        # A stage that ends by an exception (a closed stdout mid-cycle) skips
        # close(); the node must still get its values back.
        atexit.register(self._restore_everything)

    @property
    def originals(self) -> dict:
        """{task_id: {type: Original}}: what OWCA writes back."""
        return self.store.by_task

    @property
    def desired(self) -> dict:
        """{task_id: {type: value}}: what OWCA wants for each task."""
        return self.planner.desired

    # -- reading -----------------------------------------------------------------------

    def topology(self, frame: dict) -> Topology:
        return read_topology(self.paths, frame.get("platform", {}).get("platform_topology_cpus"))

    def read_cycle(self, frame: dict) -> Cycle:
        topology = self.topology(frame)
        files, readings = {}, {}
        for task_id, task in frame["tasks"].items():
            path = task.get("cgroup_path")
            if not isinstance(path, str):
                continue
            self.store.note_cgroup_path(task_id, path)
            files[task_id] = TaskCgroupFiles(self.paths, path)
            readings[task_id] = current_allocations(files[task_id], topology)
            # The memory files are read only where OWCA sets (or set) one.
            memory = [t for t in MEMORY_TYPES if t in self.desired.get(task_id, ()) or
                      t in self.originals.get(task_id, ())]
            if memory:
                readings[task_id].update(current_allocations(files[task_id], topology,
                                                             memory))
        return Cycle(topology, files, readings, self.rdt.read())

    def current_allocations(self, frame: dict,
                            cycle: Optional[Cycle] = None) -> Dict[str, dict]:
        """What each task has now, read from its cgroup and resctrl group this cycle."""
        cycle = cycle or self.read_cycle(frame)
        out = {}
        for task_id in frame["tasks"]:
            values = {t: r.value for t, r in cycle.readings.get(task_id, {}).items()}
            rdt = self.rdt.current(task_id, cycle)
            if rdt is not None:
                values[RDT] = rdt
            out[task_id] = values
        return out

    # -- the cycle ---------------------------------------------------------------------

    def process(self, frame: dict) -> list:
        if frame["kind"] == "anomalies":
            # For the allocator; the stage has forwarded the frame already (forward_consumed).
            self.allocator.observe_anomalies(frame)
            if self.headroom is not None:
                self.headroom.observe_anomalies(frame.get("anomalies") or [], self._hp,
                                                frame["ts"])
            return []
        self._last = (frame["seq"], frame["ts"], frame["host"])
        self._last_frame = frame
        tasks = frame["tasks"]
        if not self.originals and not self.desired and \
                not self.allocator.reads_current_allocations:
            # Nothing of OWCA's on the node and an allocator that does not look:
            # no cgroup is read unless it asks for something.
            asked = self.allocator.allocate(frame, {task_id: {} for task_id in tasks})
            if not asked[0]:
                return self._quiet_cycle(frame, asked[1],
                                         asked[2] + self._headroom(frame, asked[2], None))
        else:
            asked = None
        cycle = self.read_cycle(frame)
        current = self.current_allocations(frame, cycle)
        self._values_shipped = True
        allocations, anomalies, extra = asked or self.allocator.allocate(frame, current)
        extra = list(extra) + self._headroom(frame, extra, current)

        withdrawn = self.planner.merge(allocations, tasks, cycle)
        if self.store.unclaimed and self.allocator.ok:
            withdrawn += self.store.not_claimed(allocations, tasks)
        restores = self._restores(tasks, withdrawn, cycle)

        changes, deferred = self.planner.budget(self.planner.plan(cycle), frame["seq"])
        done = self.writer.apply(restores, cycle)
        written = self.writer.write(changes, cycle, self._last[2])
        done += written or []
        done += self.writer.apply(self.planner.reclaim(cycle), cycle)
        self.store.forget_groups(self.rdt.remove_unused(cycle, self.planner.wanted_groups()))
        if written is not None:    # None: the journal failed this cycle, and was counted
            self.store.sync(self._last[2])

        for task_id, type_, reason in cycle.errors:
            self._report(frame["seq"], task_id, type_, reason)
        self._forget_cleared_errors(cycle.errors)
        self.allocation_errors_total += len(cycle.errors)

        metrics = list(extra) + self._samples(current, done, cycle) + self.stats.samples()
        out_allocations: Dict[str, dict] = {}   # task -> type -> value
        restored: Dict[str, dict] = {}          # task -> type -> original value
        for change in done:
            out_allocations.setdefault(change.task_id, {})[change.type] = change.value
            if change.original is not None:
                restored.setdefault(change.task_id, {})[change.type] = change.original.value
        out = [frames.allocations_frame(
            frame["seq"], out_allocations, ts=frame["ts"], host=frame["host"], metrics=metrics,
            dry_run=self.dry_run, restored=restored, deferred=len(deferred),
            errors=[{"task_id": t, "type": ty, "reason": r} for t, ty, r in cycle.errors])]
        if anomalies:
            out.append(frames.anomalies_frame(frame["seq"], anomalies, ts=frame["ts"],
                                              host=frame["host"]))
        return out

    def _headroom(self, frame: dict, extra: list, current: Optional[dict]) -> list:
        """The headroom's samples of this cycle; a failure costs them, not the cycle."""
        if self.headroom is None:
            return []
        try:
            self._hp = self.headroom.hp_tasks(frame)
            self.headroom.observe_allocator(extra)
            samples = self.headroom.cycle(frame, current)
        except Exception as e:  # noqa: BLE001 the headroom's failure costs its samples only
            self.headroom_errors += 1
            log.error("cycle %s: headroom failed: %s: %s", frame["seq"], type(e).__name__, e)
            samples = []
        return samples + [frames.sample("headroom_errors_total", self.headroom_errors,
                                        type="counter")]

    def _quiet_cycle(self, frame: dict, anomalies: list, extra: list) -> list:
        """The frames of a cycle that read and wrote nothing."""
        metrics = list(extra) + self._counter_samples() + self.stats.samples()
        out = [frames.allocations_frame(frame["seq"], {}, ts=frame["ts"], host=frame["host"],
                                        metrics=metrics, dry_run=self.dry_run, restored={},
                                        deferred=0, errors=[])]
        if anomalies:
            out.append(frames.anomalies_frame(frame["seq"], anomalies, ts=frame["ts"],
                                              host=frame["host"]))
        return out

    def _restores(self, tasks: dict, withdrawn: List[tuple], cycle: Cycle) -> List[Change]:
        """This cycle's restores: every type of the tasks that went, and those withdrawn."""
        restores = []
        for task_id in sorted(set(self.desired) | set(self.originals)):
            if task_id not in tasks:
                self.desired.pop(task_id, None)
                restores += self.store.restores(task_id, list(self.originals.get(task_id, ())))
        self.external.forget_tasks_but(tasks)
        self.store.forget_cgroup_paths_but(tasks)
        for task_id, type_ in withdrawn:
            restores += self.store.restores(task_id, [type_], cycle)
        return restores

    # -- reporting ---------------------------------------------------------------------

    def _report(self, seq, task_id: str, type_: str, reason: str) -> None:
        key = (task_id, type_, reason)
        level = logging.DEBUG if key in self._logged else logging.ERROR
        self._logged.add(key)
        if not reason.startswith(type_):  # most reasons name their type already
            reason = f"{type_}: {reason}"
        log.log(level, "cycle %s: task %s: %s", seq, task_id, reason)

    def _forget_cleared_errors(self, errors) -> None:
        self._logged.intersection_update(errors)

    def _samples(self, current: dict, done: List[Change], cycle: Cycle) -> list:
        now = {task_id: dict(values) for task_id, values in current.items()}
        if not self.dry_run:
            for change in done:
                value = change.value if change.original is None else change.original.value
                if value is None:
                    now.get(change.task_id, {}).pop(change.type, None)
                else:
                    now.setdefault(change.task_id, {})[change.type] = value
        out = []
        for task_id in sorted(now):
            out += allocation_samples(task_id, now[task_id])
        for task_id, type_, reason in cycle.errors:
            out.append(frames.sample("allocation_error", 1, {"task_id": task_id, "type": type_,
                                                             "reason": reason[:1000]}))
        return out + self._counter_samples()

    def _counter_samples(self) -> list:
        out = [frames.sample("allocations_count", self.writer.changes_total, type="counter"),
               frames.sample("allocation_errors_count", self.allocation_errors_total,
                             type="counter"),
               frames.sample("owca_allocator_errors_total", self.allocator.errors,
                             {"stage": self.name}, "counter")]
        out += self.external.samples()
        if self.journal is not None:
            for reason, count in (("corrupt", self.journal.set_aside),
                                  ("write", self.store.write_errors)):
                out.append(frames.sample("allocation_journal_errors_total", count,
                                         {"reason": reason}, "counter"))
        stats = self.planner.reclaim_stats
        if stats["writes"] or "memory_reclaim" not in self.memory.refused:
            out += [frames.sample("allocation_memory_reclaim_requested_bytes_total",
                                  stats["bytes"], type="counter"),
                    frames.sample("allocation_memory_reclaim_writes_total", stats["writes"],
                                  type="counter"),
                    frames.sample("allocation_memory_reclaim_short_total", stats["short"],
                                  type="counter")]
        return out

    # -- the end -------------------------------------------------------------------

    def close(self) -> list:
        """Every original written back, then the stream's last frame (`shutdown`): what
        was restored, and what the tasks have now, read back after the restore."""
        if self._closed:
            return []
        restored = self._restore_everything()
        if self._last_frame is None and not restored:
            return []    # no frame written, none to end
        seq, _, host = self._last
        now: List[dict] = []
        if self._last_frame is not None and (self._values_shipped or restored):
            current = self.current_allocations(self._last_frame)
            for task_id in sorted(current):
                now += allocation_samples(task_id, current[task_id])
        return [frames.allocations_frame(
            seq, {t: {ty: None for ty in types} for t, types in restored.items()},
            ts=time.time(), host=host, dry_run=self.dry_run, restored=restored, shutdown=True,
            deferred=0, errors=[],
            metrics=now + self._counter_samples() + self.stats.samples())]

    def _restore_everything(self) -> Dict[str, dict]:
        """Every original written back, OWCA's resctrl groups removed; once."""
        if self._closed:
            return {}
        self._closed = True
        atexit.unregister(self._restore_everything)
        restored: Dict[str, dict] = {}   # task -> type -> original value
        for task_id in sorted(self.originals):
            for change in self.store.restores(task_id, list(self.originals[task_id])):
                if self.writer.restore_at_stop(change):
                    assert change.original is not None, "a restore writes back its original"
                    restored.setdefault(task_id, {})[change.type] = change.original.value
                    log.info("task %s: %s restored", task_id, change.type)
        self.desired.clear()
        # A stage that saw no frame changed nothing, unless a run before it left groups.
        ran = self._last[1] is not None or self.store.created_groups
        if ran and not self.dry_run:
            self.store.forget_groups(self.rdt.remove_all())
        self.store.sync(self._last[2])
        self.store.close()
        return restored


def allocation_samples(task_id: str, values: dict) -> list:
    """The allocation_* gauges of one task's allocations."""
    labels = {"task_id": task_id}
    out = []
    for type_ in (CPU_QUOTA, CPU_SHARES, CPU_IDLE):
        if values.get(type_) is not None:
            out.append(frames.sample(f"allocation_{type_}", values[type_], labels))
    for type_, label in ((CPUSET_CPUS, "cpus"), (CPUSET_MEMS, "mems")):
        if values.get(type_) is not None:
            ids = values[type_]
            out.append(frames.sample(f"allocation_{type_}", len(parse_cpu_list(ids)),
                                     {**labels, label: ids}))
    for type_ in MEMORY_TYPES:
        if values.get(type_) not in (None, MEMORY_UNLIMITED):
            out.append(frames.sample(f"allocation_{type_}_bytes", values[type_], labels))
    rdt = values.get(RDT)
    if rdt:
        for key, name, base in (("l3", "allocation_rdt_l3_mask", 16),
                                ("mb", "allocation_rdt_mb_percent", 10)):
            for cache_id, v in sorted(rdt.get(key, {}).items()):
                out.append(frames.sample(name, int(str(v), base),
                                         {**labels, "group_name": rdt["name"],
                                          "cache_id": str(cache_id)}))
    return out


def read_topology(paths, platform_cpus=None) -> Topology:
    """Online CPUs and NUMA nodes from sysfs; `platform_cpus` (the measured count) if the
    CPU list is unreadable."""
    try:
        cpus = online_cpus(paths)
    except (OSError, ValueError):
        cpus = frozenset(range(int(platform_cpus or 0)))
    try:
        nodes = online_nodes(paths)
    except (OSError, ValueError):
        nodes = frozenset((0,))   # a kernel without NUMA support has node 0 only
    return Topology(cpus=cpus, numa_nodes=nodes)

