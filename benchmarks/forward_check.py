#!/usr/bin/env python3
"""The cost of checking that a frame forwarded on its prefix is a JSON object.

A stage forwards a frame it does not consume after reading its version and
kind off the line's prefix (lib/owca/core/frames.py, sniff()).  A line that begins
like a frame but is broken (`{"v":1,"kind":"tasks", broken`) must still be a
bad line wherever it is seen, so the forwarded line is parsed too
(frames.parse(): UTF-8 decode and json.loads, no field checks).  This measures,
per forwarded line, sniff() alone and sniff() + parse(), for the frames a
pipeline forwards:

- anomalies: the anomalies frame owca-allocate forwards every cycle (EMPTY or
  with 10 anomalies);
- allocations: an allocations frame of TASKS tasks (forwarded by nothing in the
  pipeline's order, but by a stage placed after owca-allocate);
- measurements: a measurements frame of TASKS tasks with every registered task
  metric, which a stage forwards only when it does not consume it (owca-measure
  given a recording of measurements): the worst case.

Each figure is the median of REPEATS runs of LOOPS lines, in microseconds per
line, on one core.  Last, beside the decode and validation of a consumed
measurements frame, what checking its metric and label names costs
(frames.NameCheck, docs/protocol.md, Bad lines).

Usage: python3 benchmarks/forward_check.py [--tasks 100] [--loops 2000] [--repeats 7]
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from owca.core import frames  # noqa: E402
from owca.core.metrics import TASK_CGROUP  # noqa: E402


def lines(tasks: int) -> dict:
    anomalies = [{"type": "contention", "resource": "cpu", "contended_task_id": f"t{i}",
                  "contending_task_ids": [f"t{i + 1}"], "uuid": "0123456789abcdef",
                  "metrics": [frames.sample("cpu_threshold", 0.9)]} for i in range(10)]
    allocations = {f"/kubepods/pod{i}": {"cpu_quota": 0.5, "cpu_shares": 0.25,
                                         "cpuset_cpus": "0-3"} for i in range(tasks)}
    metrics = {name: 12345.678 for name, spec in TASK_CGROUP.items() if not spec.levels}
    tasks_ = {f"/kubepods/pod{i}": {"name": f"pod{i}", "cgroup_path": f"/kubepods/pod{i}",
                                    "labels": {"priority": "be"}, "resources": {"cpus": 1},
                                    "metrics": dict(metrics)} for i in range(tasks)}
    return {
        "anomalies (empty)": frames.encode(frames.anomalies_frame(1, [], ts=1.0, host="n")),
        "anomalies (10)": frames.encode(frames.anomalies_frame(1, anomalies, ts=1.0, host="n")),
        f"allocations ({tasks} tasks)": frames.encode(
            frames.allocations_frame(1, allocations, ts=1.0, host="n")),
        f"measurements ({tasks} tasks)": frames.encode(
            frames.measurements_frame(1, {"platform_topology_cpus": 2}, tasks_, ts=1.0,
                                      host="n")),
    }


def per_line_us(fn, line: bytes, loops: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(loops):
            fn(line)
        runs.append((time.perf_counter() - started) / loops * 1e6)
    return statistics.median(runs), min(runs), max(runs)


def sniff_and_parse(line: bytes):
    frames.sniff(line)
    frames.parse(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--loops", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"{'frame':28} {'bytes':>9} {'sniff us':>10} {'+ parse us':>11} {'(min-max)':>17}")
    for name, line in lines(args.tasks).items():
        loops = max(10, args.loops * 300 // len(line))
        sniff, _, _ = per_line_us(frames.sniff, line, loops, args.repeats)
        both, low, high = per_line_us(sniff_and_parse, line, loops, args.repeats)
        print(f"{name:28} {len(line):9d} {sniff:10.2f} {both:11.2f} "
              f"{f'({low:.2f}-{high:.2f})':>17}")
    consumed = lines(args.tasks)[f"measurements ({args.tasks} tasks)"]
    frame = frames.decode(consumed)
    names = frames.NameCheck()
    loops = max(10, args.loops // 20)
    decode, _, _ = per_line_us(lambda x: frames.validate(frames.decode(x)), consumed, loops,
                               args.repeats)
    check, low, high = per_line_us(names.frame, frame, loops, args.repeats)
    print(f"consumed measurements ({args.tasks} tasks): decode + validate {decode:.1f} us, "
          f"names {check:.1f} us ({low:.1f}-{high:.1f})")


if __name__ == "__main__":
    main()
