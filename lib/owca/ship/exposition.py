"""Frames as Prometheus text exposition (format 0.0.4), one block per frame.

Every sample carries the cycle's timestamp in milliseconds.  Labels:
- every sample: `host`;
- task metrics: `task_id`, `task_name` and the task's own labels;
- nested metrics: one label per level, named by the metric's spec;
- anomalies: `anomaly{type, resource, contended_task_id, contending_task_id, uuid} 1`.

Metric names: frames carry OWCA's registered names; here, at the exposition
boundary, each becomes its Prometheus name (owca.core.metrics.exposed_name: a counter
ends in `_total`).  A registered metric has its registered type whatever its
sample says; an unregistered one (a plug-in's) the sample's type and help.

This is owca-ship's hot path (a hundred tasks are a few thousand samples per
cycle): label strings are rendered once and cached, numbers are checked by
exact type, and each sample is one f-string.
"""
from typing import Dict, Iterable, List, Sequence

from owca.core.metrics import REGISTRY, exposed_name, spec_for

CATEGORY_OF_KIND = {"measurements": "metrics", "tasks": "metrics",
                    "anomalies": "anomalies", "allocations": "allocations"}

_CACHE_LIMIT = 100000  # rendered label strings kept; tasks come and go

# frame name -> exposition name of the registered metrics (the hot loop's lookup)
_EXPOSED = {name: spec.exposed_name for name, spec in REGISTRY.items()}


def _exposed(name: str, type_=None) -> str:
    found = _EXPOSED.get(name)
    if found is not None:
        return found
    return exposed_name(name, type_)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def label_string(labels: Dict[str, str]) -> str:
    """`a="x",b="y"` (no braces), in the given order."""
    return ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items())


def family_name(line: str) -> str:
    """The metric a line of exposition text belongs to ('' for other comments)."""
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") else ""
    for i, ch in enumerate(line):
        if ch in "{ \n":
            return line[:i]
    return line


def _series(line: str) -> str:
    """A sample line's name and labels: what makes it one series."""
    end = line.rfind("} ")
    return line[:end + 1] if end >= 0 else line.split(" ", 1)[0]


def merge(texts: Iterable[str]) -> str:
    """Several exposition texts (the cycles of several categories) as one valid text:
    the samples of a metric family that more than one text gives are served together,
    under one HELP and TYPE (the first text's), every series once (the first text's)."""
    families: Dict[str, list] = {}    # name -> [HELP line, TYPE line, sample lines, series]
    for text in texts:
        for line in text.splitlines(keepends=True):
            name = family_name(line)
            if not name:
                continue
            family = families.get(name)
            if family is None:
                family = families[name] = ["", "", [], set()]
            if line[0] == "#":
                slot = 0 if line.startswith("# HELP") else 1
                if not family[slot]:
                    family[slot] = line
                continue
            series = _series(line)
            if series not in family[3]:
                family[3].add(series)
                family[2].append(line)
    out = []
    for help_line, type_line, lines, _ in families.values():
        out.append(help_line)
        out.append(type_line)
        out.extend(lines)
    return "".join(out)


