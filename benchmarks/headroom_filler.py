#!/usr/bin/env python3
"""A best-effort filler that follows the published headroom, as a scheduler would.

It reads the latest `headroom_cpu_cores` that owca-allocate published (the allocations
frames of a lab run's DIR/recording.jsonl, tailed), and keeps stress-ng CPU workers
running in a BE task's cgroup so that their CPU matches it: `ceil(h)` workers at
`h / ceil(h)` of a CPU each.  It follows a change when it is larger than `--hysteresis`
cores, at once when the headroom fell (a scheduler evicts), at most every `--period`
seconds when it rose (a scheduler places a pod).  Each interval it writes one JSON line
to `--log`: time, the headroom it saw, what it runs.

It moves its workers into every cgroup hierarchy's group at the BE task's path (v1
controllers, cgroup2 at unified/, or a pure cgroup2 tree), so the pipeline measures
them as that task.  It stops its workers on SIGTERM/SIGINT and at the end of the run
(the recording's last frame, `--stop-after` seconds without a new one).

    python benchmarks/headroom_filler.py --recording DIR/recording.jsonl \\
        --cgroup-glob '/owca-scenario-headroom-nginx-*/filler' --log DIR/filler.jsonl

benchmarks/headroom_eval.py runs it beside `owca-scenario run` and scores the runs.
"""
import argparse
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

CGROUP = "/sys/fs/cgroup"


def latest_headroom(f, current):
    """The last headroom_cpu_cores of the allocations frames read so far from `f`."""
    for line in f:
        if '"kind":"allocations"' not in line[:40]:
            continue
        try:
            frame = json.loads(line)
        except ValueError:
            continue
        for s in frame.get("metrics") or []:
            if s.get("name") == "headroom_cpu_cores" and not s.get("labels"):
                current = float(s["value"])
    return current


def group_dirs(path):
    """Each hierarchy's directory for cgroup `path`: v1 controllers, unified, or v2."""
    out = []
    for entry in sorted(os.listdir(CGROUP)):
        d = os.path.join(CGROUP, entry, path.lstrip("/"))
        if os.path.isfile(os.path.join(d, "cgroup.procs")):
            out.append(d)
    root = os.path.join(CGROUP, path.lstrip("/"))
    if os.path.isfile(os.path.join(root, "cgroup.procs")) and root not in out:
        out.append(root)
    return out


def find_cgroup(pattern, wait):
    end = time.monotonic() + wait
    while time.monotonic() < end:
        for entry in sorted(os.listdir(CGROUP)) + [""]:
            base = os.path.join(CGROUP, entry)
            found = glob.glob(base.rstrip("/") + pattern)
            if found:
                return found[0][len(base.rstrip("/")):]
        time.sleep(0.5)
    raise SystemExit(f"headroom_filler: no cgroup matches {pattern} after {wait:g} s")


class Workers:
    def __init__(self, cgroup):
        self.cgroup = cgroup
        self.proc = None
        self.cores = 0.0

    def run(self, cores):
        self.stop()
        self.cores = cores
        if cores <= 0:
            return
        n = math.ceil(cores)
        load = max(1, min(100, round(cores / n * 100)))
        self.proc = subprocess.Popen(
            ["stress-ng", "--cpu", str(n), "--cpu-load", str(load), "--timeout", "0",
             "--quiet"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True)
        time.sleep(0.2)   # its workers are forked by now; move the whole group
        pids = [self.proc.pid] + children(self.proc.pid)
        for d in group_dirs(self.cgroup):
            for pid in pids:
                try:
                    with open(os.path.join(d, "cgroup.procs"), "w") as f:
                        f.write(str(pid))
                except OSError:
                    pass   # gone meanwhile, or a hierarchy that refuses: measured elsewhere

    def stop(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()
            self.proc = None
        self.cores = 0.0


def children(pid):
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out.append(int(child))
                    out.extend(children(int(child)))
    except OSError:
        pass
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recording", required=True)
    p.add_argument("--cgroup-glob", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--period", type=float, default=5.0)
    p.add_argument("--hysteresis", type=float, default=0.1)
    p.add_argument("--stop-after", type=float, default=15.0)
    p.add_argument("--wait", type=float, default=300.0)
    a = p.parse_args(argv)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    end = time.monotonic() + a.wait
    while not os.path.exists(a.recording):
        if time.monotonic() > end or stop:
            raise SystemExit(f"headroom_filler: no {a.recording}")
        time.sleep(0.5)
    cgroup = find_cgroup(a.cgroup_glob, a.wait)
    workers = Workers(cgroup)
    headroom, last_change, last_growth = 0.0, time.monotonic(), -math.inf
    size = 0
    with open(a.recording) as f, open(a.log, "a") as log:
        try:
            while not stop:
                seen = latest_headroom(f, headroom)
                grown = os.path.getsize(a.recording)
                now = time.monotonic()
                if grown != size:
                    size, last_change = grown, now
                elif now - last_change > a.stop_after:
                    break   # the run ended
                headroom = seen
                if headroom < workers.cores - 1e-9 or (
                        headroom > workers.cores + a.hysteresis and
                        now - last_growth >= a.period):
                    if headroom > workers.cores:
                        last_growth = now
                    workers.run(round(headroom, 2))
                log.write(json.dumps({"ts": time.time(), "headroom_cpu_cores": headroom,
                                      "running_cores": workers.cores}) + "\n")
                log.flush()
                time.sleep(1.0)
        finally:
            workers.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
