"""Service levels from where services already publish them: the task's own Prometheus
endpoint, a Prometheus server, redis (sli_config.py says how a task names its source).

Each cycle every task with an SLI source is read side by side (`parallel` threads), each
read bounded by `scrape_timeout` (connect, answer, parsing) and `max_answer_bytes`; the
cycle waits for them no longer than that, so that a hung or huge endpoint costs one
task its SLI, never the cycle.  A read still running from an earlier cycle is not
started again (`hung`).

What a task gets, whatever its source, is what owca-wrap writes for it (docs/workloads.md):
apm_sli (seconds for a latency SLI, requests per second for a throughput one), apm_slo,
apm_sli_normalized (1 at the objective, below 1 broken), apm_throughput_per_second (the
service's own request rate: the load) and apm_report_timestamp_seconds (when the service
was read); they replace a wrapper's values of the same task (OWNED), whose other
figures (apm_latency_p99_seconds, the load generator's view) stay.  No SLI that cycle,
never a made-up one, when the read fails; apm_sli_up is then 0 and apm_sli_missing{reason}
1:

    down              no connection, an HTTP error, a redis error, a malformed answer
    timeout           the read did not end within scrape_timeout
    hung              the read of an earlier cycle is still running
    too_large         the answer was longer than max_answer_bytes
    no_histogram      no series of the histogram matches (or no +Inf bucket, or a
                      command without a histogram)
    layout_changed    a series' bucket bounds differ from the last read's
    counter_reset     a bucket count went down: the service restarted
    too_few_requests  fewer than min_requests requests since the last read
    first_read        nothing to take a difference from yet
    no_value          the Prometheus query answered no single finite number
    rate_limited      read less than min_scrape_interval ago
    bad_spec          the task's annotations are wrong, or it lacks a label that its
                      template or port_label names

The interval's quantile is taken from the bucket counts' differences between two reads,
as Prometheus's `histogram_quantile(q, sum by (le) (rate(h_bucket[...])))` does: per
series the difference of each cumulative bucket, summed by bound; the bucket where the
rank q * count falls, interpolated linearly inside it (the lowest bucket from 0 when its
bound is positive); a rank in the +Inf bucket gives the highest finite bound.  Unlike
rate(), a series whose counts went down gives no SLI (`counter_reset`) rather than a
guess at what it counted before; a series new since the last read is left out of this
interval, as rate() leaves out a series with a single sample.

Only classic histograms: native histograms have no text exposition (prometheus_client's
parser reads the text format and OpenMetrics text, neither of which carries them).
The exposition is parsed with prometheus_client's parser, on the lines of the histogram
only (its family's lines are picked first by name, so that a service's thousand other
metrics cost a string comparison each, not a parse).
"""
import http.client
import json
import logging
import math
import socket
import time
import urllib.parse
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

from owca.core import frames
from owca.measure.sources.base import Cycle, Reading, Source
from owca.measure.sources.sli_config import (LATENCYSTATS_QUANTILES, SliConfig, SliSpec,
                                             SliSpecError, fill, matches, promql_string,
                                             spec_for_task, task_host, task_port)

log = logging.getLogger("owca.sli")

# What this source speaks for in its tasks: a wrapper's values of them are dropped, so
# that a cycle without an SLI from the source is one without an SLI at all.
OWNED = frozenset({"apm_sli", "apm_slo", "apm_sli_normalized", "apm_throughput_per_second",
                   "apm_report_timestamp_seconds"})
REASONS = ("down", "timeout", "hung", "too_large", "no_histogram", "layout_changed",
           "counter_reset", "too_few_requests", "first_read", "no_value", "rate_limited",
           "bad_spec")
ACCEPT = "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"


class NoSli(Exception):
    """This cycle gives the task no SLI; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# -- the interval's quantile from two reads of cumulative buckets -------------------------

SeriesKey = FrozenSet[Tuple[str, str]]
Buckets = Dict[float, float]  # upper bound -> cumulative count (+Inf included)


@dataclass
class Snapshot:
    """One read of a histogram: its series' cumulative buckets, and when it was read."""
    series: Dict[SeriesKey, Buckets]
    monotonic: float
    wall: float


