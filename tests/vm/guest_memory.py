"""The memory allocation types on a real cgroup v2 kernel; run INSIDE the test guest.

tests/vm/test_v2_guest.py boots the guest and runs this module there (beside
guest_v2.py, whose delegated unit and helpers it uses).  Each test writes real files
and checks their effect: a page-cache streamer over its memory.high is throttled and
reclaimed back under it; an HP task under memory.min keeps its pages while a sibling
streams through their common parent's limit; memory.reclaim gives back cold pages;
stopping owca-allocate, and a restart after SIGKILL, give every memory value back.
Files are written under /var/tmp (on the guest's disk: tmpfs pages are not reclaimable
without swap, and the guest has none).
"""
import os
import shutil
import signal
import uuid
from contextlib import ExitStack

import pytest

from cgroup_helpers import read_int, read_str, tell, wait_line, write_str
from guest_v2 import (IN_GUEST, Scripted, allocate_tool, delegated, feed,  # noqa: F401
                      measurements, report, settings, start, stop, task_cgroup)
from owca.allocate.stage import Allocate, AllocateConfig

pytestmark = pytest.mark.skipif(not IN_GUEST, reason="runs inside the v2 test guest only "
                                                      "(tests/vm/test_v2_guest.py boots it)")
MIB = 1 << 20
# Writes MIB MiB to PATH through the page cache when told, then says "written".
STREAM = ("import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"
          "with open(%(path)r, 'wb') as f:\n"
          "    for _ in range(%(mib)d): f.write(b'x' * (1 << 20))\n"
          "print('written', flush=True)\nsys.stdin.readline()\n")
# Reads PATH (already written) into the page cache, says "cached", then waits.
CACHE = ("import sys\nwith open(%(path)r, 'rb') as f:\n"
         "    while f.read(1 << 20): pass\n"
         "print('cached', flush=True)\nsys.stdin.readline()\n")


@pytest.fixture
def scratch():
    d = f"/var/tmp/owca-memory-{uuid.uuid4().hex[:8]}"
    os.mkdir(d)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_file(path, mib):
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(b"y" * MIB)
        os.fsync(f.fileno())


def keyed(path):
    return {k: int(v) for k, v in (line.split() for line in read_str(path).splitlines())}


def test_a_streamer_over_its_memory_high_is_throttled_and_reclaimed(delegated, scratch):  # noqa: F811
    with task_cgroup(delegated, "streamer") as task:
        child = start(task, STREAM % {"path": f"{scratch}/stream", "mib": 160})
        originals = settings(task.dirs["v2"])
        s = Allocate(AllocateConfig(allocator=Scripted({"task": {"memory_high": 32 * MIB}})),
                     {"--state-dir": f"{scratch}/state"})
        assert s.process(measurements(1, {"task": (task.path, {})}))[0]["errors"] == []
        assert read_int(task.file("v2", "memory.high")) == 32 * MIB
        tell(child)
        wait_line(child, "written")
        events = keyed(task.file("v2", "memory.events"))
        current = read_int(task.file("v2", "memory.current"))
        assert events["high"] > 0            # it went over, and was reclaimed
        assert events.get("oom_kill", 0) == 0
        assert current <= 36 * MIB           # back under (a few pages of slack)
        report("memory_high_effect", {"memory_high": 32 * MIB, "wrote": 160 * MIB,
                                      "current_after": current, "high_events": events["high"]})
        s.close()
        assert settings(task.dirs["v2"]) == originals


