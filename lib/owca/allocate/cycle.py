"""What a cycle of owca-allocate works on: what it read from the system (`Cycle`), the
writes it decides (`Change`, each a list of `Op`), and a file's value from before
OWCA's first write to it (`Original`), which a restore writes back.

Planning, the RDT groups and the originals make Changes; the writer runs their Ops
(in --dry-run it reports them); the originals are kept in the journal.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from owca.core import allocation
from owca.core.allocation import (CPU_IDLE, CPUSET_CPUS, CPUSET_MEMS, MEMORY_TYPES, Topology,
                                  parse_cpu_list)
from owca.allocate.cgroup_files import Reading, TaskCgroupFiles
from owca.allocate.memory_files import canonical_memory
from owca.allocate.resctrl import Group


def canonical(type_: str, text: str) -> str:
    """A file's text as compared with what OWCA wrote (the kernel's own spelling)."""
    if type_ in (CPUSET_CPUS, CPUSET_MEMS):
        try:
            return allocation.format_cpu_list(parse_cpu_list(text))
        except ValueError:
            return text
    if type_ == CPU_IDLE:
        return " ".join(text.split()[:1])   # cpu.idle alone; an original has the weight too
    if type_ in MEMORY_TYPES:    # v1 reads back -1 as the page counter's maximum
        return canonical_memory(text)
    return " ".join(text.split())


@dataclass
class Original:
    """A type's file as it was before OWCA's first write to it, and what OWCA wrote.

    Journaled (lib/owca/allocate/journal.py) before every write that changes it."""
    text: str                      # written back on restore ("" for rdt: the default group)
    value: object                  # the same, normalised (for the frame and the metrics)
    # The file and its cgroup's (st_dev, st_ino), both set for a cgroup file; rdt's
    # original (the default group) has neither.
    path: Optional[str] = None
    identity: Optional[Tuple[int, int]] = None
    # The texts OWCA wrote or is writing to the file (canonical): the file holds
    # OWCA's value when it holds one of them.
    ours: List[str] = field(default_factory=list)
    # The last text OWCA wrote this run, once the write worked.
    written: Optional[str] = None
    # (text found, value wanted, reapplied?) of a change another writer made, so that
    # it counts once.
    foreign: Optional[tuple] = None

    def holds_ours(self, type_: str, text: str) -> bool:
        text = canonical(type_, text)
        return text == self.written if self.written is not None else text in self.ours

    def note_ours(self, type_: str, text: str, found: Optional[str]) -> None:
        """`text` is about to be written; `found` is in the file now."""
        text = canonical(type_, text)
        kept = [t for t in self.ours if found is not None and t == canonical(type_, found)]
        self.ours = kept + [text] if text not in kept else kept

    def to_journal(self) -> dict:
        entry = {"original": self.text, "value": self.value, "ours": list(self.ours)}
        if self.path is not None:
            assert self.identity is not None, "set with the path"
            entry.update(path=self.path, identity=list(self.identity))
        return entry

    @classmethod
    def from_journal(cls, entry: dict) -> "Original":
        identity = entry.get("identity")   # journal.check_body: two numbers, or absent
        return cls(text=entry["original"], value=entry.get("value"), path=entry.get("path"),
                   identity=(identity[0], identity[1]) if identity else None,
                   ours=list(entry["ours"]))


@dataclass
class Op:
    """One write to the system, described for logs and --dry-run."""
    what: str
    run: Callable[[], None]


@dataclass
class Change:
    task_id: str
    type: str
    value: object       # what the task gets (None: withdrawn, its original restored)
    ops: List[Op]
    original: Optional[Original] = None   # the restore this change performs
    text: Optional[str] = None            # what it puts in the file (rdt: the group's name)
    creates: Optional[str] = None         # the resctrl group it creates

    def new_text(self) -> str:
        """What the change puts in its file: every change has it but a restore, which
        writes back its `original`."""
        assert self.text is not None, f"a restore of {self.type} has no text of its own"
        return self.text


@dataclass
class Cycle:
    """What one cycle read from the system."""
    topology: Topology
    files: Dict[str, TaskCgroupFiles]
    readings: Dict[str, Dict[str, Reading]]
    groups: Optional[Dict[str, Group]]          # None: resctrl not mounted
    threads: Dict[str, List[int]] = field(default_factory=dict)
    claims: Dict[str, tuple] = field(default_factory=dict)   # rdt group: (task, schemata)
    errors: List[Tuple[str, str, str]] = field(default_factory=list)

    def error(self, task_id: str, type_: str, reason: str) -> None:
        self.errors.append((task_id, type_, reason))

    def thread_ids(self, task_id: str) -> List[int]:
        """The task's threads, read once a cycle."""
        if task_id not in self.threads:
            self.threads[task_id] = self.files[task_id].thread_ids()
        return self.threads[task_id]
