"""owca-ship against what a hostile or broken upstream, plug-in, broker or disk can give
it: every exposition it writes still parses (`promtool check metrics`), the good samples
of a frame survive the bad one beside them, what was repaired or left out is counted,
and the operator hears of a hung broker, a small disk and a storage that cannot write.
Real owca-ship processes, real promtool, real sockets, a real tmpfs."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import tool_command, tool_env, wait_for
from kafka_broker import (HOST, TS0, broker, consume, free_port, measurements,  # noqa: F401
                          terminate)
from owca.ship.spool import parse_name
from small_fs import small_fs  # noqa: F401  (a fixture)
from test_kafka import scraped, value

PLATFORM_LINE = f'platform_mem_usage_bytes{{host="{HOST}"}} 5001'
TASK_LINE = f'task_up{{host="{HOST}",task_id="t1",task_name="memcached",app="mc"}} 1'


def frame(seq=1, ts=TS0 + 1, platform=None, tasks=None, metrics=None, kind="measurements"):
    """A measurements frame with good samples (PLATFORM_LINE, TASK_LINE), to which a case
    adds its hostile one; a JSON line, written as json.dumps writes what Python holds
    (NaN, a lone surrogate escaped, an integer of any length)."""
    task = {"name": "memcached", "labels": {"app": "mc"}, "metrics": {"task_up": 1}}
    body = {"v": 1, "kind": kind, "seq": seq, "ts": ts, "host": HOST,
            "platform": {"platform_mem_usage_bytes": 5001, **(platform or {})},
            "tasks": tasks if tasks is not None else {"t1": task},
            "metrics": metrics or []}
    return (json.dumps(body) + "\n").encode()


def ship(stdin: bytes, *args, config=None):
    """owca-ship (--no-timing) on `stdin`; its default storage is standard output."""
    argv = ["--no-timing", *args] + (["-c", str(config)] if config else [])
    return subprocess.run(tool_command("ship", *argv), input=stdin, capture_output=True,
                          env=tool_env(), timeout=120)


def blocks(stdout: bytes):
    """The exposition texts of owca-ship's standard output, one per frame."""
    return [b.split("\n", 1)[1] for b in stdout.decode().split("# owca ")[1:]]


def promtool_passes(text: str):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool command (Debian package prometheus, requirements/apt.txt)")
    checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=120)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b""), text


def two_cycles(stdin: bytes):
    """(the first block, the second, stderr) of owca-ship on `stdin` (the hostile frame,
    then a good one), each block checked by promtool."""
    result = ship(stdin)
    assert result.returncode == 0, result.stderr
    texts = blocks(result.stdout)
    for text in texts:
        promtool_passes(text)
    return (*texts, result.stderr.decode())


def sample_lines(text: str, prefix: str):
    return [line for line in text.splitlines() if line.startswith(prefix)]


# -- cause 1: one sample the frame protocol allows must not cost the whole exposition -------

def _task(**changes):
    task = {"name": "memcached", "labels": {"app": "mc"}, "metrics": {"task_up": 1}}
    task.update(changes)
    return {"t1": task}