def interval_buckets(prev: Snapshot, cur: Snapshot) -> Buckets:
    """The counts of the interval between two reads, per bound, summed over the series
    present in both; NoSli for a layout change or a counter that went down."""
    total: Buckets = {}
    for key, now in cur.series.items():
        before = prev.series.get(key)
        if before is None:
            continue
        if before.keys() != now.keys():
            raise NoSli("layout_changed", f"bucket bounds {_bounds(before)} became {_bounds(now)}")
        for bound, count in now.items():
            delta = count - before[bound]
            if delta < 0:
                raise NoSli("counter_reset", f"bucket le={bound:g} went from {before[bound]:g} "
                                             f"to {count:g}")
            total[bound] = total.get(bound, 0.0) + delta
    return total


def _bounds(buckets: Buckets) -> str:
    return "[" + ",".join(f"{b:g}" for b in sorted(buckets)) + "]"


def bucket_quantile(q: float, buckets: Buckets) -> float:
    """Prometheus's bucketQuantile on cumulative counts {upper bound: count}."""
    if math.inf not in buckets:
        raise NoSli("no_histogram", "no +Inf bucket")
    bounds = sorted(buckets)
    if len(bounds) < 2:
        raise NoSli("no_histogram", "only the +Inf bucket")
    counts, top = [], 0.0
    for b in bounds:  # cumulative counts never fall (Prometheus's ensureMonotonic)
        top = max(top, buckets[b])
        counts.append(top)
    observations = counts[-1]
    rank = q * observations
    i = next(i for i, c in enumerate(counts) if c >= rank)
    if i == len(bounds) - 1:
        return bounds[-2]
    if i == 0 and bounds[0] <= 0:
        return bounds[0]
    start, below = (0.0, 0.0) if i == 0 else (bounds[i - 1], counts[i - 1])
    inside = counts[i] - below
    return start + (bounds[i] - start) * ((rank - below) / inside)


# -- reading the services, bounded in time and size -----------------------------------------

def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise NoSli("timeout", "no time left")
    return left


