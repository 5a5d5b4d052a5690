#!/usr/bin/env python3
"""Throughput and memory of the pipeline's stages.

Part 1 (live, needs root): TASKS real cgroups (cpu, cpuacct, memory) with a
sleeping process in each; the five stages run on them for a few seconds at a
short interval, measure's output recorded with tee; it reports each stage's
peak RSS and PSS.

Part 2 (replay): the recording, repeated to CYCLES measurements frames, is
replayed through `owca-detect | owca-allocate | owca-ship` (ship to stdout,
into /dev/null); it reports cycles per second and each stage's peak RSS and
PSS.  With --synthetic, frames carrying every registered task metric stand in
for the recording (no root needed).

Three measures of memory: each stage's peak RSS (its resident pages, shared
ones included) and PSS (shared pages divided among the processes mapping
them), and the stages' RSS together: their resident physical pages counted
once each, read from /proc/PID/pagemap (root), the largest of samples taken
every half second.  Summing RSS counts the interpreter's shared pages once per
stage.

Usage: python3 benchmarks/pipeline_throughput.py [--tasks 100] [--cycles 3000]
       [--live-seconds 10] [--synthetic]
"""
import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "workloads")]

from owca.core import frames  # noqa: E402
from owca.core.metrics import PLATFORM, TASK_CGROUP, TASK_INTERNAL  # noqa: E402
from owca_workloads.cgroup_files import write_str  # noqa: E402

BIN = os.path.join(ROOT, "bin")
CONTROLLERS = ("cpu", "cpuacct", "memory")
PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1


def tool(name, *args):
    return [sys.executable, os.path.join(BIN, f"owca-{name}"), *args]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.path.join(ROOT, "lib")
    return e


def synthetic_task_metrics(rng: random.Random) -> dict:
    """Every registered task metric, shaped as owca-measure emits it on a 2-node box."""
    metrics = {}
    for spec in list(TASK_CGROUP.values()) + list(TASK_INTERNAL.values()):
        if spec.levels == ("numa_node",):
            metrics[spec.name] = {"0": rng.randrange(1 << 20), "1": rng.randrange(1 << 20)}
        elif len(spec.levels) == 2:
            metrics[spec.name] = {r: {"some": round(rng.random() * 5, 2),
                                      "full": round(rng.random(), 2)}
                                  for r in ("cpu", "memory", "io")}
        else:
            metrics[spec.name] = round(rng.random() * 1e6, 3)
    return metrics


def write_stream(path: str, ntasks: int, ncycles: int) -> int:
    rng = random.Random(42)
    platform = {}
    for spec in PLATFORM.values():
        platform[spec.name] = {str(c): rng.randrange(1 << 30) for c in range(16)} \
            if spec.levels else rng.randrange(1 << 30)
    tasks = {}
    for i in range(ntasks):
        task_id = f"/kubepods/burstable/pod{i:04d}-5f4e-4c1b-9a7e-3b2d1c0e9f8a"
        tasks[task_id] = {"name": f"task-{i}", "cgroup_path": task_id,
                          "labels": {"priority": "hp" if i % 4 == 0 else "be",
                                     "app": f"app{i % 10}", "namespace": "default"},
                          "resources": {"cpus": 1.0, "mem_bytes": 1 << 30},
                          "metrics": synthetic_task_metrics(rng)}
    size = 0
    with open(path, "wb") as f:
        for seq in range(1, ncycles + 1):
            line = frames.encode(frames.measurements_frame(seq, platform, tasks,
                                                           ts=1.7e9 + seq, host="node-1"))
            size = len(line)
            f.write(line)
    return size


