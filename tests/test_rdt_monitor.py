"""RDT monitoring (lib/owca/measure/sources/rdt.py) on a resctrl tree that follows the kernel's docs.

There is no RDT here: tests/fixtures/resctrl_mon is a hand-written mount, driven
through tests/fake_node.FakeResctrlKernel, which does what
Documentation/arch/x86/resctrl.rst says the kernel does for MON groups (mkdir
within the RMID budget, the `tasks` rules between control and MON groups, a
control group's counts including its MON groups', rmdir).  The tasks' cgroups
are a cgroup2 tree of plain files whose cgroup.threads give their thread ids.

What these tests cannot cover: anything the hardware does (the counters are set
by the tests, so no figure here says a real cache or memory controller was
measured), how long the kernel keeps an RMID in limbo, the moment a real
counter reads `Unavailable`, and threads of real processes.
"""
import hashlib
import logging
import os

import pytest

from fake_node import FakeResctrlKernel, changed_files, copy_tree, fake_cgroup_v2, snapshot
from owca.core import frames, metrics
from owca.core.config import ConfigError
from owca.measure.stage import Measure, MeasureConfig
from owca.core.paths import Paths
from owca.measure.sources.rdt import (Counter, MonitoringUnavailable, RdtMonitor, group_name,
                                      parse_counter, task_threads)
from conftest import tool_command, tool_env

TOTAL, LOCAL, LLC = "mbm_total_bytes", "mbm_local_bytes", "llc_occupancy"
# The fixture's default group holds 1, 2, 3, 100, 101; batch-team 4242, 4243.
TASKS = {"a": [5001, 5002], "b": [5003], "c": [5004], "d": [5005]}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def node(tmp_path, fixtures_dir):
    """(fake resctrl, cgroupfs root, make_monitor(tasks)) with TASKS' threads in the
    default group, as threads are when resctrl is mounted."""
    fs = FakeResctrlKernel(copy_tree(os.path.join(fixtures_dir, "resctrl_mon"),
                                     str(tmp_path / "resctrl")))
    cgroupfs = fake_cgroup_v2(str(tmp_path / "cgroup"),
                              {f"/{t}": ids for t, ids in TASKS.items()})
    fs._set_thread_ids("", fs._thread_ids("") + [i for ids in TASKS.values() for i in ids])
    clock = Clock()

    def monitor(tasks=("a",)):
        m = RdtMonitor(fs, task_threads(Paths(cgroupfs=cgroupfs)), clock=clock)
        m.update({t: f"/{t}" for t in tasks})
        return m
    monitor.clock = clock
    return fs, cgroupfs, monitor


def mon(name_of_task, ctrl=""):
    return "/".join(p for p in (ctrl, "mon_groups", group_name(name_of_task)) if p)


def threads(fs, group):
    return sorted(fs._thread_ids(group))


def set_threads(cgroupfs, task, ids):
    for name in ("cgroup.threads", "cgroup.procs"):
        with open(os.path.join(cgroupfs, task, name), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))


# -- pure parts ------------------------------------------------------------------------


def test_counter_values_as_the_kernel_prints_them():
    assert parse_counter("123456\n") == 123456
    assert parse_counter("Unavailable\n") is None
    assert parse_counter("Error\n") is None


def test_a_counter_gives_rates_and_survives_a_wrap_and_unavailable():
    c = Counter()
    c.update(1000, 10.0)
    assert c.rate is None and c.total == 0           # one value is no rate
    c.update(5000, 12.0)
    assert c.rate == 2000 and c.total == 4000
    c.update(300, 13.0)                              # went back: wrapped, or a new RMID
    assert c.rate is None and c.total == 4000
    c.update(1300, 14.0)
    assert c.rate == 1000 and c.total == 5000
    c.update(None, 15.0)                             # Unavailable
    assert c.rate is None and c.total == 5000
    c.update(1500, 16.0)
    assert c.rate is None
    c.update(2500, 17.0)
    assert c.rate == 1000 and c.total == 6000


def test_group_names_are_valid_directory_names_for_any_task_id():
    name = group_name("/kubepods/burstable/pod1/../x y")
    assert name.startswith("owca-mon-") and "/" not in name and " " not in name
    assert name == "owca-mon-" + hashlib.sha256(
        b"/kubepods/burstable/pod1/../x y").hexdigest()[:16]


# -- groups kept in step with the tasks ---------------------------------------------------


