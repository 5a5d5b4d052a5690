"""The profile's arithmetic, in pieces a distributed engine can run anywhere.

1. `split`: a chunk of input (JSON lines or Kafka messages) becomes compact cycles
   (owca.profile.records), dealt into `partitions` by a stable hash of the host, so that
   every cycle of a host meets its others in one partition (rates need the previous
   cycle).
2. `partition_part`: per host, in time order, each task's signals exactly as
   `!ContentionDetector` computes them (its own `_signals` and `_bucket`), kept only for
   the cycles in which the host's own detector did not name the task as contended: a
   profile is the normal.  The anomalies give the bad-neighbour counts.
3. `summarise`: per key (workload, CPU model, load bucket, signal), from the sorted values,
   count, median, scaled MAD and quantiles.  Sorting first makes the result independent of
   how the values were partitioned: the distributed run's profile equals the local one's.
"""
import math
import zlib
from typing import Dict, Iterable, List, Optional, Tuple

from owca.detect.detectors.contention import MAD_TO_SIGMA, ContentionDetector, _median
from owca.profile import records
from owca.profile.records import Options

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
# Wilson's score interval at 95 %: the confidence of a bad-neighbour share.
WILSON_Z = 1.959964


def partition_of(host: str, partitions: int) -> int:
    return zlib.crc32(host.encode("utf-8", "replace")) % partitions


def split(chunk: tuple, opts: Options, partitions: int) -> Tuple[List[List[dict]], int]:
    """([cycles of partition p for p in range(partitions)], bad inputs) of one chunk:
    ("lines", [bytes...], stream tag) or ("messages", [(category, host, seq, ts,
    text)...]).  Each cycle's `stream` is its host, or for lines its host and the tag (a
    file is one node's stream: two recordings of one host are two streams)."""
    kind, items = chunk[0], chunk[1]
    bad = 0
    if kind == "lines":
        cycles, bad = records.from_lines(items, opts)
        for cycle in cycles:
            cycle["stream"] = f"{cycle['host']}@{chunk[2]}"
    else:
        cycles = []
        for category, host, seq, ts, text in items:
            found = records.from_exposition(text, host, seq, ts, category, opts)
            if found is None:
                bad += 1
            else:
                cycles.append(found)
    out: List[List[dict]] = [[] for _ in range(partitions)]
    for cycle in cycles:
        out[partition_of(cycle.setdefault("stream", cycle["host"]), partitions)].append(cycle)
    return out, bad


def pick(split_result, p: int) -> List[dict]:
    return split_result[0][p]


def bad_of(split_result) -> int:
    return split_result[1]


def _detector(opts: Options) -> ContentionDetector:
    return ContentionDetector(sli_metric=opts.sli_metric, load_metric=opts.load_metric,
                              throughput_metric=opts.throughput_metric,
                              load_bucket_ratio=opts.load_bucket_ratio)


def bucket_key(bucket) -> str:
    return str(bucket)


