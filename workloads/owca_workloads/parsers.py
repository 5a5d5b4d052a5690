"""Parsers that turn a workload's or load generator's output into APM metrics.

A parser is fed the output one line at a time (without its newline) and answers:

    feed(line) -> None                 the line is not one it understands
                  {}                   understood, nothing complete yet (a table's header)
                  {metric: value, ...} the metrics this line completed
                  raises ParseError    recognised, but unusable (a value that is not a number)

Metric names start with `apm_` and carry their unit (`_seconds`, `_per_second`);
values are converted to those units.  A multi-line report (wrk's summary,
SPECjbb's table) is kept in the parser until its last line completes it.  Every
parser here is pure: `parse(name, text)` runs one over a whole text, which is
how they are tested, on literal strings and recorded outputs.

Built-in parsers (owca-wrap --parser NAME):
  regex            lines matched by --regex patterns (named groups name, value, unit)
  wrk              wrk's summary (--latency adds the percentiles)
  redis-benchmark  redis-benchmark --csv rows
  sysbench         sysbench's run summary (events per second, latency percentile)
  specjbb          SPECjbb2015 controller's progress lines and response-time table
  memaslap         memaslap's (memcaslap's) per-period statistics
  owca-sine        owca-sine's step lines (the target rate)
An external parser is named `module:factory`: a callable returning an object
with feed(line).
"""
import importlib
import re
from typing import Callable, Dict, List, Optional

Metrics = Dict[str, float]


class ParseError(ValueError):
    """A line a parser recognised but could not use."""


TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
              "min": 60.0, "h": 3600.0}
SI_UNITS = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}

_NAME_BAD = re.compile(r"[^a-z0-9_]+")


def metric_name(raw: str) -> str:
    """A parsed name as an APM metric name: lower case, [a-z0-9_], `apm_` in front."""
    name = _NAME_BAD.sub("_", raw.strip().lower()).strip("_")
    if not name:
        raise ParseError(f"metric name {raw!r} has no usable characters")
    return name if name.startswith("apm_") else "apm_" + name


def number(text: str, unit: str = "") -> float:
    """`text` as a float scaled by `unit` (a time unit to seconds, or k/M/G)."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ParseError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ParseError(f"{text!r} is not a finite number")
    unit = (unit or "").strip()
    if unit in TIME_UNITS:
        return value * TIME_UNITS[unit]
    if unit in SI_UNITS:
        return value * SI_UNITS[unit]
    raise ParseError(f"unknown unit {unit!r}")


def table_row(what: str, header: List[str], cells: List[str], columns: dict) -> Metrics:
    """A table row as metrics: columns maps a header cell to (metric, unit)."""
    if len(cells) != len(header):
        raise ParseError(f"{what} row has {len(cells)} cells, its header {len(header)}")
    row = dict(zip(header, cells))
    return {name: number(row[column], unit)
            for column, (name, unit) in columns.items() if column in row}


class RegexParser:
    """Lines matched by regular expressions with named groups `name` and `value`
    (and optionally `unit`: ns, us, ms, s, m, h convert to seconds; k, M, G scale).

    Every pattern is tried on every line (re.search); each match gives one metric.
    """

    def __init__(self, patterns: List[str]):
        self.patterns = []
        for p in patterns:
            try:
                compiled = re.compile(p)
            except re.error as e:
                raise ValueError(f"--regex {p!r}: {e}") from None
            missing = {"name", "value"} - set(compiled.groupindex)
            if missing:
                raise ValueError(f"--regex {p!r}: no named group "
                                 f"{' or '.join(sorted(missing))} ((?P<name>...), (?P<value>...))")
            self.patterns.append(compiled)

    def feed(self, line: str) -> Optional[Metrics]:
        out = None
        for pattern in self.patterns:
            for m in pattern.finditer(line):
                unit = m.group("unit") if "unit" in pattern.groupindex else ""
                out = out if out is not None else {}
                out[metric_name(m.group("name"))] = number(m.group("value"), unit)
        return out


# -- wrk ----------------------------------------------------------------------------------

_WRK_NUM = r"([0-9.]+)(ns|us|ms|s|m|h)?"
_WRK_LATENCY = re.compile(r"^\s*Latency\s+" + _WRK_NUM + r"\s+" + _WRK_NUM + r"\s+" + _WRK_NUM)
_WRK_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+" + _WRK_NUM + r"\s*$")
_WRK_REQUESTS = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(ns|us|ms|s|m|h),")
_WRK_SOCKET_ERRORS = re.compile(r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), "
                                r"timeout (\d+)")
_WRK_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)")
_WRK_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)")
_WRK_OTHER = re.compile(r"^(Running \S+ test @|\s+\d+ threads and \d+ connections|"
                        r"\s+Thread Stats|\s+Req/Sec|\s+Latency Distribution|Transfer/sec:)")


class WrkParser:
    """wrk's end-of-run summary; the `Requests/sec:` line completes it."""

    def __init__(self):
        self._reset()

    def _reset(self):
        self.pending: Metrics = {}
        self.errors = 0
        self.runtime = None

    def feed(self, line: str) -> Optional[Metrics]:
        m = _WRK_LATENCY.match(line)
        if m:
            self.pending["apm_latency_avg_seconds"] = number(m.group(1), m.group(2) or "s")
            self.pending["apm_latency_max_seconds"] = number(m.group(5), m.group(6) or "s")
            return {}
        m = _WRK_PERCENTILE.match(line)
        if m:
            self.pending[f"apm_latency_p{m.group(1)}_seconds"] = number(m.group(2),
                                                                         m.group(3) or "s")
            return {}
        m = _WRK_REQUESTS.match(line)
        if m:
            self.runtime = number(m.group(2), m.group(3))
            return {}
        m = _WRK_SOCKET_ERRORS.match(line)
        if m:
            self.errors += sum(int(g) for g in m.groups())
            return {}
        m = _WRK_NON_2XX.match(line)
        if m:
            self.errors += int(m.group(1))
            return {}
        m = _WRK_RATE.match(line)
        if m:
            out = dict(self.pending)
            out["apm_throughput_per_second"] = number(m.group(1))
            if self.runtime:
                out["apm_errors_per_second"] = self.errors / self.runtime
            self._reset()
            return out
        if _WRK_OTHER.match(line):
            return {}
        return None


