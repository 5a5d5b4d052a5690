"""Signals that see contention without a hardware PMU, on real cgroups with real processes:
the run-queue delay of a task's threads, per-task PSI and perf software events of a task
whose controllers are v1 but which also has a cgroup2 group (a hybrid host)."""
import contextlib
import itertools
import os
import time

import pytest

from cgroup_helpers import (TestCgroup, needs_v1, new_name, tell, v1_cgroup, v1_missing,
                            v2_cgroup, v2_missing, wait_line)
from owca.measure.sources.cgroup import RunQueueDelay, TaskCgroup
from owca.measure.stage import Measure, MeasureConfig
from owca.core.paths import DEFAULT_PATHS
from owca.measure.sources.perf import find_helper

GUARD_SECONDS = 120  # a hang guard, not a timing expectation

# Two threads spinning on CPU 0: each waits on the run queue while the other runs.
# The second thread ends when told.
SPIN_TWO_THREADS = """
import os, sys, threading
os.sched_setaffinity(0, {0})
stop = threading.Event()
def spin():
    while not stop.is_set(): pass
t = threading.Thread(target=spin); t.start()
print('running', flush=True)
sys.stdin.readline(); stop.set(); t.join()
while len(os.listdir('/proc/self/task')) > 1: pass  # the OS thread ends after join()
print('joined', flush=True)
while True: pass
"""


def hybrid_missing():
    if v1_missing() or v2_missing():
        return v1_missing() or v2_missing()
    if DEFAULT_PATHS.cgroup_v2_root == DEFAULT_PATHS.cgroupfs:
        return "a unified host (no v1 controllers beside cgroup2)"
    return None


needs_hybrid = pytest.mark.skipif(hybrid_missing() is not None, reason=str(hybrid_missing()))


@contextlib.contextmanager
def hybrid_cgroup():
    """One path in the v1 cpu, cpuacct, memory hierarchies and in cgroup2."""
    path = new_name()
    with v1_cgroup(path=path) as v1, v2_cgroup(path=path) as v2:
        both = TestCgroup(path, {**v1.dirs, **v2.dirs})
        try:
            yield both
        finally:
            for child in both.children:  # killed before the directories go
                v2.children.append(child)


def threads_delay(cgroup_dir: str) -> float:
    """The sum, read directly, of the second schedstat field of the cgroup's threads."""
    total = 0
    with open(os.path.join(cgroup_dir, "tasks")) as f:
        for tid in f.read().split():
            with open(f"/proc/{tid}/schedstat") as s:
                total += int(s.read().split()[1])
    return total / 1e9


@needs_v1
def test_run_queue_delay_is_the_sum_over_the_cgroups_threads():
    with v1_cgroup() as cg:
        child = cg.start_python(SPIN_TWO_THREADS)
        wait_line(child, "running")
        reader = TaskCgroup(DEFAULT_PATHS, cg.path)
        first = reader.read()["task_run_queue_delay_seconds"]
        direct = threads_delay(cg.dirs["cpuacct"])
        later = reader.read()["task_run_queue_delay_seconds"]
        assert first <= direct <= later  # the counters only grow between the reads
        assert later > 0  # two threads on one CPU: each waited
        reader.close()


@needs_v1
def test_a_thread_that_exits_keeps_its_delay_in_the_counter():
    with v1_cgroup() as cg:
        child = cg.start_python(SPIN_TWO_THREADS)
        wait_line(child, "running")
        rq = RunQueueDelay(DEFAULT_PATHS, cg.dirs["cpuacct"], "v1")
        before = rq.read()
        assert len(rq.threads) == 2
        tell(child)
        wait_line(child, "joined")
        after = rq.read()
        assert len(rq.threads) == 1 and rq.retired > 0
        assert after >= before
        rq.close()


def test_an_empty_or_absent_thread_list_gives_no_value(tmp_path):
    (tmp_path / "tasks").write_text("")
    assert RunQueueDelay(DEFAULT_PATHS, str(tmp_path), "v1").read() is None
    assert RunQueueDelay(DEFAULT_PATHS, str(tmp_path / "gone"), "v1").read() is None


@needs_hybrid
def test_a_v1_task_with_a_cgroup2_group_gets_its_psi_from_there():
    with hybrid_cgroup() as cg:
        child = cg.start_python(SPIN_TWO_THREADS)
        wait_line(child, "running")
        got = TaskCgroup(DEFAULT_PATHS, cg.path).read()
        assert "task_cpu_usage_seconds" in got  # read from v1 ...
        stall = got["task_pressure_stall_seconds"]  # ... and PSI from the cgroup2 group
        assert stall["cpu"]["some"] > 0  # two threads on one CPU stall each other
        with open(os.path.join(cg.dirs["v2"], "cpu.pressure")) as f:
            total = int(f.read().split("total=")[1].split()[0]) / 1e6
        assert stall["cpu"]["some"] <= total


@needs_v1
def test_a_v1_only_task_has_no_psi():
    with v1_cgroup() as cg:
        child = cg.start_python(SPIN_TWO_THREADS)
        wait_line(child, "running")
        got = TaskCgroup(DEFAULT_PATHS, cg.path).read()
        assert "task_cpu_usage_seconds" in got and "task_pressure_stall_seconds" not in got


def helper_missing():
    try:
        find_helper()
    except OSError as e:
        return str(e)
    return hybrid_missing()


@pytest.mark.skipif(helper_missing() is not None, reason=str(helper_missing()))
def test_perf_software_events_of_a_hybrid_task_through_its_cgroup2_group():
    """perf_event is implicit in cgroup2 here: a task with a cgroup2 group is counted,
    the same task without one is not (ENOENT, as the issue saw)."""
    with hybrid_cgroup() as hybrid, v1_cgroup() as v1_only:
        for cg in (hybrid, v1_only):
            wait_line(cg.start_python(SPIN_TWO_THREADS), "running")
        stage = Measure(MeasureConfig(perf_events=["context-switches", "task-clock"]),
                        {"--no-timing": True})
        try:
            tasks = [{"id": cg.path, "name": cg.path, "cgroup_path": cg.path}
                     for cg in (hybrid, v1_only)]
            # Cycles until the spinning threads have been switched (a scheduler tick or
            # more): on a loaded host they run late, so wait for the work, not a time.
            deadline = time.monotonic() + GUARD_SECONDS
            for seq in itertools.count(1):
                frame = stage.process({"seq": seq, "tasks": tasks})[0]
                counted = frame["tasks"][hybrid.path]["metrics"]
                if counted.get("task_context_switches", 0) > 0 or seq > 1 and \
                        time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            stage.close()
        assert counted["task_context_switches"] > 0 and counted["task_task_clock_seconds"] > 0
        assert "task_context_switches" not in frame["tasks"][v1_only.path]["metrics"]
        assert "task_run_queue_delay_seconds" in frame["tasks"][v1_only.path]["metrics"]
