"""Application performance metrics (APM): the files workload wrappers leave for owca-measure.

A wrapper (workloads/owca-wrap) turns a workload's or load generator's output
into metrics and keeps the latest values of the task it measures in one JSON
file per task, in an APM directory (default /run/owca/apm), replaced
atomically (written to a hidden temporary file, then renamed):

    {"task_id": "/owca/nginx", "ts": 1700000000.25,
     "labels": {"workload": "nginx", "generator": "wrk"},
     "metrics": {"apm_latency_p99_seconds": 0.00031,
                 "apm_throughput_per_second": 812.0,
                 "apm_sli": 0.00031, "apm_slo": 0.002, "apm_sli_normalized": 6.45}}

- task_id: the id of the task the metrics belong to (as owca-discover reports it);
- ts: when the values were taken (seconds since the epoch), not when the file
  was written: a wrapper whose workload fell silent leaves its file to age;
- labels: what the wrapper knows of the measurement (informational);
- metrics: names that start with `apm_` (so that a wrapper cannot shadow a
  cgroup or perf metric), finite numbers.

owca-measure's ApmReader reads the directory once per cycle and merges each
fresh file's metrics into the matching task's metrics.  A file older than
`max_age_seconds` is ignored (and counted); a malformed one is reported once per
version of the file and counted; neither stops the cycle.
"""
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from owca.core import frames
from owca.core.digest import hexdigest
from owca.measure.sources.base import Cycle, Reading, Source

log = logging.getLogger("owca.apm")

DEFAULT_APM_DIR = "/run/owca/apm"
DEFAULT_MAX_AGE_SECONDS = 30.0
METRIC_PREFIX = "apm_"
# A wrapper writes a few dozen metrics; anything much bigger is not a wrapper's.
MAX_FILE_BYTES = 256 * 1024
MAX_METRICS = 1000
SUFFIX = ".json"
# When the values were taken (docs/metrics.md); from the file's `ts` where it lacks one.
REPORT_TS_METRIC = "apm_report_timestamp_seconds"

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class ApmError(ValueError):
    """An APM file that cannot be used; the message says why, in one line."""


@dataclass
class ApmRecord:
    task_id: str
    ts: float
    labels: Dict[str, str] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_metrics(metrics) -> None:
    if not isinstance(metrics, dict):
        raise ApmError("field 'metrics': expected an object of numbers")
    if len(metrics) > MAX_METRICS:
        raise ApmError(f"field 'metrics': {len(metrics)} metrics, more than {MAX_METRICS}")
    for name, value in metrics.items():
        if not isinstance(name, str) or not name.startswith(METRIC_PREFIX) \
                or not frames.METRIC_NAME.match(name):
            raise ApmError(f"field 'metrics': name {name!r:.80} is not a metric name "
                           f"starting with {METRIC_PREFIX!r}")
        if not _finite_number(value):
            raise ApmError(f"field 'metrics.{name}': expected a finite number, got {value!r:.80}")