# -- redis-benchmark --csv ----------------------------------------------------------------

class RedisBenchmarkParser:
    """redis-benchmark --csv: a header row naming the columns, one row per test.

    "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",...
    "GET","83333.34","0.033","0.008","0.031","0.063","0.087","0.199"
    """
    COLUMNS = {"rps": ("apm_throughput_per_second", ""),
               "avg_latency_ms": ("apm_latency_avg_seconds", "ms"),
               "p50_latency_ms": ("apm_latency_p50_seconds", "ms"),
               "p95_latency_ms": ("apm_latency_p95_seconds", "ms"),
               "p99_latency_ms": ("apm_latency_p99_seconds", "ms"),
               "max_latency_ms": ("apm_latency_max_seconds", "ms")}

    def __init__(self):
        self.header: Optional[List[str]] = None

    @staticmethod
    def _cells(line: str) -> Optional[List[str]]:
        line = line.strip()
        if not (line.startswith('"') and line.endswith('"')):
            return None
        return line[1:-1].split('","')

    def feed(self, line: str) -> Optional[Metrics]:
        cells = self._cells(line)
        if cells is None:
            return None
        if cells[0] == "test":
            self.header = cells
            return {}
        if self.header is None:
            raise ParseError("redis-benchmark row before its header")
        return table_row("redis-benchmark", self.header, cells, self.COLUMNS)


# -- sysbench -----------------------------------------------------------------------------

_SYSBENCH_EPS = re.compile(r"^\s*events per second:\s+([0-9.]+)")
_SYSBENCH_AVG = re.compile(r"^\s*avg:\s+([0-9.]+)")
_SYSBENCH_PCT = re.compile(r"^\s*(\d+)th percentile:\s+([0-9.]+)")
_SYSBENCH_MAX = re.compile(r"^\s*max:\s+([0-9.]+)")
_SYSBENCH_END = re.compile(r"^Threads fairness:")


class SysbenchParser:
    """sysbench's run summary: events per second and the latency block (ms)."""

    def __init__(self):
        self.pending: Metrics = {}

    def feed(self, line: str) -> Optional[Metrics]:
        m = _SYSBENCH_EPS.match(line)
        if m:
            self.pending["apm_throughput_per_second"] = number(m.group(1))
            return {}
        m = _SYSBENCH_AVG.match(line)
        if m:
            self.pending["apm_latency_avg_seconds"] = number(m.group(1), "ms")
            return {}
        m = _SYSBENCH_MAX.match(line)
        if m:
            self.pending["apm_latency_max_seconds"] = number(m.group(1), "ms")
            return {}
        m = _SYSBENCH_PCT.match(line)
        if m:
            self.pending[f"apm_latency_p{m.group(1)}_seconds"] = number(m.group(2), "ms")
            return {}
        if _SYSBENCH_END.match(line):
            out, self.pending = self.pending, {}
            return out
        return None


# -- SPECjbb2015 controller ---------------------------------------------------------------

_SPECJBB_PROGRESS = re.compile(r"\(rIR:aIR:PR = (\d+):(\d+):(\d+)\)")
_SPECJBB_HEADER = re.compile(r"^\s*Request,\s+Success,.*\bp99,")
_SPECJBB_ROW = re.compile(r"^\s*TotalPurchase,\s*(.*?),?\s*$")


