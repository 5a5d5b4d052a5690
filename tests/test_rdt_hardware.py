"""RDT monitoring on a real resctrl mount: where test_rdt_monitor.py's fake tree stops.

Runs only where the kernel offers L3 monitoring (`info/L3_MON` under a resctrl
mount); elsewhere it is skipped with the reason.  Where the CPU has RDT
monitoring but resctrl is not mounted, the test mounts it and unmounts it
afterwards, so a node's own mount is never touched.

It checks what the fake cannot: that the kernel accepts the MON group and the
threads of a real process, that a process streaming through a buffer larger
than its share of the cache shows real occupancy and bandwidth, and that the
figures are the kernel's own (read back from mon_data).  What it still cannot
cover: an RMID in limbo after rmdir, and `Unavailable` counters, which depend
on the hardware's timing.
"""
import contextlib
import os
import subprocess
import time

import pytest

from cgroup_helpers import v1_cgroup, v1_missing, v2_cgroup, v2_missing, wait_line
from owca.core.paths import DEFAULT_PATHS
from owca.measure.sources.rdt import (DOMAIN_PREFIX, LLC, MBM_TOTAL, MON_DATA, MON_GROUPS,
                                      group_name, parse_counter, start_rdt_monitor)

RESCTRL = DEFAULT_PATHS.resctrlfs
# Copies a 64 MiB buffer over and over: misses in any L3 and streams memory.
STREAM = ("import sys\nb = bytearray(64 << 20)\nprint('running', flush=True)\n"
          "while True:\n    c = bytes(b)\n")
SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


@pytest.fixture(scope="module")
def resctrl():
    """The resctrl mount with monitoring; mounted here (and unmounted after) only
    where the CPU has it and nothing mounted it yet."""
    ours = False
    if not mounted(RESCTRL):
        if "cqm_llc" not in cpu_flags():
            pytest.skip("no RDT monitoring on this CPU (no cqm_llc in /proc/cpuinfo)")
        result = subprocess.run(["mount", "-t", "resctrl", "resctrl", RESCTRL],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"resctrl cannot be mounted here: {result.stderr.strip()}")
        ours = True
    try:
        if not os.path.isdir(os.path.join(RESCTRL, "info", "L3_MON")):
            pytest.skip("resctrl has no info/L3_MON: no L3 monitoring on this platform")
        yield RESCTRL
    finally:
        if ours:
            subprocess.run(["umount", RESCTRL], check=True)


@contextlib.contextmanager
def task_cgroup():
    if v2_missing() is None:
        with v2_cgroup() as cg:
            yield cg
    elif v1_missing(controllers=("cpu",)) is None:
        with v1_cgroup(controllers=("cpu",)) as cg:
            yield cg
    else:
        pytest.skip("neither a cgroup2 nor a v1 cpu hierarchy to put a task in")


def kernel_figure(group_dir, event):
    """The kernel's own figure for `event`, summed over the L3 domains."""
    data = os.path.join(group_dir, MON_DATA)
    values = []
    for domain in sorted(os.listdir(data)):
        if domain.startswith(DOMAIN_PREFIX):
            with open(os.path.join(data, domain, event)) as f:
                values.append(parse_counter(f.read()))
    return None if None in values else sum(values)


def features(root):
    with open(os.path.join(root, "info", "L3_MON", "mon_features")) as f:
        return f.read().split()


def test_a_streaming_task_gets_a_real_mon_group_with_the_kernels_figures(resctrl):
    monitor = start_rdt_monitor(DEFAULT_PATHS)
    try:
        with task_cgroup() as streaming, task_cgroup() as idle:
            hot = streaming.start_python(STREAM)
            wait_line(hot, "running")
            cold = idle.start_python(SLEEP)
            wait_line(cold, "running")
            monitor.update({"streaming": streaming.path, "idle": idle.path})
            monitor.read()
            hot_dir = os.path.join(resctrl, MON_GROUPS, group_name("streaming"))
            with open(os.path.join(hot_dir, "tasks")) as f:
                assert str(hot.pid) in f.read().split(), "the kernel took the task's thread"
            time.sleep(2)
            tasks, platform = monitor.read()
            kernel_llc = kernel_figure(hot_dir, LLC)
            hot_llc = tasks["streaming"]["task_llc_occupancy_bytes"]
            # Occupancy moves between two reads a moment apart; a copy loop's stays
            # within the same order of magnitude.
            assert kernel_llc > 0 and 0.5 < hot_llc / kernel_llc < 2, (hot_llc, kernel_llc)
            assert hot_llc > tasks.get("idle", {}).get("task_llc_occupancy_bytes", 0)
            assert "platform_llc_occupancy_bytes" in platform
            if MBM_TOTAL in features(resctrl):
                rate = tasks["streaming"].get("task_mem_bandwidth_bytes_per_second")
                # How fast the copy loop goes is the machine's (and its load's) figure;
                # that it moved memory, and no more than the kernel saw, is OWCA's.
                assert rate is not None and rate > 0, tasks["streaming"]
                assert tasks["streaming"]["task_mem_bandwidth_bytes"] <= \
                    kernel_figure(hot_dir, MBM_TOTAL)
            monitor.update({"idle": idle.path})
            assert not os.path.exists(hot_dir), "the group goes with its task"
    finally:
        monitor.close()
    leftovers = [d for d in os.listdir(os.path.join(resctrl, MON_GROUPS))
                 if d.startswith("owca-mon-")]
    assert leftovers == []
