#!/usr/bin/env python3
"""CPU time of one owca-measure cycle against the number of tasks, with and without perf.

For each N it creates N task cgroups, PREFIX/task-0000 ... (cgroup v1 cpu,
cpuacct and memory, and the hierarchy that carries perf_event: cgroup2 where
perf_event is not bound to v1, see PerfHierarchy), one light process in each,
and times owca-measure's Measure stage in this process:

  first cycle   the tasks frame decoded and validated, update() (opens the cgroup
                files and the perf groups), measure(), the measurements frame encoded
  steady cycle  the same with the files and groups already open (median, min, max
                over --cycles after --warmup, --gap-ms apart)

CPU time is this process's (user + system) plus, with perf, the owca-perf
helper's (/proc/PID/schedstat).  "read part" is the cgroup and perf sources'
read(), the cgroup files and perf counters read (what the floor program does,
in Python): the cycle less decoding the tasks frame, the platform, assembling
and encoding the measurements frame.  "perf part" is PerfCounters.read() alone,
Python and helper; "perf open" PerfCounters.update() in the first cycle, which
opens every task's groups.  Everything is divided by N: microseconds per task.

"run-queue delay part" is the steady cycle without perf less the same cycle with
measure's `run_queue_delay: false`: what task_run_queue_delay_seconds costs (the
task's thread list and each thread's /proc/TID/schedstat; one thread per task here).

Beside it, on the same cgroups and in the same run:
  floor_same_work (always, unless --no-same-work) benchmarks/floor_same_work.c,
                  built into build/ with cc: the files the with-perf stage read for
                  each task at their cadences, and its perf events on each counted
                  cgroup, kept open and pread, nothing else; the list is the stage's
                  own (Measure.files_read()), so the two read the same things
  --floor BINARY  a floor program taking `-n N -p PREFIX -k` and printing one JSON
                  object with cycle_ms and open_ms (the reference floor.c: perf
                  group reads plus five cgroup files kept open, in C)
  --perf-stat     `perf stat -a -e EVENTS --for-each-cgroup ... -I 100`: its CPU
                  time per interval, from the difference of a short and a long run
  --lean          the leanest cycle a Python stage could have on the same work
                  (task-clock and context-switches; time_lean_cycle), a bound
                  for owca-measure, not an alternative to it

The process limit on open files is set to --nofile (soft) first, so the run
shows whether owca-measure copes with a 1024-file soft limit.

The run re-executes itself in a private mount namespace (unshare(1)), so that
its mounts at <cgroupfs>/perf_event do not propagate into containers that
share /sys/fs/cgroup.  It mounts perf_event as v1 only where the controller is
bound to v1 already (mounting it would bind it host-wide for the run).

Usage (root): python3 benchmarks/measure_cycle.py [--tasks 10,100,1000]
              [--events task-clock,context-switches] [--helper PATH]
              [--cycles 20] [--warmup 3]
              [--gap-ms 100] [--mode tick|sleep] [--nofile 1024] [--prefix P]
              [--floor BINARY] [--perf-stat] [--lean] [--json]
"""
import argparse
import collections
import json
import logging
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/ for perf_mounts: mounting perf_event as v1 is test and benchmark code.
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "tests")]

from owca.core import frames  # noqa: E402
from owca.core.paths import DEFAULT_PATHS as PATHS  # noqa: E402
from owca.measure.sources.perf import PerfCounters  # noqa: E402
from owca.measure.sources.perf.counters import perf_event_hierarchy  # noqa: E402
from owca.measure.stage import Measure, MeasureConfig  # noqa: E402
from perf_mounts import mount_perf_event_v1  # noqa: E402

CONTROLLERS = ("cpu", "cpuacct", "memory")
PERF_STAT_INTERVAL_MS = 100
PRIVATE_NAMESPACE_MARK = "OWCA_BENCH_PRIVATE_MOUNTS"
BUILT_HELPER = os.path.join(ROOT, "build", "owca-perf")
SAME_WORK_SOURCE = os.path.join(ROOT, "benchmarks", "floor_same_work.c")
SAME_WORK_BINARY = os.path.join(ROOT, "build", "floor_same_work")


# -- the task cgroups -------------------------------------------------------------------

