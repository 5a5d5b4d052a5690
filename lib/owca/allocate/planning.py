"""What to change this cycle: the allocator's answer, validated, is what OWCA wants for
each task (`desired`, kept until it is withdrawn or the task goes); where a task's
files differ, a Change; at most `max_changes_per_cycle` of them are written a cycle.

An invalid (task, type) is the cycle's error and leaves the others alone.  A value
OWCA wrote that another writer changed is written again only as the allocator's
policy says (external_changes.py).

memory_reclaim is an action, not a setting: what the allocator asks this cycle, up to
`memory_reclaim_max_bytes` a task, is written once, never kept nor restored.  A type
the node's kernel cannot express (memory_files.MemorySupport) is refused without a
write.
"""
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from owca.core import allocation
from owca.core.allocation import CPU_IDLE, CPU_SHARES, MEMORY_RECLAIM, RDT, TYPES, InvalidAllocation
from owca.allocate.cgroup_files import CgroupGone, CgroupRefused, write_file
from owca.allocate.cycle import Change, Cycle, Op, canonical
from owca.allocate.memory_files import MemorySupport, write_reclaim
from owca.allocate.external_changes import ExternalChanges
from owca.allocate.originals import Originals
from owca.allocate.rdt_groups import RdtGroups

log = logging.getLogger("owca.allocate")

ANY_TYPE = "*"  # the `type` of an error about a task's whole allocation


