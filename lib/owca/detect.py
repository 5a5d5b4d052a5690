"""owca-detect: hands each `measurements` frame to a detector plug-in.

The measurements frame is forwarded unchanged (its line, not a re-encoding),
followed by an `anomalies` frame of the same cycle.  An `anomalies` frame from
upstream (a replayed recording's) is dropped and counted as skipped.

Detector API (DESIGN.md):

    detect(platform, tasks_measurements, tasks_resources, tasks_labels)
        -> (anomalies, extra_metrics)

`platform` is a Platform; the three mappings are keyed by task id;
`anomalies` is a list of Anomaly objects (or their dict form), `extra_metrics`
a list of samples (`owca.frames.sample(...)`).
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List

from owca import frames
from owca.config import register
from owca.digest import hexdigest
from owca.stage import Stage

log = logging.getLogger("owca.detect")


@dataclass
class Platform:
    """What a plug-in knows of the node: topology and the platform_* metrics."""
    cpus: int
    cores: int
    sockets: int
    numa_nodes: int
    metrics: Dict[str, object]

    @classmethod
    def from_frame(cls, frame: dict) -> "Platform":
        m = frame.get("platform", {})
        return cls(cpus=int(m.get("platform_topology_cpus", 0)),
                   cores=int(m.get("platform_topology_cores", 0)),
                   sockets=int(m.get("platform_topology_sockets", 0)),
                   numa_nodes=int(m.get("platform_topology_numa_nodes", 0)),
                   metrics=m)


def anomaly_uuid(type: str, resource: str, contended: str, contending: List[str]) -> str:
    """The same contention gets the same id in every cycle and every replay."""
    key = "\0".join([type, resource, contended, *sorted(contending)])
    return hexdigest(key, 16)


@dataclass
class ContentionAnomaly:
    """`contended_task_id` suffers on `resource` because of `contending_task_ids`."""
    resource: str
    contended_task_id: str
    contending_task_ids: List[str]
    metrics: List[dict] = field(default_factory=list)
    type: str = "contention"

    def to_dict(self) -> dict:
        return {"type": self.type, "resource": self.resource,
                "contended_task_id": self.contended_task_id,
                "contending_task_ids": list(self.contending_task_ids),
                "uuid": anomaly_uuid(self.type, self.resource, self.contended_task_id,
                                     self.contending_task_ids),
                "metrics": list(self.metrics)}


class AnomalyDetector:
    """Base class of detector plug-ins."""

    def detect(self, platform: Platform, tasks_measurements: Dict[str, dict],
               tasks_resources: Dict[str, dict], tasks_labels: Dict[str, dict]):
        raise NotImplementedError


@register
@dataclass
class NOPAnomalyDetector(AnomalyDetector):
    """Finds nothing: the pipeline's default, and the baseline of benchmarks."""

    def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
        return [], []


@dataclass
class DetectConfig:
    detector: AnomalyDetector = field(default_factory=NOPAnomalyDetector)
    interval: float = None


def plugin_inputs(frame: dict):
    """The plug-in API's arguments, out of a measurements frame."""
    tasks = frame["tasks"]
    return (Platform.from_frame(frame),
            {i: t.get("metrics", {}) for i, t in tasks.items()},
            {i: t.get("resources", {}) for i, t in tasks.items()},
            {i: t.get("labels", {}) for i, t in tasks.items()})


def anomaly_dicts(anomalies) -> List[dict]:
    out = []
    for a in anomalies:
        d = a.to_dict() if hasattr(a, "to_dict") else dict(a)
        d.setdefault("uuid", anomaly_uuid(d.get("type", "contention"), d.get("resource", ""),
                                          d.get("contended_task_id", ""),
                                          d.get("contending_task_ids", [])))
        out.append(d)
    return out


class Detect(Stage):
    name = "detect"
    consumes = ("measurements",)
    # A recording replayed through owca-detect carries the anomalies of its run: they
    # are dropped, so that each cycle has one anomalies frame, this detector's.
    replaces = ("anomalies",)

    def __init__(self, cfg: DetectConfig, options: dict):
        super().__init__(cfg, options)
        self.errors = 0

    def process(self, frame: dict) -> list:
        detector = self.cfg.detector
        try:
            anomalies, extra = detector.detect(*plugin_inputs(frame))
            anomalies = anomaly_dicts(anomalies)
            out = frames.anomalies_frame(frame["seq"], anomalies, ts=frame["ts"],
                                         host=frame["host"], metrics=list(extra))
            frames.validate(out)
        except Exception as e:  # a plug-in's bug costs its cycle, not the pipeline
            self.errors += 1
            log.error("cycle %s: %s failed: %s: %s", frame["seq"], type(detector).__name__,
                      type(e).__name__, e)
            out = frames.anomalies_frame(frame["seq"], [], ts=frame["ts"], host=frame["host"])
        labels = {"stage": self.name}
        out["metrics"] += [frames.sample("anomaly_count", len(out["anomalies"])),
                           frames.sample("owca_detector_errors_total", self.errors, labels,
                                         "counter")]
        out["metrics"] += self.stats.samples()
        return [out]
