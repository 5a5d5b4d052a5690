"""Service levels from the services' own metrics (lib/owca/measure/sources/sli.py).

Real parts: a service on loopback that observes the latency each request names in a
real prometheus_client Histogram and serves its registry's exposition; a redis-server
started here, with the commands sent to it over TCP; Debian's prometheus scraping the
service.  Servers that misbehave (hang, trickle, send 50 MB) are real sockets too.
"""
import math
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from kafka_broker import free_port, wait_until
from owca.measure.sources.base import Cycle
from owca.measure.sources.sli import SliSource
from owca.measure.sources.sli_config import SliConfig, SliRule

prometheus_client = pytest.importorskip("prometheus_client")

BOUNDS = (0.001, 0.005, 0.05, 0.5)


# -- a real service on loopback ------------------------------------------------------------

class Service:
    """A service that observes, in a real Histogram, the latency each GET /work?s=X
    names, and serves its registry on /metrics (or what `self.body` says instead)."""

    def __init__(self, buckets=BOUNDS, name="svc_request_duration_seconds"):
        self.name = name
        self.new_registry(buckets)
        self.body = None   # bytes served on /metrics instead of the registry
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/work"):
                    query = dict(p.split("=") for p in self.path.split("?", 1)[1].split("&"))
                    service.histogram.labels(handler=query.get("h", "/api")).observe(
                        float(query["s"]))
                    body = b"ok"
                elif self.path == "/metrics":
                    body = service.body if service.body is not None else \
                        prometheus_client.generate_latest(service.registry)
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", prometheus_client.CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def new_registry(self, buckets):
        """A restart of the service: new counters, from 0."""
        self.registry = prometheus_client.CollectorRegistry()
        self.histogram = prometheus_client.Histogram(
            self.name, "Request latency.", ["handler"], buckets=buckets, registry=self.registry)
        self.histogram.labels(handler="/api")   # exposed from the start, with zero counts

    def requests(self, n, seconds, handler="/api"):
        for _ in range(n):
            url = f"http://127.0.0.1:{self.port}/work?s={seconds}&h={handler}"
            with urllib.request.urlopen(url, timeout=10) as r:
                r.read()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def service():
    s = Service()
    yield s
    s.close()


def source(**cfg):
    cfg.setdefault("min_scrape_interval", 0)
    return SliSource(SimpleNamespace(sli=SliConfig(**cfg)), None)


def endpoint_labels(port, **extra):
    labels = {"owca_io_sli_source": "endpoint", "owca_io_sli_port": str(port),
              "owca_io_sli_histogram": "svc_request_duration_seconds",
              "owca_io_sli_slo": "0.01"}
    labels.update({f"owca_io_sli_{k}": v for k, v in extra.items()})
    return labels


def cycle(src, seq=1):
    reading = src.read(Cycle(seq, {"stage": "measure"}))
    return reading, reading.tasks.get("t", {})


def missing(metrics):
    assert "apm_sli" not in metrics and "apm_sli_normalized" not in metrics
    assert metrics["apm_sli_up"] == 0
    (reason,) = metrics["apm_sli_missing"]
    return reason


def test_the_p99_of_the_interval_from_a_real_histogram(service):
    src = source()
    src.update({"t": {"labels": endpoint_labels(service.port)}})
    service.requests(30, 0.3)          # before the first read: not in any interval
    _, m = cycle(src)
    assert missing(m) == "first_read" and m["apm_slo"] == 0.01
    service.requests(98, 0.003)
    service.requests(2, 0.04)
    reading, m = cycle(src, 2)
    assert reading.ok
    assert m["apm_sli"] == pytest.approx(0.0275)   # the 30 slow ones are not in it
    assert m["apm_sli_normalized"] == pytest.approx(0.01 / 0.0275)
    assert m["apm_sli_up"] == 1 and m["apm_throughput_per_second"] > 0
    assert m["apm_report_timestamp_seconds"] > 0
    src.close()


