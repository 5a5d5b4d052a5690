"""Frames in, compact per-host cycles out: what a profile needs and nothing else.

Two inputs carry the same cycles: the frames themselves (JSON lines, docs/protocol.md)
and the Prometheus text exposition that owca-ship's Kafka storage sends, one message per
cycle and category (docs/shipping.md).  Both become cycles of one shape:

    {"host", "seq", "ts", "kind": "measurements",
     "tasks": {task_id: {"workload", "cpu_model", "metrics": {...}}}}
    {"host", "seq", "ts", "kind": "anomalies",
     "anomalies": [[victim_id, [contender_id, ...], uuid, confidence], ...]}

Only the tasks that carry the workload label are kept, with only the metrics the
detector's signals are computed from: a cycle of a hundred tasks is a few hundred bytes.
"""
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from owca.core import frames
from owca.core.metrics import REGISTRY
from owca.detect.detectors.contention import APM_TS_METRIC, KEPT

UNKNOWN_MODEL = "unknown"


@dataclass(frozen=True)
class Options:
    """What a profile is keyed and computed by (recorded in the profile's metadata)."""
    workload_label: str = "workload"
    cpu_model_label: str = "cpu_model"
    sli_metric: str = "apm_sli"
    load_metric: str = "apm_load_target_rate_per_second"
    throughput_metric: str = "apm_throughput_per_second"
    load_bucket_ratio: float = 1.25

    def metrics(self) -> Tuple[str, ...]:
        return tuple(sorted(set(KEPT) | {APM_TS_METRIC, self.sli_metric, self.load_metric,
                                         self.throughput_metric, "task_llc_occupancy_bytes",
                                         "task_scaling_factor_max"}))


def _task(task: dict, opts: Options, wanted) -> Optional[dict]:
    labels = task.get("labels") or {}
    workload = labels.get(opts.workload_label)
    if not isinstance(workload, str) or not workload:
        return None
    model = labels.get(opts.cpu_model_label)
    metrics = task.get("metrics") or {}
    return {"workload": workload,
            "cpu_model": model if isinstance(model, str) and model else UNKNOWN_MODEL,
            "metrics": {k: metrics[k] for k in wanted if k in metrics}}


def _confidence(anomaly: dict) -> Optional[float]:
    for s in anomaly.get("metrics") or ():
        if isinstance(s, dict) and s.get("name") == "contention_confidence":
            value = s.get("value")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
    return None


def from_frame(frame: dict, opts: Options) -> Optional[dict]:
    """The compact cycle of a measurements or anomalies frame; None for other kinds."""
    kind = frame.get("kind")
    head = {"host": str(frame["host"]), "seq": int(frame["seq"]), "ts": float(frame["ts"]),
            "kind": kind}
    if kind == "measurements":
        wanted = opts.metrics()
        tasks = {}
        for tid, task in (frame.get("tasks") or {}).items():
            kept = _task(task, opts, wanted) if isinstance(task, dict) else None
            if kept is not None:
                tasks[tid] = kept
        return {**head, "tasks": tasks}
    if kind == "anomalies":
        found = [[a["contended_task_id"], list(a.get("contending_task_ids") or []),
                  str(a.get("uuid", "")), _confidence(a)]
                 for a in frame.get("anomalies") or () if isinstance(a, dict)
                 and isinstance(a.get("contended_task_id"), str)]
        return {**head, "anomalies": found}
    return None


def from_lines(lines: List[bytes], opts: Options) -> Tuple[List[dict], int]:
    """(cycles, bad lines) of JSON-lines frames; frames of other kinds are passed over."""
    out, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            frame = frames.parse(line)
            frames.check_header(frame)
            cycle = from_frame(frame, opts)
        except (frames.FrameError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        if cycle is not None:
            out.append(cycle)
    return out, bad


# -- the Prometheus text exposition (owca-ship's Kafka messages) ----------------------------

_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: (-?\d+))?\Z')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')
_UNESCAPE = re.compile(r'\\(.)')


def _unescape(value: str) -> str:
    return _UNESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value) \
        if "\\" in value else value


def _labels(text: Optional[str]) -> Dict[str, str]:
    if not text:
        return {}
    return {m.group(1): _unescape(m.group(2)) for m in _LABEL.finditer(text)}


# exposition name -> (frame name, levels) of every registered metric
_BY_EXPOSED = {spec.exposed_name: (name, spec.levels) for name, spec in REGISTRY.items()}


def from_exposition(text: str, host: str, seq: int, ts: float, category: str,
                    opts: Options) -> Optional[dict]:
    """The compact cycle of one owca-ship message (docs/shipping.md): `metrics` messages
    give the tasks' metrics back under their frame names, nested ones rebuilt from their
    level labels; `anomalies` messages give the `anomaly` samples back as anomalies."""
    head = {"host": host, "seq": seq, "ts": ts}
    wanted = set(opts.metrics())
    if category == "metrics":
        tasks: Dict[str, dict] = {}
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            m = _SAMPLE.match(line)
            if m is None:
                continue
            known = _BY_EXPOSED.get(m.group(1))
            if known is None or known[0] not in wanted:
                continue
            labels = _labels(m.group(2))
            tid = labels.get("task_id")
            workload = labels.get(opts.workload_label)
            if tid is None or not workload:
                continue
            try:
                value: float = float(m.group(3))
            except ValueError:
                continue
            task = tasks.setdefault(tid, {
                "workload": workload,
                "cpu_model": labels.get(opts.cpu_model_label) or UNKNOWN_MODEL,
                "metrics": {}})
            name, levels = known
            if not levels:
                task["metrics"][name] = value
                continue
            node = task["metrics"].setdefault(name, {})
            for level in levels[:-1]:
                node = node.setdefault(labels.get(level, ""), {})
            node[labels.get(levels[-1], "")] = value
        return {**head, "kind": "measurements", "tasks": tasks}
    if category == "anomalies":
        found: Dict[tuple, list] = {}
        confidence: Dict[str, float] = {}
        for line in text.splitlines():
            m = _SAMPLE.match(line) if line and line[0] != "#" else None
            if m is None:
                continue
            labels = _labels(m.group(2))
            if m.group(1) == "anomaly" and "contended_task_id" in labels:
                key = (labels["contended_task_id"], labels.get("uuid", ""))
                entry = found.setdefault(key, [key[0], [], key[1], None])
                if labels.get("contending_task_id"):
                    entry[1].append(labels["contending_task_id"])
            elif m.group(1) == "contention_confidence" and "contended_task_id" in labels:
                try:
                    confidence[labels["contended_task_id"]] = float(m.group(3))
                except ValueError:
                    pass
        for entry in found.values():
            entry[3] = confidence.get(entry[0])
        return {**head, "kind": "anomalies", "anomalies": list(found.values())}
    return None
