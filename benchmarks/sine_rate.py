#!/usr/bin/env python3
"""How close owca-sine drives wrk to its target rate, against nginx from the catalog.

Usage: .venv/bin/python benchmarks/sine_rate.py [--runs N] [--periods N]

Starts nginx (workloads/catalog.yaml) in a cgroup of its own, then runs owca-sine
with the catalog's wrk command and wrk's parser: a sine of base 400, amplitude 200
and period 8 s, in 1 s steps, four connections, for --periods periods.  For each
step it reads the target (owca-sine's start line) and the achieved rate (wrk's own
Requests/sec); it prints each run's largest step error, the error of the run's
requests as a whole (against the sine's integral), and the host's load average.

The goal it reports against (tests/test_workloads_sine.py held a quiet machine to it
before the test stopped asserting figures of the machine): every step within 10 % of
its target, the run within 5 %.  Needs root (cgroups); exits with the reason where
nginx or wrk cannot run.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "workloads")]

from owca.core.paths import Paths  # noqa: E402
from owca_workloads.catalog import load_catalog, start, unavailable  # noqa: E402
from owca_workloads.launch import Launcher  # noqa: E402

BASE, AMPLITUDE, PERIOD, STEP, CONNECTIONS = 400, 200, 8, 1, 4


def one_run(workdir: str, periods: int) -> tuple:
    """(targets, achieved) of each step of one run."""
    nginx = load_catalog()["nginx"]
    launcher = Launcher(f"/owca-bench-sine-{uuid.uuid4().hex[:8]}", Paths())
    try:
        run_dir = os.path.join(workdir, "nginx")
        _, port = start(launcher, nginx, "nginx", run_dir)
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "workloads", "owca-sine"),
             "--base", str(BASE), "--amplitude", str(AMPLITUDE), "--period", str(PERIOD),
             "--step", str(STEP), "--duration", str(periods * PERIOD),
             "--connections", str(CONNECTIONS), "--parser", "wrk", "--",
             *nginx.load_command(run_dir, port)],
            capture_output=True, text=True, timeout=periods * PERIOD * 10 + 60)
    finally:
        launcher.stop_all(timeout=3)
    if out.returncode != 0:
        raise RuntimeError(f"owca-sine exited with status {out.returncode}: {out.stderr}")
    targets = [float(t) for t in re.findall(
        r"step=\d+ start .*target_rate_per_second=([0-9.]+)", out.stdout)]
    achieved = [float(r) for r in re.findall(r"^Requests/sec:\s+([0-9.]+)", out.stdout, re.M)]
    if len(targets) != len(achieved):
        raise RuntimeError(f"{len(targets)} steps, {len(achieved)} wrk reports")
    return targets, achieved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--periods", type=int, default=3)
    args = parser.parse_args()
    reason = unavailable([load_catalog()["nginx"]])
    if reason:
        sys.exit(f"sine_rate: {reason}")
    for run in range(1, args.runs + 1):
        with tempfile.TemporaryDirectory() as workdir:
            targets, achieved = one_run(workdir, args.periods)
        errors = [(a - t) / t for t, a in zip(targets, achieved)]
        total = (sum(achieved) - sum(targets)) / sum(targets)
        print(f"run {run}: {len(targets)} steps, largest step error "
              f"{max(errors, key=abs):+.1%}, run {total:+.1%}; "
              f"load average {os.getloadavg()[0]:.2f}")
        print("  target->achieved:", ", ".join(f"{t:.0f}->{a:.0f}"
                                               for t, a in zip(targets, achieved)))


if __name__ == "__main__":
    main()