class SpecjbbParser:
    """SPECjbb2015's controller: the progress line's rates and the TotalPurchase row
    of each "Response times" table (latencies in microseconds)."""
    COLUMNS = {"p50": ("apm_latency_p50_seconds", "us"), "p90": ("apm_latency_p90_seconds", "us"),
               "p95": ("apm_latency_p95_seconds", "us"), "p99": ("apm_latency_p99_seconds", "us"),
               "max": ("apm_latency_max_seconds", "us")}

    def __init__(self):
        self.columns: Optional[List[str]] = None

    def feed(self, line: str) -> Optional[Metrics]:
        m = _SPECJBB_PROGRESS.search(line)
        if m:
            requested, _actual, processed = (number(g) for g in m.groups())
            return {"apm_load_target_rate_per_second": requested,
                    "apm_throughput_per_second": processed}
        if _SPECJBB_HEADER.match(line):
            self.columns = [c.strip() for c in line.strip().rstrip(",").split(",")]
            return {}
        m = _SPECJBB_ROW.match(line)
        if m and self.columns:
            cells = [c.strip() for c in m.group(1).split(",")]
            return table_row("TotalPurchase", self.columns[1:], cells, self.COLUMNS)
        return None


# -- memaslap (memcaslap) ---------------------------------------------------------------

_MEMASLAP_BLOCK = re.compile(r"^(Get|Set|Total) Statistics\s*$")
_MEMASLAP_HEADER = re.compile(r"^Type\s+Time\(s\)\s+Ops")
_MEMASLAP_ROW = re.compile(r"^(Period|Global)\s+\d")


class MemaslapParser:
    """memaslap --stat_freq: the `Period` row of each "Total Statistics" block
    (operations per second, mean and longest latency in microseconds)."""
    COLUMNS = {"TPS(ops/s)": ("apm_throughput_per_second", ""),
               "Avg(us)": ("apm_latency_avg_seconds", "us"),
               "Max(us)": ("apm_latency_max_seconds", "us")}

    def __init__(self):
        self.block = None
        self.header: Optional[List[str]] = None

    def feed(self, line: str) -> Optional[Metrics]:
        m = _MEMASLAP_BLOCK.match(line)
        if m:
            self.block = m.group(1)
            return {}
        if _MEMASLAP_HEADER.match(line):
            self.header = line.split()
            return {}
        m = _MEMASLAP_ROW.match(line)
        if not m:
            return None
        if self.block != "Total" or m.group(1) != "Period" or not self.header:
            return {}
        return table_row("memaslap", self.header, line.split(), self.COLUMNS)


# -- owca-sine ----------------------------------------------------------------------------

_SINE_LINE = re.compile(r"^owca-sine: (.*)$")
_SINE_FIELD = re.compile(r"(\w+)=(\S+)")


class SineParser:
    """owca-sine's step lines; the target comes from the end of a step,
    `owca-sine: step=3 end target_rate_per_second=812.300 ...`, so that it belongs to
    the step whose report the generator has just printed."""

    def feed(self, line: str) -> Optional[Metrics]:
        m = _SINE_LINE.match(line)
        if not m:
            return None
        words = m.group(1).split()
        fields = dict(_SINE_FIELD.findall(m.group(1)))
        if "end" in words and "target_rate_per_second" in fields:
            return {"apm_load_target_rate_per_second": number(fields["target_rate_per_second"])}
        return {}


BUILTIN: Dict[str, Callable[[], object]] = {
    "wrk": WrkParser,
    "redis-benchmark": RedisBenchmarkParser,
    "sysbench": SysbenchParser,
    "specjbb": SpecjbbParser,
    "memaslap": MemaslapParser,
    "owca-sine": SineParser,
}


def make(name: str, regexes: List[str] = ()):
    """A new parser by name: built-in, `regex` (with `regexes`), or `module:factory`."""
    if name == "regex":
        return RegexParser(list(regexes))
    factory = BUILTIN.get(name)
    if factory is None:
        module_name, sep, attr = name.partition(":")
        if not sep:
            raise ValueError(f"--parser {name!r}: not one of regex, {', '.join(BUILTIN)}, "
                             f"nor module:factory")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--parser {name!r}: {e}") from None
    parser = factory()
    if not callable(getattr(parser, "feed", None)):
        raise ValueError(f"--parser {name!r}: {factory!r} made an object without feed(line)")
    return parser


class ParserSet:
    """Several parsers fed the same lines; counts what none understood."""

    def __init__(self, parsers: list):
        self.parsers = parsers
        self.unparsed_lines = 0
        self.parse_errors = 0
        self.last_error: Optional[str] = None

    def feed(self, line: str) -> Metrics:
        out: Metrics = {}
        understood = False
        for parser in self.parsers:
            try:
                got = parser.feed(line)
            except ParseError as e:
                self.parse_errors += 1
                self.last_error = str(e)
                understood = True
                continue
            if got is not None:
                understood = True
                out.update(got)
        if not understood:
            self.unparsed_lines += 1
        return out


def parse(name: str, text: str, regexes: List[str] = ()) -> Metrics:
    """Run parser `name` over a whole text; the latest value of each metric."""
    parsers = ParserSet([make(name, regexes)])
    out: Metrics = {}
    for line in text.splitlines():
        out.update(parsers.feed(line))
    return out