def test_matchers_pick_the_series_and_milliseconds_are_converted(service):
    src = source()
    src.update({"t": {"labels": endpoint_labels(service.port, matchers='handler="/slow"',
                                                unit="milliseconds", min_requests="5")}})
    _, m = cycle(src)
    assert missing(m) == "no_histogram"          # a labelled histogram with no series yet
    service.requests(1, 0.04, handler="/slow")   # the series, and the next read's base
    cycle(src, 2)
    service.requests(50, 0.003, handler="/fast")
    service.requests(10, 0.04, handler="/slow")   # bounds read as ms: (0.005, 0.05] ms
    _, m = cycle(src, 3)
    assert m["apm_sli"] == pytest.approx((0.005 + 0.045 * 9.9 / 10) * 1e-3)
    assert m["apm_throughput_per_second"] > 0
    src.close()


def test_too_few_requests_give_the_rate_but_no_quantile(service):
    src = source()
    src.update({"t": {"labels": endpoint_labels(service.port)}})
    cycle(src)
    service.requests(5, 0.003)
    _, m = cycle(src, 2)
    assert missing(m) == "too_few_requests"
    assert m["apm_throughput_per_second"] > 0
    assert m["apm_sli_failures_total"] == {"too_few_requests": 1}
    src.close()


def test_a_restarted_service_is_a_counter_reset_then_measured_again(service):
    src = source()
    src.update({"t": {"labels": endpoint_labels(service.port)}})
    service.requests(40, 0.003)
    cycle(src)
    service.new_registry(BOUNDS)
    service.requests(25, 0.003)
    reading, m = cycle(src, 2)
    assert missing(m) == "counter_reset" and reading.ok
    service.requests(25, 0.003)
    _, m = cycle(src, 3)
    assert 0.001 < m["apm_sli"] <= 0.005
    src.close()


def test_a_bucket_layout_change_gives_no_sli_for_one_interval(service):
    src = source()
    src.update({"t": {"labels": endpoint_labels(service.port)}})
    service.requests(40, 0.003)
    cycle(src)
    service.new_registry((0.002, 0.004, 0.5))
    service.requests(60, 0.003)   # more than before: no count went down
    _, m = cycle(src, 2)
    assert missing(m) == "layout_changed"
    service.requests(30, 0.003)
    _, m = cycle(src, 3)
    assert 0.002 < m["apm_sli"] <= 0.004
    src.close()


@pytest.mark.parametrize("body", [
    b"other_metric 1\n",
    b'svc_request_duration_seconds_bucket{handler="/api",le="0.1"} 5\n'
    b'svc_request_duration_seconds_count{handler="/api"} 5\n',
])
def test_a_missing_histogram_or_inf_bucket_is_no_histogram(service, body):
    src = source()
    src.update({"t": {"labels": endpoint_labels(service.port)}})
    service.body = body
    reading, m = cycle(src)
    assert missing(m) == "no_histogram" and not reading.ok
    src.close()


def test_a_service_that_is_down_is_down():
    port = free_port()
    src = source()
    src.update({"t": {"labels": endpoint_labels(port)}})
    reading, m = cycle(src)
    assert missing(m) == "down" and not reading.ok
    sample = {s["name"]: s for s in reading.samples if s["name"] == "owca_sli_failures_total"}
    assert sample["owca_sli_failures_total"]["labels"]["reason"] == "down"
    src.close()


