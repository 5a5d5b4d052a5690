"""The frame protocol: the one place that knows what a frame looks like.

A frame is one JSON object on one newline-terminated UTF-8 line.  The normative
description, with every field, unit and limit, is docs/protocol.md; this module
implements it: a constructor and a validator per kind, the encoder, and the
cheap sniffing that lets a stage forward a frame it does not consume without
parsing it.
"""
import json
import logging
import math
import os
import re
import time
from typing import Optional, Set

VERSION = 1
KINDS = ("tasks", "measurements", "anomalies", "allocations")

# A line longer than this is rejected unread: a bounded line keeps a stage's
# memory bounded whatever its upstream does.  1000 tasks with a hundred metrics
# each stay well under it.
MAX_FRAME_BYTES = 16 * 1024 * 1024

# Nesting deeper than this is refused at the reader, so that nothing downstream that
# walks a frame (a formatter, an encoder, a plug-in) meets a depth it cannot handle.
# OWCA's own frames nest 6 deep (a pressure metric's two levels).
MAX_DEPTH = 32

MAX_ID_LENGTH = 256
MAX_LABEL_VALUE_LENGTH = 1024
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")

# Writers put "v" and "kind" first; a reader that finds this prefix knows the
# frame's version and kind without parsing the rest.  Readers must not rely on
# it: a frame with another key order is parsed in full.
_PREFIX = b'{"v":'
_KIND_AT = b',"kind":"'

log = logging.getLogger("owca")


class FrameError(ValueError):
    """A line that is not a valid frame; the message says why, in one line."""


def hostname() -> str:
    return os.uname().nodename


def new_frame(kind: str, seq: int, ts: Optional[float] = None, host: Optional[str] = None,
              **fields) -> dict:
    frame = {"v": VERSION, "kind": kind, "ts": time.time() if ts is None else ts,
             "host": hostname() if host is None else host, "seq": seq}
    frame.update(fields)
    return frame


def tasks_frame(seq, tasks, ts=None, host=None, metrics=None) -> dict:
    return new_frame("tasks", seq, ts, host, tasks=tasks, metrics=metrics or [])


def measurements_frame(seq, platform, tasks, ts=None, host=None, metrics=None) -> dict:
    return new_frame("measurements", seq, ts, host, platform=platform, tasks=tasks,
                     metrics=metrics or [])


def anomalies_frame(seq, anomalies, ts=None, host=None, metrics=None) -> dict:
    return new_frame("anomalies", seq, ts, host, anomalies=anomalies, metrics=metrics or [])


def allocations_frame(seq, allocations, ts=None, host=None, metrics=None, **fields) -> dict:
    return new_frame("allocations", seq, ts, host, allocations=allocations,
                     metrics=metrics or [], **fields)


def sample(name: str, value, labels: Optional[dict] = None, type: str = "gauge",
           help: Optional[str] = None) -> dict:
    """A free-form metric sample, as carried in a frame's `metrics` list."""
    s = {"name": name, "value": value, "labels": labels or {}, "type": type}
    if help:
        s["help"] = help
    return s


