"""What the Mesos and Kubernetes sources share.

Both ask an agent on this node over HTTP (lib/owca/discover/sources/http.py), turn its answer
into task dicts with a pure `parse_*` function, and check every entry on the
way: an id, a label or a cgroup path that the orchestrator got wrong (or that
someone forged) leaves that entry out, reported in one line and counted; it
never crashes the cycle or reaches a cgroup path outside the orchestrator's
own tree.  An answer whose overall shape is wrong is a DiscoveryError.

A string no frame can carry (a lone surrogate, which JSON's `\\ud800` escape
makes and UTF-8 cannot encode) is caught once, on the tasks a parser makes
(`screen`): it leaves out its task, or only its label.  A resource above
MAX_RESOURCE is clamped to it by the parsers (`clamped`), and reported.
"""
import logging
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

from owca.core import frames
from owca.plugin import TaskSource, source_name
from owca.core.frames import sanitize_label_name
from owca.discover.sources.http import HttpClient, HttpOptions

log = logging.getLogger("owca.discover")

# An id the orchestrator gives that becomes one component of a cgroup path.
PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}\Z")
# The largest resource value a task carries: the largest quantity Kubernetes
# keeps (it caps larger ones to it), the kernel's limit for a cgroup's bytes,
# and an integer every consumer of a frame can hold.  A larger one (16Ei, a sum
# of 8Ei, a Mesos scalar of 1e308 MB) is clamped to it, with a warning.
MAX_RESOURCE = 2 ** 63 - 1
# A code point that is half of a UTF-16 pair: alone, not encodable in UTF-8.
SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidEntry(ValueError):
    """One entry of the answer cannot be used; the message says which and why."""


def need(obj, key: str, kind, where: str):
    """obj[key], which must be of `kind` (a type or tuple); numbers are never bools."""
    if not isinstance(obj, dict):
        raise InvalidEntry(f"{where}: expected an object, got {_short(obj)}")
    if key not in obj:
        raise InvalidEntry(f"{where}: no field {key!r}")
    return check_type(obj[key], kind, f"{where}.{key}")


def optional(obj: dict, key: str, kind, where: str, default=None):
    if obj.get(key) is None:
        return default
    return check_type(obj[key], kind, f"{where}.{key}")


def check_type(value, kind, where: str):
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _tuple(kind)):
        names = "/".join(k.__name__ for k in _tuple(kind))
        raise InvalidEntry(f"{where}: expected {names}, got {_short(value)}")
    return value


def _tuple(kind) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _short(value) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def path_component(value, where: str) -> str:
    """An orchestrator id that goes into a cgroup path: one plain name, no '/' or '..'."""
    if not isinstance(value, str) or not PATH_COMPONENT.match(value):
        raise InvalidEntry(f"{where}: {value!r:.80} cannot be part of a cgroup path")
    return value


def task_id(value, where: str) -> str:
    try:
        frames.check_task_id(value, where)
    except frames.FrameError as e:
        raise InvalidEntry(str(e)) from None
    return value


def add_labels(labels: Dict[str, str], pairs, where: str, prefix: str = "") -> List[str]:
    """Copy orchestrator key/value pairs into `labels`, keys sanitised.

    Returns one line per pair left out: a value that is not a string or too
    long for a label, or a key that sanitises to one already taken.
    """
    skipped = []
    for key, value in pairs:
        if not isinstance(key, str) or not key:
            skipped.append(f"{where}: label key {key!r:.60} is not a string")
            continue
        name = prefix + sanitize_label_name(key)
        if not isinstance(value, str) or len(value) > frames.MAX_LABEL_VALUE_LENGTH:
            skipped.append(f"{where}: label {key!r:.60}: value is not a string of at most "
                           f"{frames.MAX_LABEL_VALUE_LENGTH} characters")
        elif name in labels:
            skipped.append(f"{where}: label {key!r:.60} left out: {name} is already set")
        else:
            labels[name] = value
    return skipped


def clamped(value, where: str, problems: List[str]):
    """`value`, or MAX_RESOURCE with a line in `problems` when it exceeds it."""
    if value > MAX_RESOURCE:
        problems.append(f"{where}: exceeds {MAX_RESOURCE} (2^63 - 1): clamped to it")
        return MAX_RESOURCE
    return value


def screen(tasks: List[dict], source: str, problems: List[str]) -> List[dict]:
    """The tasks whose strings a frame can carry (UTF-8): a task whose id, name or
    cgroup paths hold a lone surrogate is left out, a label that does only loses
    that label; one line in `problems` for each."""
    kept = []
    for task in tasks:
        ident = f"{source}: task {task.get('id')!r:.80}"
        bad = [f"{field} {value!r:.80}" for field, value in (
            ("id", task.get("id")), ("name", task.get("name")),
            ("cgroup_path", task.get("cgroup_path")),
            *(("subcgroup_path", p) for p in task.get("subcgroup_paths", ())))
            if isinstance(value, str) and SURROGATE.search(value)]
        if bad:
            problems.append(f"{ident} left out: {bad[0]} holds a lone surrogate (not UTF-8)")
            continue
        labels = task.get("labels", {})
        for key, value in list(labels.items()):
            if isinstance(value, str) and SURROGATE.search(value):
                problems.append(f"{ident}: label {key!r:.60} left out: its value {value!r:.60} "
                                f"holds a lone surrogate (not UTF-8)")
                del labels[key]
        kept.append(task)
    return kept


class Reporter:
    """One warning per distinct problem while it lasts; every occurrence counted.

    An entry the orchestrator keeps getting wrong is left out every cycle;
    the log says so once (and again once it has been fixed and comes back),
    the counter every time.
    """

    def __init__(self):
        self.current = set()
        self.total = 0

    def cycle(self, problems: List[str]) -> None:
        self.total += len(problems)
        for p in problems:
            if p not in self.current:
                log.warning("%s", p)
        self.current = set(problems)


@dataclass
class OrchestratorSource(HttpOptions, TaskSource):
    """A TaskSource that asks an orchestrator's node agent over HTTP.

    Subclasses define `priority` (a PriorityRule) and `fetch(client, until,
    paths) -> (tasks, problems)`.
    """

    def __post_init__(self):
        super().__post_init__()
        self._client = HttpClient(self, source_name(self))
        self._reporter = Reporter()

    def fetch(self, client: HttpClient, until: float, paths) -> Tuple[List[dict], List[str]]:
        raise NotImplementedError

    def list_tasks(self, paths) -> List[dict]:
        tasks, problems = self.fetch(self._client, self._client.deadline(), paths)
        tasks = screen(tasks, self._client.source, problems)
        self._reporter.cycle(problems)
        # `priority` is a field of each subclass (declared here, it would be a field
        # without a default ahead of HttpOptions' defaulted ones).
        return [self.priority.apply(t) for t in tasks]  # type: ignore[attr-defined]

    def samples(self) -> list:
        return self._client.samples() + [
            frames.sample("owca_orchestrator_invalid_entries_total", self._reporter.total,
                          {"source": self._client.source}, "counter")]
