"""Frames as Prometheus text exposition (format 0.0.4), one block per frame.

Every sample carries the cycle's timestamp in milliseconds (none when the frame's `ts`
is beyond what the format's int64 milliseconds hold).  Labels:
- every sample: `host`;
- task metrics: `task_id`, `task_name` and the task's own labels;
- nested metrics: one label per level, named by the metric's spec;
- anomalies: `anomaly{type, resource, contended_task_id, contending_task_id, uuid} 1`.

Metric names: frames carry OWCA's registered names in the kernel's units; here, at the
exposition boundary, each becomes its Prometheus name (owca.core.metrics.exposed_name: a
counter ends in `_total`; a registered `exposed` name) and its value the base unit (a
registered `divisor`: USER_HZ ticks into seconds, percent into a ratio).  A registered
metric has its registered type whatever its sample says; an unregistered one (a
plug-in's) the sample's type and help.  A metric renamed in release 0.2 is written
under its old name too, with the frame's value, until release 0.3 (`deprecated`;
Formatter(deprecated_names=False) leaves those out): the old name is an exposition
matter only, so that the endpoint, the files and Kafka's messages all keep it alike.

This module is the one place where what reaches the exposition is made safe: the
frame protocol lets through what Prometheus' parser refuses, and one such sample
would cost the whole scrape or textfile.  Here
- a label name Prometheus reserves (`__name__`, any `__*`) is dropped, and a label
  the exposition sets itself (`host` beside a sample's labels; a nested metric's level
  beside a task's label of that name) has the upstream one renamed `exported_<name>`,
  as Prometheus renames a target's clashing labels (Block.bad_labels, by reason);
- a value that is not a finite number (NaN, a string, a boolean, null, an integer
  beyond float64) is left out (Block.bad_values); an integer beyond int64 is written
  as a float;
- a series given twice in a cycle is shipped once, the first; one with the name and
  labels of owca-ship's own samples is dropped, owca-ship's own wins (Block.dropped);
- two names that the exposition renames to one (`x` counter and `x_total`) are one
  family, under the first one's HELP and TYPE;
- a `ts` beyond int64 milliseconds leaves the block's samples without a timestamp
  (Block.bad_timestamp);
- a lone surrogate (JSON lets `\\ud800` through) becomes `?`, so that the text encodes.

This is owca-ship's hot path (a hundred tasks are a few thousand samples per
cycle): label strings are rendered once and cached, numbers are checked by
exact type, and each sample is one f-string; what repairs costs more is done only
for the families that can need it.
"""
import collections
from typing import (Counter, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence,
                    Tuple)

from owca.core.metrics import DEPRECATED_UNTIL, REGISTRY, exposed_name, spec_for

CATEGORY_OF_KIND = {"measurements": "metrics", "tasks": "metrics",
                    "anomalies": "anomalies", "allocations": "allocations"}

_CACHE_LIMIT = 100000  # rendered label strings kept; tasks come and go

# Integers at or beyond this are written as floats: an exposition value is a float64,
# and a 400-digit integer is text no parser takes.
_BIG = 2 ** 63
# A timestamp is an int64 of milliseconds (a float's range below 2**63 is exact enough).
_MAX_MS = 2.0 ** 63

# Block.bad_labels reasons, Block.dropped reasons.
RESERVED, CLASHING = "reserved", "clashing"
DUPLICATE, FORGED = "duplicate", "forged"

# frame name -> exposition name of the registered metrics (the hot loop's lookup)
_EXPOSED = {name: spec.exposed_name for name, spec in REGISTRY.items()}
# frame name -> what its frame values are divided by in the exposition
_DIVISORS = {name: spec.divisor for name, spec in REGISTRY.items() if spec.divisor != 1}
# frame name -> (deprecated exposition name, its HELP)
_DEPRECATED = {name: (spec.deprecated,
                      "Deprecated" + (f", in {spec.frame_unit}" if spec.frame_unit else "")
                      + f": use {spec.exposed_name}"
                      + (f" (in {spec.unit})" if spec.frame_unit else "")
                      + f"; removed in release {DEPRECATED_UNTIL}. {spec.help}")
               for name, spec in REGISTRY.items() if spec.deprecated}