def parse(text: str) -> ApmRecord:
    """An APM file's text as a record; ApmError when it is not one."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as e:
        raise ApmError(f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApmError(f"expected a JSON object, got {type(data).__name__}")
    # JSON values of any type: each is checked below, before the record is made.
    task_id: Any = data.get("task_id")
    ts: Any = data.get("ts")
    labels: Any = data.get("labels", {})
    metrics: Any = data.get("metrics")
    try:
        frames.check_task_id(task_id, "task_id")
        frames.check_labels(labels, "labels")
    except frames.FrameError as e:
        raise ApmError(str(e)) from None
    if not _finite_number(ts) or ts < 0:
        raise ApmError(f"field 'ts': expected seconds since the epoch, got {ts!r:.80}")
    check_metrics(metrics)
    return ApmRecord(task_id, float(ts), dict(labels), dict(metrics))


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def encode(record: ApmRecord) -> bytes:
    check_metrics(record.metrics)
    return json.dumps({"task_id": record.task_id, "ts": record.ts, "labels": record.labels,
                       "metrics": record.metrics}, separators=(",", ":"),
                      allow_nan=False).encode("utf-8") + b"\n"


def file_name(task_id: str) -> str:
    """A file name unique to the task id: readable part, and a hash for uniqueness
    (task ids are cgroup paths and orchestrator ids, with '/' and any length)."""
    readable = _UNSAFE_NAME_CHARS.sub("_", task_id).strip("._")[:64] or "task"
    digest = hexdigest(task_id, 6)
    return f"{readable}-{digest}{SUFFIX}"


def write(directory: str, record: ApmRecord) -> str:
    """Replace the task's file atomically; returns its path."""
    data = encode(record)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    path = os.path.join(directory, file_name(record.task_id))
    # Hidden, so that a reader listing the directory skips it.
    tmp = os.path.join(directory, f".{file_name(record.task_id)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def remove(directory: str, task_id: str) -> None:
    try:
        os.unlink(os.path.join(directory, file_name(task_id)))
    except FileNotFoundError:
        pass


class ApmReader:
    """The fresh APM files of a directory, once per cycle: {task_id: {metric: value}}."""

    def __init__(self, directory: str, max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
                 clock=time.time):
        if not max_age_seconds > 0:
            raise ValueError("max_age_seconds: expected a positive number of seconds")
        self.directory = directory
        self.max_age = max_age_seconds
        self.clock = clock
        self.files = 0            # fresh files merged in the last read
        self.stale_files = 0      # files ignored in the last read for their age
        self.malformed_total = 0  # distinct malformed file versions seen
        self.read_errors_total = 0
        # The last read could not list the directory (a missing one is listed empty).
        self.directory_unreadable = False
        # path -> (mtime_ns, size) of the version reported
        self._reported: Dict[str, Tuple[int, int]] = {}
        self._missing_reported = False

    def read(self) -> Dict[str, Dict[str, float]]:
        now = self.clock()
        out: Dict[str, Dict[str, float]] = {}
        newest: Dict[str, float] = {}
        self.files = self.stale_files = 0
        self.directory_unreadable = False
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:
            # No wrapper has written yet; say so once, not every cycle.
            if not self._missing_reported:
                log.info("APM directory %s does not exist (yet): no APM metrics",
                         self.directory)
                self._missing_reported = True
            return out
        except OSError as e:
            self.read_errors_total += 1
            self.directory_unreadable = True
            log.error("APM directory %s: %s", self.directory, e.strerror)
            return out
        self._missing_reported = False
        seen = set()
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(SUFFIX):
                continue
            seen.add(entry.path)
            record = self._read_file(entry)
            if record is None:
                continue
            if now - record.ts > self.max_age:
                self.stale_files += 1
                continue
            if record.ts < newest.get(record.task_id, -1.0):
                continue  # two wrappers of one task: the newer values win
            newest[record.task_id] = record.ts
            metrics = record.metrics
            # The report's own time, for the readers that tell a new report from an old
            # one (the controller, the detector): a wrapper gives its own, a file
            # written by hand has its `ts`.
            metrics.setdefault(REPORT_TS_METRIC, record.ts)
            out[record.task_id] = metrics
        self.files = len(out)
        for path in list(self._reported):
            if path not in seen:
                del self._reported[path]
        return out

    def _read_file(self, entry) -> Optional[ApmRecord]:
        try:
            st = entry.stat()
            version = (st.st_mtime_ns, st.st_size)
            try:
                if st.st_size > MAX_FILE_BYTES:
                    raise ApmError(f"{st.st_size} bytes, more than {MAX_FILE_BYTES}")
                with open(entry.path, "rb") as f:
                    text = f.read(MAX_FILE_BYTES + 1).decode("utf-8")
                record = parse(text)
            except (ApmError, UnicodeDecodeError) as e:
                # Reported once per version of the file (its mtime and size).
                if self._reported.get(entry.path) != version:
                    self._reported[entry.path] = version
                    self.malformed_total += 1
                    log.error("APM file %s: %s (ignored)", entry.path, e)
                return None
        except FileNotFoundError:
            return None  # its wrapper removed it between listing and reading
        except OSError as e:
            self.read_errors_total += 1
            log.error("APM file %s: %s", entry.path, e.strerror)
            return None
        self._reported.pop(entry.path, None)
        return record

    def samples(self, labels: dict) -> list:
        """The reader's own counters, as owca_* samples of owca-measure."""
        return [
            frames.sample("owca_apm_files", self.files, labels),
            frames.sample("owca_apm_stale_files", self.stale_files, labels),
            frames.sample("owca_apm_malformed_files_total", self.malformed_total, labels,
                          "counter"),
            frames.sample("owca_apm_read_errors_total", self.read_errors_total, labels,
                          "counter"),
        ]



# -- as a source of owca-measure --------------------------------------------------

class ApmSource(Source):
    """The workload wrappers' APM files (apm.py's ApmReader) as a source.

    Imported only when the configuration sets `apm_dir`.

    Failure as a whole: the APM directory could not be listed this cycle (it is a
    file, or not readable: owca_apm_read_errors_total counts it).  A directory that
    does not exist yet is no failure: no wrapper has written on this node.  A stale,
    malformed or unreadable file is not one either; each has its own counter.
    """

    name = "apm"

    def __init__(self, cfg, paths):
        self.reader = ApmReader(cfg.apm_dir, cfg.apm_max_age)

    def read(self, cycle: Cycle) -> Reading:
        tasks = self.reader.read()
        return Reading(tasks=tasks, samples=self.reader.samples(cycle.labels),
                       ok=not self.reader.directory_unreadable)
