"""The exposition checked by the Prometheus ecosystem's own tools (Debian's prometheus
package): `promtool check metrics` on what owca-ship makes of a recorded stream, a real
Prometheus server scraping the endpoint and answering a query, and the alerting rules
of configs/prometheus/ under `promtool test rules`."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request

import pytest

from conftest import FIXTURES, ROOT, tool_command, tool_env
from kafka_broker import ShipProcess, free_port, measurements, port_open, wait_until

RULES = os.path.join(ROOT, "configs", "prometheus")


def binary(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"no {name} command (Debian package prometheus, requirements/apt.txt)")
    return path


def promtool(*args, stdin=None):
    return subprocess.run([binary("promtool"), *args], input=stdin, capture_output=True,
                          timeout=120)


def test_the_exposition_of_a_recorded_stream_passes_promtool(tmp_path):
    """The recorded stream through owca-detect (a plug-in detector that finds anomalies
    and emits metrics of its own), owca-allocate (dry run) and owca-ship: the cycle
    file, and every metrics cycle on standard output, pass `promtool check metrics`
    without a single complaint."""
    textfile = tmp_path / "owca.prom"
    detect_config = tmp_path / "detect.yaml"
    detect_config.write_text("detect:\n  detector: !ThresholdDetector\n"
                             "    metric: task_cpu_usage_seconds\n    threshold: 0.01\n"
                             "    resource: cpu\n    contending_labels: {priority: be}\n")
    ship_config = tmp_path / "ship.yaml"
    ship_config.write_text(f"ship:\n  storages:\n"
                           f"    - !FileStorage {{path: {textfile}, overwrite: true}}\n"
                           f"    - !StdoutStorage {{categories: [metrics]}}\n")
    plugin = os.path.join(ROOT, "configs", "examples", "threshold_detector.py")
    with open(os.path.join(FIXTURES, "recorded_stream", "stream.jsonl"), "rb") as recording:
        pipeline = subprocess.run(
            " ".join(tool_command("detect", "-r", f"{plugin}:ThresholdDetector", "-c",
                                  str(detect_config))) + " | "
            + " ".join(tool_command("allocate", "--dry-run", "-c",
                                    os.path.join(ROOT, "configs", "static-allocator.yaml")))
            + " | " + " ".join(tool_command("ship", "-c", str(ship_config))),
            shell=True, stdin=recording, capture_output=True, env=tool_env(), timeout=120)
    assert pipeline.returncode == 0, pipeline.stderr
    text = textfile.read_text()
    for family in ("task_cpu_usage_seconds_total", "anomaly", "allocations_total",
                   "threshold_detector_threshold", "owca_cycle_duration_seconds"):
        assert f"\n# TYPE {family} " in text, family
    assert 'anomaly{host="vm",type="contention"' in text
    checked = promtool("check", "metrics", stdin=text.encode())
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")

    blocks = pipeline.stdout.decode().split("# owca metrics ")[1:]
    assert len(blocks) == 12
    for block in blocks:
        checked = promtool("check", "metrics", stdin=block.split("\n", 1)[1].encode())
        assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")


def test_the_alerting_rules_pass_promtool_s_own_tests():
    checked = promtool("check", "rules", os.path.join(RULES, "alerts.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([binary("promtool"), "test", "rules", "alerts_test.yml"],
                            cwd=RULES, capture_output=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert b"SUCCESS" in tested.stdout


def test_a_spool_that_keeps_growing_pages_and_a_busy_one_does_not():
    """OwcaSpoolGrowing is among the rules and alerts_test.yml holds it to its word: it
    fires for a spool that grew for 15 minutes, not before, not for a spool that holds
    a cycle or two, and not once the spool stopped growing (full: OwcaCyclesDropped)."""
    import yaml
    with open(os.path.join(RULES, "alerts.yml")) as f:
        rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    (rule,) = [r for r in rules if r.get("alert") == "OwcaSpoolGrowing"]
    assert rule["for"] == "15m" and "owca_ship_spool_cycles" in rule["expr"]
    with open(os.path.join(RULES, "alerts_test.yml")) as f:
        cases = [c for t in yaml.safe_load(f)["tests"] for c in t["alert_rule_test"]
                 if c["alertname"] == "OwcaSpoolGrowing"]
    assert [bool(c["exp_alerts"]) for c in cases] == [False, True, False]
    assert [a["exp_labels"]["host"] for c in cases for a in c["exp_alerts"]] == ["n1"]
    tested = subprocess.run([binary("promtool"), "test", "rules", "alerts_test.yml"],
                            cwd=RULES, capture_output=True, timeout=120)
    assert tested.returncode == 0, tested.stdout + tested.stderr


class PrometheusServer:
    """Debian's prometheus on a free loopback port with a data directory of its own;
    stopped by its pid and removed with its directory."""

    def __init__(self, targets, rule_files=()):
        self.dir = tempfile.mkdtemp(prefix="owca-prometheus-")
        self.port = free_port()
        config = os.path.join(self.dir, "prometheus.yml")
        with open(config, "w") as f:
            json.dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                       "rule_files": list(rule_files),
                       "scrape_configs": [{"job_name": "owca", "static_configs":
                                           [{"targets": targets}]}]}, f)
        self.log = open(os.path.join(self.dir, "prometheus.log"), "wb")
        self.proc = subprocess.Popen(
            [binary("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={self.dir}/data",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: port_open(self.port) or self.proc.poll() is not None,
                   timeout=60, what="prometheus to listen")
        assert self.proc.poll() is None, self.output()

    def query(self, expr):
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr})
        with urllib.request.urlopen(url, timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def output(self):
        with open(os.path.join(self.dir, "prometheus.log"), errors="replace") as f:
            return f.read()[-3000:]

    def close(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def scraped(tmp_path, frame_of, query):
    """owca-ship's endpoint, fed frame_of(seq) for seq = 1, 2, ... as a pipeline goes on,
    until a Prometheus server scraping it answers `query`: (ship, server, the last seq)."""
    port = free_port()
    config = tmp_path / "owca.yaml"
    config.write_text(f"ship:\n  storages:\n    - !PrometheusStorage {{port: {port}}}\n")
    ship = ShipProcess(str(config), str(tmp_path / "ship.log"))
    server = None
    try:
        ship.send(frame_of(1))
        server = PrometheusServer([f"127.0.0.1:{port}"])
        seq = [1]

        def answered():
            seq[0] += 1
            ship.send(frame_of(seq[0]))      # the pipeline goes on meanwhile
            time.sleep(0.2)
            return server.query(query)

        wait_until(answered, timeout=90, what=f"prometheus to answer {query}")
        yield ship, server, seq[0]
    finally:
        if server is not None:
            server.close()
        ship.close()


def test_a_prometheus_server_scrapes_the_endpoint_and_answers_a_query(tmp_path):
    query = 'task_cpu_usage_seconds_total{task_id="t1"}'
    with scraped(tmp_path, measurements, query) as (ship, server, last):
        result = server.query(query)
        assert len(result) == 1
        metric, (_, value) = result[0]["metric"], result[0]["value"]
        assert metric["job"] == "owca" and metric["task_name"] == "memcached"
        assert metric["app"] == "mc" and metric["host"] == "node-1"
        assert float(value) in {s * 0.5 for s in range(1, last + 1)}
        assert server.query('up{job="owca"}')[0]["value"][1] == "1"
        assert ship.terminate() == 0, ship.log()


def test_a_prometheus_server_reads_platform_cpu_time_in_seconds_and_the_old_name_in_ticks(
        tmp_path):
    """What PromQL users assume: `platform_cpu_usage_seconds_total` in seconds (the frame's
    USER_HZ ticks / USER_HZ); until release 0.3 the old name, in ticks, beside it."""
    from owca.core import frames
    from owca.core.metrics import USER_HZ
    ticks = 249303

    def frame(seq):
        return frames.measurements_frame(seq, {"platform_cpu_usage": {"0": ticks}}, {},
                                         ts=time.time(), host="node-1")
    with scraped(tmp_path, frame, 'platform_cpu_usage_total{cpu="0"}') as (ship, server, _):
        (seconds,) = server.query('platform_cpu_usage_seconds_total{cpu="0"}')
        (old,) = server.query('platform_cpu_usage_total{cpu="0"}')
        assert float(seconds["value"][1]) == ticks / USER_HZ
        assert float(old["value"][1]) == ticks
        assert ship.terminate() == 0, ship.log()