def _exposed(name: str, type_=None) -> str:
    found = _EXPOSED.get(name)
    if found is not None:
        return found
    return exposed_name(name, type_)


def divided(value, divisor):
    """A frame value in the exposition's unit: each number of it divided by `divisor`
    (None for an integer no float holds); anything else as it is, to be counted bad."""
    t = type(value)
    if t is int or t is float:
        try:
            return value / divisor
        except OverflowError:
            return None
    if t is dict:
        return {k: divided(v, divisor) for k, v in value.items()}
    return value


def _undivided(text: str, divisor) -> str:
    """An exposition value written back in the frame's unit: 15 significant digits undo
    the division's rounding (2493.03 * 100 is 249302.99999999997; the frame had 249303)."""
    value = float(f"{float(text) * divisor:.15g}")
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)


def _alias_line(line: str, exposed: str, old: str, divisor) -> str:
    """A sample line of `exposed` as the deprecated name `old` writes it."""
    rest = line[len(exposed):]
    if divisor is None:
        return old + rest
    end = rest.rfind("} ")
    start = end + 2 if end >= 0 else 1
    stop = rest.find(" ", start)
    if stop < 0:
        stop = len(rest) - 1     # the newline
    return f"{old}{rest[:start]}{_undivided(rest[start:stop], divisor)}{rest[stop:]}"


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def label_string(labels: Dict[str, str]) -> str:
    """`a="x",b="y"` (no braces), in the given order."""
    return ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items())


def encodable(text: str) -> str:
    """`text` with any lone surrogate (which UTF-8 cannot carry) replaced by `?`."""
    if text.isascii():
        return text
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode()


def timestamp_ms(ts) -> Optional[int]:
    """A frame's `ts` (seconds) as the exposition's milliseconds; None when an int64
    cannot hold it (1e300, or seconds mistaken for milliseconds: 9.3e15)."""
    ms = ts * 1000
    if not -_MAX_MS < ms < _MAX_MS:   # NaN and infinities too
        return None
    return int(round(ms))


def _huge(value: int) -> Optional[str]:
    """An integer beyond int64 as float text; None beyond float64 (no finite value)."""
    try:
        return repr(float(value))
    except OverflowError:
        return None


def _has_label(prefix: str, name: str) -> bool:
    """Whether a rendered label string has a label `name` (a value's own `,x="` has its
    quote escaped, so only a label can match)."""
    return prefix.startswith(f'{name}="') or f',{name}="' in prefix


def _exported(name: str, taken) -> str:
    """The name a clashing upstream label gets: exported_<name>, as Prometheus does."""
    name = "exported_" + name
    while taken(name):
        name = "exported_" + name
    return name


def clean_labels(labels: Dict[str, str], own: Tuple[str, ...]) -> Tuple[Dict[str, str], int, int]:
    """(labels, reserved, clashing): the labels without the names Prometheus reserves
    (`__*`), those named like a label of `own` renamed exported_<name>."""
    out: Dict[str, str] = {}
    reserved = clashing = 0
    for k, v in labels.items():
        if k.startswith("__"):
            reserved += 1
            continue
        if k in own:
            clashing += 1
            k = _exported(k, lambda n: n in labels or n in own or n in out)
        out[k] = v
    return out, reserved, clashing


