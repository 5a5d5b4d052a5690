"""The profile document (docs/protocol.md, "Profiles"): build, read, split, join.

    {"format": "owca-profile", "version": 1,
     "options": {workload_label, cpu_model_label, sli_metric, load_metric,
                 throughput_metric, load_bucket_ratio},
     "source": {...what was read: files, or topics with each partition's offsets...},
     "built": {"engine", "seconds", "frames"...}          (varies from run to run)
     "totals": {"hosts", "task_cycles", "excluded_task_cycles", "bad_inputs"},
     "workloads": {workload: {cpu model: {load bucket: {signal: {count, centre, spread,
                                                                quantiles}}}}},
     "bad_neighbours": [{victim_workload, antagonist_workload, count, cycles, share,
                         confidence, detector_confidence}, ...]}

`comparable()` is the document less `source` and `built`: what two builds of the same
frames agree on, whatever engine or cluster ran them.
"""
import json
import os
from dataclasses import asdict
from typing import Dict, List, Optional

from owca.detect.fleet_prior import FORMAT, VERSION, ProfileError, check, load  # noqa: F401
from owca.profile.records import Options

META_KEY = "__meta__"


def document(merged: dict, summaries: Dict[tuple, dict], opts: Options, source: dict,
             built: dict, bad_inputs: int) -> dict:
    from owca.profile.compute import bad_neighbours
    workloads: Dict[str, dict] = {}
    for (workload, model, bucket, signal) in sorted(summaries):
        workloads.setdefault(workload, {}).setdefault(model, {}).setdefault(bucket, {})[
            signal] = summaries[(workload, model, bucket, signal)]
    return {"format": FORMAT, "version": VERSION, "options": asdict(opts),
            "source": source, "built": built,
            "totals": {"hosts": len(merged["hosts"]), "task_cycles": merged["cycles"],
                       "excluded_task_cycles": merged["excluded"], "bad_inputs": bad_inputs},
            "workloads": workloads,
            "bad_neighbours": bad_neighbours(merged["pairs"], merged["victims"])}


def comparable(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("source", "built")}


def write(doc: dict, path: Optional[str]) -> None:
    """The document to `path` atomically (a reader polling it never sees half of it), or
    to stdout with None."""
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if path is None or path == "-":
        import sys
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def messages(doc: dict) -> List[tuple]:
    """(key, value) per workload for a compacted topic: each workload's entries with its
    bad-neighbour pairs as victim; the metadata under META_KEY."""
    meta = {k: v for k, v in doc.items() if k not in ("workloads", "bad_neighbours")}
    out = [(META_KEY, meta)]
    for workload in sorted(doc["workloads"]):
        out.append((workload, {
            "workload": doc["workloads"][workload],
            "bad_neighbours": [p for p in doc["bad_neighbours"]
                               if p["victim_workload"] == workload]}))
    return [(k, json.dumps(v, sort_keys=True).encode()) for k, v in out]


def join(latest: Dict[str, bytes], where: str) -> dict:
    """The profile from the latest value of each key of a compacted topic."""
    if META_KEY not in latest:
        raise ProfileError(f"{where}: no {META_KEY} message: nothing was published there")
    try:
        doc = json.loads(latest[META_KEY])
        doc["workloads"], pairs = {}, []
        for key in sorted(k for k in latest if k != META_KEY):
            if not latest[key]:
                continue    # a tombstone: the workload was withdrawn
            part = json.loads(latest[key])
            doc["workloads"][key] = part["workload"]
            pairs += part["bad_neighbours"]
    except (ValueError, KeyError, TypeError) as e:
        raise ProfileError(f"{where}: a message is not a profile part: {e}") from None
    pairs.sort(key=lambda e: (-e["confidence"], -e["count"], e["victim_workload"],
                              e["antagonist_workload"]))
    doc["bad_neighbours"] = pairs
    return check(doc, where)
