"""The memory allocation types on real cgroup v1 memory directories with real processes.

Each test makes /owca-test-<random> in the cpu, cpuacct and memory hierarchies and
removes it afterwards (tests/cgroup_helpers.py); skipped where the machine has no
writable v1 memory hierarchy.  cgroup v2's memory.min/low/high/max and memory.reclaim
are tested in the QEMU guest (tests/vm/guest_memory.py): this host has no cgroup2
memory controller.
"""
import json
import logging
import os
import signal

import pytest

from cgroup_helpers import read_int, read_str, v1_cgroup, v1_missing, wait_line
from owca.allocate import journal
from owca.allocate.stage import Allocate, AllocateConfig
from test_allocate import Scripted, samples
from test_allocate_cgroups import measurements
from conftest import end_processes
from test_allocate_journal import _cycle, _start

CONTROLLERS = ("cpu", "cpuacct", "memory")
pytestmark = pytest.mark.skipif(v1_missing(controllers=CONTROLLERS) is not None,
                                reason=str(v1_missing(controllers=CONTROLLERS)))
SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"
MIB = 1 << 20
# Writes MIB MiB to a file through the page cache, 1 MiB at a time, then says "written".
STREAM = ("import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"
          "with open(%(path)r, 'wb') as f:\n"
          "    for _ in range(%(mib)d): f.write(b'x' * (1 << 20))\n"
          "print('written', flush=True)\nsys.stdin.readline()\n")


@pytest.fixture
def task():
    with v1_cgroup(CONTROLLERS) as cg:
        yield cg


@pytest.fixture
def state(tmp_path):
    return {"--state-dir": str(tmp_path / "state")}


def memory_settings(cg):
    return {name: read_str(cg.file("memory", name))
            for name in ("memory.limit_in_bytes", "memory.soft_limit_in_bytes")}


def test_memory_max_and_low_are_written_read_back_and_restored_at_stop(task, state):
    wait_line(task.start_python(SLEEP), "running")
    originals = memory_settings(task)
    s = Allocate(AllocateConfig(allocator=Scripted(
        {"task": {"memory_max": 64 * MIB + 100, "memory_low": 32 * MIB}})), state)
    frame = s.process(measurements(1, task.path))[0]
    assert frame["errors"] == []
    # Whole pages: what the kernel keeps, so the next cycle finds it in place.
    assert read_int(task.file("memory", "memory.limit_in_bytes")) == 64 * MIB
    assert read_int(task.file("memory", "memory.soft_limit_in_bytes")) == 32 * MIB
    key = (("task_id", "task"),)
    assert samples(frame, "allocation_memory_max_bytes") == {key: 64 * MIB}
    frame = s.process(measurements(2, task.path))[0]
    assert frame["allocations"] == {} and frame["errors"] == []    # nothing rewritten
    assert s.cfg.allocator.seen[1]["task"]["memory_max"] == 64 * MIB
    assert s.cfg.allocator.seen[1]["task"]["memory_low"] == 32 * MIB
    last = s.close()[0]
    assert memory_settings(task) == originals
    assert last["restored"] == {"task": {"memory_max": "max", "memory_low": "max"}}


def test_a_withdrawn_memory_type_gets_its_original_back(task, state):
    wait_line(task.start_python(SLEEP), "running")
    originals = memory_settings(task)
    s = Allocate(AllocateConfig(allocator=Scripted(
        {"task": {"memory_max": 48 * MIB}}, {"task": {"memory_max": None}})), state)
    s.process(measurements(1, task.path))
    assert read_int(task.file("memory", "memory.limit_in_bytes")) == 48 * MIB
    frame = s.process(measurements(2, task.path))[0]
    assert frame["restored"] == {"task": {"memory_max": "max"}}
    assert memory_settings(task) == originals
    s.close()


def test_a_page_cache_streamer_is_held_under_its_memory_max(task, state, tmp_path):
    """The kernel reclaims the streamer's clean page cache at the limit: it finishes,
    not OOM-killed, and never held more than its limit."""
    child = task.start_python(STREAM % {"path": str(tmp_path / "stream"), "mib": 96})
    wait_line(child, "running")
    s = Allocate(AllocateConfig(allocator=Scripted({"task": {"memory_max": 24 * MIB}})),
                 state)
    assert s.process(measurements(1, task.path))[0]["errors"] == []
    child.stdin.write("go\n")
    child.stdin.flush()
    wait_line(child, "written")
    assert os.path.getsize(tmp_path / "stream") == 96 * MIB
    assert read_int(task.file("memory", "memory.max_usage_in_bytes")) <= 24 * MIB
    assert read_int(task.file("memory", "memory.failcnt")) > 0    # it did reach the limit
    s.close()


