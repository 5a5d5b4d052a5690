"""What owca-allocate must write back, in memory and in the journal, and the restores
that write it back.

Before OWCA's first write of a type to a task it remembers the file's content
(`remember`), and the writer saves the journal (journal.py) before the write.  A
withdrawal, the task's disappearance (if its cgroup is still the same one) and the
stop write the originals back (`restores`).  A run that follows one that did not stop
cleanly (a SIGKILL, an OOM kill, a crash of the machine) adopts the journal's
originals (`adopt`), never the values that run wrote.
"""
import logging
import os
from typing import Dict, List, Optional, Set

from owca.core import frames
from owca.core.allocation import CPU_IDLE, CPU_QUOTA, RDT, TYPES
from owca.core.paths import Paths
from owca.core.resctrl import DEFAULT_GROUP
from owca.core.stage import DataError
from owca.allocate.cgroup_files import (CgroupGone, CgroupRefused, TaskCgroupFiles, read_file,
                                        restore_file)
from owca.allocate.cycle import Change, Cycle, Op, Original, canonical
from owca.allocate.journal import Journal, JournalError
from owca.allocate.journal import body as journal_body
from owca.allocate.rdt_groups import RdtGroups

log = logging.getLogger("owca.allocate")


class Originals:
    def __init__(self, paths: Paths, journal: Optional[Journal], rdt: RdtGroups):
        self.paths = paths
        self.journal = journal          # None: --dry-run, which writes nothing
        self.rdt = rdt
        self.by_task: Dict[str, Dict[str, Original]] = {}
        self.cgroup_paths: Dict[str, str] = {}
        self.created_groups: Set[str] = set()   # resctrl groups OWCA made (journaled)
        # Whether originals or groups changed since the journal was last saved: a
        # cycle that changed nothing costs no encoding of the journal.
        self.dirty = False
        # Adopted (task, types) the allocator of this run has not set yet (see adopt).
        self.unclaimed: Dict[str, set] = {}
        self.write_errors = 0           # journal saves that failed

    # -- the journal ---------------------------------------------------------------------

    def adopt(self) -> None:
        """Take over what a run that did not stop cleanly left in the journal: the
        originals it must write back, never the values it wrote, as the originals."""
        if self.journal is None:
            return
        try:
            body = self.journal.load()
        except JournalError as e:
            raise DataError(str(e)) from None
        if not body:
            return
        self.created_groups.update(body["groups"])
        self.dirty = True    # rewritten without what is dropped here
        adopted = 0
        for task_id, task in sorted(body["tasks"].items()):
            originals = {}
            for type_, entry in task["types"].items():
                original = Original.from_journal(entry)
                if self._same_cgroup(task["cgroup_path"], type_, original):
                    originals[type_] = original
            if not originals:
                log.info("journal: task %s: its cgroup %s is gone (or is another cgroup): "
                         "dropped from the journal", task_id, task["cgroup_path"])
                continue
            self.by_task[task_id] = originals
            self.cgroup_paths[task_id] = task["cgroup_path"]
            self.unclaimed[task_id] = set(originals)
            adopted += len(originals)
        if adopted or self.created_groups:
            log.warning("journal: %s: adopted %d original values of %d tasks and %d resctrl "
                        "groups from a run that did not stop cleanly (pid %s); they are "
                        "written back when the tasks stop being managed or this run stops",
                        self.journal.path, adopted, len(self.by_task),
                        len(self.created_groups), body.get("pid"))
        self.sync(None)

    def _same_cgroup(self, cgroup_path: str, type_: str, original: Original) -> bool:
        try:
            files = TaskCgroupFiles(self.paths, cgroup_path)
            if type_ == RDT:
                return os.path.isdir(files.directory(CPU_QUOTA))
            return files.file(type_) == original.path and \
                files.identity(type_) == original.identity
        except (CgroupGone, CgroupRefused, OSError):
            return False

    def not_claimed(self, allocations: dict, tasks: dict) -> List[tuple]:
        """The adopted (task, type)s this run's allocator leaves out of its first answer
        that has the task: no longer wanted, so written back, as a clean stop and start
        would have left them.  (A task not in the frame is restored as one that went.)"""
        out = []
        for task_id in sorted(self.unclaimed):
            types = self.unclaimed.pop(task_id)
            if task_id not in tasks:
                continue
            wanted = allocations.get(task_id)
            claimed = set(wanted) if isinstance(wanted, dict) else set()
            out += [(task_id, type_) for type_ in sorted(types - claimed)]
        return out

    def save(self, host: Optional[str]) -> None:
        """The journal made what memory holds; JournalError (counted) when it cannot be.
        `host`: of the last cycle, None before the first."""
        if self.journal is None or not self.dirty:
            return
        tasks = {task_id: {"cgroup_path": self.cgroup_paths[task_id],
                           "types": {t: o.to_journal() for t, o in sorted(types.items())}}
                 for task_id, types in self.by_task.items() if types}
        try:
            self.journal.save(journal_body(host or frames.hostname(), tasks,
                                           self.created_groups))
        except JournalError:
            self.write_errors += 1
            raise
        self.dirty = False

    def sync(self, host: Optional[str]) -> None:
        """save() where a failure costs nothing but the log line and the count."""
        try:
            self.save(host)
        except JournalError as e:
            log.error("%s", e)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()

    # -- what is kept ------------------------------------------------------------------

    def original(self, task_id: str, type_: str) -> Optional[Original]:
        return self.by_task.get(task_id, {}).get(type_)

    def note_cgroup_path(self, task_id: str, cgroup_path: str) -> None:
        """Where the task's cgroup is: a restore after the task went writes there."""
        self.cgroup_paths[task_id] = cgroup_path

    def forget_cgroup_paths_but(self, tasks) -> None:
        """The paths of the tasks that went and left nothing to restore are dropped."""
        for task_id in set(self.cgroup_paths) - set(tasks) - set(self.by_task):
            del self.cgroup_paths[task_id]

    def remember(self, change: Change, cycle: Cycle) -> None:
        """The original of the change's file (read before OWCA's first write to it), and
        the text the change writes, as OWCA's."""
        self.dirty = True
        originals = self.by_task.setdefault(change.task_id, {})
        original = originals.get(change.type)
        found = None
        if change.type == RDT:
            if original is None:
                original = originals[RDT] = Original(text=DEFAULT_GROUP, value=None)
        else:
            reading = cycle.readings[change.task_id][change.type]
            found = reading.text
            if original is None:
                files = cycle.files[change.task_id]
                original = originals[change.type] = Original(
                    text=reading.text, value=reading.value, path=reading.path,
                    identity=files.identity(change.type))
        original.note_ours(change.type, change.new_text(), found)
        if change.creates:
            self.created_groups.add(change.creates)

    def wrote(self, change: Change) -> None:
        """The change's write worked: its file holds OWCA's text now."""
        self.by_task[change.task_id][change.type].written = canonical(change.type,
                                                                      change.new_text())

    def forget_groups(self, names: List[str]) -> None:
        """OWCA's resctrl groups that were removed."""
        for name in names:
            if name in self.created_groups:
                self.created_groups.discard(name)
                self.dirty = True

    # -- restoring ---------------------------------------------------------------------

    def restores(self, task_id: str, types: List[str],
                 cycle: Optional[Cycle] = None) -> List[Change]:
        """Changes that write back the originals of `types` (forgotten here); `cycle`:
        this cycle's readings, None for a task that went or at the stop."""
        originals = self.by_task.get(task_id, {})
        out = []
        for type_ in sorted(types, key=_restore_rank):
            original = originals.pop(type_, None)
            if original is None:
                continue
            self.dirty = True
            try:
                files = (cycle.files.get(task_id) if cycle else None) or \
                    TaskCgroupFiles(self.paths, self.cgroup_paths[task_id])
                ops = (self.rdt.restore_ops(task_id, files, cycle) if type_ == RDT
                       else _restore_cgroup_ops(task_id, type_, files, original))
            except (CgroupGone, CgroupRefused, OSError) as e:
                log.info("task %s: %s not restored: %s", task_id, type_,
                         getattr(e, "strerror", None) or e)
                continue
            if ops:
                out.append(Change(task_id, type_, None, ops, original=original))
        if not originals:
            self.by_task.pop(task_id, None)
        return out