# The task processes come from a spawner, a fresh interpreter: forked from the
# measuring process instead, 1000 children would share its pages copy-on-write,
# and its first cycle would pay a page fault for every page it writes (twice its
# CPU time at N = 1000), which owca-measure on a node never does.
SPAWNER = r"""
import os, signal, sys, time
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children reap themselves
mode = sys.argv[1]
for line in sys.stdin:
    dirs = line.split()
    pid = os.fork()
    if pid:
        print(pid, flush=True)
        continue
    try:  # the child: join the cgroups, then idle or tick
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        for d in dirs:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if mode == "sleep":
            os.execvp("sleep", ["sleep", "infinity"])
        while True:
            time.sleep(0.1)
    finally:
        os._exit(1)
"""


class TaskCgroups:
    """N cgroups PREFIX/task-NNNN in every controller, one process each; the
    processes are killed by the pids recorded here, never by name."""

    def __init__(self, prefix, n, mode, perf_root):
        self.prefix, self.n = prefix, n
        self.pids = []
        self.roots = [PATHS.cgroup_v1(c) for c in CONTROLLERS] + [perf_root]
        for root in self.roots:
            os.makedirs(os.path.join(root, prefix), exist_ok=True)
        self.spawner = subprocess.Popen([sys.executable, "-S", "-c", SPAWNER, mode],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        for i in range(n):
            dirs = [os.path.join(root, self.name(i)) for root in self.roots]
            for d in dirs:
                os.mkdir(d)
            self.spawner.stdin.write(" ".join(dirs) + "\n")
            self.spawner.stdin.flush()
            self.pids.append(int(self.spawner.stdout.readline()))

    def name(self, i):
        return "%s/task-%04d" % (self.prefix, i)

    def wait_joined(self):
        probe = os.path.join(self.roots[0], "%s", "cgroup.procs")
        deadline = time.monotonic() + 60
        for i, pid in enumerate(self.pids):
            while time.monotonic() < deadline:
                with open(probe % self.name(i)) as f:
                    if str(pid) in f.read().split():
                        break
                time.sleep(0.01)

    def tasks_frame(self, seq):
        tasks = [{"id": "task-%04d" % i, "name": "task-%04d" % i,
                  "cgroup_path": "/" + self.name(i), "labels": {}, "resources": {}}
                 for i in range(self.n)]
        return frames.tasks_frame(seq, tasks)

    def remove(self):
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.spawner.stdin.close()  # the spawner exits at the end of its input
        self.spawner.wait()
        self.spawner.stdout.close()
        # The spawner reaps its children as they die; a directory the kernel
        # still finds busy is tried again once everything else is gone.
        dirs = [os.path.join(root, self.name(i)) for root in self.roots for i in range(self.n)]
        dirs += [os.path.join(root, self.prefix) for root in self.roots]
        for attempt in range(50):
            busy = []
            for d in dirs:
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError:
                    busy.append(d)
            if not busy:
                return
            dirs = busy
            time.sleep(0.1)
        print("warning: could not remove %d cgroups, e.g. %s" % (len(dirs), dirs[0]),
              file=sys.stderr)


class PerfHierarchy:
    """The perf_event hierarchy for the run, also reachable at
    <cgroupfs>/perf_event, where a floor program looks for it:

    - perf_event on cgroup2 (not bound to v1; this kind of machine): the
      cgroup2 root, bind-mounted there; the controller's binding is not touched
    - bound to v1 and mounted there: used as it is
    - bound to v1, mounted elsewhere or nowhere: mounted there for the run,
      released afterwards
    """

    def __init__(self):
        self.point = PATHS.cgroup_v1("perf_event").rstrip("/")
        self.made_dir = self.mounted = self.bound = False
        if perf_event_hierarchy(PATHS)[0] == 0:
            self.root = PATHS.cgroup_v2_root
            self._make_point()
            subprocess.run(["mount", "--bind", self.root, self.point], check=True)
            self.bound = True
            return
        self.root = self.point
        if not os.path.exists(os.path.join(self.point, "cgroup.procs")):
            self._make_point()
            mount_perf_event_v1(self.point)
            self.mounted = True

    def _make_point(self):
        if not os.path.isdir(self.point):
            os.mkdir(self.point)
            self.made_dir = True

    def release(self):
        if self.bound:
            subprocess.run(["umount", self.point], check=True)
        if self.mounted:
            subprocess.run(["umount", self.point], check=True)
        if self.made_dir:
            os.rmdir(self.point)


# -- owca-measure -----------------------------------------------------------------------

def schedstat_seconds(pid):
    """CPU time of a process (all its threads), in seconds, from schedstat."""
    total = 0
    task_dir = PATHS.proc(str(pid), "task")
    for tid in os.listdir(task_dir):
        with open(os.path.join(task_dir, tid, "schedstat")) as f:
            total += int(f.read().split()[0])
    return total / 1e9


def summary_us(seconds, n):
    per_task = sorted(s * 1e6 / n for s in seconds)
    return {"median": round(statistics.median(per_task), 2), "min": round(per_task[0], 2),
            "max": round(per_task[-1], 2)}


class TimedStage:
    """A Measure stage and the CPU time it spends: this process's, plus its
    perf helper's; perf_cpu collects PerfCounters.read() alone."""

    def __init__(self, events, helper=None, perf_root=None, run_queue_delay=True):
        cfg = MeasureConfig(perf_events=list(events) or None, perf_helper=helper,
                            perf_cgroup_root=perf_root, run_queue_delay=run_queue_delay)
        self.stage = Measure(cfg, {"--no-timing": True})
        perf = self.stage.source("perf")
        self.perf = perf.counters if perf else None
        self.read_cpu = []         # per cycle, the cgroup and perf sources' read()
        self._reads = []           # this cycle's, summed into read_cpu
        self.perf_cpu = []         # PerfCounters.read() per cycle
        self.perf_update_cpu = []  # PerfCounters.update() per cycle (opens the groups)
        for source in (self.stage.source("cgroup"), perf):
            if source:
                source.read = self._timed(source.read, self._reads)
        if self.perf:
            self.perf.read = self._timed(self.perf.read, self.perf_cpu)
            self.perf.update = self._timed(self.perf.update, self.perf_update_cpu)

    def _timed(self, method, spent):
        def timed(*args):
            started = self.cpu()
            result = method(*args)
            spent.append(self.cpu() - started)
            return result
        return timed

    def cpu(self):
        own = time.process_time()
        return own + (schedstat_seconds(self.perf.helper.pid) if self.perf else 0)

    def cycle(self, line):
        """What owca-measure does with one tasks frame: decode and check it,
        update and measure, encode the measurements frame."""
        started = self.cpu()
        out = self.stage.process(frames.validate(frames.decode(line)))
        self.read_cpu.append(sum(self._reads))
        self._reads.clear()
        for produced in out:
            frames.encode(produced)
        return self.cpu() - started, out[0]


def time_measure(cgroups, events, helper, perf_root, cycles, warmup, gap):
    """Two Measure stages on the same cgroups, without and with perf: each one's
    first cycle, then their steady cycles interleaved so that both see the same
    machine."""
    runs = {"without_perf": TimedStage([]), "with_perf": TimedStage(events, helper, perf_root),
            # the run-queue delay's cost: the cycle without perf, less this one
            "without_perf_or_run_queue_delay": TimedStage([], run_queue_delay=False)}
    results = {}
    try:
        for name, run in runs.items():
            first, _ = run.cycle(frames.encode(cgroups.tasks_frame(1)))
            results[name] = {"first_us_per_task": round(first * 1e6 / cgroups.n, 2)}
        steady = {name: [] for name in runs}
        for seq in range(2, 2 + warmup + cycles):
            line = frames.encode(cgroups.tasks_frame(seq))
            for name, run in runs.items():
                time.sleep(gap)
                spent, frame = run.cycle(line)
                steady[name].append(spent)
                results[name]["tasks_measured"] = len(frame["tasks"])
        for name, run in runs.items():
            results[name]["cycle_us_per_task"] = summary_us(steady[name][warmup:], cgroups.n)
            results[name]["read_us_per_task"] = summary_us(run.read_cpu[1 + warmup:], cgroups.n)
        results["run_queue_delay_us_per_task"] = round(
            results["without_perf"]["cycle_us_per_task"]["median"]
            - results["without_perf_or_run_queue_delay"]["cycle_us_per_task"]["median"], 2)
        run = runs["with_perf"]
        results["plan"] = run.stage.files_read()
        counted = run.perf.read()
        results["with_perf"].update(
            perf_part_us_per_task=summary_us(run.perf_cpu[1 + warmup:-1], cgroups.n),
            perf_open_us_per_task=round(run.perf_update_cpu[0] * 1e6 / cgroups.n, 2),
            perf_tasks_counted=len(counted),
            perf_tasks_not_counted=dict(collections.Counter(run.perf.failed_tasks.values())),
            helper_fds=len(os.listdir(PATHS.proc(str(run.perf.helper.pid), "fd"))))
        return results
    finally:
        for run in runs.values():
            run.stage.close()


# -- the leanest Python cycle ------------------------------------------------------------

LEAN_FILES = (("cpuacct", "cpuacct.usage"), ("cpu", "cpu.stat"),
              ("memory", "memory.usage_in_bytes"), ("memory", "memory.max_usage_in_bytes"),
              ("memory", "memory.stat"))
LEAN_METRICS = ('"task_cpu_usage_seconds":%r,"task_cpu_periods":%d,'
                '"task_cpu_throttled_periods":%d,"task_cpu_throttled_seconds":%r,'
                '"task_mem_usage_bytes":%d,"task_mem_max_usage_bytes":%d,'
                '"task_mem_page_faults":%d,"task_task_clock_seconds":%r,'
                '"task_context_switches":%d,"task_scaling_factor_avg":%r,'
                '"task_scaling_factor_max":%r,"task_up":1,"task_last_seen":%r}}')


def time_lean_cycle(cgroups, helper, perf_root, cycles, warmup, gap):
    """How cheap a cycle of a Python stage can be at all: owca-measure's
    steady work on these cgroups (decode a tasks frame; read the five files it
    reads every cycle and the two software events; encode a measurements
    frame), minus all a real stage must also do: no frame checks, no error
    handling, no platform or slow metrics, JSON from %-templates.  A bound
    for what owca-measure could reach in Python, not a way to run."""
    counters = PerfCounters(["task-clock", "context-switches"], helper_path=helper,
                            cgroup_root=perf_root)
    fds = {}
    try:
        ids = ["task-%04d" % i for i in range(cgroups.n)]
        counters.update({t: "/" + cgroups.name(i) for i, t in enumerate(ids)})
        slot_task = {slot: t for t, (slot, _) in counters._opened.items()}
        templates = {}
        for i, t in enumerate(ids):
            fds[t] = [os.open(os.path.join(PATHS.cgroup_v1(c, cgroups.name(i)), f), os.O_RDONLY)
                      for c, f in LEAN_FILES]
            templates[t] = ('"%s":{"name":"%s","cgroup_path":"/%s","labels":{},'
                            '"resources":{},"metrics":{' % (t, t, cgroups.name(i))
                            + LEAN_METRICS)
        pread = os.pread

        def cycle(line):
            frame = json.loads(line)
            ts = time.time()
            values = {slot_task[r.slot]: r for r in counters.helper.read()}
            parts = []
            for task in frame["tasks"]:
                t = task["id"]
                usage, cpu_stat, mem, max_mem, mem_stat = fds[t]
                cs = pread(cpu_stat, 256, 0).split()
                ms = pread(mem_stat, 4096, 0)
                i = ms.find(b"\ntotal_pgfault ") + 15
                r = values[t]
                parts.append(templates[t] % (
                    int(pread(usage, 64, 0)) / 1e9, int(cs[1]), int(cs[3]), int(cs[5]) / 1e9,
                    int(pread(mem, 64, 0)), int(pread(max_mem, 64, 0)),
                    int(ms[i:ms.find(b"\n", i)]), r.values[0] / 1e9, r.values[1],
                    r.scale_avg, r.scale_max, ts))
            return ('{"v":1,"kind":"measurements","ts":%r,"host":"h","seq":%d,"platform":{},'
                    '"tasks":{%s},"metrics":[]}' % (ts, frame["seq"], ",".join(parts))).encode()

        def cpu():
            return time.process_time() + schedstat_seconds(counters.helper.pid)

        spent = []
        for seq in range(1, 1 + warmup + cycles):
            line = frames.encode(cgroups.tasks_frame(seq))
            time.sleep(gap)
            started = cpu()
            out = cycle(line)
            spent.append(cpu() - started)
        assert len(json.loads(out)["tasks"]) == cgroups.n
        return {"cycle_us_per_task": summary_us(spent[warmup:], cgroups.n)}
    finally:
        for task_fds in fds.values():
            for fd in task_fds:
                os.close(fd)
        counters.close()


# -- the references ---------------------------------------------------------------------

def build_same_work_floor():
    """build/floor_same_work, compiled from benchmarks/floor_same_work.c when older."""
    if not os.path.exists(SAME_WORK_BINARY) or \
            os.path.getmtime(SAME_WORK_BINARY) < os.path.getmtime(SAME_WORK_SOURCE):
        os.makedirs(os.path.dirname(SAME_WORK_BINARY), exist_ok=True)
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", SAME_WORK_BINARY,
                        SAME_WORK_SOURCE], check=True)
    return SAME_WORK_BINARY


