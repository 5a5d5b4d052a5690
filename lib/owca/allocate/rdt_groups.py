"""OWCA's resctrl control groups as a cycle uses them: which group holds a task's threads,
the Changes that create a group, write its schemata and move the task's threads into
it, the moves back to the default group, and the removal of groups no task wants.

The rules of the filesystem (only `owca-*` groups are written) are resctrl.py's.
"""
import functools
import logging
from typing import Dict, List, Optional

from owca.core.allocation import RDT, InvalidAllocation
from owca.core.resctrl import DEFAULT_GROUP, format_schemata
from owca.allocate.cgroup_files import CgroupGone, CgroupRefused, TaskCgroupFiles
from owca.allocate.cycle import Change, Cycle, Op, Original
from owca.allocate.external_changes import ExternalChanges
from owca.allocate.resctrl import (Group, Resctrl, is_owca_group, schemata_matches, schemata_of,
                                   validate_on_platform)

log = logging.getLogger("owca.allocate")


def _one_line(schemata: str) -> str:
    return " ".join(schemata.split())


class RdtGroups:
    def __init__(self, resctrl: Resctrl, resctrlfs: str, dry_run: bool,
                 external: ExternalChanges):
        self.resctrl = resctrl
        self.resctrlfs = resctrlfs      # where it is mounted, for messages
        self.dry_run = dry_run
        self.external = external
        self.schemata_written: Dict[str, dict] = {}   # group -> what OWCA wrote

    # -- reading -----------------------------------------------------------------------

    def read(self) -> Optional[Dict[str, Group]]:
        """Every control group now; None when resctrl is not mounted or unreadable."""
        if not self.resctrl.available():
            return None
        try:
            return self.resctrl.groups()
        except (OSError, ValueError) as e:
            log.warning("resctrl at %s unreadable, rdt left out this cycle: %s",
                        self.resctrlfs, getattr(e, "strerror", None) or e)
            return None

    @staticmethod
    def current(task_id: str, cycle: Cycle) -> Optional[dict]:
        """The rdt value of the group that holds the task's threads."""
        if not cycle.groups or task_id not in cycle.files:
            return None
        try:
            threads = set(cycle.thread_ids(task_id))
        except (CgroupGone, CgroupRefused, OSError, ValueError):
            return None
        # The group holding most of the task's threads (all of them, once OWCA moved them).
        held = max(cycle.groups.values(), key=lambda g: len(g.thread_ids & threads))
        if not held.thread_ids & threads:
            return None
        value: Dict[str, object] = {"name": held.name}
        if "L3" in held.schemata:
            value["l3"] = dict(held.schemata["L3"])
        if "MB" in held.schemata:
            value["mb"] = {i: int(v) for i, v in held.schemata["MB"].items()}
        return value

    # -- planning ----------------------------------------------------------------------

    def validate(self, value: dict, cycle: Cycle) -> dict:
        """An rdt value checked against what the platform allows."""
        if cycle.groups is None:
            raise InvalidAllocation(f"{RDT}: resctrl is not mounted at {self.resctrlfs}")
        return validate_on_platform(value, self.resctrl.info())

    def plan(self, task_id: str, value: dict, cycle: Cycle,
             original: Optional[Original]) -> Optional[Change]:
        """The Change that puts the task's threads in the group `value` names, with the
        schemata it gives; `original` is the task's rdt original, if OWCA wrote one."""
        if cycle.groups is None:
            raise InvalidAllocation(f"{RDT}: resctrl is not mounted at {self.resctrlfs}")
        threads = cycle.thread_ids(task_id)
        name = value["name"]
        for other in cycle.groups.values():
            if not is_owca_group(other.name) and other.thread_ids.intersection(threads):
                raise InvalidAllocation(f"{RDT}: the task's threads are in resctrl group "
                                        f"{other.name!r}, which is not OWCA's")
        wanted = schemata_of(value)
        claim = cycle.claims.setdefault(name, (task_id, wanted))
        if claim[1] != wanted:
            raise InvalidAllocation(f"{RDT}: group {name} is given other values by task "
                                    f"{claim[0]} in this cycle")
        ops: List[Op] = []
        creates = None
        group = cycle.groups.get(name)
        if group is None:
            num_closids = self.resctrl.info().num_closids
            if len(cycle.groups) >= num_closids - 1:
                raise InvalidAllocation(
                    f"{RDT}: no CLOSID left for group {name}: num_closids {num_closids} "
                    f"allows {num_closids - 1} groups besides the default one, and these exist: "
                    f"{', '.join(sorted(cycle.groups)) or 'none'}")
            ops.append(Op(f"create resctrl group {name}",
                          lambda: self.resctrl.create_group(name)))
            creates = name
            # Planned, not yet made: later tasks of this cycle join it.
            group = cycle.groups[name] = Group(name, set(), {})
        if not schemata_matches(wanted, group.schemata) and \
                self._schemata_to_write(task_id, group, wanted, value, original):
            ops.append(Op(f"write {wanted} to resctrl group {name}'s schemata",
                          lambda: self._write_schemata(name, wanted)))
            for resource, domains in wanted.items():
                group.schemata.setdefault(resource, {}).update(
                    {i: str(v) for i, v in domains.items()})
        for thread_id in threads:
            if thread_id not in group.thread_ids:
                ops.append(Op(f"move thread {thread_id} to resctrl group {name}",
                              functools.partial(self.move_thread, thread_id, name)))
        group.thread_ids.update(threads)
        if not ops:
            return None
        return Change(task_id, RDT, value, ops, text=name, creates=creates)

    def _schemata_to_write(self, task_id: str, group: Group, wanted: dict, value,
                           original: Optional[Original]) -> bool:
        """Whether a group's schemata that differs from `wanted` is written: always, unless
        another writer changed what OWCA wrote there and the allocator leaves it."""
        if original is None or self.schemata_written.get(group.name) != wanted:
            return True
        found = {r: dict(d) for r, d in group.schemata.items() if r in wanted}
        return self.external.reapply(task_id, RDT, f"{group.name}/schemata", original,
                                     _one_line(format_schemata(found)), found, value,
                                     _one_line(format_schemata(wanted)))

    # -- writing -----------------------------------------------------------------------

    def _write_schemata(self, name: str, wanted: dict) -> None:
        self.resctrl.write_schemata(name, wanted)
        self.schemata_written[name] = wanted

    def move_thread(self, thread_id: int, name: str) -> None:
        try:
            self.resctrl.move_thread(thread_id, name)
        except ProcessLookupError:
            pass  # the thread ended: nothing to move

    def restore_ops(self, task_id: str, files: TaskCgroupFiles,
                    cycle: Optional[Cycle]) -> List[Op]:
        """The task's threads that are in OWCA's groups go back to the default group (a
        thread another writer moved elsewhere is left there)."""
        threads = (cycle.threads.get(task_id) if cycle else None) or files.thread_ids()
        groups = cycle.groups if cycle and cycle.groups is not None else \
            (self.resctrl.groups() if self.resctrl.available() else {})
        owca = set().union(*[g.thread_ids for g in groups.values() if is_owca_group(g.name)])
        return [Op(f"move thread {t} back to the default resctrl group",
                   functools.partial(self.move_thread, t, DEFAULT_GROUP))
                for t in threads if t in owca]

    # -- removing ----------------------------------------------------------------------

    def remove_unused(self, cycle: Cycle, wanted: set) -> List[str]:
        """OWCA's groups not `wanted` are removed (their threads go back to the default
        group, which the kernel does on rmdir); returns those removed."""
        if cycle.groups is None:
            return []
        return [name for name in sorted(cycle.groups)
                if is_owca_group(name) and name not in wanted and self._remove(name)]

    def remove_all(self) -> List[str]:
        """Every group of OWCA's removed; returns those removed."""
        removed = []
        try:
            if self.resctrl.available():
                for name in sorted(self.resctrl.groups()):
                    if is_owca_group(name) and self._remove(name):
                        removed.append(name)
        except OSError as e:
            log.error("resctrl at %s unreadable, OWCA's groups not removed: %s",
                      self.resctrlfs, e.strerror or e)
        return removed

    def _remove(self, name: str) -> bool:
        if self.dry_run:
            log.info("dry-run: would remove resctrl group %s", name)
            return False
        try:
            self.resctrl.remove_group(name)
            log.info("removed resctrl group %s", name)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.error("cannot remove resctrl group %s: %s", name, e.strerror or e)
            return False
        self.schemata_written.pop(name, None)
        return True
