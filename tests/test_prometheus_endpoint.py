"""The Prometheus endpoint: owca-ship as a real process serving HTTP on loopback,
scraped with urllib and parsed with prometheus_client's exposition parser."""
import gzip
import socket
import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import load_tool
from kafka_broker import (HOST, ShipProcess, anomalies, free_port, measurements, port_open,
                          wait_until)
from owca.core import frames
from owca.ship.exposition import family_name, merge, strip_timestamps
from owca.ship.storages.prometheus import accepts_gzip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# -- the text handling, on literal strings ------------------------------------------------

def test_family_name():
    assert family_name('# HELP a_total Things.\n') == "a_total"
    assert family_name('# TYPE a_total counter\n') == "a_total"
    assert family_name('a_total{x="1 2"} 3 1000\n') == "a_total"
    assert family_name('b 3 1000\n') == "b"
    assert family_name('# owca metrics seq=1\n') == ""


def test_merge_serves_every_series_of_a_family_two_texts_have_once():
    metrics = ('# HELP up Up.\n# TYPE up gauge\nup{host="n"} 1 1000\n'
               '# HELP x_total X.\n# TYPE x_total counter\n'
               'x_total{host="n",stage="measure"} 5 1000\n')
    anomalies_text = ('# HELP anomaly A.\n# TYPE anomaly gauge\nanomaly{uuid="u} v"} 1 1000\n'
                      '# HELP x_total X.\n# TYPE x_total counter\n'
                      'x_total{host="n",stage="detect"} 9 1000\n'
                      'x_total{host="n",stage="measure"} 7 1000\n')   # a repeat: the first wins
    assert merge([metrics, anomalies_text]) == (
        '# HELP up Up.\n# TYPE up gauge\nup{host="n"} 1 1000\n'
        '# HELP x_total X.\n# TYPE x_total counter\n'
        'x_total{host="n",stage="measure"} 5 1000\nx_total{host="n",stage="detect"} 9 1000\n'
        '# HELP anomaly A.\n# TYPE anomaly gauge\nanomaly{uuid="u} v"} 1 1000\n')
    assert merge([]) == ""


@pytest.mark.parametrize("header, gzip_", [
    ("gzip", True), ("gzip, deflate, br", True), ("GZIP;q=0.5", True), ("*", True),
    ("gzip;q=0", False), ("gzip; q=0.0, identity", False), ("*;q=0", False),
    ("*, gzip;q=0", False), ("identity", False), ("", False), ("deflate", False),
    ("gzip;q=bad", False),
])
def test_accepts_gzip_follows_the_weights(header, gzip_):
    assert accepts_gzip(header) is gzip_


def test_strip_timestamps():
    text = ('# HELP a A thing with spaces 1 2.\n# TYPE a gauge\n'
            'a{host="n",label="x y 3"} 1.5 1700000001000\nb 2 1700000001000\n')
    assert strip_timestamps(text) == ('# HELP a A thing with spaces 1 2.\n# TYPE a gauge\n'
                                      'a{host="n",label="x y 3"} 1.5\nb 2\n')


# -- the endpoint ------------------------------------------------------------------------------