HOSTILE = {
    # id: (the hostile frame, a line of its block, owca-ship's count in the next cycle)
    "label __name__": (
        frame(metrics=[{"name": "app_requests", "value": 3,
                        "labels": {"__name__": "other", "path": "/"}}]),
        f'app_requests{{host="{HOST}",path="/"}} 3 ',
        'owca_ship_bad_labels_total{host="node-1",stage="ship",reason="reserved"} 1'),
    "a task label __meta": (
        frame(tasks=_task(labels={"__meta_pod": "x", "app": "mc"})),
        TASK_LINE,
        'owca_ship_bad_labels_total{host="node-1",stage="ship",reason="reserved"} 1'),
    "ts 1e300": (
        frame(ts=1e300), PLATFORM_LINE + "\n",
        'owca_ship_bad_timestamps_total{host="node-1",stage="ship"} 1'),
    "ts in milliseconds": (
        frame(ts=9.3e15), PLATFORM_LINE + "\n",
        'owca_ship_bad_timestamps_total{host="node-1",stage="ship"} 1'),
    "ts beyond float milliseconds": (
        frame(ts=1e307), PLATFORM_LINE + "\n",
        'owca_ship_bad_timestamps_total{host="node-1",stage="ship"} 1'),
    "a value of 401 digits": (
        frame(platform={"huge": int("9" * 401)}), PLATFORM_LINE,
        'owca_ship_bad_values_total{host="node-1",stage="ship"} 1'),
    "a value beyond int64": (
        frame(platform={"big": 10 ** 25}), f'big{{host="{HOST}"}} 1e+25 ',
        'owca_ship_bad_values_total{host="node-1",stage="ship"} 0'),
    "a sample's host label": (
        frame(metrics=[{"name": "app_requests", "value": 3, "labels": {"host": "other"}}]),
        f'app_requests{{host="{HOST}",exported_host="other"}} 3 ',
        'owca_ship_bad_labels_total{host="node-1",stage="ship",reason="clashing"} 1'),
    "a task label named like a metric's level": (
        frame(tasks=_task(labels={"numa_node": "x"},
                          metrics={"task_up": 1, "task_mem_numa_pages": {"0": 7}})),
        'task_mem_numa_pages{host="node-1",task_id="t1",task_name="memcached",'
        'exported_numa_node="x",numa_node="0"} 7 ',
        'owca_ship_bad_labels_total{host="node-1",stage="ship",reason="clashing"} 1'),
    "two names of one exposition name": (
        frame(tasks=_task(metrics={"task_up": 1, "task_cpu_usage_seconds": 1.5,
                                   "task_cpu_usage_seconds_total": 2.5})),
        'task_cpu_usage_seconds_total{host="node-1",task_id="t1",task_name="memcached",'
        'app="mc"} 1.5 ',
        'owca_ship_dropped_samples_total{host="node-1",stage="ship",reason="duplicate"} 1'),
    # (a lone surrogate never gets this far: the frame reader refuses the line,
    # tests/test_hostile_config_frames.py)
    "a help that is not text": (
        frame(metrics=[{"name": "app_requests", "value": 3, "help": {"no": "text"}}]),
        f'app_requests{{host="{HOST}"}} 3 ',
        'owca_ship_bad_values_total{host="node-1",stage="ship"} 0'),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_one_hostile_sample_leaves_an_exposition_that_parses(case, tmp_path):
    """The hostile frame, then a good one: every block on stdout passes promtool, the
    hostile frame's good samples are in its block, and the next cycle counts what was
    repaired.  The textfile of the hostile cycle (timestamps stripped) passes too."""
    hostile, expected, counted = HOSTILE[case]
    first, second, err = two_cycles(hostile + frame(seq=2))
    assert PLATFORM_LINE in first and expected in first
    assert counted in second
    assert len(err.splitlines()) <= 1     # said once, in one line

    textfile = tmp_path / "owca.prom"
    config = tmp_path / "ship.yaml"
    config.write_text(f"ship:\n  storages:\n    - !FileStorage {{path: {textfile}, "
                      f"overwrite: true}}\n")
    result = ship(hostile, config=config)
    assert result.returncode == 0, result.stderr
    text = textfile.read_text()
    promtool_passes(text)
    assert PLATFORM_LINE + "\n" in text


# -- cause 2: values that are not numbers -----------------------------------------------------

def test_values_that_are_not_finite_numbers_are_left_out_and_counted():
    """A string, a boolean, null and an integer beyond float64, as platform, task and
    nested values: each left out and counted, the rest shipped.  (NaN and the infinities
    never get this far: JSON has no such token, and the frame reader refuses the line,
    tests/test_hostile_config_frames.py.)"""
    hostile = frame(
        platform={"c": "fast", "d": True, "e": None,
                  "f": 10 ** 400, "g": {"0": "slow", "1": 7}},
        tasks=_task(metrics={"task_up": 1, "task_mem_usage_bytes": "lots"}))
    first, second, err = two_cycles(hostile + frame(seq=2))
    assert PLATFORM_LINE in first and TASK_LINE in first
    assert f'g{{host="{HOST}",level1="1"}} 7 ' in first
    for name in ("c", "d", "e", "f", "task_mem_usage_bytes"):
        assert not re.search(rf"^{name}[{{ ]", first, re.M), name
    assert 'owca_ship_bad_values_total{host="node-1",stage="ship"} 6 ' in second
    assert "cycle 1: 6 metric values are not finite numbers" in err


# -- cause 3: an upstream sample cannot forge owca-ship's own ----------------------------------

def test_an_upstream_sample_cannot_forge_owca_ship_s_own_counters():
    """A frame (and an anomaly's evidence) carries samples with the names and labels of
    owca-ship's own counters: owca-ship's own values are shipped, once each; the forged
    ones are dropped and counted."""
    forged = [{"name": "owca_bad_frames_total", "value": 99, "labels": {"stage": "ship"},
               "type": "counter"},
              {"name": "owca_frames_read_total", "value": 1000, "labels": {"stage": "ship"},
               "type": "counter"},
              {"name": "owca_ship_bad_values_total", "value": 5, "labels": {"stage": "ship"}},
              # another stage's counter of the same name is no forgery
              {"name": "owca_frames_read_total", "value": 7, "labels": {"stage": "detect"},
               "type": "counter"}]
    anomaly = {"v": 1, "kind": "anomalies", "seq": 1, "ts": TS0 + 1, "host": HOST,
               "anomalies": [{"type": "contention", "resource": "cpu",
                              "contended_task_id": "t1", "contending_task_ids": ["t2"],
                              "uuid": "u1", "metrics": forged[:1]}]}
    stdin = b"not a frame\n" + frame(metrics=forged) + json.dumps(anomaly).encode() + b"\n" \
        + frame(seq=2)
    first, anomalies, second, _ = two_cycles(stdin)
    own = f'{{host="{HOST}",stage="ship"}}'
    assert sample_lines(first, "owca_bad_frames_total" + own) == \
        [f"owca_bad_frames_total{own} 1 1700000001000"]
    assert sample_lines(first, "owca_frames_read_total" + own) == \
        [f"owca_frames_read_total{own} 2 1700000001000"]
    assert sample_lines(first, "owca_ship_bad_values_total" + own) == \
        [f"owca_ship_bad_values_total{own} 0 1700000001000"]
    assert f'owca_frames_read_total{{host="{HOST}",stage="detect"}} 7 ' in first
    assert "owca_bad_frames_total" not in anomalies
    assert 'owca_ship_dropped_samples_total{host="node-1",stage="ship",reason="forged"} 4 ' \
        in second
    for family in text_string_to_metric_families(first):
        series = [(s.name, tuple(sorted(s.labels.items()))) for s in family.samples]
        assert len(series) == len(set(series)), family.name


# -- cause 4: a storage that prints -----------------------------------------------------------

PRINTING_STORAGE = '''
import os
import subprocess
from dataclasses import dataclass

from owca.plugin import Storage


@dataclass(kw_only=True)
class PrintingStorage(Storage):
    """A plug-in storage that talks on standard output, as careless ones do."""

    def start(self):
        print("printed at start")

    def store(self, cycle):
        print(f"printed for cycle {cycle.seq}", flush=True)
        os.write(1, b"written to descriptor 1\\n")
        subprocess.run(["echo", "a child's output"], check=True)
'''


def test_a_storage_that_prints_leaves_the_exposition_on_stdout_alone(tmp_path):
    plugin = tmp_path / "printing.py"
    plugin.write_text(PRINTING_STORAGE)
    config = tmp_path / "ship.yaml"
    config.write_text("ship:\n  storages:\n    - !PrintingStorage {}\n    - !StdoutStorage {}\n")
    result = ship(frame(seq=1) + frame(seq=2), "-r", f"{plugin}:PrintingStorage",
                  config=config)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    assert "printed" not in out and "descriptor 1" not in out and "child" not in out, out
    texts = blocks(result.stdout)
    assert len(texts) == 2
    for text in texts:
        promtool_passes(text)
        assert PLATFORM_LINE in text
    err = result.stderr.decode()
    for said in ("printed at start", "printed for cycle 2", "written to descriptor 1",
                 "a child's output"):
        assert said in err, err


# -- cause 5: a broker that accepts and never answers -----------------------------------------

HUNG_BROKER = """
import socket, sys, threading
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(16)
print(server.getsockname()[1], flush=True)

def swallow(conn):
    while conn.recv(65536):
        pass

while True:
    conn, _ = server.accept()
    threading.Thread(target=swallow, args=(conn,), daemon=True).start()
"""


def test_a_hung_broker_shows_in_the_metrics_long_before_the_client_gives_up(tmp_path):
    """A process that accepts Kafka connections, reads and never answers.  The client
    would wait send_timeout_seconds (300 s here) before an attempt fails; the storage's
    own answer_timeout_seconds (1 s) counts the attempt unanswered while it still waits,
    and the log says so once."""
    hung = subprocess.Popen([sys.executable, "-c", HUNG_BROKER], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    port = free_port()
    log_path = tmp_path / "ship.log"
    ship_proc = None
    try:
        broker_port = int(hung.stdout.readline())
        config = tmp_path / "ship.yaml"
        config.write_text(
            f"ship:\n  storages:\n    - !KafkaStorage\n"
            f"      bootstrap_servers: [127.0.0.1:{broker_port}]\n"
            f"      spool_directory: {tmp_path / 'spool'}\n"
            f"      send_timeout_seconds: 300\n      answer_timeout_seconds: 1\n"
            f"      flush_timeout_seconds: 1\n"
            f"    - !PrometheusStorage {{port: {port}}}\n")
        with open(log_path, "wb") as log:
            ship_proc = subprocess.Popen(tool_command("ship", "-c", str(config)),
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=log, env=tool_env())
        seq = 0

        def unanswered_shown():
            nonlocal seq
            assert ship_proc.poll() is None, log_path.read_text()
            seq += 1
            ship_proc.stdin.write(json.dumps(measurements(seq)).encode() + b"\n")
            ship_proc.stdin.flush()
            got = scraped(port)
            return got and value(got, "owca_ship_unanswered_sends_total") >= 1 and got

        got = wait_for(unanswered_shown, 60, "the unanswered send in the metrics", step=0.5,
                       detail=lambda: log_path.read_text())
        # The client's own timeout is far off: no failed attempt is counted yet.
        assert value(got, "owca_ship_send_errors_total") == 0
        assert value(got, "owca_ship_spool_cycles") >= 1
        os.kill(ship_proc.pid, signal.SIGTERM)
        assert ship_proc.wait(60) == 0, log_path.read_text()
    finally:
        if ship_proc is not None:
            terminate(ship_proc)
            ship_proc.stdin.close()
        terminate(hung)
        hung.stdout.close()
    log = log_path.read_text()
    assert log.count("has not answered for") == 1, log


def test_a_cycle_whose_time_kafka_cannot_carry_is_delivered(broker, tmp_path):  # noqa: F811
    """A frame with ts 1e300: its message goes with the time of sending, instead of
    staying at the head of the spool for good, and the cycles after it follow."""
    config = tmp_path / "ship.yaml"
    config.write_text(f"ship:\n  storages:\n    - !KafkaStorage\n"
                      f"      bootstrap_servers: [{broker.bootstrap}]\n"
                      f"      spool_directory: {tmp_path / 'spool'}\n"
                      f"      send_timeout_seconds: 5\n      flush_timeout_seconds: 20\n")
    before = time.time()
    result = ship(frame(seq=1, ts=1e300) + frame(seq=2), config=config)
    assert result.returncode == 0, result.stderr
    records = consume(broker.bootstrap, "owca_metrics", 2)
    assert [int(dict(r.headers)["owca-seq"]) for r in records] == [1, 2]
    assert records[0].timestamp >= before * 1000
    assert records[1].timestamp == (TS0 + 1) * 1000
    promtool_passes(records[0].value.decode())


# -- cause 6: a small disk -------------------------------------------------------------------

def test_on_a_small_disk_the_default_reserve_leaves_the_spool_room(small_fs, tmp_path):  # noqa: F811
    """A 4 MiB filesystem with 392 KiB free and no broker: the default reserve (64 MiB)
    would leave no room at all; sized from the filesystem it lets the spool keep the 16
    cycles that fit (8 KiB each), none counted disk_full."""
    fs = small_fs(4 << 20)
    fs.fill(leave_free=392 << 10)
    spool = os.path.join(fs.path, "spool")
    config = tmp_path / "ship.yaml"
    config.write_text(f"ship:\n  storages:\n    - !KafkaStorage\n"
                      f"      bootstrap_servers: [127.0.0.1:{free_port()}]\n"
                      f"      spool_directory: {spool}\n"
                      f"      flush_timeout_seconds: 0.5\n    - !StdoutStorage {{}}\n")
    stdin = b"".join(json.dumps(measurements(seq)).encode() + b"\n" for seq in range(1, 17))
    result = ship(stdin, config=config)
    assert result.returncode == 0, result.stderr
    kept = sorted(parse_name(n) for n in os.listdir(spool) if parse_name(n) is not None)
    assert kept == list(range(1, 17)), result.stderr
    last = blocks(result.stdout)[-1]
    assert 'owca_ship_spool_cycles{host="node-1",storage="KafkaStorage"} 15 ' in last
    assert 'owca_ship_dropped_cycles_total{host="node-1",storage="KafkaStorage",' \
           'reason="disk_full"} 0 ' in last
    assert "full: dropping" not in result.stderr.decode()


# -- cause 8: a storage that cannot write ------------------------------------------------------

@pytest.mark.parametrize("storage, reason", [
    ("!FileStorage {path: MISSING/owca.prom}", "FileStorage: path: directory MISSING does not "
                                               "exist"),
    ("!FileStorage {path: MISSING/owca.prom, overwrite: true}",
     "FileStorage: path: directory MISSING does not exist"),
    ("!LogStorage {output: MISSING/owca.log}", "LogStorage: output: directory MISSING does "
                                               "not exist"),
    ("!FileStorage {path: TMP}", "FileStorage: path: TMP is a directory"),
])
def test_check_config_refuses_a_file_that_cannot_be_written(storage, reason, tmp_path):
    missing = str(tmp_path / "no-such-dir")
    config = tmp_path / "ship.yaml"
    config.write_text("ship:\n  storages:\n    - "
                      + storage.replace("MISSING", missing).replace("TMP", str(tmp_path))
                      + "\n")
    result = ship(b"", "--check-config", config=config)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode() == (
        f"owca-ship: error: {config}:3: "
        f"{reason.replace('MISSING', missing).replace('TMP', str(tmp_path))}\n")


def test_check_config_lets_a_unit_s_runtime_directory_be_made_by_systemd(tmp_path):
    """/run/<unit> does not exist before systemd starts the unit (RuntimeDirectory=), and
    the Ansible role checks the configuration before that."""
    runtime = f"/run/owca-test-{os.getpid()}-absent"
    assert not os.path.exists(runtime)
    config = tmp_path / "ship.yaml"
    config.write_text(f"ship:\n  storages:\n    - !FileStorage {{path: {runtime}/m.prom}}\n")
    result = ship(b"", "--check-config", config=config)
    assert (result.returncode, result.stderr) == (0, b"")
    assert not os.path.exists(runtime)
