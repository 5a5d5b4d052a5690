"""owca-profile's commands (the usage is bin/owca-profile's docstring)."""
import gzip
import logging
import sys
import time
from typing import List, Optional

from owca.core.stage import (EXIT_ERROR, EXIT_OK, DataError, UsageError, parse_args,
                             run_guarded, setup_logging)
from owca.profile import profile as prof
from owca.profile.records import Options

log = logging.getLogger("owca.profile")

TOOL = "owca-profile"
LINES_PER_CHUNK = 2000


def _bound(text: Optional[str], name: str):
    if text is None:
        return None
    try:
        if text.startswith("@"):
            return ("time", float(text[1:]))
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}: expected an offset (123) or a time (@1700000000), "
                         f"got {text!r}") from None
    if value < 0:
        raise UsageError(f"{name}: expected an offset >= 0")
    return ("offset", value)


def _positive(args, name: str) -> int:
    try:
        value = int(args[name])
    except (TypeError, ValueError):
        raise UsageError(f"{name}: expected a positive integer, got {args[name]!r}") from None
    if value < 1:
        raise UsageError(f"{name}: expected a positive integer, got {value}")
    return value


def _servers(text: str) -> List[str]:
    servers = [s.strip() for s in text.split(",") if s.strip()]
    if not servers:
        raise UsageError("--kafka: expected host:port[,host:port...]")
    return servers


def options(args) -> Options:
    try:
        ratio = float(args["--load-bucket-ratio"])
    except ValueError:
        ratio = 0.0
    if ratio <= 1:
        raise UsageError("--load-bucket-ratio: expected a number above 1 (1.25: 25 % wide)")
    return Options(workload_label=args["--workload-label"],
                   cpu_model_label=args["--cpu-model-label"],
                   sli_metric=args["--sli-metric"], load_bucket_ratio=ratio)


def file_chunks(paths: List[str]) -> List[tuple]:
    """("lines", [...]) chunks of the files, in order."""
    chunks = []
    for index, path in enumerate(paths):
        try:
            if path == "-":
                data = sys.stdin.buffer.read()
            else:
                opener = gzip.open if path.endswith(".gz") else open
                with opener(path, "rb") as f:
                    data = f.read()
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
        lines = data.splitlines()
        chunks += [("lines", lines[i:i + LINES_PER_CHUNK], index)
                   for i in range(0, len(lines), LINES_PER_CHUNK)]
    return chunks


def build(args) -> int:
    from owca.profile import engine
    opts = options(args)
    workers = _positive(args, "--workers")
    partitions = _positive(args, "--partitions") if args["--partitions"] else None
    bad = 0
    started = time.monotonic()
    if args["--kafka"]:
        from owca.profile import kafka
        topics = [t for t in args["--topics"].split(",") if t]
        try:
            chunks, source, bad = kafka.read_cycles(
                _servers(args["--kafka"]), topics, _bound(args["--start"], "--start"),
                _bound(args["--end"], "--end"))
        except kafka.KafkaError as e:
            raise DataError(str(e)) from None
    else:
        chunks, source = file_chunks(args["FILE"]), {"files": list(args["FILE"])}
    log.info("read %d chunks in %.1f s", len(chunks), time.monotonic() - started)
    try:
        client, cluster = engine.client_for(args["--scheduler"], workers)
    except engine.EngineError as e:
        raise DataError(str(e)) from None
    try:
        doc = engine.build(chunks, opts, source, client, partitions,
                           engine="dask:" + (args["--scheduler"] or "local"))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    doc["totals"]["bad_inputs"] += bad
    prof.write(doc, args["--output"])
    if args["--publish"]:
        _publish(args, doc)
    t = doc["totals"]
    log.info("profile of %d hosts, %d task cycles (%d flagged, left out), %d workloads, "
             "%d bad-neighbour pairs, %d bad inputs, in %.1f s", t["hosts"], t["task_cycles"],
             t["excluded_task_cycles"], len(doc["workloads"]), len(doc["bad_neighbours"]),
             t["bad_inputs"], doc["built"]["seconds"])
    return EXIT_OK


def _publish(args, doc: dict) -> None:
    from owca.profile import kafka
    if not args["--kafka"]:
        raise UsageError("--publish: needs --kafka")
    try:
        kafka.publish(_servers(args["--kafka"]), args["--profile-topic"], prof.messages(doc))
    except kafka.KafkaError as e:
        raise DataError(str(e)) from None


def fetch(args) -> int:
    from owca.profile import kafka
    topic = args["--profile-topic"]
    try:
        latest = kafka.fetch(_servers(args["--kafka"]), topic)
        doc = prof.join(latest, topic)
    except (kafka.KafkaError, prof.ProfileError) as e:
        raise DataError(str(e)) from None
    prof.write(doc, args["--output"])
    log.info("profile of %d workloads fetched from %s", len(doc["workloads"]), topic)
    return EXIT_OK


def main(doc: str, argv=None) -> int:
    args, code = parse_args(TOOL, doc, argv)
    if args is None:
        return code if code is not None else EXIT_ERROR

    def body():
        setup_logging(TOOL, args["--log-level"])
        if log.getEffectiveLevel() > logging.DEBUG:
            # The Kafka client logs each failed connection; the error that ends the
            # command says once what failed.
            logging.getLogger("kafka").setLevel(logging.CRITICAL)
        if args["build"]:
            return build(args)
        return fetch(args)

    return run_guarded(TOOL, False, body)
