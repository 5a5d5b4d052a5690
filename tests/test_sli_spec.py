"""The pure parts of the SLI sources (lib/owca/measure/sources/sli.py, sli_config.py):
the interval's quantile from bucket differences, as Prometheus's histogram_quantile
computes it, and what a task's annotations, labels and the configuration ask for.
tests/test_sli.py reads real services."""
import math
import os
import re

import pytest

from owca.measure.sources.sli import NoSli, Snapshot, bucket_quantile, interval_buckets
from owca.measure.sources.sli_config import (SliConfig, SliRule, SliSpecError, parse_matchers,
                                             spec_for_task, spec_from_labels)

INF = math.inf


# -- the quantile of bucket differences, as histogram_quantile computes it ----------------

def test_quantile_interpolates_inside_the_bucket_the_rank_falls_in():
    # 98 at or below 5 ms, 2 more at or below 50 ms: rank 99 is half-way into (5, 50] ms.
    buckets = {0.001: 0, 0.005: 98, 0.05: 100, 0.5: 100, INF: 100}
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.0275)
    # The lowest bucket is interpolated from 0, as Prometheus does for a positive bound.
    assert bucket_quantile(0.5, {0.01: 10, INF: 10}) == pytest.approx(0.005)


def test_a_rank_in_the_inf_bucket_gives_the_highest_finite_bound():
    assert bucket_quantile(0.99, {0.001: 10, 0.005: 50, INF: 100}) == 0.005


def test_a_histogram_without_its_inf_bucket_gives_no_quantile():
    with pytest.raises(NoSli) as e:
        bucket_quantile(0.99, {0.001: 10, 0.005: 50})
    assert e.value.reason == "no_histogram"


def snap(t, **series):
    return Snapshot({frozenset({("h", k)}): v for k, v in series.items()}, t, t)


def test_bucket_differences_are_summed_over_the_series_in_both_reads():
    prev = snap(0, a={0.1: 5, INF: 5}, gone={0.1: 3, INF: 3})
    cur = snap(1, a={0.1: 9, INF: 12}, new={0.1: 100, INF: 100})
    # `new` has no earlier read (rate() leaves it out too); `gone` has no later one.
    assert interval_buckets(prev, cur) == {0.1: 4, INF: 7}


@pytest.mark.parametrize("cur, reason", [
    (snap(1, a={0.1: 1, INF: 9}), "counter_reset"),
    (snap(1, a={0.2: 5, INF: 9}), "layout_changed"),
    (snap(1, a={0.1: 5, 0.2: 6, INF: 9}), "layout_changed"),
])
def test_a_reset_or_a_new_layout_gives_no_interval(cur, reason):
    with pytest.raises(NoSli) as e:
        interval_buckets(snap(0, a={0.1: 5, INF: 5}), cur)
    assert e.value.reason == reason


# -- what a task asks for: annotations and rules -------------------------------------------

def test_kubernetes_annotations_and_mesos_labels_name_the_same_spec():
    pod = {"annotation_owca_io_sli_source": "endpoint", "annotation_owca_io_sli_port": "8080",
           "annotation_owca_io_sli_histogram": "http_request_duration_seconds",
           "annotation_owca_io_sli_matchers": 'handler="/api", code=~"2.."',
           "annotation_owca_io_sli_slo": "0.25", "annotation_owca_io_sli_quantile": "0.95"}
    mesos = {k[len("annotation_"):]: v for k, v in pod.items()}
    a, b = spec_from_labels(pod), spec_from_labels(mesos)
    assert a == b and a is not None
    assert (a.source, a.port, a.slo, a.quantile) == ("endpoint", 8080, 0.25, 0.95)
    assert a.matcher_list == [("handler", "=", "/api"), ("code", "=~", "2..")]
    assert spec_from_labels({"app": "x"}) is None


@pytest.mark.parametrize("labels, message", [
    ({"owca_io_sli_port": "80"}, "source: missing"),
    ({"owca_io_sli_source": "endpoint", "owca_io_sli_slo": "1"}, "histogram"),
    ({"owca_io_sli_source": "endpoint", "owca_io_sli_histogram": "h", "owca_io_sli_slo": "1"},
     "port"),
    ({"owca_io_sli_source": "endpoint", "owca_io_sli_histogram": "h", "owca_io_sli_port": "80"},
     "slo"),
    ({"owca_io_sli_source": "ftp"}, "source: expected one of"),
    ({"owca_io_sli_source": "endpoint", "owca_io_sli_url": "http://169.254.169.254/"},
     "sli-url: not an SLI setting"),
    ({"owca_io_sli_source": "redis", "owca_io_sli_slo": "x"}, "slo: expected a number"),
    ({"owca_io_sli_source": "redis", "owca_io_sli_slo": "1",
      "owca_io_sli_commands": "get;flushall"}, "commands"),
    ({"owca_io_sli_source": "endpoint", "owca_io_sli_histogram": "h", "owca_io_sli_port": "80",
      "owca_io_sli_slo": "1", "owca_io_sli_matchers": "handler=/api"}, "matchers"),
])
def test_wrong_annotations_are_refused_naming_the_annotation(labels, message):
    with pytest.raises(SliSpecError, match=message):
        spec_from_labels(labels)