class RawServer:
    """A TCP server that answers each connection with `behave(conn)` in a thread."""

    def __init__(self, behave):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.conns = []

        def serve():
            while not self.stop.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.conns.append(conn)
                threading.Thread(target=behave, args=(conn, self.stop), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            c.close()


def hang(conn, stop):
    stop.wait(60)


def trickle(conn, stop):
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    while not stop.wait(0.05):
        try:
            conn.sendall(b"#")
        except OSError:
            return


def huge(conn, stop, declared=False):
    conn.recv(65536)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
    head += b"Content-Length: 52428800\r\n\r\n" if declared else b"Connection: close\r\n\r\n"
    line = b'svc_request_duration_seconds_bucket{le="+Inf"} 1\n' * 1000
    try:
        conn.sendall(head)
        for _ in range(50 * 2 ** 20 // len(line) + 1):   # 50 MB
            if stop.is_set():
                return
            conn.sendall(line)
    except OSError:
        return


@pytest.mark.parametrize("behave, reason", [
    (hang, "timeout"), (trickle, "timeout"), (huge, "too_large"),
    (lambda c, s: huge(c, s, declared=True), "too_large"),
], ids=["hung", "trickling", "50MB", "50MB-declared"])
def test_a_hung_slow_or_huge_endpoint_costs_its_task_the_sli_not_the_cycle(
        behave, reason, service):
    bad = RawServer(behave)
    try:
        src = source(scrape_timeout=1.0, max_answer_bytes=4 * 2 ** 20)
        src.update({"t": {"labels": endpoint_labels(bad.port)},
                    "good": {"labels": endpoint_labels(service.port)}})
        cycle(src)
        service.requests(40, 0.003)
        reading, m = cycle(src, 2)
        assert missing(m) == reason
        # The healthy task beside it is read in the same cycle all the same.
        assert 0.001 < reading.tasks["good"]["apm_sli"] <= 0.005
        assert reading.ok
        src.close()
    finally:
        bad.close()


def test_reads_are_rate_limited_and_tasks_without_a_source_are_left_alone(service):
    src = source(min_scrape_interval=3600)
    src.update({"t": {"labels": endpoint_labels(service.port)}, "other": {"labels": {}}})
    cycle(src)
    reading, m = cycle(src, 2)
    assert missing(m) == "rate_limited"
    assert "other" not in reading.tasks
    src.close()


def test_a_task_with_wrong_annotations_gets_bad_spec_every_cycle():
    src = source()
    src.update({"t": {"labels": {"owca_io_sli_source": "endpoint"}}})
    _, m = cycle(src)
    assert missing(m) == "bad_spec"
    src.close()


# -- redis: a real redis-server ------------------------------------------------------------

def binary(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"no {name} command (Debian package, requirements/apt.txt)")
    return path


class Redis:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="owca-sli-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._ping() or self.proc.poll() is not None, timeout=30,
                   what="redis-server to answer")
        assert self.proc.poll() is None

    def _ping(self):
        try:
            return self.command("PING") == b"+PONG\r\n"
        except OSError:
            return False

    def command(self, *args):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"*{len(args)}\r\n".encode()
                      + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in args))
            return s.recv(65536)

    def load(self, n):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            for i in range(n):
                for cmd in (("SET", f"k{i}", "v"), ("GET", f"k{i}")):
                    s.sendall(f"*{len(cmd)}\r\n".encode()
                              + b"".join(f"${len(a)}\r\n{a}\r\n".encode() for a in cmd))
                    s.recv(65536)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def redis():
    r = Redis()
    yield r
    r.close()


def test_redis_latency_histogram_gives_the_interval_quantile(redis):
    src = source()
    src.update({"t": {"labels": {"owca_io_sli_source": "redis",
                                 "owca_io_sli_port": str(redis.port),
                                 "owca_io_sli_slo": "0.001"}}})
    _, m = cycle(src)
    assert missing(m) == "no_histogram"     # no GET or SET yet
    redis.load(10)
    _, m = cycle(src, 2)
    assert missing(m) == "first_read"
    redis.load(100)
    _, m = cycle(src, 3)
    # Redis's buckets are powers of two of microseconds: the quantile lies inside one.
    assert 0 < m["apm_sli"] < 1 and m["apm_sli_up"] == 1
    assert m["apm_throughput_per_second"] > 0
    low = 2 ** math.floor(math.log2(m["apm_sli"] * 1e6)) * 1e-6
    assert low <= m["apm_sli"] <= 2 * low
    src.close()


def test_redis_info_latencystats_as_published(redis):
    src = source()
    src.update({"t": {"labels": {"owca_io_sli_source": "redis",
                                 "owca_io_sli_port": str(redis.port),
                                 "owca_io_sli_redis_stat": "latencystats",
                                 "owca_io_sli_commands": "get",
                                 "owca_io_sli_slo": "0.001"}}})
    redis.load(50)
    _, m = cycle(src)
    assert missing(m) == "first_read"    # the load needs two reads of the calls
    redis.load(50)
    _, m = cycle(src, 2)
    info = redis.command("INFO", "latencystats").decode()
    line = next(x for x in info.splitlines() if x.startswith("latency_percentiles_usec_get:"))
    p99 = float(dict(p.split("=") for p in line.split(":", 1)[1].split(","))["p99"])
    assert m["apm_sli"] == pytest.approx(p99 * 1e-6)
    assert m["apm_throughput_per_second"] > 0
    src.close()