def test_each_task_gets_a_mon_group_holding_its_threads(node):
    fs, _, monitor = node
    before = snapshot(fs.root)
    m = monitor(("a", "b"))
    m.read()
    assert threads(fs, mon("a")) == [5001, 5002]
    assert threads(fs, mon("b")) == [5003]
    # The default group still lists them (a control group lists its MON groups' threads).
    assert {5001, 5002, 5003} <= set(threads(fs, ""))
    # Only OWCA's MON groups were made and written: one thread id per write.
    writes = [c for c in fs.calls if c[0] == "write"]
    assert {c[1] for c in writes} == {mon("a") + "/tasks", mon("b") + "/tasks"}
    assert all(len(c[2].split()) == 1 for c in writes)
    assert {p.split("/")[1] for p in changed_files(before, snapshot(fs.root))
            if p.startswith("mon_groups/")} == {group_name("a"), group_name("b")}
    calls = len(fs.calls)
    m.read()      # in step already: reads only
    assert [c for c in fs.calls[calls:] if c[0] != "read"] == []


def test_threads_that_come_later_are_moved_in_and_those_that_end_are_not_an_error(node):
    fs, cgroupfs, monitor = node
    m = monitor()
    m.read()
    # A new process in the task's cgroup (not yet in a MON group), and one that ended
    # between the cgroup's listing and resctrl's.
    fs._set_thread_ids("", fs._thread_ids("") + [5010])
    set_threads(cgroupfs, "a", [5001, 5002, 5010, 5011])
    fs.exit_thread(5002)
    m.read()
    assert threads(fs, mon("a")) == [5001, 5010]
    assert m.move_failures == 0


def test_a_task_whose_cgroup_is_gone_gets_no_group_and_costs_nothing_else(node):
    fs, _, monitor = node
    m = monitor(("a", "gone", "/../x"))
    tasks, _ = m.read()
    assert sorted(m.groups) == ["a"] and sorted(tasks) == ["a"] and m.unmonitored == []


def test_a_task_moved_to_another_control_group_is_followed_there(node):
    fs, _, monitor = node
    m = monitor()
    m.read()
    # owca-allocate gives the task an rdt group: its threads leave every MON group.
    fs.mkdir("owca-be")
    for t in (5001, 5002):
        fs.write(f"{t}\n", "owca-be", "tasks")
    assert threads(fs, mon("a")) == []
    m.read()
    assert threads(fs, mon("a", "owca-be")) == [5001, 5002]
    assert not os.path.exists(fs.path(mon("a")))
    # The control group removed (allocation withdrawn): its MON group went with it, the
    # threads are back in the default group, and so is the task's MON group.
    fs.rmdir("owca-be")
    m.read()
    assert threads(fs, mon("a")) == [5001, 5002]


def test_groups_go_with_their_tasks_and_on_stop_and_nothing_else_is_touched(node):
    fs, _, monitor = node
    before = snapshot(fs.root)
    m = monitor(("a", "b"))
    m.read()
    m.update({"b": "/b"})
    assert not os.path.exists(fs.path(mon("a")))
    assert os.path.isdir(fs.path(mon("b")))
    m.close()
    assert fs.directories("mon_groups") == ["web-team"]
    # The tree is as it was, but for the kernel's last command status.
    assert changed_files(before, snapshot(fs.root)) <= {"info/last_cmd_status"}
    assert {c[1].split("/")[1] for c in fs.calls if c[0] in ("mkdir", "rmdir", "write")} \
        == {group_name("a"), group_name("b")}


def test_groups_left_by_a_killed_run_are_removed_at_start_and_others_kept(node):
    fs, _, monitor = node
    fs.mkdir("mon_groups/owca-mon-0123456789abcdef")
    fs.mkdir("batch-team/mon_groups/owca-mon-fedcba9876543210")
    fs.mkdir("batch-team/mon_groups/team-b")
    monitor(())
    assert fs.directories("mon_groups") == ["web-team"]
    assert fs.directories("batch-team", "mon_groups") == ["team-b"]


