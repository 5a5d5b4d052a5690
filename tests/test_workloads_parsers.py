"""owca-wrap's parsers, on literal strings and on recorded outputs (workloads/samples/)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
SAMPLES = os.path.join(WORKLOADS, "samples")
sys.path.insert(0, WORKLOADS)

from owca_workloads import parsers  # noqa: E402
from owca_workloads.parsers import ParseError, ParserSet, make, parse  # noqa: E402


def sample(name: str) -> str:
    with open(os.path.join(SAMPLES, name), encoding="utf-8") as f:
        return f.read()


# -- regex --------------------------------------------------------------------------------

def test_regex_named_groups_with_units():
    text = "req lat=3.5ms name=latency_p99_seconds\nrate: throughput_per_second 1.5k\n"
    got = parse("regex", text, [
        r"lat=(?P<value>[0-9.]+)(?P<unit>ms) name=(?P<name>\w+)",
        r"rate: (?P<name>\w+) (?P<value>[0-9.]+)(?P<unit>k)?",
    ])
    assert got == {"apm_latency_p99_seconds": pytest.approx(0.0035),
                   "apm_throughput_per_second": 1500.0}


def test_regex_name_is_sanitised_and_prefixed_once():
    assert parse("regex", "Ops/Sec: 12", [r"(?P<name>Ops/Sec): (?P<value>\d+)"]) == \
        {"apm_ops_sec": 12.0}
    assert parse("regex", "apm_x 1", [r"(?P<name>apm_x) (?P<value>\d)"]) == {"apm_x": 1.0}


def test_regex_without_the_named_groups_is_refused():
    with pytest.raises(ValueError, match="no named group value"):
        make("regex", [r"(?P<name>\w+) \d+"])
    with pytest.raises(ValueError, match="--regex"):
        make("regex", [r"(unclosed"])


def test_a_matched_value_that_is_not_a_number_is_a_parse_error_and_counted():
    ps = ParserSet([make("regex", [r"(?P<name>lat)=(?P<value>\S+)"])])
    assert ps.feed("lat=oops") == {}
    assert ps.feed("nothing here") == {}
    assert ps.feed("lat=2") == {"apm_lat": 2.0}
    assert (ps.parse_errors, ps.unparsed_lines) == (1, 1)
    assert "oops" in ps.last_error


def test_number_units():
    assert parsers.number("250", "us") == pytest.approx(250e-6)
    assert parsers.number("2", "m") == 120.0
    assert parsers.number("3", "G") == 3e9
    for bad in ("nan", "inf", "x"):
        with pytest.raises(ParseError):
            parsers.number(bad)
    with pytest.raises(ParseError, match="unknown unit"):
        parsers.number("1", "parsecs")


# -- wrk ----------------------------------------------------------------------------------

def test_wrk_summary_with_latency_distribution():
    got = parse("wrk", sample("wrk.txt"))
    assert got == {
        "apm_latency_avg_seconds": pytest.approx(241.78e-6),
        "apm_latency_max_seconds": pytest.approx(4.43e-3),
        "apm_latency_p50_seconds": pytest.approx(155e-6),
        "apm_latency_p75_seconds": pytest.approx(190e-6),
        "apm_latency_p90_seconds": pytest.approx(351e-6),
        "apm_latency_p99_seconds": pytest.approx(2.74e-3),
        "apm_throughput_per_second": pytest.approx(759.01),
        "apm_errors_per_second": 0.0,
    }


def test_wrk_error_responses_per_second():
    got = parse("wrk", sample("wrk-errors.txt"))
    assert got["apm_errors_per_second"] == pytest.approx(26000 / 1.01)
    assert "apm_latency_p99_seconds" not in got  # run without --latency


def test_wrk_reports_only_at_its_end_and_each_run_afresh():
    ps = ParserSet([make("wrk")])
    lines = sample("wrk.txt").splitlines()
    for line in lines[:-2]:
        assert ps.feed(line) == {}
    assert ps.feed(lines[-2])["apm_throughput_per_second"] == pytest.approx(759.01)
    # A second run without --latency does not inherit the first run's percentiles.
    got = {}
    for line in sample("wrk-errors.txt").splitlines():
        got.update(ps.feed(line))
    assert "apm_latency_p50_seconds" not in got
    assert ps.unparsed_lines == 0


def test_wrk_socket_errors_count():
    text = ("  10 requests in 2.00s, 1.00KB read\n"
            "  Socket errors: connect 1, read 2, write 0, timeout 3\n"
            "Requests/sec:      5.00\n")
    assert parse("wrk", text)["apm_errors_per_second"] == 3.0


# -- redis-benchmark, sysbench, memaslap, specjbb -----------------------------------------

def test_redis_benchmark_csv_last_row_wins():
    got = parse("redis-benchmark", sample("redis-benchmark.txt"))
    assert got == {"apm_throughput_per_second": pytest.approx(39215.69),
                   "apm_latency_avg_seconds": pytest.approx(40e-6),
                   "apm_latency_p50_seconds": pytest.approx(39e-6),
                   "apm_latency_p95_seconds": pytest.approx(63e-6),
                   "apm_latency_p99_seconds": pytest.approx(79e-6),
                   "apm_latency_max_seconds": pytest.approx(175e-6)}


def test_redis_benchmark_row_without_header_is_a_parse_error():
    ps = ParserSet([make("redis-benchmark")])
    ps.feed('"GET","1.0","2.0"')
    assert ps.parse_errors == 1


def test_sysbench_summary():
    got = parse("sysbench", sample("sysbench-cpu.txt"))
    assert got == {"apm_throughput_per_second": pytest.approx(4736.85),
                   "apm_latency_avg_seconds": pytest.approx(0.21e-3),
                   "apm_latency_max_seconds": pytest.approx(8.25e-3),
                   "apm_latency_p95_seconds": pytest.approx(0.22e-3)}


def test_memaslap_total_period_rows_only():
    ps = ParserSet([make("memaslap")])
    reports = []
    for line in sample("memaslap.txt").splitlines():
        got = ps.feed(parsers_line(line))
        if got:
            reports.append(got)
    assert len(reports) == 2  # one Total block per second of a 2 s run
    assert set(reports[0]) == {"apm_throughput_per_second", "apm_latency_avg_seconds",
                               "apm_latency_max_seconds"}
    assert all(r["apm_throughput_per_second"] > 0 for r in reports)


def parsers_line(line: str) -> str:
    """The wrapper strips terminal escapes before parsing; do as it does."""
    from owca_workloads.wrap import _ANSI_ESCAPE
    return _ANSI_ESCAPE.sub("", line)


def test_specjbb_progress_and_total_purchase_row():
    ps = ParserSet([make("specjbb")])
    reports = [got for got in (ps.feed(line) for line in sample("specjbb.txt").splitlines())
               if got]
    progress = [r for r in reports if "apm_throughput_per_second" in r]
    tables = [r for r in reports if "apm_latency_p99_seconds" in r]
    assert progress[0] == {"apm_load_target_rate_per_second": 0.0,
                           "apm_throughput_per_second": 0.0}  # the ramp-up line
    assert progress[1] == {"apm_load_target_rate_per_second": 1000.0,
                           "apm_throughput_per_second": 968.0}
    assert len(tables) == 3
    assert tables[-1] == {"apm_latency_p50_seconds": pytest.approx(3.3e-3),
                          "apm_latency_p90_seconds": pytest.approx(4.0),
                          "apm_latency_p95_seconds": pytest.approx(5.6),
                          "apm_latency_p99_seconds": pytest.approx(6.8),
                          "apm_latency_max_seconds": pytest.approx(7.3)}
    assert ps.parse_errors == 0


def test_sine_parser_takes_the_target_from_the_end_of_a_step():
    ps = ParserSet([make("owca-sine")])
    assert ps.feed("owca-sine: step=2 start elapsed_seconds=2.0 target_rate_per_second=900.000 "
                   "asked_rate_per_second=920.000 duration_seconds=2") == {}
    assert ps.feed("owca-sine: step=2 end target_rate_per_second=900.000 "
                   "achieved_rate_per_second=880.000") == \
        {"apm_load_target_rate_per_second": 900.0}
    assert ps.feed("Requests/sec: 1") == {} and ps.unparsed_lines == 1


# -- external parsers -----------------------------------------------------------------------

class CountingParser:
    def __init__(self):
        self.n = 0

    def feed(self, line):
        self.n += 1
        return {"apm_lines_seen": self.n}


def test_external_parser_by_module_and_factory():
    got = parse(f"{__name__}:CountingParser", "a\nb\nc")
    assert got == {"apm_lines_seen": 3}


def test_unknown_parsers_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not one of regex"):
        make("nosuch")
    with pytest.raises(ValueError, match="nosuchmodule"):
        make("nosuchmodule:Parser")
    with pytest.raises(ValueError, match="without feed"):
        make("builtins:object")