def _restore_cgroup_ops(task_id: str, type_: str, files: TaskCgroupFiles,
                        original: Original) -> List[Op]:
    path = files.file(type_)
    if path != original.path or files.identity(type_) != original.identity:
        # Another cgroup now lives at that path: what it has is not ours to change.
        log.info("task %s: %s not restored: %s is a new cgroup", task_id, type_,
                 os.path.dirname(path))
        return []
    now = read_file(path)
    if canonical(type_, now) == canonical(type_, original.text):
        return []
    if not original.holds_ours(type_, now):
        # Another writer set it after OWCA's last write: its value, not OWCA's to undo.
        log.info("task %s: %s not restored: another writer changed %s to %r after OWCA "
                 "wrote it; left as it is", task_id, type_, path, now)
        return []
    text = original.text
    if type_ == CPU_IDLE:
        return _restore_idle_ops(path, files.weight_file(), text)

    def restore():
        written = restore_file(path, text)
        if written != text:
            log.info("task %s: %s: the kernel keeps a cgroup with processes from an "
                     "empty cpuset: wrote the parent's effective %s instead of ''",
                     task_id, type_, written)
    return [Op(f"restore {text!r} to {path}", restore)]


def _restore_rank(type_: str) -> int:
    """Restores go in the order of TYPES (cpu_idle before cpu_shares: see there)."""
    return TYPES.index(type_) if type_ in TYPES else len(TYPES)


def _restore_idle_ops(path: str, weight_name: str, original: str) -> List[Op]:
    """cpu.idle written back, then the weight it had: clearing cpu.idle resets the
    cgroup's weight to the kernel's default (an idle cgroup has the least, fixed)."""
    idle, _, weight = original.partition(" ")
    weight_path = os.path.join(os.path.dirname(path), weight_name)

    def restore():
        restore_file(path, idle)
        if idle == "0" and weight and read_file(weight_path) != weight:
            restore_file(weight_path, weight)
    what = f"restore {idle!r} to {path}" + (f" and {weight!r} to {weight_path}"
                                            if idle == "0" and weight else "")
    return [Op(what, restore)]