def test_a_port_from_the_tasks_label(redis):
    src = source(rules=[SliRule(source="redis", slo=0.001, port_label="port",
                                match={"workload": "redis"})])
    src.update({"t": {"labels": {"workload": "redis", "port": str(redis.port)}},
                "u": {"labels": {"workload": "redis", "port": "6379; x"}}})
    redis.load(10)
    reading, m = cycle(src)
    assert missing(m) == "first_read"
    assert reading.tasks["u"]["apm_sli_missing"] == {"bad_spec": 1}
    src.close()


def test_redis_down_is_down():
    src = source()
    src.update({"t": {"labels": {"owca_io_sli_source": "redis",
                                 "owca_io_sli_port": str(free_port()),
                                 "owca_io_sli_slo": "0.001"}}})
    _, m = cycle(src)
    assert missing(m) == "down"
    src.close()


# -- a real Prometheus server scraping the service ----------------------------------------

def test_a_prometheus_server_query_per_task(service):
    from test_promtool import PrometheusServer
    server = PrometheusServer([f"127.0.0.1:{service.port}"])
    try:
        query = ('histogram_quantile(0.99, sum by (le) (rate('
                 'svc_request_duration_seconds_bucket{job="{job}"}[1m])))')
        load = 'sum(rate(svc_request_duration_seconds_count{job="{job}"}[1m]))'
        src = source(prometheus_url=f"http://127.0.0.1:{server.port}",
                     rules=[SliRule(source="prometheus", slo=0.01, query=query,
                                    load_query=load, match={"app": "svc"})])
        src.update({"t": {"labels": {"app": "svc", "job": "owca"}},
                    "nolabel": {"labels": {"app": "svc"}}})

        def measured():
            service.requests(20, 0.003)
            time.sleep(0.5)
            return "apm_sli" in cycle(src)[1]

        wait_until(measured, timeout=90, what="prometheus to answer the task's query")
        reading, m = cycle(src, 2)
        assert 0.001 < m["apm_sli"] <= 0.005 and m["apm_throughput_per_second"] > 0
        # A template naming a label the task lacks is no query at all.
        assert reading.tasks["nolabel"]["apm_sli_missing"] == {"bad_spec": 1}
        src.close()
    finally:
        server.close()


def test_the_prometheus_server_down_or_no_series_gives_no_value(service):
    src = source(prometheus_url=f"http://127.0.0.1:{free_port()}",
                 rules=[SliRule(source="prometheus", slo=0.01, query="up")])
    src.update({"t": {"labels": {}}})
    _, m = cycle(src)
    assert missing(m) == "down"
    src.close()


def test_owca_measure_merges_the_sli_into_the_task(service, tmp_path):
    """The whole stage: a config with an sli section, a tasks frame with annotations."""
    from owca.measure.stage import Measure, MeasureConfig
    from owca.core import frames
    from owca.measure.sources import apm
    cfg = MeasureConfig(sli=SliConfig(min_scrape_interval=0), apm_dir=str(tmp_path))
    stage = Measure(cfg, {})
    try:
        task = {"id": "t", "name": "svc", "cgroup_path": "/",
                "labels": endpoint_labels(service.port), "resources": {}}
        # A wrapper measures the same task from its client's side.
        apm.write(str(tmp_path), apm.ApmRecord("t", time.time(), {}, {
            "apm_sli": 9.0, "apm_slo": 1.0, "apm_sli_normalized": 0.1,
            "apm_latency_p99_seconds": 9.0, "apm_throughput_per_second": 5.0}))
        first = stage.process({"seq": 1, "tasks": [task]})[0]["tasks"]["t"]["metrics"]
        # No SLI from the task's source yet, and none of the wrapper's either.
        assert first["apm_sli_missing"] == {"first_read": 1}
        assert "apm_sli" not in first and "apm_sli_normalized" not in first
        assert "apm_throughput_per_second" not in first
        assert first["apm_slo"] == 0.01 and first["apm_latency_p99_seconds"] == 9.0
        service.requests(40, 0.003)
        out = stage.process({"seq": 2, "tasks": [task]})[0]
        frames.validate(out)
        metrics = out["tasks"]["t"]["metrics"]
        assert 0.001 < metrics["apm_sli"] <= 0.005
        assert metrics["apm_throughput_per_second"] != 5.0
        assert metrics["apm_latency_p99_seconds"] == 9.0   # the wrapper's own figure
        assert any(s["name"] == "owca_source_success" and s["labels"]["source"] == "sli"
                   and s["value"] == 1 for s in out["metrics"])
    finally:
        stage.close()
