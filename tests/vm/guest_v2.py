"""OWCA on a real cgroup v2 kernel whose tree systemd owns; run INSIDE the test guest.

tests/vm/test_v2_guest.py boots the guest (tests/vm/owca_qemu.py) and runs this
module there with the guest's pytest, as root; each test here is reported as
a test of that module.  Outside the guest every test is skipped.

The tasks live as systemd wants a delegated tree to look (systemd's
CGROUP_DELEGATION): a transient service with Delegate=yes under its own slice,
`owcatest.slice/owca-guest-tasks.service`; its own process moved into a
leaf (`supervisor`), since a v2 inner node holds no process; the controllers
enabled for the children in the unit's cgroup.subtree_control (systemd enabled
them along the path down to the unit).  Each task is a child cgroup with real
processes in it.  Figures the closing note reports are written to
$OWCA_GUEST_REPORT (a JSON object), when set.
"""
import json
import os
import signal
import subprocess
import time
from contextlib import ExitStack, contextmanager

import pytest

from cgroup_helpers import (ALLOCATE, BURN_FOREVER, BURN_THEN_SLEEP, TestCgroup, kill,
                            process_cpu_seconds, read_int, read_str, tell, wait_line,
                            write_str)
from conftest import ROOT, tool_command, tool_env
from owca.core import frames
from owca.allocate.stage import Allocate, AllocateConfig, read_topology
from owca.core.paths import DEFAULT_PATHS

CGROUPFS = DEFAULT_PATHS.cgroup_v2_root
IN_GUEST = os.environ.get("OWCA_IN_GUEST") == "1"
pytestmark = pytest.mark.skipif(not IN_GUEST, reason="runs inside the v2 test guest only "
                                                      "(tests/vm/test_v2_guest.py boots it)")
SLICE = "owcatest.slice"   # no "-": a dash in a slice name nests it
UNIT = "owca-guest-tasks.service"
SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"
WRITE_FILES = ("cpu.max", "cpu.weight", "cpuset.cpus", "cpuset.mems")


