#!/usr/bin/env python3
"""How soon owca-discover stops on SIGTERM while its orchestrator hangs.

Usage: benchmarks/discover_stop.py [--runs N]

Starts a kubelet stand-in on loopback (tests/orchestrator_server.py) that
accepts each request and never answers, runs `owca-discover` against it with
the default timeout and deadline (5 s, 10 s), waits until the request has
arrived, sends SIGTERM and times the exit (from the signal to the process's
reaping).  Prints each run and the median, min and max, in milliseconds, and
the host's load average.  Without the prompt stop the figure is the rest of the
cycle's deadline (about 9.4 s).
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "lib")]

from orchestrator_server import HANG, ReplayServer, wait_until  # noqa: E402


def one_run(workdir: str) -> float:
    with ReplayServer({"GET /pods": {"kind": "PodList", "items": []}}) as server:
        server.mode = HANG
        config = os.path.join(workdir, "owca.yaml")
        with open(config, "w") as f:
            f.write(f"discover:\n  source: !KubernetesDiscovery\n    url: {server.url}\n")
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "lib"))
        tool = subprocess.Popen([sys.executable, os.path.join(ROOT, "bin", "owca-discover"),
                                 "--config", config, "--cgroupfs", workdir],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            if not wait_until(lambda: server.requests, timeout=30):
                raise RuntimeError("no request arrived")
            time.sleep(0.2)  # well inside the read
            sent = time.monotonic()
            tool.send_signal(signal.SIGTERM)
            tool.wait(timeout=60)
            return time.monotonic() - sent
        finally:
            if tool.poll() is None:
                tool.kill()
                tool.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        times = [one_run(workdir) * 1000 for _ in range(args.runs)]
    print("stop after SIGTERM (ms):", " ".join(f"{t:.1f}" for t in times))
    print(f"median {statistics.median(times):.1f} ms, min {min(times):.1f}, "
          f"max {max(times):.1f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
