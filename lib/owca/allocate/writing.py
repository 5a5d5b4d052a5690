"""Writing Changes to the system: the journal first, on disk before any write of the
cycle; then each change's writes, a failure reported as the change's error.  In
--dry-run nothing is written, the journal neither: each write is logged as what
would have been done.
"""
import logging
from typing import List, Optional

from owca.allocate.cycle import Change, Cycle
from owca.allocate.journal import JournalError
from owca.allocate.originals import Originals

log = logging.getLogger("owca.allocate")


class Writer:
    def __init__(self, dry_run: bool, originals: Originals):
        self.dry_run = dry_run
        self.originals = originals
        self.changes_total = 0          # changes written (restores included)

    def write(self, changes: List[Change], cycle: Cycle,
              host: Optional[str]) -> Optional[List[Change]]:
        """The journal first (each original, and what OWCA is about to write), on disk
        before any of the writes; then the writes.  No journal, no write: None when the
        journal could not be saved.  `host`: the journal's, that of the cycle."""
        if self.dry_run or not changes:
            return self.apply(changes, cycle)
        ready = []
        for change in changes:
            try:
                self.originals.remember(change, cycle)
            except OSError as e:   # the cgroup went between reading and now
                cycle.error(change.task_id, change.type, f"{e.filename or ''}: {e.strerror}")
                continue
            ready.append(change)
        try:
            self.originals.save(host)
        except JournalError as e:
            for change in ready:
                cycle.error(change.task_id, change.type, f"not written: {e}")
            return None
        return self.apply(ready, cycle)

    def apply(self, changes: List[Change], cycle: Cycle) -> List[Change]:
        """Write (or, in --dry-run, report) each change; returns those done."""
        done = []
        for change in changes:
            if self.dry_run:
                for op in change.ops:
                    log.info("dry-run: task %s: would %s", change.task_id, op.what)
                done.append(change)
                continue
            if not self._run(change, cycle):
                continue
            if change.original is None and change.text is not None:
                self.originals.wrote(change)
            done.append(change)
        self.changes_total += len(done)
        return done

    @staticmethod
    def _run(change: Change, cycle: Cycle) -> bool:
        """Run the change's writes in order; the first that fails is the change's error
        and ends it.  Whether every write worked."""
        for op in change.ops:
            log.debug("task %s: %s", change.task_id, op.what)
            try:
                op.run()
            except OSError as e:
                cycle.error(change.task_id, change.type, f"{op.what}: {e.strerror or e}")
                return False
        return True

    def restore_at_stop(self, change: Change) -> bool:
        """A restore written when OWCA stops, with no cycle to report a failure in: it
        is logged.  Whether the change was written."""
        for op in change.ops:
            try:
                op.run()
            except OSError as e:
                log.error("task %s: %s: %s", change.task_id, op.what, e.strerror or e)
                return False
        self.changes_total += 1
        return True