def test_tasks_beyond_the_rmid_budget_are_counted_not_silently_unmeasured(node, caplog):
    fs, _, monitor = node
    # 6 RMIDs: the default group, batch-team and web-team hold three.
    m = monitor(("a", "b", "c", "d"))
    with caplog.at_level(logging.WARNING, logger="owca.rdt_monitor"):
        tasks, _ = m.read()
        m.read()
    assert sorted(m.groups) == ["a", "b", "c"] and m.unmonitored == ["d"]
    assert "d" not in tasks
    assert sum("not monitored by RDT" in r.message for r in caplog.records) == 1
    own = {s["name"]: s["value"] for s in m.samples({"stage": "measure"})}
    assert own == {"owca_rdt_monitored_tasks": 3, "owca_rdt_unmonitored_tasks": 1,
                   "owca_rdt_rmids": 6}
    # A task goes: the one left out gets its RMID.
    m.update({t: f"/{t}" for t in ("b", "c", "d")})
    m.read()
    assert sorted(m.groups) == ["b", "c", "d"] and m.unmonitored == []
    # RMIDs the kernel keeps in limbo: mkdir says ENOSPC even below num_rmids.
    m.update({t: f"/{t}" for t in ("a", "b")})
    fs.rmids_in_limbo = 2
    m.read()
    assert m.unmonitored == ["a"] and not os.path.exists(fs.path(mon("a")))


# -- the figures ----------------------------------------------------------------------


def test_occupancy_and_bandwidth_rates_between_cycles(node):
    fs, _, monitor = node
    m = monitor(("a", "b"))
    m.read()
    assert "task_mem_bandwidth_bytes_per_second" not in m.read()[0]["a"]  # same clock
    group = mon("a")
    for cache_id, (llc, total, local) in {"0": (1 << 20, 10_000, 8_000),
                                          "1": (2 << 20, 5_000, 1_000)}.items():
        fs.set_counter(group, cache_id, LLC, llc)
        fs.set_counter(group, cache_id, TOTAL, total)
        fs.set_counter(group, cache_id, LOCAL, local)
    monitor.clock.now += 1
    tasks, _ = m.read()
    assert tasks["a"]["task_llc_occupancy_bytes"] == 3 << 20
    # The group was read at 0 when it was made (a new RMID counts from 0).
    assert tasks["a"]["task_mem_bandwidth_bytes_per_second"] == 15_000
    fs.set_counter(group, "0", TOTAL, 30_000)
    fs.set_counter(group, "1", TOTAL, 9_000)
    fs.set_counter(group, "0", LOCAL, 18_000)
    fs.set_counter(group, "1", LOCAL, 2_000)
    monitor.clock.now += 2
    tasks, _ = m.read()
    assert tasks["a"]["task_mem_bandwidth_bytes_per_second"] == (20_000 + 4_000) / 2
    assert tasks["a"]["task_mem_bandwidth_local_bytes_per_second"] == (10_000 + 1_000) / 2
    assert tasks["a"]["task_mem_bandwidth_bytes"] == 15_000 + 24_000
    assert tasks["a"]["task_mem_bandwidth_local_bytes"] == 9_000 + 11_000
    assert tasks["b"]["task_mem_bandwidth_bytes_per_second"] == 0
    for name in tasks["a"]:
        assert metrics.REGISTRY[name].scope == "task"


def test_unavailable_and_a_counter_that_went_back_cost_one_cycle_not_a_wrong_figure(node):
    fs, _, monitor = node
    m = monitor()
    m.read()
    group = mon("a")
    for value in (1000, 2000):
        fs.set_counter(group, "0", TOTAL, value)
        fs.set_counter(group, "1", TOTAL, value)
        monitor.clock.now += 1
        tasks, _ = m.read()
    assert tasks["a"]["task_mem_bandwidth_bytes_per_second"] == 2000
    fs.set_counter(group, "1", TOTAL, "Unavailable")
    fs.set_counter(group, "1", LLC, "Unavailable")
    monitor.clock.now += 1
    tasks, _ = m.read()
    assert "task_mem_bandwidth_bytes_per_second" not in tasks["a"]
    assert "task_llc_occupancy_bytes" not in tasks["a"]
    fs.set_counter(group, "1", TOTAL, 100)     # back, lower: a reset, not a negative rate
    fs.set_counter(group, "0", TOTAL, 3000)
    monitor.clock.now += 1
    tasks, _ = m.read()
    assert "task_mem_bandwidth_bytes_per_second" not in tasks["a"]
    fs.set_counter(group, "1", TOTAL, 600)
    fs.set_counter(group, "0", TOTAL, 3500)
    monitor.clock.now += 1
    tasks, _ = m.read()
    assert tasks["a"]["task_mem_bandwidth_bytes_per_second"] == 1000
    # From 0 at the group's making: 2000 + 2000, then id 0 alone (+1000; id 1 had no
    # earlier value after Unavailable), then both (+500 +500).
    assert tasks["a"]["task_mem_bandwidth_bytes"] == 4000 + 1000 + 500 + 500


