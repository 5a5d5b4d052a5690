"""Which service level a task publishes, and where: owca-measure's `sli` section and the
tasks' own annotations (Kubernetes) or labels (Mesos).

Kept apart from sli.py, which reads the services, so that owca-measure's configuration
can be checked without importing the HTTP, redis and Prometheus-parsing code.

A task's SLI comes from the first rule of `sli.rules` whose `match` its labels hold,
else, with `sli.annotations` on, from its `owca.io/sli-*` annotations or labels:
owca-discover copies a pod's annotations into labels as `annotation_<key, sanitised>`
and a Mesos task's labels as `<key, sanitised>`, so `owca.io/sli-port` reaches
owca-measure as `annotation_owca_io_sli_port` or `owca_io_sli_port`; both are read.

An annotation names a port, never a host: the host is the task's own address (the
`pod_ip` label discovery gives a pod) or `sli.default_host`, so that a pod cannot make a
root agent fetch another machine's URL.  Only a rule, which the operator writes, may
give a whole URL, and only the configuration names the Prometheus server.
"""
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Dict, List, Literal, Optional, Tuple

ANNOTATION_PREFIX = "owca.io/sli-"
# The label names that key reaches owca-measure under (frames.sanitize_label_name).
_LABEL_PREFIXES = ("annotation_owca_io_sli_", "owca_io_sli_")

SOURCES = ("endpoint", "prometheus", "redis", "wrapper")
KINDS = ("latency", "throughput")
# Seconds per unit of a histogram's bucket bounds, or of a query's answer.
UNITS = {"seconds": 1.0, "milliseconds": 1e-3, "microseconds": 1e-6}
REDIS_STATS = ("histogram", "latencystats")
# The quantiles INFO latencystats publishes by default (latency-tracking-info-percentiles).
LATENCYSTATS_QUANTILES = {0.5: "p50", 0.99: "p99", 0.999: "p99.9"}

_MATCHER = re.compile(
    r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|\Z)')
_METRIC = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_COMMAND = re.compile(r"[a-z][a-z0-9_|-]*\Z")
_TEMPLATE_FIELD = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


class SliSpecError(ValueError):
    """A task's SLI settings that cannot be used; the message says which and why."""


Matcher = Tuple[str, str, str]  # (label, operator, value)