@pytest.mark.parametrize("protected", [False, True], ids=["unprotected", "memory_min"])
def test_an_hp_task_under_memory_min_keeps_its_pages_when_a_sibling_streams(
        delegated, scratch, protected):  # noqa: F811
    """HP caches 64 MiB; BE streams 400 MiB; their parent may hold 160 MiB.  The
    parent's limit reclaims; with memory.min HP's pages are not taken."""
    make_file(f"{scratch}/hp-data", 64)
    with ExitStack() as stack:
        parent = stack.enter_context(task_cgroup(delegated, "memfamily"))
        write_str(parent.file("v2", "cgroup.subtree_control"), "+memory")
        write_str(parent.file("v2", "memory.max"), str(160 * MIB))
        hp = stack.enter_context(task_cgroup(parent.path, "hp"))
        be = stack.enter_context(task_cgroup(parent.path, "be"))
        # Drop the file's pages (charged to whoever read it before) so HP reads them in.
        write_str("/proc/sys/vm/drop_caches", "1")
        start(hp, CACHE % {"path": f"{scratch}/hp-data"}, "cached")
        before = keyed(hp.file("v2", "memory.stat"))["file"]
        s = None
        if protected:
            s = Allocate(AllocateConfig(allocator=Scripted({"hp": {"memory_min": 80 * MIB}})),
                         {"--state-dir": f"{scratch}/state"})
            assert s.process(measurements(1, {"hp": (hp.path, {})}))[0]["errors"] == []
            assert read_int(hp.file("v2", "memory.min")) == 80 * MIB
        streamer = start(be, STREAM % {"path": f"{scratch}/stream", "mib": 400})
        tell(streamer)
        wait_line(streamer, "written")
        after = keyed(hp.file("v2", "memory.stat"))["file"]
        report(f"memory_min_effect_{'protected' if protected else 'unprotected'}",
               {"hp_file_bytes_before": before, "hp_file_bytes_after": after,
                "parent_memory_max": 160 * MIB, "streamed": 400 * MIB})
        assert before >= 60 * MIB
        if not protected:
            # The antagonist does take them without protection (so that what the
            # protected run keeps is memory.min's doing, not the LRU's).
            assert after < before / 2
        if protected:
            assert after >= before - 4 * MIB      # kept, but for a few pages
            s.close()
            assert read_str(hp.file("v2", "memory.min")) == "0"


def test_memory_reclaim_gives_back_cold_pages_once_and_is_counted(delegated, scratch):  # noqa: F811
    make_file(f"{scratch}/data", 64)
    with task_cgroup(delegated, "cold") as task:
        write_str("/proc/sys/vm/drop_caches", "1")
        start(task, CACHE % {"path": f"{scratch}/data"}, "cached")
        originals = settings(task.dirs["v2"])
        before = read_int(task.file("v2", "memory.current"))
        s = Allocate(AllocateConfig(allocator=Scripted({"task": {"memory_reclaim": 32 * MIB}})),
                     {"--state-dir": f"{scratch}/state"})
        frame = s.process(measurements(1, {"task": (task.path, {})}))[0]
        after = read_int(task.file("v2", "memory.current"))
        assert frame["errors"] == []
        assert frame["allocations"] == {"task": {"memory_reclaim": 32 * MIB}}
        counters = {m["name"]: m["value"] for m in frame["metrics"]
                    if m["name"].startswith("allocation_memory_reclaim_")}
        assert counters["allocation_memory_reclaim_requested_bytes_total"] == 32 * MIB
        assert counters["allocation_memory_reclaim_writes_total"] == 1
        assert before - after >= 24 * MIB
        report("memory_reclaim_effect", {"current_before": before, "current_after": after,
                                         "asked": 32 * MIB})
        s.close()
        assert settings(task.dirs["v2"]) == originals     # nothing of a reclaim to restore


STATIC = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
          "      - labels: {priority: be}\n"
          "        allocations: {memory_high: 67108864, memory_low: 16777216, "
          "memory_max: 268435456}\n")


def test_a_restart_after_sigkill_gives_the_memory_values_back(delegated, scratch):  # noqa: F811
    config = f"{scratch}/owca.yaml"
    write_str(config, STATIC)
    env = {"STATE_DIRECTORY": f"{scratch}/state"}
    os.mkdir(env["STATE_DIRECTORY"])
    with task_cgroup(delegated, "task") as task:
        start(task)
        before = settings(task.dirs["v2"])
        with allocate_tool(config, env) as first:
            feed(first, 1, task)
            assert read_int(task.file("v2", "memory.high")) == 64 * MIB
            stop(first, signal.SIGKILL)
        assert read_int(task.file("v2", "memory.max")) == 256 * MIB    # nobody restored
        with allocate_tool(config, env) as second:
            feed(second, 2, task)
            stderr = stop(second)
        assert settings(task.dirs["v2"]) == before, stderr