def encode(frame: dict) -> bytes:
    """One compact line; NaN and infinities are not JSON and are refused."""
    try:
        data = json.dumps(frame, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
    except ValueError as e:
        raise FrameError(f"cannot encode frame: {e}") from None
    if len(data) >= MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return data + b"\n"


def sniff(line: bytes):
    """(version, kind) read off the line's prefix, or None when it has another shape."""
    if not line.startswith(_PREFIX):
        return None
    comma = line.find(_KIND_AT, 5, 32)
    if comma < 0:
        return None
    try:
        version = int(line[5:comma])
    except ValueError:
        return None
    start = comma + len(_KIND_AT)
    end = line.find(b'"', start, start + 32)
    if end < 0:
        return None
    return version, line[start:end].decode("ascii", "replace")


def _refuse_constant(name: str):
    raise FrameError(f"{name} is not a JSON number (JSON has no NaN or infinities)")


# Python's json reads NaN, Infinity and -Infinity, which RFC 8259 does not have.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)

# An escape of a UTF-16 surrogate: a lone one would be a str that cannot be encoded.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse(line: bytes):
    """The JSON object of a line, not checked further; FrameError when it is none.

    Decoded as UTF-8 here rather than by json.loads, which guesses UTF-16 or -32
    from a NUL byte and calls the line "not UTF-8" for it.  Beyond JSON's own
    rules: no NaN or infinities, nesting at most MAX_DEPTH deep, and no string
    with a lone surrogate (docs/protocol.md, Transport).
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FrameError(f"not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        frame = _DECODER.decode(text)
    except FrameError:
        raise
    except RecursionError:  # far deeper than MAX_DEPTH: the decoder gave up first
        raise FrameError(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # the causes a reader cannot see, named before JSON's own
        nul = line.find(b"\0")
        if nul >= 0:
            raise FrameError(f"NUL byte at byte {nul}") from None
        if text.startswith("\ufeff"):
            raise FrameError("a byte order mark (U+FEFF) begins the line") from None
        raise FrameError(f"invalid JSON: {e}") from None
    if type(frame) is not dict:
        raise FrameError(f"a frame is a JSON object, got {type(frame).__name__}")
    if nesting_depth(line) > MAX_DEPTH:
        raise FrameError(f"nested deeper than {MAX_DEPTH} levels")
    if b"\\u" in line and _SURROGATE_ESCAPE.search(line):
        # Rare (OWCA writes characters, not escapes): the whole frame is checked.
        try:
            json.dumps(frame, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise FrameError("a string holds a lone surrogate (an escape from \\ud800 to "
                             "\\udfff not in a pair): not Unicode text") from None
    return frame


# What nesting_depth keeps of a line: the brackets, as one kind, and the quotes.
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_ONE_KIND = bytes.maketrans(b"[]", b"{}")
_STRING = re.compile(rb'"[^"]*"')


def nesting_depth(line: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep the JSON text `line` nests (a scalar 0, `[]` 1), or limit + 1 when
    deeper than `limit`.

    Done on the bytes, not the decoded objects: the brackets and quotes are kept
    (a few C passes over the line), the strings dropped, then each pass removes
    the innermost pairs.  `line` must be valid JSON.
    """
    if b"\\" in line:  # an escaped quote or backslash delimits nothing
        line = line.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Dropping a pair of adjacent quotes leaves every other character inside or
    # outside a string as it was: most strings go here, in one C pass.
    kept = line.translate(_ONE_KIND, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in kept:  # strings that hold brackets
        kept = _STRING.sub(b"", kept)
    depth = 0
    while kept:
        if depth == limit:
            return limit + 1
        kept = kept.replace(b"{}", b"")
        depth += 1
    return depth


def decode(line: bytes) -> dict:
    """Parse a line into a frame and check its common fields (not its body)."""
    frame = parse(line)
    check_header(frame)
    return frame


def check_header(frame: dict) -> None:
    v = frame.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise FrameError(f"field 'v': expected a positive integer, got {v!r}")
    kind = frame.get("kind")
    if not isinstance(kind, str) or not kind:
        raise FrameError(f"field 'kind': expected a non-empty string, got {kind!r}")
    if v != VERSION:
        return  # a newer version's other fields are not ours to judge
    _need(frame, "ts", _is_number, "a number (seconds since the epoch)")
    _need(frame, "host", lambda x: isinstance(x, str), "a string")
    _need(frame, "seq", lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
          "a non-negative integer")


def validate(frame: dict) -> dict:
    """Check a decoded frame of a known kind and version; returns it."""
    kind = frame["kind"]
    check = _BODY_CHECKS.get(kind)
    if check is None:
        raise FrameError(f"unknown kind {kind!r}")
    metrics = frame.get("metrics", [])
    if not isinstance(metrics, list):
        raise FrameError("field 'metrics': expected a list of samples")
    for i, s in enumerate(metrics):
        check_sample(s, f"metrics[{i}]")
    check(frame)
    return frame


def is_known(version: int, kind: str) -> bool:
    return version == VERSION and kind in KINDS


# -- body checks ----------------------------------------------------------------

def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and not (isinstance(x, float) and not math.isfinite(x)))


def _need(obj: dict, field: str, ok, expected: str, where: str = ""):
    value = obj.get(field)
    if field not in obj or not ok(value):
        raise FrameError(f"field '{where}{field}': expected {expected}, got {value!r:.80}")
    return value


def check_task_id(task_id, where="id"):
    if not isinstance(task_id, str) or not task_id or len(task_id) > MAX_ID_LENGTH \
            or not task_id.isprintable():
        raise FrameError(f"field '{where}': expected a printable string of 1 to "
                         f"{MAX_ID_LENGTH} characters, got {task_id!r:.80}")


# Label names recur in every frame: remember the good ones (bounded) so that
# each is matched against the pattern once, not once per task per cycle.
_GOOD_LABEL_NAMES: Set[str] = set()


def check_labels(labels, where):
    if type(labels) is not dict:
        raise FrameError(f"field '{where}': expected an object of strings")
    for key, value in labels.items():
        if key not in _GOOD_LABEL_NAMES:
            if not LABEL_NAME.match(key):
                raise FrameError(f"field '{where}': label name {key!r:.80} is not "
                                 f"[a-zA-Z_][a-zA-Z0-9_]*")
            if len(_GOOD_LABEL_NAMES) < 10000:
                _GOOD_LABEL_NAMES.add(key)
        if type(value) is not str or len(value) > MAX_LABEL_VALUE_LENGTH:
            raise FrameError(f"field '{where}.{key}': expected a string of at most "
                             f"{MAX_LABEL_VALUE_LENGTH} characters")


def check_resources(resources, where):
    if not isinstance(resources, dict):
        raise FrameError(f"field '{where}': expected an object of numbers")
    for key, value in resources.items():
        if not _is_number(value):
            raise FrameError(f"field '{where}.{key}': expected a number, got {value!r:.80}")


def check_cgroup_path(path, where):
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path \
            or ".." in path.split("/"):
        raise FrameError(f"field '{where}': expected an absolute cgroup path without '..', "
                         f"got {path!r:.80}")


def check_subcgroup_paths(paths, where):
    if type(paths) is not list:
        raise FrameError(f"field '{where}': expected a list of cgroup paths")
    for j, sub in enumerate(paths):
        check_cgroup_path(sub, f"{where}[{j}]")


def check_metric_values(metrics, where):
    if not isinstance(metrics, dict):
        raise FrameError(f"field '{where}': expected an object of metrics")


def check_sample(s, where):
    if not isinstance(s, dict):
        raise FrameError(f"field '{where}': expected a sample object")
    name = _need(s, "name", lambda x: isinstance(x, str) and METRIC_NAME.match(x),
                 "a metric name", where + ".")
    _need(s, "value", _is_number, "a number", where + ".")
    check_labels(s.get("labels", {}), f"{where}.labels")
    if s.get("type", "gauge") not in ("gauge", "counter"):
        raise FrameError(f"field '{where}.type' of {name}: expected 'gauge' or 'counter'")


def _check_tasks(frame):
    tasks = _need(frame, "tasks", lambda x: isinstance(x, list), "a list of tasks")
    seen = set()
    for i, task in enumerate(tasks):
        where = f"tasks[{i}]"
        if not isinstance(task, dict):
            raise FrameError(f"field '{where}': expected a task object")
        check_task_id(task.get("id"), where + ".id")
        if task["id"] in seen:
            raise FrameError(f"field '{where}.id': duplicate task id {task['id']!r}")
        seen.add(task["id"])
        check_cgroup_path(task.get("cgroup_path"), where + ".cgroup_path")
        check_subcgroup_paths(task.get("subcgroup_paths", []), where + ".subcgroup_paths")
        check_labels(task.get("labels", {}), where + ".labels")
        check_resources(task.get("resources", {}), where + ".resources")


def _check_measurements(frame):
    platform = _need(frame, "platform", lambda x: isinstance(x, dict), "an object")
    check_metric_values(platform, "platform")
    tasks = _need(frame, "tasks", lambda x: isinstance(x, dict), "an object keyed by task id")
    empty: dict = {}
    for task_id, task in tasks.items():
        # The hot path of every consuming stage: names are built only for errors.
        if type(task_id) is not str or not 0 < len(task_id) <= MAX_ID_LENGTH \
                or not task_id.isprintable():
            check_task_id(task_id, f"tasks.{task_id}")
        if type(task) is not dict:
            raise FrameError(f"field 'tasks.{task_id}': expected a task object")
        # Optional here (a replayed recording may lack them), but never a way out of
        # the cgroup tree for a stage that acts on the path.
        path = task.get("cgroup_path")
        if path is not None and not (type(path) is str and path[:1] == "/"
                                     and "/.." not in path and "\0" not in path):
            check_cgroup_path(path, f"tasks.{task_id}.cgroup_path")
        if "subcgroup_paths" in task:
            check_subcgroup_paths(task["subcgroup_paths"], f"tasks.{task_id}.subcgroup_paths")
        labels = task.get("labels", empty)
        if labels is not empty:
            check_labels(labels, f"tasks.{task_id}.labels")
        resources = task.get("resources", empty)
        if resources is not empty:
            check_resources(resources, f"tasks.{task_id}.resources")
        if type(task.get("metrics", empty)) is not dict:
            raise FrameError(f"field 'tasks.{task_id}.metrics': expected an object of metrics")


def _check_anomalies(frame):
    anomalies = _need(frame, "anomalies", lambda x: isinstance(x, list), "a list of anomalies")
    for i, a in enumerate(anomalies):
        where = f"anomalies[{i}]"
        if not isinstance(a, dict):
            raise FrameError(f"field '{where}': expected an anomaly object")
        for field in ("type", "resource", "uuid"):
            _need(a, field, lambda x: isinstance(x, str) and x, "a non-empty string", where + ".")
        check_task_id(a.get("contended_task_id"), where + ".contended_task_id")
        contending = _need(a, "contending_task_ids", lambda x: isinstance(x, list),
                           "a list of task ids", where + ".")
        for j, task_id in enumerate(contending):
            check_task_id(task_id, f"{where}.contending_task_ids[{j}]")
        for j, s in enumerate(a.get("metrics", [])):
            check_sample(s, f"{where}.metrics[{j}]")


def _check_allocations(frame):
    allocations = _need(frame, "allocations", lambda x: isinstance(x, dict),
                        "an object keyed by task id")
    for task_id, allocation in allocations.items():
        check_task_id(task_id, f"allocations.{task_id}")
        if not isinstance(allocation, dict):
            raise FrameError(f"field 'allocations.{task_id}': expected an object")


_BODY_CHECKS = {
    "tasks": _check_tasks,
    "measurements": _check_measurements,
    "anomalies": _check_anomalies,
    "allocations": _check_allocations,
}


# -- names on their way in ------------------------------------------------------------

_GOOD_METRIC_NAMES: Set[str] = set()


class NameCheck:
    """Metric and label names checked where they enter a stage's frames.

    A metric with a name the exposition format cannot carry (`app latency.p99`)
    would make every Prometheus block it is in unreadable; one with a bad label
    name too.  Such a metric is left out of the frame, counted in `bad`, and
    reported once per name; the rest of the frame goes on.  Good names are
    remembered (bounded), so that a name is matched once, not once per task per
    cycle.
    """

    def __init__(self):
        self.bad = 0
        self.lineno = 0  # of the input line being checked, for the report
        self._reported = set()

    def _report(self, name, where, reason):
        self.bad += 1
        if name not in self._reported and len(self._reported) < 10000:
            self._reported.add(name)
            log.error("line %d: %s: %s %r is not a valid name: left out (reported once)",
                      self.lineno, where, reason, name)

    def _good_metric(self, name) -> bool:
        if name in _GOOD_METRIC_NAMES:
            return True
        if type(name) is not str or not METRIC_NAME.match(name):
            return False
        if len(_GOOD_METRIC_NAMES) < 10000:
            _GOOD_METRIC_NAMES.add(name)
        return True

    def values(self, metrics, where):
        """A metrics object ({name: value}) without the names that are not metric names."""
        if type(metrics) is not dict:
            return metrics  # the frame's validation reports a wrong shape
        if _GOOD_METRIC_NAMES.issuperset(metrics):  # the hot path: one C loop
            return metrics
        good = self._good_metric
        for name in metrics:
            if not good(name):
                break
        else:
            return metrics
        out = {}
        for name, value in metrics.items():
            if good(name):
                out[name] = value
            else:
                self._report(name, where, "metric name")
        return out

    def samples(self, samples, where):
        """A list of samples without those whose metric or label names are not valid."""
        if type(samples) is not list:
            return samples
        out = []
        for s in samples:
            if type(s) is dict:
                name = s.get("name")
                if isinstance(name, str) and not self._good_metric(name):
                    self._report(name, where, "metric name")
                    continue
                labels = s.get("labels")
                if type(labels) is dict:
                    bad = [k for k in labels if k not in _GOOD_LABEL_NAMES
                           and not (isinstance(k, str) and LABEL_NAME.match(k))]
                    if bad:
                        self._report(bad[0], f"{where} {name}", "label name")
                        continue
            out.append(s)
        return out

    def frame(self, frame: dict) -> dict:
        """Every name of a decoded frame checked in place; the frame's shape is not
        (validate() does that)."""
        self.samples_of(frame)
        if frame.get("kind") == "measurements":
            if "platform" in frame:
                frame["platform"] = self.values(frame["platform"], "platform")
            tasks = frame.get("tasks")
            if type(tasks) is dict:
                known = _GOOD_METRIC_NAMES.issuperset  # the hot path: no call per name
                for task in tasks.values():
                    if type(task) is dict:
                        metrics = task.get("metrics")
                        if type(metrics) is dict and not known(metrics):
                            task["metrics"] = self.values(metrics, "task metrics")
        return frame

    def samples_of(self, frame: dict) -> dict:
        """The names of a frame's samples (its `metrics`, an anomaly's evidence) checked in
        place: where a plug-in's extra metrics enter a frame a stage writes."""
        if "metrics" in frame:
            frame["metrics"] = self.samples(frame["metrics"], "metrics")
        if frame.get("kind") == "anomalies" and type(frame.get("anomalies")) is list:
            for a in frame["anomalies"]:
                if type(a) is dict and "metrics" in a:
                    a["metrics"] = self.samples(a["metrics"], "anomaly metrics")
        return frame


_LABEL_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label_name(name: str) -> str:
    """Orchestrator label keys (`app.kubernetes.io/name`) as Prometheus label names."""
    clean = _LABEL_BAD_CHARS.sub("_", name)
    return clean if clean and not clean[0].isdigit() else "_" + clean