def report(key, value):
    """A figure for the closing note (the host keeps the file)."""
    path = os.environ.get("OWCA_GUEST_REPORT")
    if not path:
        return
    data = json.loads(open(path).read()) if os.path.exists(path) else {}
    data[key] = value
    write_str(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def systemctl(*args):
    return subprocess.run(["systemctl", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def delegated():
    """The delegated unit's cgroup path, set up as systemd's delegation rules want."""
    subprocess.run(["systemd-run", "--quiet", f"--unit={UNIT}", f"--slice={SLICE}",
                    "-p", "Delegate=yes", "sleep", "infinity"], check=True)
    unit_path = f"/{SLICE}/{UNIT}"
    unit_dir = os.path.join(CGROUPFS, SLICE, UNIT)
    try:
        pids = read_str(os.path.join(unit_dir, "cgroup.procs")).split()
        supervisor = os.path.join(unit_dir, "supervisor")
        os.mkdir(supervisor)
        for pid in pids:
            write_str(os.path.join(supervisor, "cgroup.procs"), pid)
        controllers = read_str(os.path.join(unit_dir, "cgroup.controllers")).split()
        write_str(os.path.join(unit_dir, "cgroup.subtree_control"),
              " ".join("+" + c for c in controllers))
        yield unit_path
    finally:
        subprocess.run(["systemctl", "stop", UNIT], capture_output=True)


@contextmanager
def task_cgroup(parent_path, name):
    path = f"{parent_path}/{name}"
    directory = os.path.join(CGROUPFS, path.lstrip("/"))
    os.mkdir(directory)
    cg = TestCgroup(path, {"v2": directory})
    try:
        yield cg
    finally:
        cg.cleanup()


def start(cg, code=SLEEP, line="running"):
    child = cg.start_python(code)
    wait_line(child, line)
    return child


def settings(*dirs):
    """Every writable setting file's content in these cgroup directories."""
    out = {}
    for d in dirs:
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            # (*.pressure are writable for PSI triggers, but are figures, not settings)
            if os.stat(path).st_mode & 0o200 and "." in name and \
                    not name.endswith(".pressure") and \
                    name not in ("cgroup.procs", "cgroup.threads", "memory.reclaim"):
                try:
                    out[path] = read_str(path)
                except OSError:
                    continue     # write-only files
    return out


def as_restored(before, cg, written=("cpuset.cpus", "cpuset.mems")):
    """`before` as a restore leaves it: the kernel refuses to empty the cpuset of a cgroup
    with processes (ENOSPC), so an empty one OWCA wrote (`written` of `cg`) comes back as
    the parent's effective set."""
    out = dict(before)
    for path, text in before.items():
        name = os.path.basename(path)
        if name in written and os.path.dirname(path) == cg.dirs["v2"] and text == "":
            out[path] = read_str(os.path.join(os.path.dirname(os.path.dirname(path)),
                                          name + ".effective"))
    return out


def cpu_stat(cg):
    return {k: int(v) for k, v in (line.split() for line in
                                    read_str(cg.file("v2", "cpu.stat")).splitlines())}


def measurements(seq, tasks):
    """A measurements frame for {task id: (cgroup path, labels)}."""
    ncpus = len(read_topology(DEFAULT_PATHS).cpus)
    frame = frames.measurements_frame(
        seq, {"platform_topology_cpus": ncpus},
        {t: {"name": t, "cgroup_path": path, "labels": labels, "resources": {},
             "metrics": {}} for t, (path, labels) in tasks.items()}, ts=time.time(),
        host="guest")
    return frames.validate(frames.decode(frames.encode(frame)))


class Scripted:
    """An allocator that asks for the same allocations every cycle."""

    def __init__(self, allocations):
        self.allocations = allocations

    def allocate(self, platform, measurements_, resources, labels, current):
        return self.allocations, [], []


def usage_rate(cg, seconds):
    """CPU seconds per second the cgroup used over `seconds`, and cpu.stat's deltas."""
    before, t0 = cpu_stat(cg), time.monotonic()
    time.sleep(seconds)
    after, t1 = cpu_stat(cg), time.monotonic()
    delta = {k: after[k] - before[k] for k in after}
    return delta["usage_usec"] / 1e6 / (t1 - t0), delta


# -- the kernel and systemd as the tests find them ------------------------------------------


def test_the_guest_is_a_pure_v2_host_with_every_controller_in_the_delegated_unit(delegated):
    assert os.path.exists(os.path.join(CGROUPFS, "cgroup.controllers"))
    assert not os.path.isdir(os.path.join(CGROUPFS, "cpu,cpuacct"))
    unit_dir = os.path.join(CGROUPFS, delegated.lstrip("/"))
    enabled = set(read_str(os.path.join(unit_dir, "cgroup.subtree_control")).split())
    assert {"cpu", "cpuset", "memory", "io"} <= enabled
    # The v2 rule the layout follows: an inner node with controllers takes no process.
    with pytest.raises(OSError) as raised:
        write_str(os.path.join(unit_dir, "cgroup.procs"), str(os.getpid()))
    assert raised.value.errno == 16   # EBUSY


# -- the pipeline end to end ------------------------------------------------------------


def test_the_pipeline_measures_real_v2_tasks(delegated, tmp_path):
    from test_pipeline_cgroups import latest_samples, run_pipeline
    burn_seconds, hold_mib = 1.0, 64
    with task_cgroup(delegated, "burner") as burner, task_cgroup(delegated, "holder") as holder, \
            task_cgroup(delegated, "spinner") as spinner:
        burning = start(burner, BURN_THEN_SLEEP % {"seconds": burn_seconds}, "done")
        start(spinner, BURN_FOREVER)
        holding = start(holder, ALLOCATE % {"mib": hold_mib}, "started")
        baseline = read_int(holder.file("v2", "memory.current"))
        tell(holding)
        wait_line(holding, "allocated")
        config = tmp_path / "owca.yaml"
        config.write_text(
            "discover:\n  source: !StaticDiscovery\n    tasks:\n"
            f"      - {{cgroup_path: '{burner.path}', name: burner}}\n"
            f"      - {{cgroup_path: '{holder.path}', name: holder}}\n"
            f"      - {{cgroup_path: '{spinner.path}', name: spinner}}\n"
            "measure:\n  perf_events: [task-clock, context-switches]\n"
            f"  perf_helper: {os.path.join(ROOT, 'build', 'owca-perf')}\n")
        text = run_pipeline(str(config), 3, tmp_path, timeout=600)
        spinner_cpu = cpu_stat(spinner)["usage_usec"] / 1e6
        kernel_cpu = cpu_stat(burner)["usage_usec"] / 1e6
        kernel_mem = read_int(holder.file("v2", "memory.current"))
        burnt = process_cpu_seconds(burning.pid)
        pressure = {r: read_str(burner.file("v2", f"{r}.pressure")) for r in ("cpu", "memory", "io")}
    latest, _ = latest_samples(text)
    cpu = latest[("task_cpu_usage_seconds", "burner")][0]
    assert cpu == pytest.approx(kernel_cpu, rel=0.02)
    assert cpu == pytest.approx(burnt, rel=0.15)
    mem = latest[("task_mem_usage_bytes", "holder")][0]
    assert mem == pytest.approx(kernel_mem, rel=0.05)
    assert mem - baseline >= hold_mib * (1 << 20) * 0.9
    # PSI per task: every resource's file is read (io too), and cpu shows the burner's
    # waits no larger than the kernel's total at the end.
    for resource in ("cpu", "memory", "io"):
        assert ("task_pressure_stall_seconds", "burner") in latest, text[:2000]
    assert f"resource=\"io\"" in text and "task_pressure_stall_seconds_total{" in text
    cpu_total_us = int(pressure["cpu"].split("total=")[1].split()[0])
    stalled = [float(line.rsplit(" ", 2)[-2]) for line in text.splitlines()
               if line.startswith("task_pressure_stall_seconds_total{") and 'task_name="burner"'
               in line and 'resource="cpu"' in line and 'stall="some"' in line]
    assert stalled and max(stalled) <= cpu_total_us / 1e6 + 1e-6
    # perf software events per v2 cgroup (the guest has no PMU: no hardware events).
    perf_lines = "\n".join(line for line in text.splitlines()
                           if "perf" in line or "task_clock" in line)
    assert ("task_task_clock_seconds", "spinner") in latest, perf_lines
    # Counted from when the pipeline opened the task: no more than the cgroup's CPU time.
    task_clock = latest[("task_task_clock_seconds", "spinner")][0]
    assert 0 < task_clock <= spinner_cpu
    assert ("task_context_switches", "holder") in latest
    report("pipeline", {"burner_cpu_seconds_owca": cpu, "burner_cpu_seconds_kernel": kernel_cpu,
                        "spinner_perf_task_clock_seconds": task_clock,
                        "spinner_cpu_seconds_kernel": spinner_cpu})


# -- allocation: effect, dry run, restore, what is not OWCA's ------------------------------


@pytest.fixture
def family(delegated):
    """Two tasks, `task` and `sibling`, each a cgroup in the delegated unit."""
    with ExitStack() as stack:
        task = stack.enter_context(task_cgroup(delegated, "task"))
        sibling = stack.enter_context(task_cgroup(delegated, "sibling"))
        yield os.path.join(CGROUPFS, delegated.lstrip("/")), task, sibling


def test_quota_weight_and_cpusets_take_effect_and_are_restored(family):
    unit_dir, task, sibling = family
    ncpus = len(read_topology(DEFAULT_PATHS).cpus)
    burner = start(task, BURN_FOREVER)
    start(sibling)
    others = settings(unit_dir, sibling.dirs["v2"])
    originals = settings(task.dirs["v2"])
    before, _ = usage_rate(task, 3)

    quota = 0.1   # of the whole platform: 20 ms per 100 ms period on 2 CPUs
    last_cpu = str(ncpus - 1)
    s = Allocate(AllocateConfig(allocator=Scripted({"task": {
        "cpu_quota": quota, "cpu_shares": 2.0, "cpuset_cpus": last_cpu,
        "cpuset_mems": "0"}})), {})
    frame = s.process(measurements(1, {"task": (task.path, {})}))[0]
    assert frame["errors"] == []
    quota_us = round(quota * 100000 * ncpus)
    assert read_str(task.file("v2", "cpu.max")) == f"{quota_us} 100000"
    assert read_str(task.file("v2", "cpu.weight")) == "200"
    assert read_str(task.file("v2", "cpuset.cpus")) == last_cpu
    assert read_str(task.file("v2", "cpuset.mems")) == "0"
    assert f"Cpus_allowed_list:\t{last_cpu}\n" in read_str(f"/proc/{burner.pid}/status") + "\n"
    # The cap holds: within the periods that passed, the loop got at most its quota of
    # each (and one period's worth of slack for the window's edges), and was throttled.
    after, delta = usage_rate(task, 3)
    assert delta["usage_usec"] <= quota_us * (delta["nr_periods"] + 1)
    assert delta["nr_throttled"] > 0
    assert after < before
    report("quota_effect", {"cpu_max": f"{quota_us} 100000", "cpus": ncpus,
                            "usage_cpu_per_s_before": round(before, 4),
                            "usage_cpu_per_s_after": round(after, 4),
                            "cap_cpu_per_s": quota * ncpus,
                            "periods": delta["nr_periods"],
                            "throttled_periods": delta["nr_throttled"]})
    # Read back in the next cycle: nothing more to write.
    assert s.process(measurements(2, {"task": (task.path, {})}))[0]["allocations"] == {}
    # Neither the parent (the unit's cgroup) nor the sibling was written.
    assert settings(unit_dir, sibling.dirs["v2"]) == others
    s.close()
    assert settings(task.dirs["v2"]) == as_restored(originals, task)
    assert settings(unit_dir, sibling.dirs["v2"]) == others
    restored, _ = usage_rate(task, 2)
    report("quota_effect_restored_usage_cpu_per_s", round(restored, 4))


def test_dry_run_writes_nothing(family):
    unit_dir, task, sibling = family
    start(task)
    before = settings(unit_dir, task.dirs["v2"], sibling.dirs["v2"])
    s = Allocate(AllocateConfig(allocator=Scripted(
        {"task": {"cpu_quota": 0.1, "cpu_shares": 0.5, "cpuset_cpus": "0"}})),
        {"--dry-run": True})
    frame = s.process(measurements(1, {"task": (task.path, {})}))[0]
    assert frame["dry_run"] is True
    assert set(frame["allocations"]["task"]) == {"cpu_quota", "cpu_shares", "cpuset_cpus"}
    s.close()
    assert settings(unit_dir, task.dirs["v2"], sibling.dirs["v2"]) == before


def test_a_controller_the_parent_does_not_enable_is_reported_not_enabled(delegated):
    unit_dir = os.path.join(CGROUPFS, delegated.lstrip("/"))
    with task_cgroup(delegated, "cpu-only") as inner:
        # An inner node enabling cpu but not cpuset for its child, as a delegatee may.
        write_str(inner.file("v2", "cgroup.subtree_control"), "+cpu")
        with task_cgroup(inner.path, "task") as task:
            start(task)
            parent_before = settings(unit_dir, inner.dirs["v2"])
            s = Allocate(AllocateConfig(allocator=Scripted(
                {"task": {"cpu_quota": 0.5, "cpuset_cpus": "0"}})), {})
            frame = s.process(measurements(1, {"task": (task.path, {})}))[0]
            errors = {e["type"]: e["reason"] for e in frame["errors"]}
            assert set(errors) == {"cpuset_cpus"}
            assert "controller not enabled" in errors["cpuset_cpus"]
            assert frame["allocations"] == {"task": {"cpu_quota": 0.5}}
            s.close()
            # OWCA enabled nothing: the parents' subtree_control is as the delegatee left it.
            assert settings(unit_dir, inner.dirs["v2"]) == parent_before


STATIC = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
          "      - labels: {priority: be}\n"
          "        allocations: {cpu_quota: 0.1, cpu_shares: 0.25, cpuset_cpus: '0'}\n")


@contextmanager
def allocate_tool(config, env=None):
    """owca-allocate as a real process; SIGKILLed (by pid) if still running at the end."""
    tool = subprocess.Popen(tool_command("allocate", "-c", str(config)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**tool_env(), **(env or {})},
                            cwd=ROOT)
    try:
        yield tool
    finally:
        kill(tool)


def feed(tool, seq, task):
    tool.stdin.write(frames.encode(measurements(seq, {"task": (task.path,
                                                               {"priority": "be"})})))
    tool.stdin.flush()
    assert json.loads(tool.stdout.readline())["kind"] == "measurements"
    return json.loads(tool.stdout.readline())


def stop(tool, sig=signal.SIGTERM) -> str:
    """Signal the tool, wait for it; its stderr (it must exit 0 unless SIGKILLed)."""
    os.kill(tool.pid, sig)
    status = tool.wait(timeout=120)
    stderr = tool.stderr.read().decode(errors="replace")
    assert sig == signal.SIGKILL or status == 0, stderr
    return stderr


@pytest.fixture
def be_task(family, tmp_path):
    """(a running best-effort task, STATIC's config file, the family's settings now, and
    as they were at the start)."""
    unit_dir, task, sibling = family
    start(task)
    config = tmp_path / "owca.yaml"
    config.write_text(STATIC)

    def now():
        return settings(unit_dir, task.dirs["v2"], sibling.dirs["v2"])
    return task, config, now, now()


def test_the_tool_restores_on_sigterm(be_task):
    task, config, now, before = be_task
    with allocate_tool(config) as tool:
        assert feed(tool, 1, task)["allocations"]["task"]["cpu_shares"] == 0.25
        assert read_str(task.file("v2", "cpu.weight")) == "25"
        assert read_str(task.file("v2", "cpuset.cpus")) == "0"
        stderr = stop(tool)
    assert now() == as_restored(before, task, ("cpuset.cpus",)), stderr


def test_a_restart_after_sigkill_restores_the_originals(be_task, tmp_path):
    task, config, now, before = be_task
    state = tmp_path / "state"
    state.mkdir()
    env = {"STATE_DIRECTORY": str(state)}   # what systemd's StateDirectory= gives the unit
    with allocate_tool(config, env) as first:
        feed(first, 1, task)
        assert read_str(task.file("v2", "cpu.weight")) == "25"
        stop(first, signal.SIGKILL)
    assert read_str(task.file("v2", "cpu.weight")) == "25"     # nobody restored
    assert (state / "allocations.journal").exists()       # but the journal holds them
    with allocate_tool(config, env) as second:
        feed(second, 2, task)
        stderr = stop(second)
    assert now() == as_restored(before, task, ("cpuset.cpus",)), stderr


# -- systemd owns what it did not delegate --------------------------------------------------


def test_a_systemd_units_own_cgroup_is_not_fought_over(delegated, tmp_path):
    """systemd rewrites the cgroup attributes of the units it did not delegate (on
    daemon-reload, on set-property): OWCA refuses to write them and says why; inside a
    delegated unit what OWCA wrote survives systemd's reload."""
    unit = "owca-guest-plain.service"
    subprocess.run(["systemd-run", "--quiet", f"--unit={unit}", f"--slice={SLICE}",
                    "-p", "CPUWeight=100", "-p", "AllowedCPUs=0", "sleep", "infinity"],
                   check=True)
    plain_path = f"/{SLICE}/{unit}"
    plain_dir = os.path.join(CGROUPFS, SLICE, unit)
    try:
        with task_cgroup(delegated, "task") as task:
            start(task)
            before_plain = settings(plain_dir)
            s = Allocate(AllocateConfig(allocator=Scripted({
                "plain": {"cpu_quota": 0.25, "cpu_shares": 2.0},
                "task": {"cpu_quota": 0.25, "cpu_shares": 2.0}})), {})
            frame = s.process(measurements(1, {"plain": (plain_path, {}),
                                               "task": (task.path, {})}))[0]
            errors = {(e["task_id"], e["type"]): e["reason"] for e in frame["errors"]}
            assert set(errors) == {("plain", "cpu_quota"), ("plain", "cpu_shares")}
            assert "systemd" in errors[("plain", "cpu_quota")]
            assert settings(plain_dir) == before_plain
            written = settings(task.dirs["v2"])
            assert read_str(task.file("v2", "cpu.weight")) == "200"
            systemctl("daemon-reload")
            systemctl("set-property", "--runtime", unit, "CPUWeight=150")
            # systemd rewrote its own unit, and left the delegated subtree alone.
            assert read_str(os.path.join(plain_dir, "cpu.weight")) == "150"
            assert settings(task.dirs["v2"]) == written
            frame = s.process(measurements(2, {"plain": (plain_path, {}),
                                               "task": (task.path, {})}))[0]
            assert frame["allocations"] == {}
            s.close()
    finally:
        subprocess.run(["systemctl", "stop", unit], capture_output=True)
