#!/usr/bin/env python3
"""The Prometheus endpoint under parallel scrapes: latency of each scrape.

owca-ship (a real process, from --root: this tree, or an older copy for a before/after)
serves one metrics cycle of --tasks tasks on a loopback port with a PrometheusStorage;
then --scrapes scrapes are made by --parallel client threads at once, each a fresh
TCP connection (as urllib and most one-shot clients make them), and the time from
connect() to the last byte of each is recorded.  Reported: p50, p99 and the largest,
over --runs runs, and the host's load average.

`--server prometheus-client` serves the same families with prometheus_client's own
exposition server (start_http_server and a collector holding the families parsed from
the same exposition text) instead, for the comparison its docs/shipping.md entry cites.

Usage: .venv/bin/python benchmarks/prometheus_scrape.py [--tasks 200] [--scrapes 1000]
           [--parallel 50] [--runs 3] [--root DIR] [--server owca|prometheus-client]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CLIENT_SERVER = """
import sys, time
from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
families = list(text_string_to_metric_families(text))
class Cycle:
    def collect(self):
        return families
for c in list(REGISTRY._collector_to_names):
    REGISTRY.unregister(c)
REGISTRY.register(Cycle())
start_http_server(int(sys.argv[2]), addr="127.0.0.1")
print("ready", flush=True)
time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frame(seq, tasks):
    sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "lib")]
    from kafka_broker import measurements
    f = measurements(seq)
    template = f["tasks"].pop("t1")
    for i in range(tasks):
        f["tasks"][f"task-{i:04d}"] = dict(template, name=f"task-{i:04d}")
    return f


def scrape(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
                  b"Accept-Encoding: identity\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.") and b" 200 " in data[:20], data[:200]
    return time.perf_counter() - start


def burst(port: int, scrapes: int, parallel: int) -> list:
    times, lock, left = [], threading.Lock(), [scrapes]

    def worker():
        while True:
            with lock:
                if not left[0]:
                    return
                left[0] -= 1
            t = scrape(port)
            with lock:
                times.append(t)

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(times)


def wait_ready(port: int, proc):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            scrape(port)
            return
        except (OSError, AssertionError):
            time.sleep(0.1)
    raise RuntimeError("the endpoint never served a cycle")


def start_owca(root, port, work, tasks):
    sys.path[:0] = [os.path.join(ROOT, "lib")]
    from owca.core import frames
    config = os.path.join(work, "owca.yaml")
    with open(config, "w") as f:
        f.write(f"ship:\n  storages:\n    - !PrometheusStorage\n      port: {port}\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "lib"))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "bin", "owca-ship"), "-c",
                             config], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, cwd=root)
    proc.stdin.write(frames.encode(frame(1, tasks)))
    proc.stdin.flush()
    return proc


def start_client_library(port, work, tasks):
    sys.path[:0] = [os.path.join(ROOT, "lib")]
    from owca.ship.exposition import Formatter, strip_timestamps
    path = os.path.join(work, "cycle.prom")
    with open(path, "w") as f:
        f.write(strip_timestamps(Formatter().format(frame(1, tasks)).render()))
    return subprocess.Popen([sys.executable, "-c", CLIENT_SERVER, path, str(port)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=1000)
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--root", default=ROOT, help="the tree whose owca-ship runs")
    parser.add_argument("--server", choices=("owca", "prometheus-client"), default="owca")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="owca-scrape-") as work:
        port = free_port()
        proc = start_owca(os.path.abspath(args.root), port, work, args.tasks) \
            if args.server == "owca" else start_client_library(port, work, args.tasks)
        try:
            wait_ready(port, proc)
            for _ in range(args.runs):
                times = burst(port, args.scrapes, args.parallel)
                pick = lambda q: times[min(len(times) - 1, int(q * len(times)))]  # noqa: E731
                runs.append({"p50_ms": round(pick(0.50) * 1000, 1),
                             "p99_ms": round(pick(0.99) * 1000, 1),
                             "max_ms": round(times[-1] * 1000, 1),
                             "over_900ms": sum(1 for t in times if t > 0.9)})
        finally:
            proc.kill()
            proc.wait()
    result = {"server": args.server, "root": args.root, "tasks": args.tasks,
              "scrapes": args.scrapes, "parallel": args.parallel, "runs": runs,
              "loadavg": os.getloadavg()}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.server} ({args.root}), {args.tasks} tasks, {args.scrapes} scrapes "
          f"{args.parallel} in parallel, load average {result['loadavg'][0]:.2f}")
    for r in runs:
        print(f"  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms  max {r['max_ms']} ms  "
              f"over 0.9 s: {r['over_900ms']}")


if __name__ == "__main__":
    main()
