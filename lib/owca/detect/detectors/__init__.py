"""The built-in detectors of owca-detect.

BUILTINS is their one list; owca-detect declares it to the configuration loader,
which imports a detector's module only when a configuration names its tag.
"""
BUILTINS = {
    "NOPAnomalyDetector": "owca.plugin:NOPAnomalyDetector",
    "ContentionDetector": "owca.detect.detectors.contention:ContentionDetector",
}