class Planner:
    def __init__(self, max_changes_per_cycle: int, write_systemd_units: bool,
                 originals: Originals, rdt: RdtGroups, external: ExternalChanges,
                 memory: Optional[MemorySupport] = None, memory_reclaim_max_bytes: int = 0):
        self.max_changes_per_cycle = max_changes_per_cycle
        self.memory = memory or MemorySupport("v2")
        self.memory_reclaim_max_bytes = memory_reclaim_max_bytes
        self.reclaims: Dict[str, int] = {}     # task -> bytes asked this cycle
        self._memory_said = False
        # bytes written to memory.reclaim, the writes, those the kernel fell short in
        self.reclaim_stats = {"bytes": 0, "writes": 0, "short": 0}
        self.write_systemd_units = write_systemd_units
        self.originals = originals
        self.rdt = rdt
        self.external = external
        # task -> type -> value, validated: a number, a CPU list, or an rdt dict
        self.desired: Dict[str, Dict[str, Any]] = {}

    def merge(self, allocations: dict, tasks: dict, cycle: Cycle) -> List[tuple]:
        """Validate what the allocator set into `desired`; returns the withdrawn (task, type)."""
        withdrawn = []
        self.reclaims = {}
        for task_id, wanted in allocations.items():
            task_id = str(task_id)
            if task_id not in tasks:
                cycle.error(task_id, ANY_TYPE, "no such task in this cycle")
                continue
            if not isinstance(wanted, dict):
                cycle.error(task_id, ANY_TYPE, f"expected {{type: value}}, got "
                                               f"{type(wanted).__name__}")
                continue
            for type_, value in wanted.items():
                if type_ not in TYPES:
                    cycle.error(task_id, str(type_), f"unknown allocation type (types: "
                                                     f"{', '.join(TYPES)})")
                    continue
                refused = self.memory.refused.get(type_)
                if refused is not None and value is None:
                    continue      # never written here: nothing to withdraw
                if refused is not None:
                    self.say_memory_support()
                    cycle.error(task_id, type_, refused)
                    continue
                if value is None:
                    self.desired.get(task_id, {}).pop(type_, None)
                    withdrawn.append((task_id, type_))
                    continue
                try:
                    value = allocation.validate(type_, value, cycle.topology)
                    if type_ == RDT:
                        value = self.rdt.validate(value, cycle)
                except (InvalidAllocation, TypeError) as e:
                    cycle.error(task_id, type_, str(e))
                    continue
                except (OSError, ValueError) as e:   # resctrl's info/ unreadable
                    cycle.error(task_id, type_, f"{type(e).__name__}: "
                                                f"{getattr(e, 'strerror', None) or e}")
                    continue
                if type_ == MEMORY_RECLAIM:
                    self.reclaims[task_id] = min(value, self.memory_reclaim_max_bytes)
                    continue
                self.desired.setdefault(task_id, {})[type_] = value
        return withdrawn

    def say_memory_support(self) -> None:
        """The one line on the memory types this kernel cannot be given, once a run."""
        if not self._memory_said:
            self._memory_said = True
            log.info("%s", self.memory.line())

    def wanted_groups(self) -> set:
        """The resctrl groups some task is to be in."""
        return {v[RDT]["name"] for v in self.desired.values() if RDT in v}

    def plan(self, cycle: Cycle) -> List[Change]:
        """A Change for each (task, type) whose file does not hold what OWCA wants."""
        changes = []
        for task_id in sorted(self.desired):
            for type_ in TYPES:
                if type_ not in self.desired[task_id]:
                    continue
                value = self.desired[task_id][type_]
                try:
                    if type_ == CPU_SHARES and self.desired[task_id].get(CPU_IDLE):
                        raise InvalidAllocation(
                            f"{CPU_SHARES}: not written while {CPU_IDLE} is 1: the kernel "
                            f"gives an idle cgroup the least weight and refuses another")
                    if task_id not in cycle.files:
                        raise CgroupGone("the task has no cgroup_path")
                    change = (self.rdt.plan(task_id, value, cycle,
                                            self.originals.original(task_id, RDT))
                              if type_ == RDT else self._plan_cgroup(task_id, type_, value, cycle))
                except InvalidAllocation as e:
                    cycle.error(task_id, type_, str(e))
                    continue
                except (CgroupGone, CgroupRefused) as e:
                    cycle.error(task_id, type_, str(e))
                    continue
                except OSError as e:
                    cycle.error(task_id, type_, f"{e.filename or ''}: {e.strerror}")
                    continue
                if change is not None:
                    changes.append(change)
        return changes

    def _plan_cgroup(self, task_id: str, type_: str, value, cycle: Cycle) -> Optional[Change]:
        files = cycle.files[task_id]
        unit = "" if self.write_systemd_units else files.systemd_unit()
        if unit:
            raise CgroupRefused(
                f"{files.cgroup_path} is systemd unit {unit}'s own cgroup, whose values "
                f"systemd sets (and resets on daemon-reload): set them through systemd "
                f"(systemctl set-property), give the task a cgroup below a delegated unit "
                f"(Delegate=yes), or set write_systemd_units")
        reading = cycle.readings[task_id].get(type_)
        if reading is None:
            reading = files.read(type_, cycle.topology)   # raises why it is not there
            cycle.readings[task_id][type_] = reading
        text = files.target(type_, value, cycle.topology, reading)
        original = self.originals.original(task_id, type_)
        if canonical(type_, text) == canonical(type_, reading.text):
            if original is not None:
                original.foreign = None
            return None
        path = reading.path
        if original is not None and not original.holds_ours(type_, reading.text) and \
                not self.external.reapply(task_id, type_, os.path.basename(path), original,
                                          reading.text, reading.value, value):
            return None
        return Change(task_id, type_, value,
                      [Op(f"write {text!r} to {path}", lambda: write_file(path, text))],
                      text=text)

    def reclaim(self, cycle: Cycle) -> List[Change]:
        """This cycle's proactive reclaims: one write of each, counted."""
        changes = []
        for task_id, amount in sorted(self.reclaims.items()):
            if task_id not in cycle.files:
                cycle.error(task_id, MEMORY_RECLAIM, "the task has no cgroup_path")
                continue
            try:
                path = cycle.files[task_id].file(MEMORY_RECLAIM)
            except (InvalidAllocation, CgroupGone, CgroupRefused) as e:
                cycle.error(task_id, MEMORY_RECLAIM, str(e))
                continue
            changes.append(Change(task_id, MEMORY_RECLAIM, amount,
                                  [Op(f"reclaim {amount} bytes through {path}",
                                      self._reclaim_op(path, amount))]))
        self.reclaims = {}
        return changes

    def _reclaim_op(self, path: str, amount: int):
        def reclaim():
            whole = write_reclaim(path, amount)
            self.reclaim_stats["writes"] += 1
            self.reclaim_stats["bytes"] += amount
            self.reclaim_stats["short"] += not whole
        return reclaim

    def budget(self, changes: List[Change], seq) -> Tuple[List[Change], List[Change]]:
        """The changes written this cycle, and those that wait for the next one."""
        limit = self.max_changes_per_cycle
        deferred = changes[limit:]
        if deferred:
            log.info("cycle %s: %d changes wait for the next cycle (max_changes_per_cycle %d)",
                     seq, len(deferred), limit)
        return changes[:limit], deferred