def http_get(url: str, deadline: float, max_bytes: int, accept: str) -> Tuple[str, str]:
    """(body, content type) of a GET, within the deadline and size; NoSli otherwise.
    Each socket read waits at most until the deadline, so a server that sends a byte
    at a time is cut off at it all the same."""
    parts = urllib.parse.urlsplit(url)
    conn_class = (http.client.HTTPSConnection if parts.scheme == "https"
                  else http.client.HTTPConnection)
    try:
        conn = conn_class(parts.hostname or "", parts.port, timeout=_remaining(deadline))
    except ValueError as e:
        raise NoSli("down", f"{url}: {e}") from None
    try:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.connect()
        # The connection lets go of its socket when the answer ends with the connection
        # (no Content-Length): the response still reads from it, so it is kept here.
        sock = conn.sock
        conn.request("GET", target, headers={"Accept": accept, "User-Agent": "owca-measure"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise NoSli("down", f"{url}: HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > max_bytes:
            raise NoSli("too_large", f"{url}: {length} bytes, more than {max_bytes}")
        chunks, size = [], 0
        while True:
            sock.settimeout(_remaining(deadline))
            chunk = resp.read1(65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise NoSli("too_large", f"{url}: more than {max_bytes} bytes")
            chunks.append(chunk)
        return (b"".join(chunks).decode("utf-8", "replace"),
                resp.getheader("Content-Type", "") or "")
    except socket.timeout:
        raise NoSli("timeout", f"{url}: no answer within the deadline") from None
    except (OSError, http.client.HTTPException) as e:
        raise NoSli("down", f"{url}: {e}") from None
    finally:
        conn.close()


def histogram_lines(text: str, name: str) -> str:
    """The exposition's lines of the histogram's family: its samples and its TYPE, HELP
    and UNIT lines (which OpenMetrics' parser needs to tell its samples from others')."""
    samples = tuple(name + suffix for suffix in ("_bucket", "_count", "_sum", "_created"))
    comments = tuple(f"# {kind} {name} " for kind in ("TYPE", "HELP", "UNIT"))
    return "\n".join(line for line in text.splitlines()
                     if line.startswith(samples) and _sample_name(line) in samples
                     or line.startswith(comments)) + "\n"


def _sample_name(line: str) -> str:
    end = len(line)
    for sep in ("{", " ", "\t"):
        at = line.find(sep)
        if 0 <= at < end:
            end = at
    return line[:end]


def parse_histogram(text: str, content_type: str, spec: SliSpec, now: float,
                    wall: float) -> Snapshot:
    """The histogram's series matching the spec's matchers, from exposition text."""
    assert spec.histogram is not None
    lines = histogram_lines(text, spec.histogram)
    try:
        if content_type.startswith("application/openmetrics-text"):
            from prometheus_client.openmetrics.parser import text_string_to_metric_families
            families = list(text_string_to_metric_families(lines + "# EOF\n"))
        else:
            from prometheus_client.parser import text_string_to_metric_families as text_families
            families = list(text_families(lines))
    except (ValueError, TypeError, IndexError) as e:
        raise NoSli("down", f"unparsable exposition: {str(e)[:120]}") from None
    series: Dict[SeriesKey, Buckets] = {}
    bucket_name = spec.histogram + "_bucket"
    for family in families:
        for sample in family.samples:
            if sample.name != bucket_name or "le" not in sample.labels:
                continue
            labels = {k: v for k, v in sample.labels.items() if k != "le"}
            if not matches(labels, spec.matcher_list):
                continue
            try:
                bound = float(sample.labels["le"])
            except ValueError:
                raise NoSli("down", f"bucket bound le={sample.labels['le']!r:.40}") from None
            if math.isnan(bound) or not math.isfinite(sample.value):
                raise NoSli("down", "a bucket that is not a number")
            series.setdefault(frozenset(labels.items()), {})[bound] = sample.value
    if not series:
        raise NoSli("no_histogram", f"no series of {spec.histogram}_bucket"
                                    f"{'{' + spec.matchers + '}' if spec.matchers else ''}")
    for buckets in series.values():
        if math.inf not in buckets:
            raise NoSli("no_histogram", f"a series of {spec.histogram} without its +Inf bucket")
    return Snapshot(series, now, wall)


# -- redis: RESP2, just what INFO and LATENCY HISTOGRAM answer ------------------------------

class _Incomplete(Exception):
    pass


def resp_parse(buf: bytes, pos: int = 0):
    """(value, next position) of one RESP2 reply; _Incomplete while more is to come."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos:pos + 1], buf[pos + 1:end]
    if kind == b"+":
        return line.decode(), end + 2
    if kind == b"-":
        raise NoSli("down", f"redis: {line.decode(errors='replace')[:120]}")
    if kind == b":":
        return int(line), end + 2
    if kind == b"$":
        n = int(line)
        if n < 0:
            return None, end + 2
        if len(buf) < end + 2 + n + 2:
            raise _Incomplete
        return buf[end + 2:end + 2 + n], end + 2 + n + 2
    if kind == b"*":
        n = int(line)
        items, at = [], end + 2
        for _ in range(max(n, 0)):
            item, at = resp_parse(buf, at)
            items.append(item)
        return items, at
    raise NoSli("down", f"redis: not a RESP2 reply ({kind!r})")


def redis_command(host: str, port: int, args: List[str], deadline: float, max_bytes: int):
    request = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
    address = host.strip("[]")
    try:
        with socket.create_connection((address, port), timeout=_remaining(deadline)) as sock:
            sock.sendall(request)
            buf = b""
            while True:
                sock.settimeout(_remaining(deadline))
                chunk = sock.recv(65536)
                if not chunk:
                    raise NoSli("down", f"redis {host}:{port}: connection closed mid-answer")
                buf += chunk
                if len(buf) > max_bytes:
                    raise NoSli("too_large", f"redis {host}:{port}: more than {max_bytes} bytes")
                try:
                    return resp_parse(buf)[0]
                except _Incomplete:
                    continue
                except ValueError:
                    raise NoSli("down", f"redis {host}:{port}: malformed answer") from None
    except socket.timeout:
        raise NoSli("timeout", f"redis {host}:{port}: no answer within the deadline") from None
    except OSError as e:
        raise NoSli("down", f"redis {host}:{port}: {e}") from None


def redis_histogram(answer, commands: List[str], now: float, wall: float) -> Snapshot:
    """LATENCY HISTOGRAM's answer as a Snapshot: one series per command, bounds in µs.

    Redis lists only the power-of-two bounds up to its highest non-empty bucket, so the
    layout grows as slower calls come; a bound missing from one read holds the count of
    the next lower bound listed (the counts are cumulative), the same for every read."""
    if not isinstance(answer, list) or len(answer) % 2:
        raise NoSli("down", "redis: LATENCY HISTOGRAM answered no map")
    found = {}
    for name, body in zip(answer[::2], answer[1::2], strict=True):
        if not isinstance(body, list):
            raise NoSli("down", "redis: LATENCY HISTOGRAM answered no map")
        fields_ = dict(zip(body[::2], body[1::2], strict=False))
        calls, hist = fields_.get(b"calls"), fields_.get(b"histogram_usec")
        if not isinstance(calls, int) or not isinstance(hist, list):
            raise NoSli("down", "redis: LATENCY HISTOGRAM without calls and histogram_usec")
        # Redis's bounds are 1024 x 2^k ns in whole µs (1, 2, 4, ... 32, 65, 131, 262,
        # ...): each is taken as the power of two it stands for, so that bounds above
        # 32 µs are not lost between the powers the series are laid out on.
        buckets: Dict[float, float] = {}
        for bound, count in zip(hist[::2], hist[1::2], strict=False):
            exp = max(0, round(math.log2(bound))) if isinstance(bound, int) and bound > 0 \
                else 0
            buckets[float(2 ** exp)] = max(buckets.get(float(2 ** exp), 0.0), float(count))
        # The histogram's own total as +Inf: `calls` is counted apart from the buckets.
        buckets[math.inf] = max(buckets.values(), default=0.0)
        found[name.decode() if isinstance(name, bytes) else str(name)] = buckets
    missing = [c for c in commands if c not in found]
    if len(missing) == len(commands):
        raise NoSli("no_histogram", f"redis: no calls of {', '.join(commands)} yet")
    # Every series on the powers of two up to 2^40 µs, so that layouts never differ.
    series = {}
    for command, buckets in found.items():
        full, last = {}, 0.0
        for exp in range(41):
            bound = float(2 ** exp)
            last = buckets.get(bound, last)
            full[bound] = last
        full[math.inf] = buckets[math.inf]
        series[frozenset({("command", command)})] = full
    return Snapshot(series, now, wall)


def parse_latencystats(info: str, commands: List[str], quantile: float) -> Tuple[float, float]:
    """(the worst of the commands' published quantile in µs, their calls) from
    `INFO latencystats commandstats`; both since the server started (or CONFIG RESETSTAT)."""
    key = LATENCYSTATS_QUANTILES[quantile]
    worst, calls, seen = None, 0.0, False
    for line in info.splitlines():
        name, _, values = line.partition(":")
        for command in commands:
            if name == f"latency_percentiles_usec_{command}":
                pairs = dict(p.split("=", 1) for p in values.split(",") if "=" in p)
                if key in pairs:
                    value = float(pairs[key])
                    worst = value if worst is None else max(worst, value)
                    seen = True
            elif name == f"cmdstat_{command}":
                pairs = dict(p.split("=", 1) for p in values.split(",") if "=" in p)
                calls += float(pairs.get("calls", 0))
    if not seen or worst is None:
        raise NoSli("no_histogram", f"redis: no latencystats of {', '.join(commands)}")
    return worst, calls


# -- a task's read, in a worker thread --------------------------------------------------

@dataclass
class Result:
    """What one read gave: a histogram snapshot (endpoint, redis histogram), or an SLI
    and load as the service published them (prometheus, latencystats)."""
    wall: float
    snapshot: Optional[Snapshot] = None
    sli: Optional[float] = None          # in the spec's unit
    load: Optional[float] = None         # requests per second, already a rate
    calls: Optional[float] = None        # cumulative calls, for a rate of two reads
    monotonic: float = 0.0


@dataclass
class TaskState:
    spec: Optional[SliSpec]
    labels: Dict[str, str]
    spec_error: Optional[str] = None
    previous: Optional[Result] = None
    running: Optional[Future] = None
    last_start: float = -math.inf
    failures: Dict[str, int] = field(default_factory=dict)
    last_reason: Optional[str] = None


class SliSource(Source):
    """Service levels from the services' own metrics (module docstring).

    Failure as a whole: every task with an SLI source got none this cycle for a reason
    of its service (down, timeout, hung, too_large, no_histogram, no_value); too few
    requests, a first read, a rate limit and a task's bad annotations are the source
    working.
    """

    name = "sli"

    def __init__(self, cfg, paths):
        self.cfg: SliConfig = cfg.sli
        self.tasks: Dict[str, TaskState] = {}
        self.pool = ThreadPoolExecutor(max_workers=self.cfg.parallel,
                                       thread_name_prefix="owca-sli")
        self.reads_total = 0
        self.failures_total: Dict[str, int] = {}

    # -- the task set ---------------------------------------------------------------------
    def update(self, tasks: Dict[str, dict]) -> None:
        kept = {}
        for task_id, task in tasks.items():
            labels = task.get("labels", {})
            state = self.tasks.get(task_id)
            if state is not None and state.labels == labels:
                kept[task_id] = state
                continue
            try:
                spec, error = spec_for_task(self.cfg, labels), None
            except (SliSpecError, ValueError, TypeError) as e:
                spec, error = None, str(e)
                log.error("task %s: SLI: %s (no SLI for it)", task_id, error)
            if spec is not None and spec.source == "wrapper":
                spec = None   # the wrapper's files, read by the apm source as ever
            if spec is None and error is None:
                continue
            new = TaskState(spec, dict(labels), error)
            if state is not None and state.spec == spec:
                new.previous, new.running, new.failures = (state.previous, state.running,
                                                          state.failures)
            kept[task_id] = new
        self.tasks = kept

    # -- the cycle ----------------------------------------------------------------------
    def read(self, cycle: Cycle) -> Reading:
        now = time.monotonic()
        deadline = now + self.cfg.scrape_timeout
        started: Dict[str, Future] = {}
        outcome: Dict[str, object] = {}
        for task_id, state in self.tasks.items():
            if state.spec is None:
                outcome[task_id] = NoSli("bad_spec", state.spec_error or "")
            elif state.running is not None and not state.running.done():
                outcome[task_id] = NoSli("hung", "the last read is still running")
            elif now - state.last_start < self.cfg.min_scrape_interval:
                outcome[task_id] = NoSli("rate_limited")
            else:
                state.last_start = now
                state.running = started[task_id] = self.pool.submit(
                    self._read_one, state.spec, state.labels, deadline)
        if started:
            # The reads end by the deadline themselves; the margin is for the thread's
            # last steps after it, never the wait for a read that overruns.
            wait_futures(list(started.values()), timeout=self.cfg.scrape_timeout + 0.25)
        self.reads_total += len(started)
        for task_id, fut in started.items():
            if not fut.done():
                outcome[task_id] = NoSli("timeout", "the read overran its deadline")
                continue
            try:
                outcome[task_id] = fut.result()
            except NoSli as e:
                outcome[task_id] = e
            except SliSpecError as e:   # a label its template or port_label names
                outcome[task_id] = NoSli("bad_spec", str(e))
            except Exception as e:  # a bug of this module must not end owca-measure
                log.exception("task %s: SLI read failed", task_id)
                outcome[task_id] = NoSli("down", f"{type(e).__name__}: {e}")
        tasks: Dict[str, dict] = {}
        service_failures = 0
        for task_id, result in outcome.items():
            state = self.tasks[task_id]
            metrics = tasks[task_id] = {}
            if isinstance(result, Result):
                try:
                    self._metrics(state, result, metrics)
                except NoSli as e:
                    result = e
            if isinstance(result, NoSli):
                self._missing(task_id, state, result, metrics)
                service_failures += result.reason in ("down", "timeout", "hung", "too_large",
                                                      "no_histogram", "no_value")
            else:
                state.last_reason = None
        measured = [s for s in self.tasks.values() if s.spec is not None]
        ok = not measured or service_failures < len(measured)
        return Reading(tasks=tasks, samples=self._samples(cycle.labels), ok=ok,
                       replaces=OWNED)

    def _read_one(self, spec: SliSpec, labels: Dict[str, str], deadline: float) -> Result:
        """One task's read, in a worker thread: only the spec, labels and the deadline
        go in, a Result or NoSli comes out."""
        if time.monotonic() >= deadline:
            raise NoSli("timeout", "waited past the deadline for a free reader")
        wall, mono = time.time(), time.monotonic()
        cap = self.cfg.max_answer_bytes
        host = task_host(self.cfg, labels)
        if spec.source == "endpoint":
            url = (fill(spec.url, labels, urllib.parse.quote) if spec.url
                   else f"http://{host}:{task_port(spec, labels)}{spec.path}")
            text, content_type = http_get(url, deadline, cap, ACCEPT)
            _remaining(deadline)
            return Result(wall, snapshot=parse_histogram(text, content_type, spec, mono, wall),
                          monotonic=mono)
        if spec.source == "prometheus":
            assert spec.query is not None
            sli = self._query(fill(spec.query, labels, promql_string), deadline)
            load = (self._query(fill(spec.load_query, labels, promql_string), deadline)
                    if spec.load_query else None)
            return Result(wall, sli=sli, load=load, monotonic=mono)
        port = task_port(spec, labels)
        if spec.redis_stat == "latencystats":
            info = redis_command(host, port, ["INFO", "latencystats", "commandstats"],
                                 deadline, cap)
            value, calls = parse_latencystats((info or b"").decode(errors="replace"),
                                              spec.commands, spec.quantile)
            return Result(wall, sli=value * 1e-6, calls=calls, monotonic=mono)
        answer = redis_command(host, port, ["LATENCY", "HISTOGRAM", *spec.commands],
                               deadline, cap)
        return Result(wall, snapshot=redis_histogram(answer, spec.commands, mono, wall),
                      monotonic=mono)

    def _query(self, query: str, deadline: float) -> float:
        assert self.cfg.prometheus_url is not None
        url = (self.cfg.prometheus_url.rstrip("/") + "/api/v1/query?"
               + urllib.parse.urlencode({"query": query}))
        text, _ = http_get(url, deadline, self.cfg.max_answer_bytes, "application/json")
        try:
            answer = json.loads(text)
            data = answer["data"]
            result = data["result"]
            if data["resultType"] == "scalar":
                value = result[1]
            elif data["resultType"] == "vector" and len(result) == 1:
                value = result[0]["value"][1]
            else:
                raise NoSli("no_value", f"query {query!r:.80}: {len(result)} series, not one")
            number = float(value)
        except (ValueError, KeyError, TypeError, IndexError):
            raise NoSli("down", f"query {query!r:.80}: not a Prometheus answer") from None
        if not math.isfinite(number):
            raise NoSli("no_value", f"query {query!r:.80}: {value}")
        return number

    # -- a read's figures ------------------------------------------------------------------
    def _metrics(self, state: TaskState, result: Result, out: dict) -> None:
        spec = state.spec
        assert spec is not None
        previous, state.previous = state.previous, result
        out["apm_slo"] = spec.slo
        out["apm_report_timestamp_seconds"] = round(result.wall, 3)
        sli: Optional[float]
        load: Optional[float]
        if result.snapshot is not None:
            sli, load = self._from_histograms(spec, previous, result)
        else:
            sli, load = result.sli, result.load
            if result.calls is not None:
                if previous is None or previous.calls is None:
                    raise NoSli("first_read", "no earlier read to take the rate from")
                if result.calls < previous.calls:
                    raise NoSli("counter_reset", "redis calls went down")
                load = (result.calls - previous.calls) / max(
                    result.monotonic - previous.monotonic, 1e-9)
            if sli is not None and spec.kind == "latency":
                sli *= spec.seconds_per_unit if spec.source == "prometheus" else 1.0
        if load is not None:
            out["apm_throughput_per_second"] = round(load, 6)
        if spec.kind == "throughput":
            sli = load if result.snapshot is not None else sli
        if sli is None or not math.isfinite(sli):
            raise NoSli("no_value", "no SLI in the answer")
        assert spec.slo is not None
        out["apm_sli"] = sli
        if spec.kind == "throughput":
            out["apm_sli_normalized"] = sli / spec.slo
        else:
            if sli > 0:
                out["apm_sli_normalized"] = spec.slo / sli
        out["apm_sli_up"] = 1

    def _from_histograms(self, spec: SliSpec, previous: Optional[Result],
                         result: Result) -> Tuple[Optional[float], float]:
        if previous is None or previous.snapshot is None:
            raise NoSli("first_read", "no earlier read to take the difference from")
        assert result.snapshot is not None
        buckets = interval_buckets(previous.snapshot, result.snapshot)
        if not buckets:
            raise NoSli("first_read", "no series in both reads yet")
        requests = buckets.get(math.inf, 0.0)
        seconds = max(result.snapshot.monotonic - previous.snapshot.monotonic, 1e-9)
        load = requests / seconds
        if spec.kind == "throughput":
            return None, load
        if requests < spec.min_requests:
            raise _WithLoad(NoSli("too_few_requests",
                                  f"{requests:g} requests, fewer than {spec.min_requests}"), load)
        scale = 1e-6 if spec.source == "redis" else spec.seconds_per_unit
        return bucket_quantile(spec.quantile, buckets) * scale, load

    def _missing(self, task_id: str, state: TaskState, e: NoSli, out: dict) -> None:
        if isinstance(e, _WithLoad):
            out["apm_throughput_per_second"] = round(e.load, 6)
        out.pop("apm_sli", None)
        out.pop("apm_sli_normalized", None)
        out["apm_sli_up"] = 0
        out["apm_sli_missing"] = {e.reason: 1}
        if e.reason not in ("rate_limited", "first_read"):
            state.failures[e.reason] = state.failures.get(e.reason, 0) + 1
            self.failures_total[e.reason] = self.failures_total.get(e.reason, 0) + 1
        if state.failures:
            out["apm_sli_failures_total"] = dict(state.failures)
        if state.last_reason != e.reason:
            state.last_reason = e.reason
            level = logging.INFO if e.reason in ("first_read", "rate_limited",
                                                 "too_few_requests") else logging.WARNING
            log.log(level, "task %s: no SLI: %s", task_id, e)

    def _samples(self, labels: dict) -> list:
        out = [frames.sample("owca_sli_tasks", sum(1 for s in self.tasks.values()
                                                   if s.spec is not None), labels),
               frames.sample("owca_sli_reads_total", self.reads_total, labels, "counter")]
        for reason, n in sorted(self.failures_total.items()):
            out.append(frames.sample("owca_sli_failures_total", n,
                                     dict(labels, reason=reason), "counter"))
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class _WithLoad(NoSli):
    """No SLI, but the interval's request rate is known all the same."""

    def __init__(self, inner: NoSli, load: float):
        super().__init__(inner.reason, inner.detail)
        self.load = load