def parse_matchers(text: str) -> List[Matcher]:
    """`handler="/api", code=~"2.."` (the braces optional) as (label, op, value) triples,
    the operators PromQL's: = != =~ !~ (a regex matches the whole value, as in PromQL)."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    out: List[Matcher] = []
    pos = 0
    while pos < len(body.rstrip()):
        m = _MATCHER.match(body, pos)
        if not m or m.end() == pos:
            raise SliSpecError(f'matchers: expected label="value", ... at {body[pos:pos + 40]!r}')
        name, op, raw = m.group(1), m.group(2), m.group(3)
        value = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), raw)
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as e:
                raise SliSpecError(f"matchers: {name}{op}: bad regular expression: {e}") from None
        out.append((name, op, value))
        pos = m.end()
    return out


def matches(labels: Dict[str, str], matchers: List[Matcher]) -> bool:
    for name, op, value in matchers:
        have = labels.get(name, "")
        if op == "=" and have != value or op == "!=" and have == value:
            return False
        if op in ("=~", "!~") and (re.fullmatch(value, have) is None) == (op == "=~"):
            return False
    return True


@dataclass
class SliSpec:
    """What a task's SLI is and where it is read: one rule of the configuration, or the
    task's annotations.  `slo` is in seconds for a latency SLI, in requests per second
    for a throughput one (higher is better)."""
    source: Literal["endpoint", "prometheus", "redis", "wrapper"]
    slo: Optional[float] = None
    kind: Literal["latency", "throughput"] = "latency"
    quantile: float = 0.99
    # The unit of the histogram's bucket bounds (endpoint) or of the query's answer.
    unit: Literal["seconds", "milliseconds", "microseconds"] = "seconds"
    # Fewer requests than this in a cycle: no quantile of it (a p99 of 10 is their max).
    min_requests: int = 20
    # -- endpoint: the task's own /metrics -------------------------------------------
    port: Optional[int] = None
    # The task's label that holds the port, where the orchestrator chose it (over `port`).
    port_label: Optional[str] = None
    path: str = "/metrics"
    # A rule only: the whole URL, with {label} fields of the task (`http://{pod_ip}:9090/m`).
    url: Optional[str] = None
    histogram: Optional[str] = None   # the classic histogram's name, without _bucket
    matchers: str = ""                # its series to sum, PromQL style: handler="/api"
    # -- prometheus: an instant query of the server named by sli.prometheus_url --------
    query: Optional[str] = None       # {label} fields of the task, PromQL-escaped
    load_query: Optional[str] = None  # the request rate, requests per second
    # -- redis: INFO latencystats / LATENCY HISTOGRAM ------------------------------------
    commands: List[str] = field(default_factory=lambda: ["get", "set"])
    redis_stat: Literal["histogram", "latencystats"] = "histogram"

    def __post_init__(self):
        self.matcher_list = parse_matchers(self.matchers)
        if self.source == "wrapper":
            return
        if not isinstance(self.slo, (int, float)) or not math.isfinite(self.slo) \
                or self.slo <= 0:
            raise SliSpecError(f"slo: expected a positive number, got {self.slo!r:.40}")
        if not 0 < self.quantile < 1:
            raise SliSpecError(f"quantile: expected a number between 0 and 1, "
                               f"got {self.quantile!r}")
        if self.min_requests < 1:
            raise SliSpecError("min_requests: expected at least 1 request")
        if self.port is not None and not 0 < self.port < 65536:
            raise SliSpecError(f"port: expected 1..65535, got {self.port!r}")
        if self.source == "endpoint":
            if self.histogram is None or not _METRIC.match(self.histogram):
                raise SliSpecError(f"histogram: expected a metric name, "
                                   f"got {self.histogram!r:.80}")
            if self.url is None and self.port is None and self.port_label is None:
                raise SliSpecError("port: an endpoint source needs the port of its /metrics")
            if not self.path.startswith("/") or any(c in self.path for c in " \r\n\t"):
                raise SliSpecError(f"path: expected a URL path, got {self.path!r:.80}")
            if self.url is not None and not re.match(r"https?://", self.url):
                raise SliSpecError(f"url: expected an http:// or https:// URL, "
                                   f"got {self.url!r:.80}")
        elif self.source == "prometheus":
            if not self.query:
                raise SliSpecError("query: a prometheus source needs a PromQL query")
        elif self.source == "redis":
            if self.port is None and self.port_label is None:
                self.port = 6379
            if not self.commands or not all(_COMMAND.match(c) for c in self.commands):
                raise SliSpecError(f"commands: expected redis command names, "
                                   f"got {self.commands!r:.80}")
            if self.kind != "latency":
                raise SliSpecError("kind: a redis source gives a latency SLI")
            if self.redis_stat == "latencystats" and self.quantile not in LATENCYSTATS_QUANTILES:
                raise SliSpecError(f"quantile: INFO latencystats publishes "
                                   f"{', '.join(map(str, LATENCYSTATS_QUANTILES))}")

    @property
    def seconds_per_unit(self) -> float:
        return UNITS[self.unit]


@dataclass
class SliRule(SliSpec):
    """A rule of the configuration: the tasks whose labels hold all of `match`."""
    match: Dict[str, str] = field(default_factory=dict)


@dataclass
class SliConfig:
    """owca-measure's `sli` section (docs/control.md, "Service levels a service publishes")."""
    rules: List[SliRule] = field(default_factory=list)
    # Read the tasks' owca.io/sli-* annotations (Kubernetes) or labels (Mesos).
    annotations: bool = True
    # The Prometheus server the `prometheus` sources query (its base URL).
    prometheus_url: Optional[str] = None
    # The host of a task that discovery gives no address (`pod_ip`) for.
    default_host: str = "127.0.0.1"
    # Each read ends within this many seconds, answer and parsing included; the cycle
    # waits no longer for all of them together (they run side by side).
    scrape_timeout: float = 2.0
    # An answer longer than this is cut off and gives no SLI.
    max_answer_bytes: int = 4 * 1024 * 1024
    # A task's service is asked at most once in this many seconds (below the cycle:
    # a cycle that comes a little early is no reason to skip a read).
    min_scrape_interval: float = 0.5
    # Reads at the same time, at most.
    parallel: int = 8

    def __post_init__(self):
        if not 0 < self.scrape_timeout <= 60:
            raise ValueError("scrape_timeout: expected seconds, more than 0 and at most 60")
        if self.max_answer_bytes < 1024:
            raise ValueError("max_answer_bytes: expected at least 1024 bytes")
        if self.min_scrape_interval < 0:
            raise ValueError("min_scrape_interval: expected seconds, at least 0")
        if not 1 <= self.parallel <= 256:
            raise ValueError("parallel: expected 1..256 reads at the same time")
        if self.prometheus_url is not None and not re.match(r"https?://", self.prometheus_url):
            raise ValueError("prometheus_url: expected an http:// or https:// URL")
        if any(r.source == "prometheus" for r in self.rules) and not self.prometheus_url:
            raise ValueError("prometheus_url: a rule with source prometheus needs the server")