def test_a_rule_comes_before_the_annotations():
    rule = SliRule(source="redis", slo=0.001, match={"workload": "redis"})
    cfg = SliConfig(rules=[rule])
    labels = {"workload": "redis", "owca_io_sli_source": "wrapper"}
    spec = spec_for_task(cfg, labels)
    assert spec is not None and spec.source == "redis" and spec.port == 6379
    spec = spec_for_task(cfg, {"workload": "nginx", "owca_io_sli_source": "wrapper"})
    assert spec is not None and spec.source == "wrapper"
    assert spec_for_task(SliConfig(annotations=False), {"owca_io_sli_source": "wrapper"}) is None


def test_matchers_parse_promql_escapes():
    assert parse_matchers(r'{path="/a\"b", x!="", y!~"a|b"}') == [
        ("path", "=", '/a"b'), ("x", "!=", ""), ("y", "!~", "a|b")]


def test_the_sli_section_is_checked_at_start(tmp_path):
    from owca.core.config import ConfigError, load_section
    from owca.measure.stage import MeasureConfig
    path = tmp_path / "owca.yaml"
    path.write_text("measure:\n  sli:\n    rules:\n      - source: prometheus\n"
                    "        slo: 0.1\n        query: up\n")
    with pytest.raises(ConfigError, match="prometheus_url"):
        load_section(str(path), "measure", MeasureConfig)
    path.write_text("measure:\n  sli:\n    prometheus_url: http://127.0.0.1:9090\n"
                    "    rules:\n      - source: endpoint\n        slo: 0.1\n"
                    "        histogram: h\n        match: {app: x}\n")
    with pytest.raises(ConfigError, match=r"owca.yaml:\d+: SliRule: port"):
        load_section(str(path), "measure", MeasureConfig)


def test_the_measure_sections_of_docs_control_md_load():
    from owca.core.config import load_section
    from owca.measure.stage import MeasureConfig
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "docs", "control.md")
    text = open(path).read()
    start = text.index("## Service levels a service already publishes")
    blocks = re.findall(r"```yaml\n(measure:\n  sli:.*?)```", text[start:], re.S)
    assert len(blocks) == 2
    configs = [load_section(path, "measure", MeasureConfig, text=b).sli for b in blocks]
    assert configs[0] == SliConfig()
    rules = configs[1].rules
    assert [r.source for r in rules] == ["prometheus", "redis"]
    assert rules[0].unit == "milliseconds" and "{pod_name}" in rules[0].query


@pytest.mark.parametrize("openmetrics", [False, True])
def test_the_exposition_is_parsed_in_either_text_format(openmetrics):
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.openmetrics import exposition
    from owca.measure.sources.sli import parse_histogram
    from owca.measure.sources.sli_config import SliSpec
    registry = prometheus_client.CollectorRegistry()
    h = prometheus_client.Histogram("svc_seconds", "x", ["handler"], buckets=(0.001, 0.005),
                                    registry=registry)
    h.labels(handler="/api").observe(0.003)
    h.labels(handler="/").observe(0.0001)
    # Names that start like the histogram's but are other metrics.
    other = prometheus_client.Counter("svc_seconds_bucket_x", "y", registry=registry)
    other.inc()
    if openmetrics:
        text, kind = exposition.generate_latest(registry).decode(), exposition.CONTENT_TYPE_LATEST
    else:
        text, kind = prometheus_client.generate_latest(registry).decode(), "text/plain"
    spec = SliSpec(source="endpoint", slo=1, histogram="svc_seconds", port=1,
                   matchers='handler="/api"')
    snapshot = parse_histogram(text, kind, spec, 0.0, 0.0)
    assert snapshot.series == {frozenset({("handler", "/api")}): {0.001: 0, 0.005: 1, INF: 1}}


def test_redis_bounds_above_32_us_count_as_the_powers_of_two_they_stand_for():
    # LATENCY HISTOGRAM spells its bounds 1024 x 2^k ns in whole microseconds: 32, 65,
    # 131, 262.  A slow command lands above 32 us; its bucket must count.
    from owca.measure.sources.sli import bucket_quantile, interval_buckets, redis_histogram

    def answer(calls, counts):
        return [b"get", [b"calls", calls, b"histogram_usec",
                         [x for pair in counts for x in pair]]]
    before = redis_histogram(answer(10, [(8, 10)]), ["get"], 0.0, 0.0)
    after = redis_histogram(answer(110, [(8, 20), (32, 30), (65, 60), (131, 110)]),
                            ["get"], 1.0, 1.0)
    buckets = interval_buckets(before, after)
    p99 = bucket_quantile(0.99, buckets)
    assert 64 <= p99 <= 128      # inside the 131 us bucket, not above every bound
