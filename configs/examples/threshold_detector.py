"""An external detector, loaded with `-r configs/examples/threshold_detector.py:ThresholdDetector`.

It reports contention on `resource` for every task whose `metric` is above
`threshold`, naming as contending tasks the others that match
`contending_labels` (by default the best-effort ones), heaviest first.  It is an
example of the plug-in API, not a production detector: a real one looks at
rates and at the workload's service level, not at one gauge.
"""
from dataclasses import dataclass, field
from typing import Dict

from owca.plugin import AnomalyDetector, ContentionAnomaly, frames


@dataclass
class ThresholdDetector(AnomalyDetector):
    metric: str
    threshold: float
    resource: str = "cpu"
    contending_labels: Dict[str, str] = field(default_factory=lambda: {"priority": "be"})
    max_contending: int = 3

    def __post_init__(self):
        if self.max_contending < 1:
            raise ValueError("max_contending: expected at least 1")

    def _matches(self, labels: dict) -> bool:
        return all(labels.get(k) == v for k, v in self.contending_labels.items())

    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        anomalies = []
        for task_id, metrics in sorted(tasks_measurements.items()):
            value = metrics.get(self.metric)
            if not isinstance(value, (int, float)) or value <= self.threshold:
                continue
            if self._matches(tasks_labels.get(task_id, {})):
                continue  # a best-effort task is not protected
            others = [t for t in tasks_measurements
                      if t != task_id and self._matches(tasks_labels.get(t, {}))]
            others.sort(key=lambda t: -float(tasks_measurements[t].get(self.metric, 0) or 0))
            anomalies.append(ContentionAnomaly(
                resource=self.resource, contended_task_id=task_id,
                contending_task_ids=others[:self.max_contending],
                metrics=[frames.sample(self.metric, value, {"task_id": task_id}),
                         frames.sample(self.metric + "_threshold", self.threshold,
                                       {"task_id": task_id})]))
        extra = [frames.sample("threshold_detector_threshold", self.threshold,
                               {"metric": self.metric})]
        return anomalies, extra
