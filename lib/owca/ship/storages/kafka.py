"""Storage `kafka`: every cycle to a Kafka topic, through an on-disk spool.

    ship:
      storages:
        - !KafkaStorage
          bootstrap_servers: [kafka-1.example:9093]
          spool_directory: /var/lib/owca-ship/kafka-spool

One message per cycle: the cycle's Prometheus text exposition (with
timestamps) as the value, the host as the key (so that one node's cycles stay
in one partition, in order), the cycle's time as the message timestamp, and
headers `owca-category`, `owca-seq` and `content-type`.  One topic per
category (metrics, anomalies, allocations).

store() only appends the cycle to the spool (written and fsync'd: the point at
which a cycle counts as acknowledged) and returns; a sender thread takes the
oldest cycle, sends it with acks from all in-sync replicas, and removes it once
the broker has acknowledged it.  One cycle is in flight at a time, so the order
on the topic is the order of the cycles whatever fails in between; a cycle
whose acknowledgement was lost is sent again (at least once).  While the broker
cannot be reached the sender backs off exponentially and the cycles wait in
the spool, bounded, the oldest dropped first.  docs/shipping.md is the
operator's description.
"""
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Type

from owca.core import frames
from owca.ship.exposition import timestamp_ms
from owca.ship.spool import (CORRUPT, DISK_FULL, FULL, TOO_LARGE, Record, Spool, SpoolError,
                             SpoolFull)
from owca.plugin import CATEGORIES, Cycle, Storage, StorageError

log = logging.getLogger("owca.kafka")

DEFAULT_TOPICS = {c: f"owca_{c}" for c in CATEGORIES}
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
REJECTED = "rejected"
DROP_REASONS = (FULL, DISK_FULL, TOO_LARGE, REJECTED, CORRUPT)
DROP_LOG_SECONDS = 60     # a spool that drops says so at most this often
TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}\Z")
MiB = 1024 * 1024

# Outcomes of one attempt to deliver a record.
DELIVERED, FAILED, REFUSED = "delivered", "failed", "refused"


def _permanent_errors() -> tuple:
    """Broker answers about the record itself: sending it again cannot succeed."""
    from kafka import errors
    return (errors.MessageSizeTooLargeError, errors.RecordListTooLargeError,
            errors.InvalidRecordError, errors.InvalidTimestampError)