def scrape(url, headers=None, method="GET"):
    """(status, headers, body) of one request."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def samples_of(body: bytes) -> dict:
    """{(name, sorted label items): sample} of a scrape, each family once."""
    families = list(text_string_to_metric_families(body.decode()))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), f"a family twice: {names}"
    return {(s.name, tuple(sorted(s.labels.items()))): s for f in families for s in f.samples}


def one(samples, name, **labels):
    found = [s for (n, items), s in samples.items()
             if n == name and all((k, v) in items for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
def endpoint(tmp_path):
    """Start owca-ship with a PrometheusStorage; yields (ship, url, write_config)."""
    started = []

    def start(extra="", args=()):
        port = free_port()
        config = tmp_path / f"owca-{port}.yaml"
        config.write_text(f"ship:\n  storages:\n    - !PrometheusStorage\n"
                          f"      port: {port}\n{extra}")
        ship = ShipProcess(str(config), str(tmp_path / f"ship-{port}.log"), *args)
        started.append(ship)
        wait_until(lambda: port_open(port) or ship.proc.poll() is not None,
                   what="the endpoint to listen")
        assert ship.proc.poll() is None, ship.log()
        return ship, f"http://127.0.0.1:{port}"

    yield start
    for ship in started:
        ship.close()


@pytest.mark.integration
def test_scrape_serves_the_latest_cycle(endpoint):
    ship, url = endpoint()
    status, headers, body = scrape(url + "/metrics")
    assert status == 503 and b"no cycle shipped yet" in body

    for seq in (1, 2, 3):
        ship.send(measurements(seq), anomalies(seq))
    wait_until(lambda: b'uuid="u3"' in scrape(url + "/metrics")[2], what="cycle 3")

    status, headers, body = scrape(url + "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    assert int(headers["Content-Length"]) == len(body)
    samples = samples_of(body)
    assert one(samples, "platform_mem_usage_bytes", host=HOST).value == 5003
    assert one(samples, "task_cpu_usage_seconds_total", task_id="t1", app="mc").value == 1.5
    assert b"\n# TYPE task_cpu_usage_seconds_total counter\n" in body   # the Prometheus name
    assert one(samples, "anomaly", uuid="u3", contended_task_id="t1").value == 1
    assert not [s for s in samples.values() if s.timestamp is not None]
    assert one(samples, "owca_frames_read_total", stage="ship").value == 5

    # HEAD, gzip and other paths
    status, head_headers, head_body = scrape(url + "/metrics", method="HEAD")
    assert status == 200 and head_body == b""
    assert int(head_headers["Content-Length"]) == len(body)
    status, gz_headers, gz_body = scrape(url + "/metrics", {"Accept-Encoding": "gzip"})
    assert gz_headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(gz_body) == body
    for refusing in ("gzip;q=0", "identity", "*;q=0, deflate"):
        status, plain_headers, plain_body = scrape(url + "/metrics",
                                                   {"Accept-Encoding": refusing})
        assert "Content-Encoding" not in plain_headers and plain_body == body, refusing
    status, _, body404 = scrape(url + "/other")
    assert status == 404 and b"/metrics" in body404

    ship.send(measurements(4))
    wait_until(lambda: b"5004" in scrape(url + "/metrics")[2], what="cycle 4")
    samples = samples_of(scrape(url + "/metrics")[2])
    assert one(samples, "owca_ship_scrapes_total", storage="PrometheusStorage").value >= 5
    assert ship.terminate() == 0, ship.log()
    assert not port_open(int(url.rsplit(":", 1)[1]))


def stage_samples(stage, seq, bad=0):
    """What a stage adds to the frames it writes: its own counters and cycle time."""
    labels = {"stage": stage}
    return [frames.sample("owca_frames_read_total", seq, labels, "counter"),
            frames.sample("owca_bad_frames_total", bad, labels, "counter"),
            frames.sample("owca_cycle_duration_seconds", 0.001 * seq, labels)]


@pytest.mark.integration
def test_every_series_of_every_category_is_served(endpoint):
    """A family that more than one category carries (a stage's own counters and cycle
    time: owca-measure's in the metrics, owca-detect's in the anomalies, owca-allocate's
    in the allocations) is served with the series of all of them, once each."""
    from kafka_broker import allocations
    ship, url = endpoint()
    for seq in (1, 2):
        m, a, al = measurements(seq), anomalies(seq), allocations(seq)
        m["metrics"] = stage_samples("measure", seq)
        a["metrics"] = stage_samples("detect", seq, bad=3)
        al["metrics"] = stage_samples("allocate", seq) + al["metrics"]
        ship.send(m, a, al)
    wait_until(lambda: b'stage="allocate"} 2' in scrape(url + "/metrics")[2], what="cycle 2")
    samples = samples_of(scrape(url + "/metrics")[2])
    for stage in ("measure", "detect", "allocate"):
        assert one(samples, "owca_cycle_duration_seconds", stage=stage).value == 0.002
        assert one(samples, "owca_frames_read_total", stage=stage).value == 2
    assert one(samples, "owca_bad_frames_total", stage="detect").value == 3
    assert one(samples, "owca_frames_read_total", stage="ship").value == 4  # at cycle 2 metrics
    assert one(samples, "allocations_total").value == 1
    assert ship.finish() == 0, ship.log()


def failed_lines(ship) -> int:
    return sum("failed:" in line for line in ship.log().splitlines())


@pytest.mark.integration
def test_clients_that_hang_up_cost_one_debug_line_each(endpoint):
    """Clients that reset their connection mid-request: no traceback, nothing at the
    default log level; at debug level one line each."""
    import struct
    import time
    for level, expected in (("info", 0), ("debug", 20)):
        ship, url = endpoint(args=("--log-level", level))
        ship.send(measurements(1))
        wait_until(lambda: scrape(url + "/metrics")[0] == 200, what="the first cycle")
        port = int(url.rsplit(":", 1)[1])
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # no end of headers
                # SO_LINGER 0: close() sends a reset, not a FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert scrape(url + "/metrics")[0] == 200      # the endpoint still serves
        if expected:     # the server's threads log in their own time: wait for the lines
            wait_until(lambda: failed_lines(ship) == expected, what=f"{expected} lines")
        else:            # nothing to wait for: room for a line that must not come
            time.sleep(0.5)
        assert ship.terminate() == 0
        lines = [line for line in ship.log().splitlines() if "failed:" in line]
        assert "Traceback" not in ship.log(), ship.log()
        assert len(lines) == expected, ship.log()
        assert all(line.startswith("owca-ship: debug: ") for line in lines), lines


@pytest.mark.integration
def test_concurrent_scrapes_each_see_one_whole_cycle(endpoint):
    ship, url = endpoint("      categories: [metrics]\n")
    ship.send(measurements(1))
    wait_until(lambda: scrape(url + "/metrics")[0] == 200, what="the first cycle")
    seen, errors = set(), []

    def scraper():
        try:
            for _ in range(25):
                status, headers, body = scrape(url + "/metrics")
                assert status == 200 and headers["Content-Type"] == CONTENT_TYPE
                samples = samples_of(body)
                seq = one(samples, "platform_mem_usage_bytes").value - 5000
                # Every sample from the same cycle: never half of one and half of another.
                assert one(samples, "task_mem_usage_bytes").value == 1000 + seq
                assert one(samples, "task_cpu_usage_seconds_total").value == seq * 0.5
                seen.add(seq)
        except Exception as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=scraper) for _ in range(8)]
    for t in threads:
        t.start()
    for seq in range(2, 60):
        ship.send(measurements(seq))
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert len(seen) > 1     # the cycles changed under the scrapers
    assert ship.finish() == 0, ship.log()


@pytest.mark.integration
def test_timestamps_on_request_and_staleness(endpoint):
    ship, url = endpoint("      timestamps: true\n      stale_after_seconds: 0.5\n")
    ship.send(measurements(7))
    wait_until(lambda: scrape(url + "/metrics")[0] == 200, what="cycle 7")
    samples = samples_of(scrape(url + "/metrics")[2])
    assert one(samples, "platform_mem_usage_bytes").timestamp == 1700000007.0
    wait_until(lambda: scrape(url + "/metrics")[0] == 503, what="the cycle to go stale")
    assert b"the latest cycle is" in scrape(url + "/metrics")[2]


@pytest.mark.integration
def test_port_in_use_fails_at_start(tmp_path, capsys):
    """Not a configuration error (exit 2, no restart): the port may come free (exit 1)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "owca.yaml"
        config.write_text(f"ship:\n  storages:\n    - !PrometheusStorage\n      port: {port}\n")
        assert load_tool("ship").main(["-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == f"owca-ship: error: PrometheusStorage: cannot listen on 127.0.0.1:{port}: " \
                  f"Address already in use\n"


def test_bad_configuration_fails_with_file_and_line(tmp_path, capsys):
    config = tmp_path / "owca.yaml"
    config.write_text("ship:\n  storages:\n    - !PrometheusStorage\n      port: 70000\n")
    assert load_tool("ship").main(["-c", str(config)]) == 2
    assert capsys.readouterr().err == \
        f"owca-ship: error: {config}:4: PrometheusStorage: port: expected 0..65535, got 70000\n"


@pytest.mark.integration
def test_the_shipped_config_works(tmp_path):
    """configs/prometheus.yaml, on a free loopback port."""
    from conftest import ROOT
    port = free_port()
    with open(f"{ROOT}/configs/prometheus.yaml") as f:
        text = f.read()
    for old, new in (("listen_address: 0.0.0.0", "listen_address: 127.0.0.1"),
                     ("port: 9477", f"port: {port}")):
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "prometheus.yaml"
    config.write_text(text)
    ship = ShipProcess(str(config), str(tmp_path / "ship.log"))
    try:
        ship.send(measurements(1))
        url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: port_open(port) and scrape(url)[0] == 200, what="the endpoint")
        assert one(samples_of(scrape(url)[2]), "platform_mem_usage_bytes").value == 5001
        assert ship.terminate() == 0, ship.log()
    finally:
        ship.close()
