"""Frames as Prometheus text exposition (format 0.0.4), one block per frame.

Every sample carries the cycle's timestamp in milliseconds.  Labels:
- every sample: `host`;
- task metrics: `task_id`, `task_name` and the task's own labels;
- nested metrics: one label per level, named by the metric's spec;
- anomalies: `anomaly{type, resource, contended_task_id, contending_task_id, uuid} 1`.
"""
from typing import Dict, List

from owca.metrics import spec_for

CATEGORY_OF_KIND = {"measurements": "metrics", "tasks": "metrics",
                    "anomalies": "anomalies", "allocations": "allocations"}


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def label_string(labels: Dict[str, str]) -> str:
    """`a="x",b="y"` (no braces), in the given order."""
    return ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items())


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v \
        and v not in (float("inf"), float("-inf"))


class Block:
    """Samples grouped by metric name, rendered in one go."""

    def __init__(self, ts_ms: int):
        self.ts = f" {ts_ms}\n"
        self.lines: Dict[str, List[str]] = {}
        self.types: Dict[str, str] = {}
        self.bad_values = 0

    def add_value(self, name: str, prefix: str, value, levels=(), type_=None):
        """`prefix` is the rendered label string shared by the sample's labels."""
        if isinstance(value, dict):
            spec = spec_for(name)
            self._add_nested(name, prefix, value, spec.levels, 0, type_)
            return
        if not _is_number(value):
            self.bad_values += 1
            return
        lines = self.lines.get(name)
        if lines is None:
            lines = self.lines[name] = []
            if type_:
                self.types[name] = type_
        lines.append(f"{name}{{{prefix}}} {value}{self.ts}" if prefix else
                     f"{name} {value}{self.ts}")

    def _add_nested(self, name, prefix, value: dict, levels, depth, type_):
        level = levels[depth] if depth < len(levels) else f"level{depth + 1}"
        for key, sub in value.items():
            label = f'{level}="{escape(str(key))}"'
            inner = f"{prefix},{label}" if prefix else label
            if isinstance(sub, dict):
                self._add_nested(name, inner, sub, levels, depth + 1, type_)
            else:
                self.add_value(name, inner, sub, type_=type_)

    def add_sample(self, sample: dict, host_prefix: str):
        labels = sample.get("labels") or {}
        prefix = f"{host_prefix},{label_string(labels)}" if labels else host_prefix
        self.add_value(sample["name"], prefix, sample["value"], type_=sample.get("type"))

    def render(self) -> str:
        out = []
        for name, lines in self.lines.items():
            spec = spec_for(name)
            if spec.help:
                out.append(f"# HELP {name} {spec.help}\n")
            out.append(f"# TYPE {name} {self.types.get(name) or spec.type}\n")
            out.extend(lines)
        return "".join(out)


class Formatter:
    """Turns frames into exposition text; caches each task's rendered labels."""

    def __init__(self):
        self._task_prefixes: Dict[tuple, str] = {}

    def task_prefix(self, host: str, task_id: str, task: dict) -> str:
        labels = task.get("labels") or {}
        key = (host, task_id, task.get("name"), tuple(labels.items()))
        prefix = self._task_prefixes.get(key)
        if prefix is None:
            if len(self._task_prefixes) > 100000:  # tasks come and go: stay bounded
                self._task_prefixes.clear()
            ordered = {"host": host, "task_id": task_id, "task_name": task.get("name", task_id)}
            for k, v in labels.items():
                ordered.setdefault(k, v)
            prefix = self._task_prefixes[key] = label_string(ordered)
        return prefix

    def format(self, frame: dict, extra_samples: List[dict] = ()) -> Block:
        block = Block(int(round(frame["ts"] * 1000)))
        host = frame["host"]
        host_prefix = label_string({"host": host})
        kind = frame["kind"]
        if kind == "measurements":
            for name, value in frame["platform"].items():
                block.add_value(name, host_prefix, value)
            for task_id, task in frame["tasks"].items():
                prefix = self.task_prefix(host, task_id, task)
                for name, value in task.get("metrics", {}).items():
                    block.add_value(name, prefix, value)
        elif kind == "anomalies":
            for a in frame["anomalies"]:
                for contending in a["contending_task_ids"] or [""]:
                    labels = {"host": host, "type": a["type"], "resource": a["resource"],
                              "contended_task_id": a["contended_task_id"],
                              "contending_task_id": contending, "uuid": a["uuid"]}
                    block.add_value("anomaly", label_string(labels), 1)
                for s in a.get("metrics", []):
                    block.add_sample(s, host_prefix)
        for s in frame.get("metrics", []):
            block.add_sample(s, host_prefix)
        for s in extra_samples:
            block.add_sample(s, host_prefix)
        return block