def plan_lines(plan):
    """Measure.files_read() as floor_same_work's plan file."""
    lines = ["f %d %d %d %s" % (every, phase, int(kept), path)
             for path, every, phase, kept in plan["files"]]
    lines += ["p %s" % directory for directory in plan["perf_cgroups"]]
    return "".join(line + "\n" for line in lines)


def run_floor_same_work(plan, n, cycles, warmup, gap_ms):
    """The same-work floor on what the with-perf stage read (its own listing), in
    this run and process tree: its kept-open cycle, its opening, what it read."""
    binary = build_same_work_floor()
    with tempfile.NamedTemporaryFile("w", prefix="owca-plan-", suffix=".txt") as f:
        f.write(plan_lines(plan))
        f.flush()
        argv = [binary, "-f", f.name, "-c", str(cycles), "-w", str(warmup), "-g", str(gap_ms)]
        if plan["perf_events"]:
            argv += ["-e", ",".join(plan["perf_events"])]
        done = subprocess.run(argv, capture_output=True, text=True, preexec_fn=hard_nofile,
                              check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-300:]}
    out = json.loads(done.stdout)
    return {"cycle_us_per_task": round(out["cycle_ms"]["median"] * 1e3 / n, 2),
            "files_us_per_task": round(out["files_ms"]["median"] * 1e3 / n, 2),
            "perf_us_per_task": round(out["perf_ms"]["median"] * 1e3 / n, 2),
            "open_us_per_task": round(out["open_ms"] * 1e3 / n, 2),
            "files_per_task": round(out["files"] / n, 2),
            "files_read_per_task_per_cycle": round(out["files_read_per_cycle"] / n, 2),
            "perf_groups": out["groups"]}


