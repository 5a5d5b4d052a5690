"""Which tasks are high priority (HP) and which best effort (BE).

An orchestrator says it in its own terms: a Kubernetes QoS class, a Mesos role,
a label such as Aurora's tier.  A PriorityRule maps those terms to one label,
`priority: hp|be`, that travels with the task through the pipeline, so that
detectors and allocators need not know which orchestrator ran the task.

    priority: !PriorityRule
      label: org.apache.aurora.tier      # the orchestrator's spelling, or the sanitised one
      hp_values: [preferred]
      qos_classes: [Guaranteed]
      roles: [latency-critical]

A task is HP when any configured criterion matches, else `default`.
"""
from dataclasses import dataclass, field
from typing import Final, List, Literal, Optional

from owca.core.frames import sanitize_label_name

# Final, so that each has its literal type: `default` below is a Literal["hp", "be"].
HP: Final = "hp"
BE: Final = "be"
# The label that carries the verdict, unless a rule names another.
PRIORITY_LABEL: Final = "priority"
QOS_CLASSES = ("Guaranteed", "Burstable", "BestEffort")

# Labels the sources set, that the rule reads.
QOS_LABEL = "qos_class"
ROLE_LABEL = "role"


@dataclass
class PriorityRule:
    label: Optional[str] = None
    hp_values: List[str] = field(default_factory=list)
    # Kubernetes QoS classes whose pods are HP (Guaranteed, Burstable, BestEffort).
    qos_classes: List[str] = field(default_factory=list)
    # Mesos roles whose tasks are HP.
    roles: List[str] = field(default_factory=list)
    default: Literal["hp", "be"] = BE
    # The label that carries the verdict.
    label_name: str = PRIORITY_LABEL

    def __post_init__(self):
        if self.hp_values and not self.label:
            raise ValueError("hp_values needs label")
        if self.label and not self.hp_values:
            raise ValueError("label needs hp_values")
        known = {q.lower(): q for q in QOS_CLASSES}
        for q in self.qos_classes:
            if q.lower() not in known:
                raise ValueError(f"qos_classes: unknown class {q!r} "
                                 f"(expected {', '.join(QOS_CLASSES)})")
        self._qos = {q.lower() for q in self.qos_classes}
        self._label = sanitize_label_name(self.label) if self.label else None
        if sanitize_label_name(self.label_name) != self.label_name:
            raise ValueError(f"label_name: {self.label_name!r} is not a label name "
                             f"([a-zA-Z_][a-zA-Z0-9_]*)")

    def classify(self, labels: dict) -> str:
        """hp or be, for a task with these (sanitised) labels."""
        if self._label and labels.get(self._label) in self.hp_values:
            return HP
        if self._qos and labels.get(QOS_LABEL, "").lower() in self._qos:
            return HP
        # A task may hold resources of several roles (`role: "a,b"`).
        if self.roles and any(r in self.roles for r in labels.get(ROLE_LABEL, "").split(",")):
            return HP
        return self.default

    def apply(self, task: dict) -> dict:
        task["labels"][self.label_name] = self.classify(task["labels"])
        return task
