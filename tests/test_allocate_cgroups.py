"""owca-allocate on real cgroup v1 directories with real processes in them.

Each test makes /owca-test-<random>/{task,sibling} in the cpu, cpuacct and cpuset
hierarchies and removes them afterwards (tests/cgroup_helpers.py).  Skipped where
the machine has no writable v1 hierarchies.
"""
import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack

import pytest

from cgroup_helpers import (BURN_FOREVER, read_int, read_str, v1_cgroup, v1_missing,
                            wait_line)
from conftest import (ROOT, blocked_writing, end_processes, tool_command, tool_env,
                      wait_for, wchan_missing)
from owca.core import frames
from owca.allocate.stage import Allocate, AllocateConfig, read_topology
from owca.core.paths import DEFAULT_PATHS
from test_allocate import Scripted

CONTROLLERS = ("cpu", "cpuacct", "cpuset")
pytestmark = pytest.mark.skipif(v1_missing(controllers=CONTROLLERS) is not None,
                                reason=str(v1_missing(controllers=CONTROLLERS)))
SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"


def online_cpus():
    return len(read_topology(DEFAULT_PATHS).cpus)


def init_cpuset(cg):
    # A v1 cpuset takes no process until it has CPUs and memory nodes.
    parent = os.path.dirname(cg.dirs["cpuset"])
    for name in ("cpuset.cpus", "cpuset.mems"):
        with open(cg.file("cpuset", name), "w") as f:
            f.write(read_str(os.path.join(parent, name)))


@pytest.fixture
def family():
    """A parent cgroup with two children, `task` and `sibling`, each running `SLEEP`."""
    with ExitStack() as stack:
        parent = stack.enter_context(v1_cgroup(CONTROLLERS))
        init_cpuset(parent)
        kids = {}
        for name in ("task", "sibling"):
            kid = stack.enter_context(v1_cgroup(CONTROLLERS, path=f"{parent.path}/{name}"))
            init_cpuset(kid)
            kids[name] = kid
        yield parent, kids["task"], kids["sibling"]


@pytest.fixture
def state(tmp_path):
    """owca-allocate's options with a state directory of the test's own."""
    return {"--state-dir": str(tmp_path / "state")}


def start(cg, code=SLEEP):
    child = cg.start_python(code)
    wait_line(child, "running")
    return child


def settings(*cgroups):
    """Every writable setting of these cgroups in the hierarchies OWCA writes (cpuacct's
    only writable file is a counter)."""
    out = {}
    for cg in cgroups:
        for c in ("cpu", "cpuset"):
            d = cg.dirs[c]
            for name in sorted(os.listdir(d)):
                path = os.path.join(d, name)
                if os.stat(path).st_mode & 0o200 and name not in ("release_agent",):
                    try:
                        out[path] = read_str(path)
                    except OSError:
                        continue  # write-only files
    return out


def measurements(seq, cgroup_path, labels=None):
    frame = frames.measurements_frame(
        seq, {"platform_topology_cpus": online_cpus()},
        {"task": {"name": "task", "cgroup_path": cgroup_path, "labels": labels or {},
                  "resources": {}, "metrics": {}}}, ts=time.time(), host="n1")
    return frames.validate(frames.decode(frames.encode(frame)))