def resident_pages(pid: int) -> set:
    """The physical frames a process has resident (needs root to see frame numbers)."""
    frames_ = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if line.rstrip().endswith("[vsyscall]"):
                continue
            pagemap.seek(start // PAGE * 8)
            data = pagemap.read((end - start) // PAGE * 8)
            for (entry,) in struct.iter_unpack("<Q", data):
                if entry >> 63 & 1:
                    frames_.add(entry & PFN_MASK)
    return frames_


def together_kb(pids) -> int:
    """Resident memory of a set of processes, each physical page counted once: what
    their RSS is together (what a cgroup holding just them would be charged for
    their mappings)."""
    union = set()
    for pid in pids:
        try:
            union |= resident_pages(pid)
        except OSError:
            pass
    return len(union) * PAGE // 1024


class MemoryWatch:
    """Peak RSS and PSS of a set of pids, sampled every few milliseconds."""

    def __init__(self, pids: dict):
        self.pids = pids
        self.peak = {name: {"rss_kb": 0, "pss_kb": 0} for name in pids}
        self.together_kb = 0
        self._last_union = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        for line in f:
                            key, _, rest = line.partition(":")
                            if key in ("Rss", "Pss"):
                                field = key.lower() + "_kb"
                                value = int(rest.split()[0])
                                if value > self.peak[name][field]:
                                    self.peak[name][field] = value
                except OSError:
                    pass
            if time.monotonic() - self._last_union > 0.5:
                self._last_union = time.monotonic()
                self.together_kb = max(self.together_kb, together_kb(self.pids.values()))
            self._stop.wait(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def replay(stream: str, ncycles: int) -> dict:
    with open(stream, "rb") as src, open(os.devnull, "wb") as sink:
        started = time.monotonic()
        detect = subprocess.Popen(tool("detect"), stdin=src, stdout=subprocess.PIPE, env=env())
        allocate = subprocess.Popen(tool("allocate"), stdin=detect.stdout,
                                    stdout=subprocess.PIPE, env=env())
        ship = subprocess.Popen(tool("ship"), stdin=allocate.stdout, stdout=sink, env=env())
        detect.stdout.close()
        allocate.stdout.close()
        procs = {"detect": detect, "allocate": allocate, "ship": ship}
        # Sampled, not wait4's ru_maxrss: that counts the benchmark's own pages,
        # which the child holds between fork and exec.
        with MemoryWatch({n: p.pid for n, p in procs.items()}) as watch:
            for p in procs.values():
                p.wait()
        elapsed = time.monotonic() - started
    for name, p in procs.items():
        if p.returncode:
            raise SystemExit(f"owca-{name} exited with {p.returncode}")
    return {"cycles": ncycles, "seconds": round(elapsed, 3),
            "cycles_per_second": round(ncycles / elapsed, 1), "memory": watch.peak,
            "together_rss_mb": round(watch.together_kb / 1024, 1)}


def make_cgroups(n: int, parent: str):
    """n task cgroups in cpu, cpuacct and memory, a `sleep` in each; (paths, processes)."""
    created, pids = [], []
    for controller in CONTROLLERS:
        os.makedirs(f"/sys/fs/cgroup/{controller}{parent}", exist_ok=True)
    for i in range(n):
        path = f"{parent}/task-{i:04d}"
        for controller in CONTROLLERS:
            os.mkdir(f"/sys/fs/cgroup/{controller}{path}")
        created.append(path)
        proc = subprocess.Popen(["sleep", "3600"])
        pids.append(proc)
        for controller in CONTROLLERS:
            write_str(f"/sys/fs/cgroup/{controller}{path}/cgroup.procs", str(proc.pid))
    return created, pids


def remove_cgroups(parent: str, created, procs):
    for p in procs:
        p.kill()
        p.wait()
    for path in created:
        for controller in CONTROLLERS:
            try:
                os.rmdir(f"/sys/fs/cgroup/{controller}{path}")
            except OSError:
                pass
    for controller in CONTROLLERS:
        try:
            os.rmdir(f"/sys/fs/cgroup/{controller}{parent}")
        except OSError:
            pass


def live(ntasks: int, seconds: float, recording: str) -> dict:
    parent = f"/owca-bench-{os.getpid()}"
    created, procs = make_cgroups(ntasks, parent)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = os.path.join(tmp, "owca.yaml")
            with open(cfg, "w") as f:
                f.write(f"discover:\n  source: !CgroupDiscovery\n    root: {parent}\n"
                        f"    hierarchies: [cpuacct]\n")
            commands = {"discover": tool("discover", "--config", cfg, "--interval", "0.1"),
                        "measure": tool("measure"), "tee": ["tee", recording],
                        "detect": tool("detect"), "allocate": tool("allocate"),
                        "ship": tool("ship")}
            running, upstream = {}, None
            with open(os.devnull, "wb") as sink:
                for name, command in commands.items():
                    p = subprocess.Popen(command, stdin=upstream,
                                         stdout=sink if name == "ship" else subprocess.PIPE,
                                         env=env())
                    if upstream is not None:
                        upstream.close()
                    upstream = p.stdout
                    running[name] = p
                stages = {n: p.pid for n, p in running.items() if n != "tee"}
                with MemoryWatch(stages) as watch:
                    time.sleep(seconds)
                    running["discover"].terminate()
                    for p in running.values():
                        p.wait(30)
        return {"tasks": ntasks, "seconds": seconds, "memory": watch.peak,
                "together_rss_mb": round(watch.together_kb / 1024, 1)}
    finally:
        remove_cgroups(parent, created, procs)


def repeat_recording(recording: str, path: str, ncycles: int) -> int:
    with open(recording, "rb") as f:
        lines = [line for line in f if line.endswith(b"\n")]
    if not lines:
        raise SystemExit("the live run recorded nothing")
    with open(path, "wb") as f:
        for i in range(ncycles):
            f.write(lines[i % len(lines)])
    return len(lines[0])


def summary(memory: dict) -> dict:
    return {"rss_total_mb": round(sum(m["rss_kb"] for m in memory.values()) / 1024, 1),
            "pss_total_mb": round(sum(m["pss_kb"] for m in memory.values()) / 1024, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--live-seconds", type=float, default=10.0)
    parser.add_argument("--synthetic", action="store_true",
                        help="replay synthetic frames; skip the live run (no root needed)")
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        stream = os.path.join(tmp, "stream.jsonl")
        if args.synthetic:
            frame_bytes = write_stream(stream, args.tasks, args.cycles)
        else:
            recording = os.path.join(tmp, "recording.jsonl")
            result["live"] = live(args.tasks, args.live_seconds, recording)
            result["live"].update(summary(result["live"]["memory"]))
            frame_bytes = repeat_recording(recording, stream, args.cycles)
        result["replay"] = replay(stream, args.cycles)
        result["replay"]["frame_bytes"] = frame_bytes
        result["replay"].update(summary(result["replay"]["memory"]))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