def partition_part(opts: Options, *parts: List[dict]) -> dict:
    """The values and counts of one partition's hosts.

    {"values": {(workload, model, bucket, signal): [values]},
     "pairs": {(victim workload, antagonist workload): [episodes, cycles, confidence sum,
               confidence count]},
     "victims": {victim workload: episodes}, "cycles": n, "excluded": n, "hosts": [..]}"""
    det = _detector(opts)
    by_host: Dict[str, Dict[tuple, dict]] = {}
    for part in parts:
        for cycle in part:
            # At-least-once delivery may bring a cycle twice: the first is kept.
            by_host.setdefault(cycle["stream"], {}).setdefault(
                (cycle["seq"], cycle["kind"]), cycle)
    values: Dict[tuple, List[float]] = {}
    pairs: Dict[tuple, list] = {}
    victims: Dict[str, int] = {}
    counted = excluded = 0
    for host in sorted(by_host):
        cycles = by_host[host]
        contended = {}
        for (seq, kind), c in cycles.items():
            if kind == "anomalies":
                contended[seq] = {a[0] for a in c["anomalies"]}
        prev: Dict[str, dict] = {}
        workload_of: Dict[str, str] = {}
        episodes: Dict[tuple, set] = {}     # (victim w, antagonist w) -> uuids
        victim_episodes: Dict[str, set] = {}
        # A cycle's measurements before its anomalies: they name the tasks' workloads.
        order = sorted(cycles.values(), key=lambda c: (c["ts"], c["seq"],
                                                       c["kind"] != "measurements"))
        for c in order:
            if c["kind"] == "measurements":
                flagged = contended.get(c["seq"], set())
                for tid in sorted(c["tasks"]):
                    task = c["tasks"][tid]
                    workload_of[tid] = task["workload"]
                    cur = task["metrics"]
                    signals, _, load = det._signals(cur, prev.get(tid))
                    prev[tid] = det._kept(cur)
                    counted += 1
                    if tid in flagged:
                        excluded += 1
                        continue
                    bucket = bucket_key(det._bucket(load))
                    for name, value in signals.items():
                        values.setdefault((task["workload"], task["cpu_model"], bucket, name),
                                          []).append(value)
                continue
            for victim, contenders, uuid, confidence in c["anomalies"]:
                vw = workload_of.get(victim)
                if vw is None:
                    continue
                victim_episodes.setdefault(vw, set()).add(uuid)
                for other in sorted(set(contenders)):
                    aw = workload_of.get(other)
                    if aw is None:
                        continue
                    key = (vw, aw)
                    episodes.setdefault(key, set()).add(uuid)
                    entry = pairs.setdefault(key, [0, 0, 0.0, 0])
                    entry[1] += 1
                    if confidence is not None:
                        entry[2] += confidence
                        entry[3] += 1
        for key, uuids in episodes.items():
            pairs[key][0] += len(uuids)
        for vw, uuids in victim_episodes.items():
            victims[vw] = victims.get(vw, 0) + len(uuids)
    return {"values": values, "pairs": pairs, "victims": victims, "cycles": counted,
            "excluded": excluded,
            "hosts": sorted({c["host"] for cs in by_host.values() for c in cs.values()})}


def merge_parts(parts: Iterable[dict]) -> dict:
    values: Dict[tuple, List[float]] = {}
    pairs: Dict[tuple, list] = {}
    victims: Dict[str, int] = {}
    counted = excluded = 0
    hosts: List[str] = []
    for part in parts:
        for key, vs in part["values"].items():
            values.setdefault(key, []).extend(vs)
        for key, entry in part["pairs"].items():
            mine = pairs.setdefault(key, [0, 0, 0.0, 0])
            for i in range(4):
                mine[i] += entry[i]
        for vw, n in part["victims"].items():
            victims[vw] = victims.get(vw, 0) + n
        counted += part["cycles"]
        excluded += part["excluded"]
        hosts = sorted(set(hosts) | set(part["hosts"]))
    return {"values": values, "pairs": pairs, "victims": victims, "cycles": counted,
            "excluded": excluded, "hosts": hosts}


def quantile(s: List[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    at = q * (len(s) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (at - lo)


def _r(x: float) -> float:
    return float(f"{x:.9g}")


def summary(values: List[float]) -> dict:
    s = sorted(values)
    centre = _median(s)
    spread = MAD_TO_SIGMA * _median(sorted(abs(v - centre) for v in s))
    return {"count": len(s), "centre": _r(centre), "spread": _r(spread),
            "quantiles": {f"p{round(q * 100):02d}": _r(quantile(s, q)) for q in QUANTILES}}


def summarise(items: List[Tuple[tuple, List[float]]]) -> List[Tuple[tuple, dict]]:
    return [(key, summary(vs)) for key, vs in items]


def wilson_lower(successes: int, total: int, z: float = WILSON_Z) -> float:
    """The lower bound of Wilson's score interval for a share: a share of 3 of 3 is less
    certain than one of 300 of 300, and ranks below it."""
    if total <= 0:
        return 0.0
    p = successes / total
    denom = 1 + z * z / total
    centre = p + z * z / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, (centre - margin) / denom)


def bad_neighbours(pairs: Dict[tuple, list], victims: Dict[str, int],
                   limit: Optional[int] = None) -> List[dict]:
    """The (victim workload, antagonist workload) pairs, best first: by the confidence
    (Wilson's lower bound of the share of the victim's episodes that named the
    antagonist), then count, then names."""
    out = []
    for (vw, aw), (episodes, cycles, conf_sum, conf_n) in pairs.items():
        total = victims.get(vw, 0)
        out.append({"victim_workload": vw, "antagonist_workload": aw, "count": episodes,
                    "cycles": cycles, "share": _r(episodes / total) if total else 0.0,
                    "confidence": _r(wilson_lower(episodes, total)),
                    "detector_confidence": _r(conf_sum / conf_n) if conf_n else None})
    out.sort(key=lambda e: (-e["confidence"], -e["count"], e["victim_workload"],
                            e["antagonist_workload"]))
    return out[:limit] if limit else out
