#!/usr/bin/env python3
"""Fleet profiles on the corpus, leave-one-out: does a fleet prior catch the episodes of
a task's first 30 seconds that the detector alone misses?

Usage:
  fleet_loo.py [--config FILE] [--early SECONDS] [--workers N] [--set NAME=VALUE]...
               [--json] [DIR...]
  fleet_loo.py (-h | --help)

Options:
  --config FILE     The detector's configuration, without a profile
                    [default: configs/examples/contention-lab.yaml].
  --early SECONDS   An episode is early when it starts within this many seconds of
                    the HP task's first measurement [default: 30].
  --workers N       Dask workers of the local cluster the profiles are built on
                    [default: 2].
  --set NAME=VALUE  A detector parameter for the replays with a profile
                    (profile_history=8, profile_drift=2).
  --json            One JSON object instead of the table.
  -h, --help        Show this help.

DIR: corpora (default workloads/corpus and workloads/corpus-quiet).  For each corpus:

1. every recording is replayed through owca-detect with the configuration: the
   detector alone, scored, and the stream a node would have shipped (measurements and
   its anomalies frames);
2. for each recording, a profile is built (owca.profile, on a local Dask cluster) from
   the shipped streams of every other recording of the corpus, and the recording is
   replayed again with `profile:` set to it;
3. recall over the early episodes and over all, and precision (positive alarm intervals
   / alarm intervals, docs/workloads.md "The scorer") over the corpus, both ways.

CPU-bound replay: a few minutes on two cores.  docs/detection.md, "Fleet profiles",
has the figures and the command.
"""
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "workloads")]

from docopt import docopt  # noqa: E402

from owca.profile import engine, profile as prof  # noqa: E402
from owca.profile.records import Options  # noqa: E402
from owca_workloads import score as sc  # noqa: E402


def shipped_lines(lines, anomalies_by_seq, host="vm") -> list:
    """The recording's measurements with the replay's anomalies frames: what the node's
    owca-ship would have sent."""
    out = []
    for frame in sc.frames_of(lines, "measurements"):
        out.append(json.dumps(frame).encode())
        found = anomalies_by_seq.get(frame["seq"], [])
        out.append(json.dumps({"v": 1, "kind": "anomalies", "ts": frame["ts"],
                               "host": frame["host"], "seq": frame["seq"],
                               "anomalies": found, "metrics": []}).encode())
    return out


def first_seen(truth: dict, lines) -> float:
    hp = truth["hp"]["task_id"]
    for frame in sc.frames_of(lines, "measurements"):
        if hp in frame.get("tasks", {}):
            return frame["ts"]
    return truth.get("started_ts", 0.0)


def early_episodes(truth: dict, scored: dict, born: float, early: float) -> list:
    starts = {(p["task_id"], p.get("scheduled_start")): p["start_ts"]
              for p in sc.phases(truth) if p["kind"] == "aggressive"}
    return [e for e in scored["episodes"]
            if starts[(e["task_id"], e["start"])] - born <= early]


def evaluate(corpus: str, config: str, early: float, client, tmp: str, extra=()) -> dict:
    dirs = sc.recording_dirs([corpus])
    data = {}
    for d in dirs:
        truth, lines = sc.read_truth(d), sc.read_recording(d)
        alone = sc.replay(lines, config)
        data[d] = (truth, lines, alone, shipped_lines(lines, alone))
    rows = []
    for i, d in enumerate(dirs):
        truth, lines, alone, _ = data[d]
        others = [(("lines", data[o][3], j)) for j, o in enumerate(dirs) if o != d]
        doc = engine.build(others, Options(), {"leave_out": os.path.basename(d)}, client)
        path = os.path.join(tmp, f"profile-{i}.json")
        prof.write(doc, path)
        cfg = os.path.join(tmp, f"detect-{i}.yaml")
        with open(cfg, "w") as f:
            f.write(config_with_profile(config, path, extra))
        fleet = sc.replay(lines, cfg)
        born = first_seen(truth, lines)
        row = {"recording": os.path.basename(d)}
        for name, found in (("alone", alone), ("fleet", fleet)):
            s = sc.score(truth, lines, found)
            e = early_episodes(truth, s, born, early)
            row[name] = {"early": len(e), "early_detected": sum(x["detected"] for x in e),
                         "episodes": len(s["episodes"]),
                         "detected": sum(x["detected"] for x in s["episodes"]),
                         "alarm_intervals": sum(s["alarm_intervals"].values()),
                         "positive_alarm_intervals": s["alarm_intervals"]["positive"]}
        rows.append(row)
    totals = {}
    for name in ("alone", "fleet"):
        t = {k: sum(r[name][k] for r in rows) for k in rows[0][name]}
        t["early_recall"] = ratio(t["early_detected"], t["early"])
        t["recall"] = ratio(t["detected"], t["episodes"])
        t["precision"] = ratio(t["positive_alarm_intervals"], t["alarm_intervals"])
        totals[name] = t
    missed = [(r["recording"], r["alone"]["early"] - r["alone"]["early_detected"]) for r in rows]
    return {"corpus": corpus, "rows": rows, "totals": totals, "missed_alone": missed}


def config_with_profile(config: str, profile_path: str, extra=()) -> str:
    """The detector configuration with `profile:` added to !ContentionDetector's
    mapping (block or flow style)."""
    with open(config) as f:
        text = f.read()
    flow = "!ContentionDetector {"
    if flow in text:
        return text.replace(flow, flow + "".join(f"{k}: {v}, " for k, v in extra)
                            + f"profile: {json.dumps(profile_path)}, ", 1)
    head, tag, rest = text.partition("!ContentionDetector\n")
    if not tag:
        raise SystemExit(f"{config}: no !ContentionDetector to give a profile to")
    indent = rest[:len(rest) - len(rest.lstrip(" "))]
    added = "".join(f"{indent}{k}: {v}\n" for k, v in extra)
    return f"{head}{tag}{indent}profile: {json.dumps(profile_path)}\n{added}{rest}"


def ratio(a, b):
    return round(a / b, 3) if b else None


def main() -> int:
    args = docopt(__doc__)
    corpora = args["DIR"] or [os.path.join(ROOT, "workloads", "corpus"),
                              os.path.join(ROOT, "workloads", "corpus-quiet")]
    extra = [tuple(kv.split("=", 1)) for kv in args["--set"]]
    client, cluster = engine.client_for(None, int(args["--workers"]))
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="owca-fleet-loo-") as tmp:
            for corpus in corpora:
                results.append(evaluate(corpus, args["--config"], float(args["--early"]),
                                        client, tmp, extra))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    if args["--json"]:
        print(json.dumps(results, indent=1))
        return 0
    print("| corpus | profile | early episodes | early recall | recall | precision |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for name in ("alone", "fleet"):
            t = r["totals"][name]
            kind = "leave-one-out" if name == "fleet" else "none"
            print(f"| {os.path.basename(r['corpus'])} | {kind} | {t['early']} | "
                  f"{t['early_recall']} ({t['early_detected']}/{t['early']}) | "
                  f"{t['recall']} | {t['precision']} |")
    for r in results:
        print(f"\n{os.path.basename(r['corpus'])}: per recording, early episodes detected "
              f"and precision, without -> with the profile")
        for row in r["rows"]:
            a, f = row["alone"], row["fleet"]
            print(f"  {row['recording']}: {a['early_detected']}/{a['early']} -> "
                  f"{f['early_detected']}/{f['early']}; "
                  f"{ratio(a['positive_alarm_intervals'], a['alarm_intervals'])} -> "
                  f"{ratio(f['positive_alarm_intervals'], f['alarm_intervals'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
