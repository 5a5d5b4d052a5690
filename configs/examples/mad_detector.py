"""A baseline detector: an HP task's latency above its own median by k MADs.

Loaded with `-r configs/examples/mad_detector.py:MadDetector` (configs/examples/
mad-baseline.yaml).  For every task that does not match `contending_labels`, it
keeps the last `window` reports of `metric` (one per apm_report_timestamp_seconds: a
report read again by a later cycle counts once, and is judged as it was) and reports contention on `resource` when the newest is
above median + k * 1.4826 * MAD of the ones before it (the MAD scaled to a normal
distribution's standard deviation), once `min_history` of them are known.  It names
as contending the matching task whose CPU use grew most since the previous cycle.

It is a baseline for the lab's scorer (docs/detection.md, "Baselines"): it knows
nothing of resources, and a load surge raises latency as much as interference does.
"""
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Dict

from owca.plugin import AnomalyDetector, ContentionAnomaly, frames

MAD_TO_SIGMA = 1.4826


@dataclass
class MadDetector(AnomalyDetector):
    metric: str = "apm_sli"
    k: float = 3.0
    window: int = 60
    min_history: int = 10
    resource: str = "cpu"
    contending_labels: Dict[str, str] = field(default_factory=lambda: {"role": "be"})

    def __post_init__(self):
        if not self.k > 0 or self.window < 3 or not 2 <= self.min_history <= self.window:
            raise ValueError("expected k > 0, window >= 3, 2 <= min_history <= window")
        self._history: Dict[str, deque] = {}
        self._report: Dict[str, float] = {}
        self._bound: Dict[str, float] = {}
        self._cpu: Dict[str, float] = {}

    def _upper_bound(self, history):
        if len(history) < self.min_history:
            return None
        median = statistics.median(history)
        mad = statistics.median(abs(v - median) for v in history)
        return median + self.k * MAD_TO_SIGMA * mad

    def _matches(self, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in self.contending_labels.items())

    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        grown = {}
        for task_id, metrics in tasks_measurements.items():
            cpu = metrics.get("task_cpu_usage_seconds")
            if isinstance(cpu, (int, float)):
                grown[task_id] = cpu - self._cpu.get(task_id, cpu)
                self._cpu[task_id] = cpu
        anomalies, extra = [], []
        for task_id, metrics in sorted(tasks_measurements.items()):
            if self._matches(tasks_labels.get(task_id, {})):
                continue
            value = metrics.get(self.metric)
            if not isinstance(value, (int, float)):
                continue
            history = self._history.setdefault(task_id, deque(maxlen=self.window))
            report = metrics.get("apm_report_timestamp_seconds", value)
            if report != self._report.get(task_id):  # a new report: judged, then kept
                self._report[task_id] = report
                self._bound[task_id] = self._upper_bound(history)
                history.append(value)
            bound = self._bound[task_id]  # a report read again is judged as it was
            if bound is None:
                continue
            extra.append(frames.sample("mad_detector_bound", bound, {"task_id": task_id}))
            if value > bound:
                others = [t for t in tasks_measurements
                          if t != task_id and self._matches(tasks_labels.get(t, {}))]
                others.sort(key=lambda t: -grown.get(t, 0.0))
                anomalies.append(ContentionAnomaly(
                    resource=self.resource, contended_task_id=task_id,
                    contending_task_ids=others[:1],
                    metrics=[frames.sample(self.metric, value, {"task_id": task_id}),
                             frames.sample(self.metric + "_bound", bound,
                                           {"task_id": task_id})]))
        return anomalies, extra