def test_quota_shares_and_cpusets_are_written_and_read_back(family, state):
    parent, task, sibling = family
    child = start(task)
    start(sibling)
    others = settings(parent, sibling)
    originals = settings(task)
    s = Allocate(AllocateConfig(allocator=Scripted(
        {"task": {"cpu_quota": 0.1, "cpu_shares": 0.5, "cpuset_cpus": "0",
                  "cpuset_mems": "0"}})), state)
    frame = s.process(measurements(1, task.path))[0]
    assert frame["errors"] == []
    ncpus = online_cpus()
    period = read_int(task.file("cpu", "cpu.cfs_period_us"))
    assert read_int(task.file("cpu", "cpu.cfs_quota_us")) == round(0.1 * period * ncpus)
    assert read_int(task.file("cpu", "cpu.shares")) == 512
    assert read_str(task.file("cpuset", "cpuset.cpus")) == "0"
    assert read_str(task.file("cpuset", "cpuset.mems")) == "0"
    # The kernel applied it to the process in the cgroup.
    status = read_str(f"/proc/{child.pid}/status")
    assert "Cpus_allowed_list:\t0\n" in status + "\n"
    # Read back from the cgroup in the next cycle.
    s.process(measurements(2, task.path))
    assert s.cfg.allocator.seen[1]["task"] == {"cpu_quota": 0.1, "cpu_shares": 0.5,
                                               "cpu_idle": 0, "cpuset_cpus": "0",
                                               "cpuset_mems": "0"}
    # The parent's and the sibling's files were not written.
    assert settings(parent, sibling) == others
    s.close()
    assert settings(task) == originals
    assert settings(parent, sibling) == others


def test_a_cpuset_wider_than_the_parents_is_refused(family, state):
    if online_cpus() < 2:
        pytest.skip("needs two online CPUs")
    parent, task, sibling = family
    for cg in (task, sibling, parent):   # children first: v1 keeps them within the parent
        with open(cg.file("cpuset", "cpuset.cpus"), "w") as f:
            f.write("0")
    s = Allocate(AllocateConfig(allocator=Scripted({"task": {"cpuset_cpus": "0-1"}})), state)
    frame = s.process(measurements(1, task.path))[0]
    assert "1 not in the parent cgroup's cpuset.cpus 0" in frame["errors"][0]["reason"]
    s.close()


def test_a_burning_process_capped_at_a_fifth_of_a_cpu_is_held_to_it(family, state):
    _, task, _ = family
    ncpus = online_cpus()
    # cpu_quota is a share of the whole platform: a fifth of ONE CPU is 0.2 / ncpus
    # (0.1 on a 2-CPU node = 20 ms of CPU time per 100 ms period).  The top weight
    # keeps the other work on this shared machine from starving it below its cap.
    quota = 0.2 / ncpus
    s = Allocate(AllocateConfig(allocator=Scripted(
        {"task": {"cpu_quota": quota, "cpu_shares": 100}})), state)
    start(task, BURN_FOREVER)
    s.process(measurements(1, task.path))
    period_us = read_int(task.file("cpu", "cpu.cfs_period_us"))
    quota_us = read_int(task.file("cpu", "cpu.cfs_quota_us"))
    assert quota_us == round(0.2 * period_us)
    # The kernel's own accounting, not the wall clock: CFS periods counted by the
    # kernel, and the CPU time it charged the cgroup between two readings of them
    # (usage read after the first and before the second: its span lies within theirs).
    stat0 = _cpu_stat(task)
    usage0 = read_int(task.file("cpuacct", "cpuacct.usage"))

    def periods_passed_and_throttled():
        stat = _cpu_stat(task)
        return stat["nr_periods"] - stat0["nr_periods"] >= CFS_PERIODS \
            and stat["nr_throttled"] > stat0["nr_throttled"]

    wait_for(periods_passed_and_throttled, timeout=120,
             what=f"{CFS_PERIODS} CFS periods of the burner, throttled in some")
    usage1 = read_int(task.file("cpuacct", "cpuacct.usage"))
    stat1 = _cpu_stat(task)
    periods = stat1["nr_periods"] - stat0["nr_periods"]
    # The span holds `periods` period boundaries, so it touches periods + 1 periods;
    # one more quota covers what a CPU's local pool kept from before it and a tick's
    # overrun.  A burst the kernel may carry over comes on top.
    burst_us = _burst_us(task)
    allowed_ns = (quota_us * (periods + 2) + burst_us) * 1000
    used_ns = usage1 - usage0
    assert used_ns <= allowed_ns, (f"{used_ns / 1e6:.1f} ms of CPU in {periods} periods, "
                                   f"at most {allowed_ns / 1e6:.1f} ms with {quota_us} us a "
                                   f"period")
    # the cap, not a lack of work, held it there
    assert stat1["nr_throttled"] > stat0["nr_throttled"]
    assert stat1["throttled_time"] > stat0["throttled_time"]
    s.close()
    assert read_int(task.file("cpu", "cpu.cfs_quota_us")) == -1