class ClientErrors(logging.Handler):
    """Keeps the Kafka client's last error line instead of printing it: the client logs
    every refused connection, the sender says once why delivery stopped.  It also counts
    the connections the client reports lost or refused, as they happen: the client
    itself retries for up to its delivery timeout before a send fails, and an outage
    must not stay unseen that long."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.last = None
        self.connection_errors = 0

    def emit(self, record):
        message = record.getMessage().splitlines()[0]
        if message.startswith("Connection failed: "):   # the cause, not the consequences
            self.last = message[len("Connection failed: "):]
        _, lost, why = message.partition("Connection lost: ")
        if lost:
            self.connection_errors += 1
            if self.last is None:
                self.last = why

    @classmethod
    def install(cls) -> "ClientErrors":
        client_log = logging.getLogger("kafka")
        for handler in client_log.handlers:
            if isinstance(handler, cls):
                return handler
        handler = cls()
        client_log.addHandler(handler)
        if log.getEffectiveLevel() > logging.DEBUG:
            client_log.propagate = False
            client_log.setLevel(logging.ERROR)
        return handler


def message_of(record: Record) -> dict:
    """KafkaProducer.send() arguments for a spooled cycle."""
    meta = record.meta
    return {"topic": meta["topic"], "value": record.payload,
            "key": meta["host"].encode(),
            "headers": [("owca-category", meta["category"].encode()),
                        ("owca-seq", str(meta["seq"]).encode()),
                        ("content-type", CONTENT_TYPE)],
            # None (the time of sending) where an int64 cannot hold it, as in the text:
            # a cycle the client cannot encode would stay at the head of the spool.
            "timestamp_ms": timestamp_ms(meta["ts"])}


class Sender(threading.Thread):
    """Drains the spool into a producer, one record in flight, backing off on failure."""

    def __init__(self, spool: Spool, make_producer, backoff: float, backoff_max: float,
                 where: str, client_errors: ClientErrors, answer_timeout: float = 5.0):
        super().__init__(name="owca-kafka-sender", daemon=True)
        self.spool = spool
        self.make_producer = make_producer
        self.backoff_min = backoff
        self.backoff_max = backoff_max
        self.where = where
        self.client_errors = client_errors
        self.answer_timeout = answer_timeout
        self.sent = 0
        self.errors = 0
        self.unanswered = 0
        # When the wait for the broker in progress (connect, or send to acknowledgement)
        # began, and whether it was counted unanswered; read by samples() as well.
        self._waiting_since: Optional[float] = None
        self._waiting_counted = False
        self._waiting_lock = threading.Lock()
        self._silence_logged = False
        self._producer: Any = None   # a KafkaProducer while connected
        self._errors_seen = 0    # connection errors counted when delivery last worked
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._permanent: Tuple[Type[Exception], ...] = ()

    def run(self):
        self._permanent = _permanent_errors()
        backoff = self.backoff_min
        failures = 0
        try:
            while not self._abort.is_set():
                if self._closing.is_set() and not len(self.spool):
                    break
                if not self.spool.wait(timeout=0.2 if self._closing.is_set() else 1.0):
                    continue
                try:
                    outcome, error = self._attempt()
                except Exception as e:  # noqa: BLE001 a bug or a disk error must not
                    # end delivery for good
                    outcome, error = FAILED, _describe(e)
                    log.error("kafka: sender: %s", error)
                if outcome == DELIVERED:
                    self._silence_logged = False
                    if failures:
                        log.info("kafka: delivering to %s again after %d failed attempts; "
                                 "%d cycles waiting", self.where, failures, len(self.spool))
                    failures, backoff = 0, self.backoff_min
                elif outcome == FAILED:
                    if self._abort.is_set():
                        break
                    self.errors += 1
                    failures += 1
                    self._discard_producer()
                    # One line when delivery stops; the counters tell the rest.
                    (log.warning if failures == 1 else log.debug)(
                        "kafka: cannot deliver to %s: %s; %d cycles wait in the spool, "
                        "retrying with backoff", self.where, error, len(self.spool))
                    self._abort.wait(backoff * random.uniform(0.8, 1.2))
                    backoff = min(backoff * 2, self.backoff_max)
        finally:
            self._discard_producer()

    def _attempt(self):
        """Deliver the oldest record: (outcome, error), (None, None) when there was none."""
        self.client_errors.last = None
        if self._producer is not None and \
                self.client_errors.connection_errors != self._errors_seen:
            # A connection broke since the last delivery (the broker went while the
            # sender was idle): fail now, rather than inside send(), which would wait
            # up to its max_block_ms for the broker's metadata.
            return FAILED, "connection to the broker lost"
        outcome, error = self._connect()
        if outcome is not None:
            return outcome, self._with_cause(error)
        # Taken only once connected: a record waiting for a broker that cannot be
        # reached is not held, so a full spool may drop it.
        record = self.spool.take(timeout=0)
        if record is None:
            return None, None
        outcome, error = self._deliver(record)
        if outcome == DELIVERED:
            self.spool.release(record, delivered=True)
            self.sent += 1
            self._errors_seen = self.client_errors.connection_errors
        elif outcome == REFUSED:
            self.spool.drop(record, REJECTED)
            log.error("kafka: %s cycle %s refused by the broker, dropped: %s",
                      record.meta["category"], record.meta["seq"], error)
        else:
            self.spool.release(record, delivered=False)
            error = self._with_cause(error)
        return outcome, error

    def _with_cause(self, error: str) -> str:
        """The client's own reason added, when it has one (a TLS handshake's, say)."""
        why = self.client_errors.last
        return f"{error} ({why})" if why and why not in error else error

    def _connect(self):
        """(None, None) with a producer ready, else (FAILED, why)."""
        if self._producer is None:
            self._wait_begins()     # the client waits for the broker's metadata here
            try:
                self._producer = self.make_producer()
            except Exception as e:  # noqa: BLE001 any client error means: not reachable now
                return FAILED, _describe(e)
            finally:
                self._wait_ends()
            self._errors_seen = self.client_errors.connection_errors
        return None, None

    def _wait_begins(self):
        with self._waiting_lock:
            self._waiting_since, self._waiting_counted = time.monotonic(), False

    def _wait_ends(self):
        self.check_unanswered()
        with self._waiting_lock:
            self._waiting_since = None

    def check_unanswered(self) -> int:
        """Count the wait in progress as unanswered once it passed answer_timeout (called
        by samples(), so that a broker that hangs shows while the client still waits,
        and when the wait ends); the count."""
        with self._waiting_lock:
            since = self._waiting_since
            if since is None or self._waiting_counted:
                return self.unanswered
            waited = time.monotonic() - since
            if waited < self.answer_timeout:
                return self.unanswered
            self._waiting_counted = True
            self.unanswered += 1
            first = not self._silence_logged
            self._silence_logged = True
        if first:
            log.warning("kafka: %s has not answered for %.0f s (answer_timeout_seconds); "
                        "%d cycles wait in the spool", self.where, waited, len(self.spool))
        return self.unanswered

    def _deliver(self, record: Record):
        self._wait_begins()
        try:
            return self._send(record)
        finally:
            self._wait_ends()

    def _send(self, record: Record):
        try:
            future = self._producer.send(**message_of(record))
        except self._permanent as e:
            return REFUSED, _describe(e)
        except Exception as e:  # noqa: BLE001 any client error: not delivered, try again later
            return FAILED, _describe(e)
        done = threading.Event()
        future.add_both(lambda _: done.set())
        while not done.wait(0.1):
            if self._abort.is_set():
                return FAILED, "stopped"
            if self.client_errors.connection_errors != self._errors_seen:
                # The connection broke under the send: the attempt has failed now, not
                # when the client's delivery timeout runs out (the record may have
                # reached the broker: sent again, it may arrive twice, as at-least-once
                # allows).
                return FAILED, "connection to the broker lost"
        if future.succeeded():
            return DELIVERED, None
        if isinstance(future.exception, self._permanent):
            return REFUSED, _describe(future.exception)
        return FAILED, _describe(future.exception)

    def _discard_producer(self):
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.close(timeout=0)
        except Exception:  # noqa: BLE001 whatever close() raised, it is forced closed
            # close() flushes before it forces, so a record still pending makes it
            # raise; fail that record the way kafka-python does past a close timeout.
            sender = getattr(producer, "_sender", None)
            if sender is not None:
                sender.force_close()
                sender.join(1.0)
            try:
                producer.close(timeout=0)
            except Exception as e:  # noqa: BLE001 the producer is discarded either way
                log.debug("kafka: producer not closed cleanly: %s", _describe(e))

    def stop(self, timeout: float) -> bool:
        """Deliver what can be delivered within `timeout` seconds, then stop."""
        self._closing.set()
        self.spool.wake()
        self.join(timeout)
        if self.is_alive():
            self._abort.set()
            self.spool.wake()
            self.join(2.0)
        return not self.is_alive()


def _describe(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    name = type(e).__name__
    return text if name in text else f"{name}: {text}" if text else name


@dataclass(kw_only=True)
class KafkaStorage(Storage):
    """Cycles to Kafka, one message per cycle, through a bounded on-disk spool."""
    bootstrap_servers: List[str]
    topics: Dict[str, str] = field(default_factory=dict)   # category -> topic
    client_id: str = "owca-ship"
    spool_directory: str = "/var/lib/owca-ship/kafka-spool"   # the unit's StateDirectory
    spool_max_bytes: int = 256 * MiB
    spool_max_cycles: int = 100000
    spool_fsync: bool = True
    # None: 64 MiB, at most 5 % of the spool's filesystem (owca.ship.spool)
    spool_min_free_bytes: Optional[int] = None
    flush_timeout_seconds: float = 10.0
    send_timeout_seconds: float = 30.0
    answer_timeout_seconds: float = 5.0
    retry_backoff_seconds: float = 0.5
    retry_backoff_max_seconds: float = 30.0
    compression_type: Optional[Literal["gzip", "snappy", "lz4", "zstd"]] = None
    max_request_size_bytes: int = 1 * MiB
    enable_idempotence: bool = True
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    ssl_cafile: Optional[str] = None
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    ssl_password: Optional[str] = None
    ssl_crlfile: Optional[str] = None
    ssl_check_hostname: bool = True
    sasl_mechanism: Optional[Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]] = None
    sasl_plain_username: Optional[str] = None
    sasl_plain_password: Optional[str] = None
    sasl_plain_password_file: Optional[str] = None

    def __post_init__(self):
        super().__post_init__()
        self.topics = {**DEFAULT_TOPICS, **self.topics}
        self._check()
        self._producer_config = self.producer_config()
        self._spool: Optional[Spool] = None     # both made by start()
        self._sender: Optional[Sender] = None
        self._dropped_logged = None   # (when, drops counted then) of the last warning

    def start(self) -> None:
        """Open the spool (resuming what a previous run left) and start delivering."""
        try:
            self._spool = Spool(self.spool_directory, self.spool_max_bytes,
                                self.spool_max_cycles, fsync=self.spool_fsync,
                                min_free_bytes=self.spool_min_free_bytes)
        except SpoolError as e:
            raise StorageError(str(e)) from None
        self._sender = Sender(self._spool, self._make_producer, self.retry_backoff_seconds,
                              self.retry_backoff_max_seconds, ",".join(self.bootstrap_servers),
                              ClientErrors.install(), self.answer_timeout_seconds)
        self._sender.start()

    def _check(self):
        if not self.bootstrap_servers:
            raise ValueError("bootstrap_servers: at least one host:port")
        for server in self.bootstrap_servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"bootstrap_servers: expected host:port, got {server!r}")
        for category, topic in self.topics.items():
            if category not in CATEGORIES:
                raise ValueError(f"topics: unknown category {category!r} "
                                 f"(expected {', '.join(CATEGORIES)})")
            if not TOPIC_NAME.match(topic) or topic in (".", ".."):
                raise ValueError(f"topics: {topic!r} (for {category}) is not a valid topic "
                                 f"name (letters, digits, '.', '_', '-'; at most 249)")
        for name in ("spool_max_bytes", "spool_max_cycles", "max_request_size_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive number")
        if self.spool_min_free_bytes is not None and self.spool_min_free_bytes < 0:
            raise ValueError("spool_min_free_bytes: expected 0 or more bytes")
        for name in ("flush_timeout_seconds", "send_timeout_seconds", "answer_timeout_seconds",
                     "retry_backoff_seconds", "retry_backoff_max_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number of seconds")
        if self.retry_backoff_max_seconds < self.retry_backoff_seconds:
            raise ValueError("retry_backoff_max_seconds: less than retry_backoff_seconds")
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile",
                     "sasl_plain_password_file"):
            path = getattr(self, name)
            if path is not None and not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path}")
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None or self.sasl_plain_username is None:
                raise ValueError(f"security_protocol: {self.security_protocol} needs "
                                 f"sasl_mechanism and sasl_plain_username")
            if (self.sasl_plain_password is None) == (self.sasl_plain_password_file is None):
                raise ValueError(f"security_protocol: {self.security_protocol} needs one of "
                                 f"sasl_plain_password, sasl_plain_password_file")
        if self.compression_type is not None:
            from kafka import codec
            available = {"gzip": codec.has_gzip, "snappy": codec.has_snappy,
                         "lz4": codec.has_lz4, "zstd": codec.has_zstd}[self.compression_type]
            if not available():
                raise ValueError(f"compression_type: {self.compression_type} needs a Python "
                                 f"module that is not installed")

    def producer_config(self) -> dict:
        """KafkaProducer's arguments: acks from all in-sync replicas, bounded waits."""
        send_ms = int(self.send_timeout_seconds * 1000)
        password = self.sasl_plain_password
        if self.sasl_plain_password_file is not None:
            with open(self.sasl_plain_password_file, encoding="utf-8") as f:
                password = f.read().rstrip("\n")
        return {
            "bootstrap_servers": list(self.bootstrap_servers),
            "client_id": self.client_id,
            "acks": "all",
            "enable_idempotence": self.enable_idempotence,
            "compression_type": self.compression_type,
            "max_request_size": self.max_request_size_bytes,
            "linger_ms": 0,
            # The producer retries within the delivery timeout; past it the sender
            # backs off and sends the cycle again from the spool.
            "delivery_timeout_ms": send_ms,
            "request_timeout_ms": max(500, send_ms // 2),
            "max_block_ms": send_ms,
            "bootstrap_timeout_ms": send_ms,
            "security_protocol": self.security_protocol,
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_password": self.ssl_password,
            "ssl_crlfile": self.ssl_crlfile,
            "ssl_check_hostname": self.ssl_check_hostname,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": password,
        }

    def _make_producer(self):
        from kafka import KafkaProducer
        return KafkaProducer(**self._producer_config)

    def store(self, cycle: Cycle) -> None:
        assert self._spool is not None, "store() before start()"
        meta = {"topic": self.topics[cycle.category], "category": cycle.category,
                "seq": cycle.seq, "ts": cycle.ts, "host": cycle.host}
        try:
            self._spool.append(meta, cycle.text.encode())
        except SpoolFull:
            pass            # counted; the warning below says it
        except SpoolError as e:
            raise StorageError(str(e)) from None
        finally:
            self._report_drops()

    def _report_drops(self):
        """A warning when cycles were dropped to make room, at most once a minute: the
        counters count every drop, the log only says that it happens, and why."""
        assert self._spool is not None, "called by store()"
        dropped = self._spool.dropped
        total = dropped[FULL] + dropped[DISK_FULL]
        now = time.monotonic()
        last = self._dropped_logged
        if total == (last[1] if last else 0) or (last and now - last[0] < DROP_LOG_SECONDS):
            return
        self._dropped_logged = (now, total)
        cycles, nbytes = self._spool.depth()
        log.warning("kafka: spool %s full: dropping the oldest cycles to make room (%d "
                    "cycles, %d bytes kept, %d bytes free on its filesystem); dropped so far: "
                    "%d for spool_max_cycles/spool_max_bytes, %d for the disk "
                    "(reserve %d bytes, spool_min_free_bytes)", self.spool_directory, cycles,
                    nbytes, self._spool.free_bytes(), dropped[FULL], dropped[DISK_FULL],
                    self._spool.reserve_bytes())

    def samples(self) -> List[dict]:
        if self._spool is None:
            return []
        assert self._sender is not None, "started with the spool"
        labels = {"storage": type(self).__name__}
        cycles, nbytes = self._spool.depth()
        out = [frames.sample("owca_ship_spool_cycles", cycles, labels),
               frames.sample("owca_ship_spool_bytes", nbytes, labels),
               frames.sample("owca_ship_sent_cycles_total", self._sender.sent, labels,
                             "counter"),
               frames.sample("owca_ship_send_errors_total", self._sender.errors, labels,
                             "counter"),
               frames.sample("owca_ship_connection_errors_total",
                             self._sender.client_errors.connection_errors, labels, "counter"),
               frames.sample("owca_ship_unanswered_sends_total",
                             self._sender.check_unanswered(), labels, "counter")]
        for reason in DROP_REASONS:
            out.append(frames.sample("owca_ship_dropped_cycles_total",
                                     self._spool.dropped[reason],
                                     {**labels, "reason": reason}, "counter"))
        return out

    def close(self) -> None:
        """Deliver for at most flush_timeout_seconds; the rest waits in the spool."""
        if self._spool is None:
            return
        assert self._sender is not None, "started with the spool"
        if not self._sender.stop(self.flush_timeout_seconds):
            log.warning("kafka: sender still busy after the flush timeout")
        left = len(self._spool)
        if left:
            log.warning("kafka: %d cycles left in the spool %s for the next start",
                        left, self.spool_directory)
        self._spool.close()
        self._spool = self._sender = None