_SPEC_FIELDS = {f.name for f in fields(SliSpec)} - {"url"}  # no URL from an annotation


def _annotated(labels: Dict[str, str]) -> Dict[str, str]:
    """{spec field: text} of the task's owca.io/sli-* annotations or labels."""
    out = {}
    for name, value in labels.items():
        for prefix in _LABEL_PREFIXES:
            if name.startswith(prefix):
                out[name[len(prefix):]] = value
    return out


def _from_text(key: str, text: str):
    """An annotation's text as the spec field `key` expects it."""
    hint = {f.name: f.type for f in fields(SliSpec)}[key]
    text = text.strip()
    try:
        if key in ("slo", "quantile"):
            return float(text)
        if key in ("port", "min_requests"):
            return int(text)
    except ValueError:
        raise SliSpecError(f"{key}: expected a number, got {text!r:.40}") from None
    if key == "commands":
        return [c.strip().lower() for c in text.split(",") if c.strip()]
    choices = getattr(hint, "__args__", None)
    if "Literal" in str(hint) and choices and text not in choices:
        raise SliSpecError(f"{key}: expected one of {', '.join(choices)}, got {text!r:.40}")
    return text


def spec_from_labels(labels: Dict[str, str]) -> Optional[SliSpec]:
    """The SLI a task's annotations (or Mesos labels) ask for; None without any;
    SliSpecError naming the annotation where they are wrong."""
    given = _annotated(labels)
    if not given:
        return None
    kwargs = {}
    for key, text in given.items():
        name = key.replace("-", "_")
        if name not in _SPEC_FIELDS or name == "match":
            raise SliSpecError(f"{ANNOTATION_PREFIX}{key}: not an SLI setting")
        try:
            kwargs[name] = _from_text(name, text)
        except SliSpecError as e:
            raise SliSpecError(f"{ANNOTATION_PREFIX}{e}") from None
    if "source" not in kwargs:
        raise SliSpecError(f"{ANNOTATION_PREFIX}source: missing (one of {', '.join(SOURCES)})")
    try:
        return SliSpec(**kwargs)
    except SliSpecError as e:
        raise SliSpecError(f"{ANNOTATION_PREFIX}{e}") from None


def spec_for_task(cfg: SliConfig, labels: Dict[str, str]) -> Optional[SliSpec]:
    """The task's SLI: the first rule that matches its labels, else its annotations."""
    for rule in cfg.rules:
        if all(labels.get(k) == v for k, v in rule.match.items()):
            return replace(rule)
    return spec_from_labels(labels) if cfg.annotations else None


def task_port(spec: SliSpec, labels: Dict[str, str]) -> int:
    """The port of the task's own service: from its `port_label`, else `port`."""
    if spec.port_label is not None:
        text = labels.get(spec.port_label, "")
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise SliSpecError(f"port_label: the task's label {spec.port_label!r} is "
                               f"{text!r:.20}, not a port")
        return int(text)
    assert spec.port is not None
    return spec.port


def task_host(cfg: SliConfig, labels: Dict[str, str]) -> str:
    """The address of the task's own service: its pod IP, else the configured host."""
    pod_ip = labels.get("pod_ip", "")
    try:
        address = ipaddress.ip_address(pod_ip)
    except ValueError:
        return cfg.default_host
    return f"[{address}]" if address.version == 6 else str(address)


def fill(template: str, labels: Dict[str, str], escape) -> str:
    """`template` with each {label} replaced by the task's label, through `escape`;
    SliSpecError naming a label the task lacks."""
    def one(m):
        name = m.group(1)
        if name not in labels:
            raise SliSpecError(f"template: the task has no label {name!r}")
        return escape(labels[name])
    return _TEMPLATE_FIELD.sub(one, template)


def promql_string(value: str) -> str:
    """A label value as the inside of a PromQL double-quoted string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