def strip_timestamps(text: str) -> str:
    """Exposition text as rendered here, each sample line ending in a timestamp, without
    the timestamps (for scrapers and textfile collectors, which stamp samples themselves)."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith("#") or not line.strip():
            out.append(line)
        else:
            out.append(line.rstrip("\n").rpartition(" ")[0] + "\n")
    return "".join(out)


class Block:
    """Samples grouped by metric name (the format wants a name's samples together)."""

    def __init__(self, ts_ms: int, level_labels: Dict[tuple, str]):
        self.ts = f" {ts_ms}\n"
        self.lines: Dict[str, List[str]] = {}      # by frame name
        self.exposed: Dict[str, str] = {}          # frame name -> exposition name
        self.types: Dict[str, str] = {}
        self.helps: Dict[str, str] = {}
        self.bad_values = 0
        self._level_labels = level_labels

    def add_value(self, name: str, prefix: str, value, type_=None):
        """`prefix` is the rendered label string shared by the sample's labels."""
        t = type(value)
        if t is int or (t is float and value - value == 0):  # finite numbers, not bools
            lines = self.lines_for(name, type_)
            name = self.exposed[name]
            lines.append(f"{name}{{{prefix}}} {value}{self.ts}" if prefix
                         else f"{name} {value}{self.ts}")
        elif t is dict:
            self._add_nested(name, prefix, value, spec_for(name).levels, 0, type_)
        else:
            self.bad_values += 1

    def _add_nested(self, name, prefix, value: dict, levels, depth, type_):
        level = levels[depth] if depth < len(levels) else f"level{depth + 1}"
        cache = self._level_labels
        lines = None
        ts = self.ts
        exposed = self.exposed.get(name) or _exposed(name, type_)
        for key, sub in value.items():
            label = cache.get((level, key))
            if label is None:
                if len(cache) > _CACHE_LIMIT:
                    cache.clear()
                label = cache[(level, key)] = f'{level}="{escape(str(key))}"'
            inner = f"{prefix},{label}" if prefix else label
            t = type(sub)
            if t is int or (t is float and sub - sub == 0):
                if lines is None:
                    lines = self.lines_for(name, type_)
                lines.append(f"{exposed}{{{inner}}} {sub}{ts}")
            elif t is dict:
                self._add_nested(name, inner, sub, levels, depth + 1, type_)
            else:
                self.bad_values += 1

    def lines_for(self, name: str, type_=None) -> List[str]:
        lines = self.lines.get(name)
        if lines is None:
            lines = self.lines[name] = []
            if type_ and name not in REGISTRY:   # the registry's type is normative
                self.types[name] = type_
            self.exposed[name] = _exposed(name, self.types.get(name))
        return lines

    def add_task_metrics(self, prefix: str, metrics: dict):
        """add_value() for each of a task's metrics, inlined: the hottest loop."""
        ts = self.ts
        lines_of = self.lines
        exposed_of = self.exposed
        for name, value in metrics.items():
            t = type(value)
            if t is int or (t is float and value - value == 0):
                lines = lines_of.get(name)
                if lines is None:
                    lines = self.lines_for(name)
                lines.append(f"{exposed_of[name]}{{{prefix}}} {value}{ts}")
            elif t is dict:
                self._add_nested(name, prefix, value, spec_for(name).levels, 0, None)
            else:
                self.bad_values += 1

    def add_sample(self, sample: dict, host_prefix: str):
        labels = sample.get("labels") or {}
        prefix = f"{host_prefix},{label_string(labels)}" if labels else host_prefix
        name = sample["name"]
        if "help" in sample and name not in REGISTRY:
            self.helps.setdefault(name, sample["help"])
        self.add_value(name, prefix, sample["value"], sample.get("type"))

    def render(self) -> str:
        out = []
        for name, lines in self.lines.items():
            if not lines:
                continue
            spec = spec_for(name)
            exposed = self.exposed[name]
            out.append(f"# HELP {exposed} {escape_help(self.helps.get(name) or spec.help)}\n")
            out.append(f"# TYPE {exposed} {self.types.get(name) or spec.type}\n")
            out.extend(lines)
        return "".join(out)


class Formatter:
    """Turns frames into exposition text; caches each task's rendered labels."""

    def __init__(self):
        self._task_prefixes: Dict[tuple, str] = {}
        self._level_labels: Dict[tuple, str] = {}

    def task_prefix(self, host: str, task_id: str, task: dict) -> str:
        labels = task.get("labels") or {}
        key = (host, task_id, task.get("name"), tuple(labels.items()))
        prefix = self._task_prefixes.get(key)
        if prefix is None:
            if len(self._task_prefixes) > _CACHE_LIMIT:
                self._task_prefixes.clear()
            ordered = {"host": host, "task_id": task_id, "task_name": task.get("name", task_id)}
            for k, v in labels.items():
                ordered.setdefault(k, v)
            prefix = self._task_prefixes[key] = label_string(ordered)
        return prefix

    def format(self, frame: dict, extra_samples: Sequence[dict] = ()) -> Block:
        block = Block(int(round(frame["ts"] * 1000)), self._level_labels)
        host = frame["host"]
        host_prefix = label_string({"host": host})
        kind = frame["kind"]
        add = block.add_value
        if kind == "measurements":
            for name, value in frame["platform"].items():
                add(name, host_prefix, value)
            for task_id, task in frame["tasks"].items():
                block.add_task_metrics(self.task_prefix(host, task_id, task),
                                       task.get("metrics", {}))
        elif kind == "anomalies":
            for a in frame["anomalies"]:
                for contending in a["contending_task_ids"] or [""]:
                    labels = {"host": host, "type": a["type"], "resource": a["resource"],
                              "contended_task_id": a["contended_task_id"],
                              "contending_task_id": contending, "uuid": a["uuid"]}
                    add("anomaly", label_string(labels), 1)
                for s in a.get("metrics", []):
                    block.add_sample(s, host_prefix)
        for s in frame.get("metrics", []):
            block.add_sample(s, host_prefix)
        for s in extra_samples:
            block.add_sample(s, host_prefix)
        return block