def hard_nofile():
    """For the references: they get the hard limit, the 1024 test is owca-measure's."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_floor(binary, cgroups, cycles, warmup, gap_ms):
    done = subprocess.run([binary, "-n", str(cgroups.n), "-p", cgroups.prefix, "-k",
                           "-c", str(cycles), "-w", str(warmup), "-g", str(gap_ms)],
                          capture_output=True, text=True, check=True, preexec_fn=hard_nofile)
    out = json.loads(done.stdout)
    return {"open_us_per_task": round(out["open_ms"] * 1e3 / cgroups.n, 2),
            "cycle_us_per_task": round(out["cycle_ms"]["median"] * 1e3 / cgroups.n, 2),
            "perf_us_per_task": round(out["perf_ms"]["median"] * 1e3 / cgroups.n, 2),
            "files_us_per_task": round(out["files_ms"]["median"] * 1e3 / cgroups.n, 2)}


def run_perf_stat(cgroups, events, settle=1.0, seconds=2.0):
    """perf stat's CPU per interval, from its schedstat between two points of
    one run (after `settle` seconds, when its events are open, and `seconds`
    later); the first point also gives the opening cost (plus a few intervals)."""
    binary = shutil.which("perf")
    if binary is None:
        return {"error": "perf not installed"}
    names = ",".join(cgroups.name(i) for i in range(cgroups.n))
    argv = [binary, "stat", "-a", "-e", ",".join(events), "--for-each-cgroup", names,
            "-I", str(PERF_STAT_INTERVAL_MS), "-x", ",", "-o", os.devnull,
            "--", "sleep", str(settle + seconds + 1)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=hard_nofile)
    try:
        time.sleep(settle)
        opened = schedstat_seconds(process.pid)
        time.sleep(seconds)
        running = schedstat_seconds(process.pid) - opened
    finally:
        process.wait()
        error = process.stderr.read().decode()
        process.stderr.close()
    if process.returncode != 0:
        return {"error": "perf stat failed: %s" % error.strip()[-300:]}
    intervals = seconds * 1000 / PERF_STAT_INTERVAL_MS
    return {"interval_us_per_task": round(running / intervals * 1e6 / cgroups.n, 2),
            "first_second_us_per_task": round(opened * 1e6 / cgroups.n, 2)}


# -- main -------------------------------------------------------------------------------

def table(results):
    rows = ["| N | measure first, no perf | measure first, perf | measure cycle, no perf | "
            "measure cycle, perf | read part, perf | perf part | perf open | floor -k cycle | "
            "floor -k open | perf stat interval | leanest Python cycle | run-queue delay part | "
            "same-work floor cycle | cycle, perf / same-work floor |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        floor, stat = r.get("floor_k", {}), r.get("perf_stat", {})
        lean = r.get("lean_python", {}).get("cycle_us_per_task", {})
        same = r.get("floor_same_work", {}).get("cycle_us_per_task")
        ratio = round(r["with_perf"]["cycle_us_per_task"]["median"] / same, 2) if same else "-"
        rows.append("| %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |"
                    % (
            r["n"], r["without_perf"]["first_us_per_task"], r["with_perf"]["first_us_per_task"],
            r["without_perf"]["cycle_us_per_task"]["median"],
            r["with_perf"]["cycle_us_per_task"]["median"],
            r["with_perf"]["read_us_per_task"]["median"],
            r["with_perf"]["perf_part_us_per_task"]["median"],
            r["with_perf"]["perf_open_us_per_task"],
            floor.get("cycle_us_per_task", "-"), floor.get("open_us_per_task", "-"),
            stat.get("interval_us_per_task", "-"), lean.get("median", "-"),
            r.get("run_queue_delay_us_per_task", "-"), same or "-", ratio))
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="10,100,1000")
    ap.add_argument("--events", default="task-clock,context-switches")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gap-ms", type=int, default=100)
    ap.add_argument("--mode", choices=("tick", "sleep"), default="tick")
    ap.add_argument("--nofile", type=int, default=1024)
    ap.add_argument("--prefix", default="owcabench-measure")
    ap.add_argument("--helper", default=BUILT_HELPER if os.path.exists(BUILT_HELPER) else None,
                    help="the owca-perf binary (default: build/owca-perf of this tree, from "
                         "`make helper`, else where owca-measure finds it)")
    ap.add_argument("--floor")
    ap.add_argument("--no-same-work", action="store_true",
                    help="leave out the same-work floor (benchmarks/floor_same_work.c, built "
                         "into build/ with cc)")
    ap.add_argument("--perf-stat", action="store_true")
    ap.add_argument("--lean", action="store_true",
                    help="also time the leanest Python cycle on the same cgroups "
                         "(time_lean_cycle)")
    ap.add_argument("--json", action="store_true", help="JSON lines only, no table")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("must run as root: creates cgroups and mounts perf_event")
    if os.environ.get(PRIVATE_NAMESPACE_MARK) != "1":
        unshare = shutil.which("unshare")
        if unshare is None:
            sys.exit("needs unshare(1) (util-linux) for a private mount namespace")
        os.environ[PRIVATE_NAMESPACE_MARK] = "1"
        os.execv(unshare, [unshare, "--mount", "--propagation", "private", "--",
                           sys.executable] + sys.argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(args.nofile, hard), hard))
    events = [e for e in args.events.split(",") if e]
    hierarchy = PerfHierarchy()
    results = []
    try:
        for n in (int(x) for x in args.tasks.split(",")):
            cgroups = TaskCgroups(args.prefix, n, args.mode, hierarchy.root)
            try:
                cgroups.wait_joined()
                result = {"n": n, "cpus": os.cpu_count(), "mode": args.mode,
                          "helper": args.helper,
                          "nofile_soft_at_start": min(args.nofile, hard),
                          "events": events}
                result["perf_cgroup_root"] = hierarchy.root
                result.update(time_measure(cgroups, events, args.helper, hierarchy.root,
                                           args.cycles, args.warmup, args.gap_ms / 1000))
                plan = result.pop("plan")
                if not args.no_same_work:
                    result["floor_same_work"] = run_floor_same_work(
                        plan, n, args.cycles, args.warmup, args.gap_ms)
                if args.floor:
                    result["floor_k"] = run_floor(args.floor, cgroups, args.cycles, args.warmup,
                                                  args.gap_ms)
                if args.perf_stat:
                    result["perf_stat"] = run_perf_stat(cgroups, events)
                if args.lean:
                    result["lean_python"] = time_lean_cycle(
                        cgroups, args.helper, hierarchy.root, args.cycles, args.warmup,
                        args.gap_ms / 1000)
            finally:
                cgroups.remove()
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        hierarchy.release()
    if not args.json:
        print("\nCPU time per task (µs), median of steady cycles; first = opening cycle")
        print(table(results))


if __name__ == "__main__":
    main()