# Enough CFS periods (100 ms each by default) for the cap to show several times over.
CFS_PERIODS = 20


def _cpu_stat(cg) -> dict:
    """cpu.stat: nr_periods, nr_throttled, throttled_time (ns), ..."""
    return {key: int(value) for key, value in
            (line.split() for line in read_str(cg.file("cpu", "cpu.stat")).splitlines())}


def _burst_us(cg) -> int:
    """cpu.cfs_burst_us, where the kernel has it (5.14 and later); 0 before."""
    path = cg.file("cpu", "cpu.cfs_burst_us")
    return read_int(path) if os.path.exists(path) else 0


def test_dry_run_writes_nothing(family):
    parent, task, sibling = family
    start(task)
    before = settings(parent, task, sibling)
    s = Allocate(AllocateConfig(allocator=Scripted(
        {"task": {"cpu_quota": 0.1, "cpu_shares": 0.5, "cpuset_cpus": "0"}})),
        {"--dry-run": True})
    frame = s.process(measurements(1, task.path))[0]
    assert frame["dry_run"] is True and set(frame["allocations"]["task"]) == \
        {"cpu_quota", "cpu_shares", "cpuset_cpus"}
    s.close()
    assert settings(parent, task, sibling) == before


STATIC = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
          "      - labels: {priority: be}\n"
          "        allocations: {cpu_quota: 0.1, cpu_shares: 0.25, cpuset_cpus: '0'}\n")


@pytest.mark.parametrize("stop", ["eof", "sigterm", "sigint", "stdout closed",
                                  "sigterm, stdout stalled", "sigint, stdout stalled"])
def test_stopping_the_tool_restores_the_original_values(family, tmp_path, stop):
    if stop.endswith("stdout stalled") and wchan_missing():
        pytest.skip(wchan_missing())
    parent, task, sibling = family
    start(task)
    before = settings(parent, task, sibling)
    config = tmp_path / "owca.yaml"
    config.write_text(STATIC)
    tool = subprocess.Popen(tool_command("allocate", "-c", str(config), "--state-dir",
                                         str(tmp_path / "state")), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env(),
                            cwd=ROOT)
    try:
        tool.stdin.write(frames.encode(measurements(1, task.path, {"priority": "be"})))
        tool.stdin.flush()
        assert json.loads(tool.stdout.readline())["kind"] == "measurements"
        allocations = json.loads(tool.stdout.readline())
        assert allocations["allocations"]["task"]["cpu_shares"] == 0.25
        assert read_int(task.file("cpu", "cpu.shares")) == 256
        assert read_str(task.file("cpuset", "cpuset.cpus")) == "0"
        if stop == "eof":
            tool.stdin.close()
        elif stop == "stdout closed":
            tool.stdout.close()   # `owca-allocate | head -2`: the next write fails
            tool.stdin.write(frames.encode(measurements(2, task.path, {"priority": "be"})))
            tool.stdin.close()
        elif stop.endswith("stdout stalled"):
            # The reader of stdout stops reading: frames go in until the tool is blocked
            # writing its output, then the signal (systemd's stop, a Ctrl-C).
            os.set_blocking(tool.stdin.fileno(), False)
            seq, pending = 1, b""
            deadline = time.monotonic() + 120  # a guard against a hang only
            while not blocked_writing(tool.pid) and time.monotonic() < deadline:
                if not pending:
                    seq += 1
                    pending = frames.encode(measurements(seq, task.path, {"priority": "be"}))
                try:
                    pending = pending[os.write(tool.stdin.fileno(), pending):]
                except BlockingIOError:
                    time.sleep(0.01)
            assert blocked_writing(tool.pid)
            os.kill(tool.pid, signal.SIGTERM if stop.startswith("sigterm") else signal.SIGINT)
        else:
            os.kill(tool.pid, signal.SIGTERM if stop == "sigterm" else signal.SIGINT)
        assert tool.wait(timeout=30) == 0, tool.stderr.read()
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
        for stream in (tool.stdin, tool.stdout, tool.stderr):
            if not stream.closed:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass
    assert settings(parent, task, sibling) == before


