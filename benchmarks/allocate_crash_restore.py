#!/usr/bin/env python3
"""How many original values come back after owca-allocate is SIGKILLed and restarted.

The field trial's fault, repeated: a task's cgroup (cgroup v1 cpu, cpuacct and
cpuset, one sleeping process) starts with cpu.cfs_quota_us 50000 and cpuset.cpus
"0-1"; owca-allocate (a StaticAllocator capping it to 25000 and "1") applies one
cycle, is killed with SIGKILL, is started again with the same state directory
($STATE_DIRECTORY, as systemd gives it), applies one cycle and is stopped cleanly
(EOF).  Per trial it reports how many of the two original values the node has
again, whether the stream ended with a `shutdown: true` frame, and whether that
frame's allocation values are the ones the kernel holds.

    sudo python3 benchmarks/allocate_crash_restore.py --trials 10
    sudo python3 benchmarks/allocate_crash_restore.py --tree OLD_CHECKOUT   # before

`--tree` runs the owca-allocate of another checkout (its bin/ and lib/), so that
the code before a change can be measured with the same script.  Needs root, the
v1 cpu, cpuacct and cpuset hierarchies and two online CPUs.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "lib"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from cgroup_helpers import v1_cgroup, v1_missing, wait_line  # noqa: E402
from owca.core import frames  # noqa: E402

CONTROLLERS = ("cpu", "cpuacct", "cpuset")
CONFIG = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
          "      - labels: {priority: be}\n"
          "        allocations: {cpu_quota: 0.125, cpuset_cpus: '1'}\n")
SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"


# Cgroup files are read and written the harness's one way (owca_workloads.cgroup_files).
sys.path.insert(0, os.path.join(ROOT, "workloads"))
from owca_workloads.cgroup_files import read_str as read, write_str as write  # noqa: E402


def frame(seq, cgroup_path):
    return frames.encode(frames.measurements_frame(
        seq, {"platform_topology_cpus": 2},
        {"task": {"name": "task", "cgroup_path": cgroup_path, "labels": {"priority": "be"},
                  "resources": {}, "metrics": {}}}, ts=time.time(), host="bench"))


def start(tree, config, state):
    env = {**os.environ, "STATE_DIRECTORY": state,
           "PYTHONPATH": os.path.join(tree, "lib")}
    return subprocess.Popen([sys.executable, os.path.join(tree, "bin", "owca-allocate"),
                             "-c", config], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)


def trial(tree, workdir):
    config = os.path.join(workdir, "owca.yaml")
    write(config, CONFIG)
    state = tempfile.mkdtemp(dir=workdir)
    with v1_cgroup(CONTROLLERS) as task:
        for name in ("cpuset.cpus", "cpuset.mems"):
            write(task.file("cpuset", name),
                  read(os.path.join(os.path.dirname(task.dirs["cpuset"]), name)))
        wait_line(task.start_python(SLEEP), "running")
        quota, cpus = task.file("cpu", "cpu.cfs_quota_us"), task.file("cpuset", "cpuset.cpus")
        write(quota, "50000")
        original = (read(quota), read(cpus))
        first = start(tree, config, state)
        first.stdin.write(frame(1, task.path))
        first.stdin.flush()
        first.stdout.readline(), first.stdout.readline()
        capped = (read(quota), read(cpus))
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        first.stdin.close()
        first.stdout.close()
        second = start(tree, config, state)
        second.stdin.write(frame(2, task.path))
        second.stdin.close()
        out = [json.loads(line) for line in second.stdout.read().splitlines()]
        second.stdout.close()
        second.wait()
        after = (read(quota), read(cpus))
    last = out[-1] if out else {}
    shipped = {s["name"]: s for s in last.get("metrics", [])}
    kernel_quota = int(after[0]) / (100000 * 2) if int(after[0]) > 0 else 1.0
    shipped_ok = (last.get("shutdown") is True
                  and shipped.get("allocation_cpu_quota", {}).get("value") == kernel_quota
                  and shipped.get("allocation_cpuset_cpus", {}).get("labels", {}).get("cpus")
                  == after[1])
    return {"original": original, "capped": capped, "after": after,
            "restored": sum(a == o for a, o in zip(after, original)),
            "shutdown_frame": last.get("shutdown") is True, "shipped_matches_kernel": shipped_ok}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", default=ROOT, help="the OWCA checkout whose tool runs")
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()
    missing = v1_missing(controllers=CONTROLLERS)
    if missing or len(os.sched_getaffinity(0)) < 2:
        sys.exit(f"cannot run here: {missing or 'needs two CPUs'}")
    with tempfile.TemporaryDirectory() as workdir:
        results = [trial(os.path.abspath(args.tree), workdir) for _ in range(args.trials)]
    for r in results:
        print(json.dumps(r))
    print(f"values restored: {sum(r['restored'] for r in results)} of {2 * len(results)}; "
          f"shutdown frame: {sum(r['shutdown_frame'] for r in results)} of {len(results)}; "
          f"shipped values = kernel's: {sum(r['shipped_matches_kernel'] for r in results)} "
          f"of {len(results)}")


if __name__ == "__main__":
    main()
