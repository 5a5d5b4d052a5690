"""owca-detect: hands each `measurements` frame to a detector plug-in.

The measurements frame is forwarded unchanged (its line, not a re-encoding),
followed by an `anomalies` frame of the same cycle.  An `anomalies` frame from
upstream (a replayed recording's) is dropped and counted as skipped.

Detector API (DESIGN.md):

    detect(platform, tasks_measurements, tasks_resources, tasks_labels)
        -> (anomalies, extra_metrics)

`platform` is a Platform; the three mappings are keyed by task id;
`anomalies` is a list of Anomaly objects (or their dict form), `extra_metrics`
a list of samples (`owca.core.frames.sample(...)`).
"""
import logging
from dataclasses import dataclass, field

from owca.core import config, frames
from owca.core.stage import Stage
from owca.core.stream import raised_by_signal
from owca.detect.detectors import BUILTINS
from owca.plugin import AnomalyDetector, NOPAnomalyDetector, anomaly_dicts, plugin_inputs

config.add_builtins(BUILTINS)

log = logging.getLogger("owca.detect")


@dataclass
class DetectConfig:
    detector: AnomalyDetector = field(default_factory=NOPAnomalyDetector)
    # No interval unless configured; the annotation stays `float`, not Optional, because
    # the configuration is checked against it: `interval: null` is refused.
    interval: float = None  # type: ignore[assignment]


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
            frames.validate(self.stats.names.samples_of(out))  # a bad name costs its metric only
        except BaseException as e:  # a plug-in's bug costs its cycle, not the pipeline: its
            if raised_by_signal(e):  # own sys.exit() or KeyboardInterrupt too, not a signal
                raise
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