# -- cpu_idle ----------------------------------------------------------------------------

def _idle_missing():
    if not os.path.exists(DEFAULT_PATHS.cgroup_v1("cpu", "/cpu.idle")):
        return "the kernel has no cpu.idle (Linux 5.15 and later)"
    return None


def test_cpu_idle_is_written_and_the_weight_it_replaced_comes_back(family, state):
    if _idle_missing():
        pytest.skip(_idle_missing())
    _, task, _ = family
    start(task)
    with open(task.file("cpu", "cpu.shares"), "w") as f:
        f.write("2048")
    s = Allocate(AllocateConfig(allocator=Scripted(
        {"task": {"cpu_idle": True}}, {"task": {"cpu_idle": 1, "cpu_shares": 2.0}})), state)
    frame = s.process(measurements(1, task.path))[0]
    assert frame["errors"] == [] and frame["allocations"] == {"task": {"cpu_idle": 1}}
    assert read_int(task.file("cpu", "cpu.idle")) == 1
    # The kernel gives an idle cgroup the least weight, and refuses another.
    assert read_int(task.file("cpu", "cpu.shares")) == 3
    frame = s.process(measurements(2, task.path))[0]
    assert [(e["type"], e["reason"].split(":")[0]) for e in frame["errors"]] == \
        [("cpu_shares", "cpu_shares")]
    assert "while cpu_idle is 1" in frame["errors"][0]["reason"]
    s.close()
    assert read_int(task.file("cpu", "cpu.idle")) == 0
    # Clearing cpu.idle alone gives the kernel's default, 1024: the original is back.
    assert read_int(task.file("cpu", "cpu.shares")) == 2048


IDLE_STATIC = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
               "      - labels: {priority: be}\n"
               "        allocations: {cpu_idle: 1}\n")


def test_cpu_idle_set_by_a_run_killed_with_sigkill_is_restored_by_the_next(family, tmp_path):
    if _idle_missing():
        pytest.skip(_idle_missing())
    _, task, _ = family
    start(task)
    shares, idle = task.file("cpu", "cpu.shares"), task.file("cpu", "cpu.idle")
    with open(shares, "w") as f:
        f.write("512")
    config = tmp_path / "owca.yaml"
    config.write_text(IDLE_STATIC)
    env = {**tool_env(), "STATE_DIRECTORY": str(tmp_path / "state")}
    frame = lambda seq: measurements(seq, task.path, {"priority": "be"})  # noqa: E731
    tools = []

    def run():
        tool = subprocess.Popen(tool_command("allocate", "-c", str(config)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, cwd=ROOT)
        tools.append(tool)
        tool.stdin.write(frames.encode(frame(len(tools))))
        tool.stdin.flush()
        return [json.loads(tool.stdout.readline()) for _ in range(2)]

    try:
        run()
        assert (read_int(idle), read_int(shares)) == (1, 3)
        os.kill(tools[0].pid, signal.SIGKILL)
        assert tools[0].wait(timeout=30) == -signal.SIGKILL
        run()
        tools[1].stdin.close()
        assert tools[1].wait(timeout=30) == 0, tools[1].stderr.read()
    finally:
        end_processes(tools)
    assert (read_int(idle), read_int(shares)) == (0, 512)
