"""The allocator plug-in as owca-allocate calls it: a plug-in's bug costs its cycle, not
the pipeline.  Each failed call is logged and counted (owca_allocator_errors_total),
whatever it raised: a sys.exit() or a KeyboardInterrupt of the plug-in's own too
(a stop signal the tool received is no failure: owca.core.stream.raised_by_signal).
"""
import logging
from typing import Callable, Optional

from owca.core.stream import raised_by_signal
from owca.plugin import Allocator, anomaly_dicts, plugin_inputs

log = logging.getLogger("owca.allocate")


class AllocatorCalls:
    def __init__(self, allocator: Allocator):
        self.allocator = allocator
        self.errors = 0       # calls that failed
        self.ok = True        # whether the allocator answered this cycle

    def _observer(self) -> Optional[Callable[[list], object]]:
        """The allocator's observe_anomalies method, which Allocator does not declare:
        None where this allocator has none."""
        observe = getattr(self.allocator, "observe_anomalies", None)
        return observe if callable(observe) else None

    @property
    def observes_anomalies(self) -> bool:
        return self._observer() is not None

    @property
    def reads_current_allocations(self) -> bool:
        return getattr(self.allocator, "reads_current_allocations", True)

    def allocate(self, frame: dict, current: dict):
        """(allocations, anomalies as dicts, extra metrics); nothing when the call failed."""
        allocator = self.allocator
        try:
            allocations, anomalies, extra = allocator.allocate(*plugin_inputs(frame), current)
            if not isinstance(allocations, dict):
                raise TypeError(f"allocations: expected {{task_id: {{type: value}}}}, got "
                                f"{type(allocations).__name__}")
            self.ok = True
            return allocations, anomaly_dicts(anomalies), list(extra)
        except BaseException as e:  # a plug-in's bug costs its cycle, not the pipeline
            if raised_by_signal(e):
                raise
            self.ok = False
            self.errors += 1
            log.error("cycle %s: %s failed: %s: %s", frame["seq"], type(allocator).__name__,
                      type(e).__name__, e)
            return {}, [], []

    def observe_anomalies(self, frame: dict) -> None:
        """The frame's anomalies handed to an allocator that observes them (the stage
        asks observes_anomalies first); nothing for one that does not."""
        observe = self._observer()
        if observe is None:
            return
        try:
            observe(frame.get("anomalies") or [])
        except BaseException as e:  # a plug-in's bug costs its cycle, not the pipeline
            if raised_by_signal(e):
                raise
            self.errors += 1
            log.error("cycle %s: %s failed on anomalies: %s: %s", frame["seq"],
                      type(self.allocator).__name__, type(e).__name__, e)

    def reapply_external_change(self, task_id: str, type_: str, wanted, found) -> bool:
        allocator = self.allocator
        try:
            return bool(allocator.reapply_external_change(task_id, type_, wanted, found))
        except BaseException as e:  # a plug-in's bug: OWCA's value stands, as by default
            if raised_by_signal(e):
                raise
            self.errors += 1
            log.error("task %s: %s.reapply_external_change failed: %s: %s", task_id,
                      type(allocator).__name__, type(e).__name__, e)
            return True
