#!/usr/bin/env python3
"""Does an SLI read from the service's own histogram agree with the wrapper's?

Usage:
  sli_agreement.py [--min-load RATE] [--tolerance FRACTION] WRAPPER_RUN HISTOGRAM_RUN

WRAPPER_RUN and HISTOGRAM_RUN are run directories of the lab's runner (each with its
recording.jsonl or .jsonl.gz) of benchmarks/sli/pyhttp-wrapper.yaml and
pyhttp-histogram.yaml under the same configuration (control_eval.py run ... controller).

It prints, for the histogram run, every interval of the HP whose request rate
(apm_throughput_per_second, the service's own) is at least --min-load: the service's
p99 (apm_sli, from its histogram) against the wrapper's (apm_latency_p99_seconds, wrk's
view of the same requests), and the fraction within --tolerance of each other; and, for
the two runs, the controller's BE level interval by interval (slo_controller_be_level):
the fraction of intervals at the same level and the mean difference.  Both are issue
26's acceptance: "the same controller decisions, within noise; the two SLIs' p99 agree
within 10 % per interval at loads above 100 requests/s".

The two p99s are not of exactly the same requests: wrk's covers its last report (one
second of its own clock), the histogram's the interval between two reads of owca-measure;
wrk's includes the loopback network and the time a request waits to be read, the
service's only its time inside.

Options:
  --min-load RATE       Requests per second [default: 100].
  --tolerance FRACTION  Of the wrapper's p99 [default: 0.1].
"""
import gzip
import json
import os
import statistics
import sys

from docopt import docopt


def frames_of(run: str):
    for name in ("recording.jsonl", "recording.jsonl.gz"):
        path = os.path.join(run, name)
        if os.path.exists(path):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        yield json.loads(line)
            return
    sys.exit(f"sli_agreement.py: {run}: no recording.jsonl(.gz)")


def hp_intervals(run: str):
    """[(ts, metrics of the HP task)] of each measurements frame."""
    out = []
    for frame in frames_of(run):
        if frame.get("kind") != "measurements":
            continue
        for task in frame.get("tasks", {}).values():
            if task.get("labels", {}).get("role") == "hp":
                out.append((frame["ts"], task.get("metrics", {})))
    return out


def be_levels(run: str):
    """slo_controller_be_level of each allocations frame, in order."""
    levels = []
    for frame in frames_of(run):
        if frame.get("kind") != "allocations":
            continue
        for sample in frame.get("metrics", []):
            if sample.get("name") == "slo_controller_be_level":
                levels.append(sample["value"])
    return levels


def main() -> int:
    args = docopt(__doc__)
    min_load, tolerance = float(args["--min-load"]), float(args["--tolerance"])
    rows = []
    for ts, m in hp_intervals(args["HISTOGRAM_RUN"]):
        load, sli, p99 = (m.get("apm_throughput_per_second"), m.get("apm_sli"),
                          m.get("apm_latency_p99_seconds"))
        if None in (load, sli, p99) or load < min_load or p99 <= 0:
            continue
        rows.append((ts, load, sli, p99, abs(sli - p99) / p99))
    for ts, load, sli, p99, err in rows:
        print(f"{ts:.1f}  load {load:8.1f}/s  histogram p99 {sli * 1e3:8.3f} ms  "
              f"wrapper p99 {p99 * 1e3:8.3f} ms  {err * 100:6.1f} %")
    if rows:
        within = sum(1 for r in rows if r[4] <= tolerance) / len(rows)
        print(f"intervals at >= {min_load:g} req/s: {len(rows)}; within {tolerance:.0%}: "
              f"{within:.1%}; median difference {statistics.median(r[4] for r in rows):.1%}")
    else:
        print("no interval with both SLIs at that load")
    a, b = be_levels(args["WRAPPER_RUN"]), be_levels(args["HISTOGRAM_RUN"])
    n = min(len(a), len(b))
    if n:
        same = sum(1 for x, y in zip(a[:n], b[:n], strict=True) if x == y) / n
        diff = statistics.fmean(abs(x - y) for x, y in zip(a[:n], b[:n], strict=True))
        print(f"controller BE level, {n} intervals: the same in {same:.1%}, mean difference "
              f"{diff:.2f} levels (wrapper run mean {statistics.fmean(a):.2f}, histogram run "
              f"{statistics.fmean(b):.2f})")
    else:
        print("no slo_controller_be_level in one of the runs (run them with the controller)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