def test_platform_figures_per_cache_id_sum_every_control_group(node):
    fs, _, monitor = node
    m = monitor()
    m.read()
    fs.set_counter("", "0", TOTAL, 1_000)
    fs.set_counter("batch-team", "0", TOTAL, 500)
    fs.set_counter(mon("a"), "0", TOTAL, 200)    # counted in the default group's too
    fs.set_counter("", "1", LLC, 4096)
    fs.set_counter("batch-team", "1", LLC, 1024)
    monitor.clock.now += 1
    _, platform = m.read()
    assert platform["platform_llc_occupancy_bytes"] == {"0": 0, "1": 5120}
    fs.set_counter("", "0", TOTAL, 3_000)
    fs.set_counter("batch-team", "0", TOTAL, 1_500)
    fs.set_counter(mon("a"), "0", TOTAL, 1_200)
    monitor.clock.now += 2
    _, platform = m.read()
    # default group: (3000 + 1200) - (1000 + 200); batch-team: 1500 - 500; per 2 s.
    assert platform["platform_mem_bandwidth_bytes_per_second"] == {"0": 2000, "1": 0}
    for name in platform:
        assert metrics.REGISTRY[name].scope == "platform"
        assert metrics.REGISTRY[name].levels == ("cache_id",)


# -- owca-measure -----------------------------------------------------------------------


def test_owca_measure_reports_rdt_monitoring_per_task_and_platform(node):
    fs, cgroupfs, _ = node
    stage = Measure(MeasureConfig(rdt_monitoring=True),
                    {"--resctrlfs": fs.root, "--cgroupfs": cgroupfs, "--no-timing": True})
    stage.source("rdt").monitor.fs = fs  # the fake kernel's behaviour for what it writes
    tasks = [{"id": t, "name": t, "cgroup_path": f"/{t}", "labels": {}, "resources": {}}
             for t in ("a", "b")]
    frame = frames.tasks_frame(1, tasks, ts=1.0, host="n")
    stage.process(frame)
    fs.set_counter(mon("a"), "0", LLC, 65536)
    out = stage.process(frames.tasks_frame(2, tasks, ts=2.0, host="n"))[0]
    assert out["tasks"]["a"]["metrics"]["task_llc_occupancy_bytes"] == 65536
    assert "platform_llc_occupancy_bytes" in out["platform"]
    own = {s["name"]: s["value"] for s in out["metrics"]}
    assert own["owca_rdt_monitored_tasks"] == 2 and own["owca_rdt_unmonitored_tasks"] == 0
    for s in out["metrics"]:
        assert s["name"] in metrics.REGISTRY
    stage.update([])
    assert fs.directories("mon_groups") == ["web-team"]
    stage.close()


def test_a_resctrl_gone_under_owca_measure_costs_the_rdt_figures_only(node, tmp_path):
    fs, cgroupfs, _ = node
    stage = Measure(MeasureConfig(rdt_monitoring=True),
                    {"--resctrlfs": fs.root, "--cgroupfs": cgroupfs, "--no-timing": True})
    tasks = [{"id": "a", "name": "a", "cgroup_path": "/a", "labels": {}, "resources": {}}]
    os.rename(fs.root, str(tmp_path / "unmounted"))
    out = stage.process(frames.tasks_frame(1, tasks, ts=1.0, host="n"))[0]
    assert "task_up" in out["tasks"]["a"]["metrics"]
    assert "task_llc_occupancy_bytes" not in out["tasks"]["a"]["metrics"]
    stage.close()


@pytest.mark.integration
def test_rdt_monitoring_where_there_is_none_fails_at_start(tmp_path, fixtures_dir):
    with pytest.raises(MonitoringUnavailable, match="not mounted"):
        RdtMonitor(FakeResctrlKernel(str(tmp_path)), lambda path: [])
    no_mon = copy_tree(os.path.join(fixtures_dir, "resctrl_l3_only"), str(tmp_path / "r"))
    with pytest.raises(MonitoringUnavailable, match="no info/L3_MON"):
        RdtMonitor(FakeResctrlKernel(no_mon), lambda path: [])
    with pytest.raises(ConfigError, match="rdt_monitoring"):
        Measure(MeasureConfig(rdt_monitoring=True), {"--resctrlfs": no_mon})
    config = tmp_path / "owca.yaml"
    config.write_text("measure:\n  rdt_monitoring: true\n")
    import subprocess
    done = subprocess.run(tool_command("measure", "-c", str(config), "--resctrlfs",
                                       str(tmp_path / "none")),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=tool_env(), timeout=60)
    assert done.returncode == 2
    assert "rdt_monitoring" in done.stderr and done.stderr.count("\n") == 1