def test_v1_says_once_what_it_cannot_express_and_never_tries_it(task, state, caplog):
    wait_line(task.start_python(SLEEP), "running")
    caplog.set_level(logging.INFO, logger="owca.allocate")
    wanted = {"task": {"memory_min": 8 * MIB, "memory_high": 16 * MIB,
                       "memory_reclaim": MIB, "memory_max": 64 * MIB}}
    s = Allocate(AllocateConfig(allocator=Scripted(wanted, wanted, wanted)), state)
    frames_ = [s.process(measurements(seq, task.path))[0] for seq in (1, 2, 3)]
    start = [r.message for r in caplog.records if "cannot be written" in r.message]
    assert start == ["memory: memory_high, memory_min, memory_reclaim cannot be written on "
                     "cgroup v1's memory hierarchy: v1 has no memory.min, memory.high nor "
                     "memory.reclaim; allocations of them are refused without a write"]
    for frame in frames_:
        assert sorted(e["type"] for e in frame["errors"]) == \
            ["memory_high", "memory_min", "memory_reclaim"]
    # The type v1 has is written all the same.
    assert read_int(task.file("memory", "memory.limit_in_bytes")) == 64 * MIB
    # Logged once at error level, not every cycle.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3
    # No memory.reclaim counters where there is no memory.reclaim.
    assert not samples(frames_[-1], "allocation_memory_reclaim_writes_total")
    s.close()


def test_a_limit_below_what_the_task_cannot_give_back_is_an_error_not_a_kill(task, state):
    """64 MiB of anonymous memory and no swap: v1 refuses a 16 MiB limit (EBUSY) after
    trying to reclaim, and OWCA reports it; the task lives on."""
    child = task.start_python("import sys\nheld = b'x' * (64 << 20)\n"
                              "print('running', flush=True)\nsys.stdin.readline()\n")
    wait_line(child, "running")
    if os.path.exists("/proc/swaps") and len(open("/proc/swaps").read().splitlines()) > 1:
        pytest.skip("with swap the kernel can meet the limit")
    s = Allocate(AllocateConfig(allocator=Scripted({"task": {"memory_max": 16 * MIB}})),
                 state)
    frame = s.process(measurements(1, task.path))[0]
    assert [e["type"] for e in frame["errors"]] == ["memory_max"]
    assert "Device or resource busy" in frame["errors"][0]["reason"]
    assert child.poll() is None
    s.close()


STATIC = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
          "      - labels: {priority: be}\n"
          "        allocations: {memory_max: 50331648, memory_low: 16777216}\n")


def test_sigkill_then_restart_then_clean_stop_gives_the_memory_values_back(task, tmp_path):
    from conftest import tool_env
    wait_line(task.start_python(SLEEP), "running")
    originals = memory_settings(task)
    config = tmp_path / "owca.yaml"
    config.write_text(STATIC)
    env = {**tool_env(), "STATE_DIRECTORY": str(tmp_path / "state")}
    frame = lambda seq: measurements(seq, task.path, {"priority": "be"})  # noqa: E731
    tools = []
    try:
        tools.append(_start(config, env))
        _cycle(tools[0], frame(1))
        assert memory_settings(task) == {"memory.limit_in_bytes": str(48 * MIB),
                                         "memory.soft_limit_in_bytes": str(16 * MIB)}
        os.kill(tools[0].pid, signal.SIGKILL)
        assert tools[0].wait(timeout=30) == -signal.SIGKILL
        assert memory_settings(task)["memory.limit_in_bytes"] == str(48 * MIB)
        tools.append(_start(config, env))
        _, allocations = _cycle(tools[1], frame(2))
        assert allocations["allocations"] == {}       # adopted: OWCA's values in place
        tools[1].stdin.close()
        assert tools[1].wait(timeout=30) == 0, tools[1].stderr.read()
        rest = [json.loads(line) for line in tools[1].stdout.read().splitlines()]
    finally:
        end_processes(tools)
    assert memory_settings(task) == originals
    assert rest[-1]["restored"] == {"task": {"memory_max": "max", "memory_low": "max"}}
    assert not os.path.exists(tmp_path / "state" / journal.NAME)