def _plain(labels: Dict[str, str], own: Tuple[str, ...]) -> bool:
    """Whether clean_labels() would leave `labels` as they are (the common case)."""
    for k in labels:
        if k in own or k.startswith("__"):
            return False
    return True


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
    """Exposition text as rendered here without the timestamps (for scrapers and textfile
    collectors, which stamp samples themselves); a line without one is left as it is."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith("#") or not line.strip():
            out.append(line)
            continue
        end = line.rfind("} ")      # values and timestamps have no `}`: the label set's end
        value_at = end + 2 if end >= 0 else line.find(" ") + 1
        if line.find(" ", value_at) < 0:
            out.append(line)        # `name{...} value`: no timestamp
        else:
            out.append(line.rstrip("\n").rpartition(" ")[0] + "\n")
    return "".join(out)


class Block:
    """Samples grouped by metric name (the format wants a name's samples together)."""

    def __init__(self, ts_ms: Optional[int], level_labels: Dict[tuple, str],
                 deprecated_names: bool = True):
        self.ts = "\n" if ts_ms is None else f" {ts_ms}\n"
        self.deprecated_names = deprecated_names
        self.bad_timestamp = ts_ms is None
        self.host = ""
        self.lines: Dict[str, List[str]] = {}      # by frame name
        self.exposed: Dict[str, str] = {}          # frame name -> exposition name
        self.types: Dict[str, str] = {}
        self.helps: Dict[str, str] = {}
        self.bad_values = 0
        self.bad_labels: Counter[str] = collections.Counter()   # reason -> labels
        self.dropped: Counter[str] = collections.Counter()      # reason -> samples
        self.examples: Dict[str, str] = {}         # reason -> a metric it happened to
        self._level_labels = level_labels
        self._families: Dict[str, str] = {}        # exposition name -> its first frame name
        self._check: Dict[str, None] = {}          # families whose series may repeat
        self._own_from: Dict[str, int] = {}        # family -> index of owca-ship's own lines

    def add_value(self, name: str, prefix: str, value, type_=None):
        """`prefix` is the rendered label string shared by the sample's labels."""
        t = type(value)
        if t is int or (t is float and value - value == 0):  # finite numbers, not bools
            if t is int and not -_BIG < value < _BIG:
                value = _huge(value)
                if value is None:
                    self.bad_values += 1
                    return
            lines = self.lines_for(name, type_)
            name = self.exposed[name]
            lines.append(f"{name}{{{prefix}}} {value}{self.ts}" if prefix
                         else f"{name} {value}{self.ts}")
        elif t is dict:
            self._add_nested(name, prefix, value, spec_for(name).levels, 0, type_)
        else:
            self.bad_values += 1

    def _add_nested(self, name, prefix, value: dict, levels, depth, type_, names=None):
        """`names`: the label names of `prefix` where known (a task's), else None."""
        level = levels[depth] if depth < len(levels) else f"level{depth + 1}"
        if (level in names) if names is not None else _has_label(prefix, level):
            prefix = self._rename_label(prefix, level, name)   # a task's label: renamed
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
            if (t is float and sub - sub == 0) or (t is int and -_BIG < sub < _BIG):
                if lines is None:
                    lines = self.lines_for(name, type_)
                lines.append(f"{exposed}{{{inner}}} {sub}{ts}")
            elif t is dict:
                self._add_nested(name, inner, sub, levels, depth + 1, type_, names)
            else:   # not a number, or an integer written as a float
                self.add_value(name, inner, sub, type_)

    def _rename_label(self, prefix: str, label: str, metric: str) -> str:
        """`prefix` with its label `label` renamed exported_<label>."""
        new = _exported(label, lambda n: _has_label(prefix, n))
        if prefix.startswith(f'{label}="'):
            prefix = new + prefix[len(label):]
        else:
            prefix = prefix.replace(f',{label}="', f',{new}="', 1)
        self.note_labels(CLASHING, 1, metric)
        return prefix

    def note_labels(self, reason: str, count: int, metric: str):
        self.bad_labels[reason] += count
        self.examples.setdefault(reason, metric)

    def lines_for(self, name: str, type_=None) -> List[str]:
        lines = self.lines.get(name)
        if lines is None:
            if type_ and name not in REGISTRY:   # the registry's type is normative
                self.types[name] = type_
            exposed = self.exposed[name] = _exposed(name, self.types.get(name))
            first = self._families.get(exposed)
            if first is None:
                self._families[exposed] = name
                lines = self.lines[name] = []
            else:   # two names, one family (a plug-in's `x_total` beside a counter `x`)
                lines = self.lines[name] = self.lines[first]
                self._check[exposed] = None
        return lines

    def add_task_metrics(self, prefix: str, metrics: dict, names=None):
        """add_value() for each of a task's metrics, inlined: the hottest loop.  `names`:
        the label names of `prefix`, where known."""
        ts = self.ts
        lines_of = self.lines
        exposed_of = self.exposed
        divisors = _DIVISORS
        for name, value in metrics.items():
            if name in divisors:
                value = divided(value, divisors[name])
            t = type(value)
            if (t is float and value - value == 0) or (t is int and -_BIG < value < _BIG):
                lines = lines_of.get(name)
                if lines is None:
                    lines = self.lines_for(name)
                lines.append(f"{exposed_of[name]}{{{prefix}}} {value}{ts}")
            elif t is dict:
                self._add_nested(name, prefix, value, spec_for(name).levels, 0, None, names)
            else:   # not a number, or an integer written as a float
                self.add_value(name, prefix, value)

    def add_sample(self, sample: dict, host_prefix: str, own: bool = False):
        """A sample of a frame's `metrics` (an anomaly's), or with `own`, one of owca-ship's
        own samples; these come last, and win over an upstream one of the same series."""
        name = sample["name"]
        labels = sample.get("labels")
        if labels:
            if not _plain(labels, _HOST):
                labels, reserved, clashing = clean_labels(labels, _HOST)
                if reserved:
                    self.note_labels(RESERVED, reserved, name)
                if clashing:
                    self.note_labels(CLASHING, clashing, name)
            prefix = f"{host_prefix},{label_string(labels)}" if labels else host_prefix
        else:
            prefix = host_prefix
        help_ = sample.get("help")
        if type(help_) is str and name not in REGISTRY:
            self.helps.setdefault(name, help_)
        type_ = sample.get("type")
        exposed = self.exposed.get(name) or _exposed(name, type_)
        if own and exposed not in self._own_from:
            first = self._families.get(exposed)
            self._own_from[exposed] = len(self.lines[first]) if first else 0
        self._check[exposed] = None
        value = sample["value"]
        if name in _DIVISORS:
            value = divided(value, _DIVISORS[name])
        self.add_value(name, prefix, value, type_)

    def may_repeat(self, name: str):
        """Have finish() check the series of `name`'s family."""
        exposed = self.exposed.get(name)
        if exposed is not None:
            self._check[exposed] = None

    def finish(self, keep_own: bool = True):
        """Each series once: an upstream sample of owca-ship's own series dropped, a
        repeated one dropped (the first kept); owca-ship's own left out unless `keep_own`."""
        for exposed in self._check:
            first = self._families.get(exposed)
            if first is None:
                continue        # its value was left out
            lines = self.lines[first]
            start = self._own_from.get(exposed, len(lines))
            own = {_series(line) for line in lines[start:]}
            seen = set()
            kept = []
            for line in lines[:start]:
                series = _series(line)
                reason = FORGED if series in own else DUPLICATE if series in seen else None
                if reason is None:
                    seen.add(series)
                    kept.append(line)
                else:
                    self.dropped[reason] += 1
                    self.examples.setdefault(reason, exposed)
            if len(kept) < start:
                lines[:start] = kept
                start = len(kept)
            if not keep_own:
                del lines[start:]

    def render(self) -> str:
        out = []
        for name in self._families.values():
            lines = self.lines[name]
            if not lines:
                continue
            spec = spec_for(name)
            exposed = self.exposed[name]
            out.append(f"# HELP {exposed} {escape_help(self.helps.get(name) or spec.help)}\n")
            out.append(f"# TYPE {exposed} {self.types.get(name) or spec.type}\n")
            out.extend(lines)
            if self.deprecated_names and name in _DEPRECATED:
                old, help_ = _DEPRECATED[name]
                if old in self._families:   # a plug-in's metric of that name: it keeps it
                    continue
                divisor = _DIVISORS.get(name)
                out.append(f"# HELP {old} {escape_help(help_)}\n")
                out.append(f"# TYPE {old} {spec.type}\n")
                out.extend(_alias_line(line, exposed, old, divisor) for line in lines)
        return encodable("".join(out))


_HOST = ("host",)


class TaskLabels(NamedTuple):
    prefix: str                 # rendered: host, task_id, task_name, the task's labels
    reserved: int               # label names Prometheus reserves, left out
    names: FrozenSet[str]       # the label names in `prefix`


class Formatter:
    """Turns frames into exposition text; caches each task's rendered labels."""

    def __init__(self, deprecated_names: bool = True):
        self.deprecated_names = deprecated_names
        # (host, task id, name, labels) -> TaskLabels
        self._task_prefixes: Dict[tuple, TaskLabels] = {}
        self._level_labels: Dict[tuple, str] = {}

    def task_prefix(self, host: str, task_id: str, task: dict) -> TaskLabels:
        """The task's labels, rendered."""
        labels = task.get("labels") or {}
        key = (host, task_id, task.get("name"), tuple(labels.items()))
        found = self._task_prefixes.get(key)
        if found is None:
            if len(self._task_prefixes) > _CACHE_LIMIT:
                self._task_prefixes.clear()
            ordered = {"host": host, "task_id": task_id, "task_name": task.get("name", task_id)}
            reserved = 0
            for k, v in labels.items():
                if k.startswith("__"):
                    reserved += 1
                else:
                    ordered.setdefault(k, v)   # ours win: the task's own host is left out
            found = self._task_prefixes[key] = TaskLabels(label_string(ordered), reserved,
                                                          frozenset(ordered))
        return found

    def format(self, frame: dict, own_samples: Sequence[dict] = (),
               with_own: bool = True) -> Block:
        """The frame's block, with owca-ship's own samples unless not `with_own`; an
        upstream sample of one of their series is left out either way."""
        block = Block(timestamp_ms(frame["ts"]), self._level_labels, self.deprecated_names)
        host = block.host = encodable(frame["host"])
        host_prefix = label_string({"host": host})
        kind = frame["kind"]
        add = block.add_value
        if kind == "measurements":
            for name, value in frame["platform"].items():
                if name in _DIVISORS:
                    value = divided(value, _DIVISORS[name])
                add(name, host_prefix, value)
            for task_id, task in frame["tasks"].items():
                own = self.task_prefix(host, task_id, task)
                if own.reserved:
                    block.note_labels(RESERVED, own.reserved, f"the labels of task {task_id}")
                block.add_task_metrics(own.prefix, task.get("metrics", {}), own.names)
        elif kind == "anomalies":
            for a in frame["anomalies"]:
                for contending in a["contending_task_ids"] or [""]:
                    labels = {"host": host, "type": a["type"], "resource": a["resource"],
                              "contended_task_id": a["contended_task_id"],
                              "contending_task_id": contending, "uuid": a["uuid"]}
                    add("anomaly", label_string(labels), 1)
                block.may_repeat("anomaly")     # a contending task named twice
                for s in a.get("metrics", []):
                    block.add_sample(s, host_prefix)
        for s in frame.get("metrics", []):
            block.add_sample(s, host_prefix)
        for s in own_samples:
            block.add_sample(s, host_prefix, own=True)
        block.finish(keep_own=with_own)
        return block
