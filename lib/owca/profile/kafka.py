"""Kafka for owca-profile: the nodes' cycles in, the profile out and back.

Partitions are read by explicit assignment, never through a consumer group: a profile
build is a batch over a range (two offsets or two times) of every partition of the
topics, and the range read is kept in the profile's `source`.  A consumer group would
move offsets nobody asked to move, and some Kafka-protocol brokers (the tests') assign a
group no partitions at all.
"""
import logging
import time
from typing import Dict, List, Optional, Tuple

log = logging.getLogger("owca.profile")

CATEGORY_HEADER = "owca-category"
SEQ_HEADER = "owca-seq"


class KafkaError(RuntimeError):
    """The broker could not be read or written (one line)."""


def _consumer(bootstrap: List[str]):
    from kafka import KafkaConsumer, errors
    try:
        return KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             request_timeout_ms=20000, client_id="owca-profile")
    except (errors.KafkaError, OSError, ValueError) as e:   # NoBrokersAvailable and others
        raise KafkaError(f"{','.join(bootstrap)}: {type(e).__name__}: {e}") from None


def _partitions(consumer, topic: str, wait: float = 10.0) -> list:
    from kafka import TopicPartition
    deadline = time.monotonic() + wait
    while True:
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        if time.monotonic() > deadline:
            raise KafkaError(f"topic {topic}: not found (no partitions)")
        time.sleep(0.2)


def _range(consumer, tps, start, end) -> Dict:
    """tp -> [first, stop) offsets; start/end are ("offset", n), ("time", seconds) or None
    (the beginning, the end as it is now)."""
    begin = consumer.beginning_offsets(tps)
    latest = consumer.end_offsets(tps)

    def at(bound, default):
        if bound is None:
            return dict(default)
        kind, value = bound
        if kind == "offset":
            return {tp: min(max(int(value), begin[tp]), latest[tp]) for tp in tps}
        found = consumer.offsets_for_times({tp: int(value * 1000) for tp in tps})
        return {tp: (found[tp].offset if found.get(tp) is not None else latest[tp])
                for tp in tps}

    first, stop = at(start, begin), at(end, latest)
    return {tp: (first[tp], max(first[tp], stop[tp])) for tp in tps}


def _header(record, name: str) -> Optional[bytes]:
    for k, v in record.headers or ():
        if k == name:
            return v
    return None


def _records(consumer, topic: str, ranges: Dict):
    """Each record of `topic` in its partition's [first, stop) range, partition by
    partition in the order the broker answers; the partitions assigned explicitly."""
    wanted = {tp: r for tp, r in ranges.items() if r[1] > r[0]}
    if not wanted:
        return
    consumer.assign(list(wanted))
    for tp, (first, _) in wanted.items():
        consumer.seek(tp, first)
    left = dict(wanted)
    idle_since = time.monotonic()
    while left:
        batches = consumer.poll(timeout_ms=500, max_records=5000)
        if not batches and time.monotonic() - idle_since > 30:
            raise KafkaError(f"topic {topic}: no messages for 30 s before the offsets "
                             f"asked for were reached")
        for tp, records in sorted(batches.items(), key=lambda x: x[0].partition):
            idle_since = time.monotonic()
            stop = wanted[tp][1]
            for r in records:
                if r.offset >= stop:
                    break
                yield r
            if consumer.position(tp) >= stop:
                left.pop(tp, None)
                consumer.pause(tp)


def read_cycles(bootstrap: List[str], topics: List[str], start=None, end=None,
                chunk: int = 2000) -> Tuple[List[tuple], dict, int]:
    """(chunks of ("messages", [(category, host, seq, ts, text)...]), source, bad) of the
    topics' every partition between `start` and `end`."""
    consumer = _consumer(bootstrap)
    read: Dict[str, dict] = {}
    source: Dict[str, object] = {"bootstrap_servers": list(bootstrap), "topics": read}
    items: List[tuple] = []
    bad = 0
    try:
        for topic in topics:
            ranges = _range(consumer, _partitions(consumer, topic), start, end)
            read[topic] = {str(tp.partition): list(r) for tp, r in
                           sorted(ranges.items(), key=lambda x: x[0].partition)}
            for r in _records(consumer, topic, ranges):
                try:
                    category = (_header(r, CATEGORY_HEADER) or b"").decode()
                    seq = int(_header(r, SEQ_HEADER) or b"-1")
                    items.append((category, r.key.decode("utf-8", "replace"), seq,
                                  r.timestamp / 1000.0, r.value.decode("utf-8", "replace")))
                except (ValueError, AttributeError):
                    bad += 1
    finally:
        consumer.close()
    chunks = [("messages", items[i:i + chunk]) for i in range(0, len(items), chunk)]
    return chunks, source, bad


def publish(bootstrap: List[str], topic: str, messages: List[tuple]) -> None:
    """Each (key, value) to `topic`, created compacted if it is not there yet."""
    from kafka import KafkaAdminClient, KafkaProducer, admin, errors
    try:
        client = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="owca-profile")
        try:
            client.create_topics([admin.NewTopic(
                topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        except errors.TopicAlreadyExistsError:
            pass
        finally:
            client.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all",
                                 client_id="owca-profile")
        try:
            for key, value in messages:
                producer.send(topic, key=key.encode(), value=value).get(timeout=30)
        finally:
            producer.close()
    except errors.KafkaError as e:
        raise KafkaError(f"{topic}: {type(e).__name__}: {e}") from None


def fetch(bootstrap: List[str], topic: str) -> Dict[str, bytes]:
    """The latest value of each key of `topic` (every partition, start to end now)."""
    consumer = _consumer(bootstrap)
    latest: Dict[str, bytes] = {}
    try:
        ranges = _range(consumer, _partitions(consumer, topic), None, None)
        for r in _records(consumer, topic, ranges):
            if r.key is not None:
                latest[r.key.decode("utf-8", "replace")] = r.value or b""
    finally:
        consumer.close()
    return latest
