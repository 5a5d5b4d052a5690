"""Values OWCA wrote that another writer changed since: each change is counted
(allocation_external_changes_total) and logged once, and the allocator's policy
(Allocator.reapply_external_change) says whether OWCA writes its value again.
"""
import logging
from typing import Dict, Optional, Set, Tuple

from owca.core import frames
from owca.allocate.allocator_calls import AllocatorCalls
from owca.allocate.cycle import Original

log = logging.getLogger("owca.allocate")


class ExternalChanges:
    def __init__(self, allocator: AllocatorCalls):
        self.allocator = allocator
        self.counts: Dict[tuple, int] = {}   # (task_id, type, file) -> changes
        self._logged: Set[Tuple[str, str]] = set()   # (task_id, type) logged at warning level

    def reapply(self, task_id: str, type_: str, file: str, original: Original,
                text: str, found, wanted, wrote: Optional[str] = None) -> bool:
        """Another writer changed a value OWCA wrote: counted and logged once per change;
        the allocator's policy says whether OWCA writes its value again (True)."""
        if original.foreign is not None and original.foreign[:2] == (text, wanted):
            return original.foreign[2]
        key = (task_id, type_, file)
        self.counts[key] = self.counts.get(key, 0) + 1
        reapply = self.allocator.reapply_external_change(task_id, type_, wanted, found)
        first = (task_id, type_) not in self._logged
        self._logged.add((task_id, type_))
        log.log(logging.WARNING if first else logging.DEBUG,
                "task %s: %s: %s was changed by another writer to %r after OWCA wrote %r; "
                "%s (counted in allocation_external_changes_total)", task_id, type_, file,
                text, wrote or original.written or "/".join(original.ours),
                "written again" if reapply else "left as it is, by the allocator's policy")
        original.foreign = (text, wanted, reapply)
        return reapply

    def forget_tasks_but(self, tasks) -> None:
        """The counts of the tasks that went are dropped."""
        for key in [k for k in self.counts if k[0] not in tasks]:
            del self.counts[key]

    def samples(self) -> list:
        return [frames.sample("allocation_external_changes_total", count,
                              {"task_id": task_id, "type": type_, "file": file}, "counter")
                for (task_id, type_, file), count in sorted(self.counts.items())]
