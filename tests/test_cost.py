"""The agent's own cost: each stage's CPU, memory and descriptors as metrics
(lib/owca/core/ownusage.py), owca-measure's CPU budget and what it sheds
(lib/owca/measure/budget.py), and the costly signals read at a per-class rate.

No test here asserts a duration.  The budget is driven by the CPU time and the
clock it is given (the budget's own tests), or, on a real stage, by a budget so
small that any cycle is over it and one so large that any is under it.
"""
import logging
import os

import pytest

from fake_node import copy_tree
from owca.core import frames, metrics
from owca.core.ownusage import OwnUsage, own_usage
from owca.core.paths import Paths
from owca.core.stage import Stats
from owca.measure import budget as budgets
from owca.measure.budget import CpuBudget
from owca.measure.sources.base import Reading, Source
from owca.measure.sources.cgroup import TaskCgroup
from owca.measure.stage import Measure, MeasureConfig

pytestmark = pytest.mark.unit

OWN = ("owca_cpu_seconds_total", "owca_resident_memory_bytes", "owca_open_descriptors")


# -- a stage's own usage --------------------------------------------------------------------

def test_own_usage_counts_the_descriptors_this_process_opens():
    reader = OwnUsage()
    try:
        before = reader.read()
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(7)]
        try:
            during = reader.read()
        finally:
            for fd in fds:
                os.close(fd)
        after = reader.read()
    finally:
        reader.close()
    assert during.open_fds == before.open_fds + 7
    assert after.open_fds == before.open_fds
    assert during.cpu_seconds >= before.cpu_seconds > 0


def test_own_usage_sees_resident_memory_grow_with_touched_pages():
    before = own_usage().rss_bytes
    block = bytearray(64 << 20)   # zeroed: every page written
    try:
        grown = own_usage().rss_bytes
    finally:
        del block
    assert before > 0
    assert grown >= before + (48 << 20)


def test_every_stage_reports_its_usage_unless_timing_is_off():
    stats = Stats("detect")
    got = {s["name"]: s for s in stats.samples()}
    for name in OWN:
        assert got[name]["labels"] == {"stage": "detect"}
        assert got[name]["value"] > 0
        assert metrics.REGISTRY[name].scope == "internal"
    assert got["owca_cpu_seconds_total"]["type"] == "counter"
    stats.timing = False   # byte-identical replays
    assert not set(OWN) & {s["name"] for s in stats.samples()}


# -- the budget on its own: made-up CPU times and clock -------------------------------------

def drive(budget: CpuBudget, share: float, cycles: int, tasks: int = 100, start=(0.0, 0.0)):
    """`cycles` cycles of one second each at `share` of one CPU; the (time, CPU) reached
    and the levels seen after each cycle."""
    now, cpu = start
    levels = []
    for _ in range(cycles):
        now += 1.0
        cpu += share
        budget.observe(now, cpu, tasks)
        levels.append(budget.level)
    return (now, cpu), levels


def test_over_budget_sheds_one_level_per_window_in_the_documented_order(caplog):
    budget = CpuBudget(2.0, window=3)   # 2 % of one CPU
    with caplog.at_level(logging.INFO, logger="owca.measure"):
        _, levels = drive(budget, 0.05, 1 + 3 * 4)
    # the first call has no period yet; then three cycles at each level before the next
    assert levels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    shed = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split("shedding to ")[1] for r in shed] == [
        "level 1, slow signals less often", "level 2, perf not read",
        "level 3, every other cycle skipped"]
    assert all("\n" not in r.getMessage() for r in shed)
    assert budget.share == pytest.approx(0.05)


def test_under_budget_nothing_is_shed():
    budget = CpuBudget(2.0, window=3)
    _, levels = drive(budget, 0.019, 30)
    assert set(levels) == {0}


def test_back_to_full_work_when_the_levels_below_fit_again():
    budget = CpuBudget(2.0, window=2)
    reached, levels = drive(budget, 0.05, 1 + 2 * 3, tasks=100)
    assert levels[-1] == budgets.LONGER_INTERVAL
    # 100 tasks cost 5 %; with 10 tasks each level below costs 0.5 %: room, level by level
    _, levels = drive(budget, 0.005, 2 * 3, tasks=10, start=reached)
    assert levels == [3, 2, 2, 1, 1, 0]


def test_no_room_at_the_level_below_stays_shed_until_the_probe():
    budget = CpuBudget(2.0, window=2)
    reached, _ = drive(budget, 0.05, 1 + 2, tasks=100)
    assert budget.level == 1
    # level 1 is cheap, but level 0 cost 5 % at these 100 tasks: no room for it
    reached, levels = drive(budget, 0.01, budgets.PROBE_EVERY - 3, tasks=100, start=reached)
    assert set(levels) == {1}
    _, levels = drive(budget, 0.01, 3, tasks=100, start=reached)
    assert levels[-1] == 0   # tried again after PROBE_EVERY cycles


def test_a_period_that_opened_new_tasks_is_not_counted():
    budget = CpuBudget(2.0, window=1)
    budget.observe(1.0, 0.0, 100)
    budget.observe(2.0, 1.0, 100, opening=True)   # a whole second opening files
    assert budget.level == 0
    budget.observe(3.0, 1.001, 100)
    assert budget.level == 0


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError, match="cpu_budget_percent"):
        CpuBudget(0)
    with pytest.raises(ValueError, match="cpu_budget_percent"):
        MeasureConfig(cpu_budget_percent=-1)
    with pytest.raises(ValueError, match="be_costly_signals_every"):
        MeasureConfig(be_costly_signals_every=0)


# -- the budget on a real stage -------------------------------------------------------------

class PerfStandIn(Source):
    """Stands in for the perf source (no PMU and no helper needed): counts its reads,
    so that the test sees whether the stage reads it."""
    name = "perf"

    def __init__(self):
        self.reads = 0

    def read(self, cycle):
        self.reads += 1
        return Reading(tasks={"/owca-fixture/hp": {"task_instructions": self.reads}})


@pytest.fixture
def recorded(fixtures_dir):
    trees = os.path.join(fixtures_dir, "procfs_sysfs_2cpus")
    return {"--cgroupfs": os.path.join(fixtures_dir, "cgroup_v1_tree"),
            "--procfs": os.path.join(trees, "proc"), "--sysfs": os.path.join(trees, "sys")}


def tasks_frame(seq):
    paths = ("/owca-fixture/hp", "/owca-fixture/be")
    return frames.tasks_frame(seq, [{"id": p, "name": p, "cgroup_path": p, "labels": {},
                                     "resources": {}} for p in paths], ts=1.0, host="h")


def level_of(frame: dict) -> int:
    return next(s["value"] for s in frame["metrics"] if s["name"] == "owca_measure_shed_level")


def test_a_stage_on_a_tiny_budget_sheds_in_order_and_comes_back(recorded, caplog):
    # a billionth of a per cent of one CPU: any cycle is over it
    stage = Measure(MeasureConfig(cpu_budget_percent=1e-9), recorded)
    perf = PerfStandIn()
    stage.sources.append(perf)
    window = stage.budget.window
    out = []
    try:
        with caplog.at_level(logging.INFO, logger="owca.measure"):
            # the first frame opens the tasks, and the first look has no period yet
            for seq in range(1, 3 + 3 * window + 2 * window):
                out.append(stage.process(tasks_frame(seq)))
            made = [f[0] for f in out if f]
            levels = [level_of(f) for f in made]
            # every level in turn, none skipped, none gone back
            assert levels == sorted(levels) and levels[0] == 0 and levels[-1] == 3
            assert set(levels) == {0, 1, 2, 3}
            at = {level: levels.index(level) for level in range(4)}
            # level 1: the cgroup readers read their slow signals STRIDE times less often
            assert all(r.stride == budgets.STRIDE for r in stage.source("cgroup").readers.values())
            # level 2: the perf source is not read any more (from the cycle after the
            # one that found level 1 over budget), and its metrics are gone
            assert perf.reads == at[2] + 1
            assert "task_instructions" not in made[-1]["tasks"]["/owca-fixture/hp"]["metrics"]
            assert "task_instructions" in made[at[1]]["tasks"]["/owca-fixture/hp"]["metrics"]
            # level 3: every other frame makes no measurements frame
            first_skip = out.index([])
            assert out[first_skip:] == [[] if i % 2 == 0 else out[first_skip + i]
                                        for i in range(len(out) - first_skip)]
            # room again: a budget no cycle can exceed
            stage.budget.limit = 1e9
            back = []
            for seq in range(100, 100 + 8 * window):
                back += [level_of(f) for f in stage.process(tasks_frame(seq))]
        assert back[-1] == 0 and back == sorted(back, reverse=True)
        assert all(r.stride == 1 for r in stage.source("cgroup").readers.values())
        assert perf.reads > at[2]
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                    and "CPU budget" in r.getMessage()]
        assert len(warnings) == 3
        infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO
                 and "has room" in r.getMessage()]
        assert len(infos) == 3
    finally:
        stage.close()


def test_without_a_budget_no_level_and_nothing_shed(recorded):
    stage = Measure(MeasureConfig(), recorded)
    try:
        frame = stage.process(tasks_frame(1))[0]
    finally:
        stage.close()
    names = {s["name"] for s in frame["metrics"]}
    assert "owca_measure_shed_level" not in names and "owca_measure_cpu_share" not in names


# -- the costly signals at a per-class rate ---------------------------------------------------

def write_cpu_pressure(root: str, total_us: int) -> None:
    with open(os.path.join(root, "owca-fixture/recorded/cpu.pressure"), "w") as f:
        f.write(f"some avg10=0.00 avg60=0.00 avg300=0.00 total={total_us}\n")


@pytest.mark.parametrize("every, stride, read_on", [
    (1, 1, [1, 2, 3, 4, 5, 6, 7]),
    (3, 1, [1, 3, 6]),          # reads 3 and 6: (reads + phase) a multiple of 3
    (1, 2, [1, 2, 4, 6]),       # the budget's stride alone
    (2, 2, [1, 4]),
])
def test_the_costly_signals_are_read_every_so_many_reads(tmp_path, every, stride, read_on):
    root = copy_tree(os.path.join(os.path.dirname(__file__), "fixtures", "cgroup_v2_tree"),
                     str(tmp_path / "tree"))
    reader = TaskCgroup(Paths(cgroupfs=root), "/owca-fixture/recorded", "v2",
                        run_queue_delay=False, costly_every=every)
    reader.stride = stride
    seen = []
    try:
        for read in range(1, 8):
            write_cpu_pressure(root, read * 1000000)
            got = reader.read()
            seen.append(got["task_pressure_stall_seconds"]["cpu"]["some"])
            assert "task_cpu_usage_seconds" in got   # the other files every read
    finally:
        reader.close()
    # the value is that of the last read that was due, carried in between
    want, last = [], None
    for read in range(1, 8):
        if read in read_on:
            last = float(read)
        want.append(last)
    assert seen == want


def test_be_tasks_get_the_configured_rate_and_hp_tasks_every_cycle(recorded):
    stage = Measure(MeasureConfig(be_costly_signals_every=5), recorded)
    try:
        stage.update([{"id": "hp", "name": "hp", "cgroup_path": "/owca-fixture/hp",
                       "labels": {"priority": "hp"}, "resources": {}},
                      {"id": "be", "name": "be", "cgroup_path": "/owca-fixture/be",
                       "labels": {"priority": "be"}, "resources": {}},
                      {"id": "none", "name": "none", "cgroup_path": "/owca-fixture/be",
                       "labels": {}, "resources": {}}])
        readers = stage.source("cgroup").readers
        assert (readers["hp"].costly_every, readers["be"].costly_every,
                readers["none"].costly_every) == (1, 5, 1)
    finally:
        stage.close()


# -- what a cycle reads, for the same-work floor ----------------------------------------------

def test_files_read_lists_each_file_with_its_cadence(recorded):
    stage = Measure(MeasureConfig(slow_metrics_every=10, run_queue_delay=False), recorded)
    try:
        assert stage.files_read()["files"] == []   # nothing read yet
        stage.process(tasks_frame(1))
        plan = stage.files_read()
    finally:
        stage.close()
    cgroupfs = recorded["--cgroupfs"]
    hp = {os.path.relpath(path, cgroupfs): (every, phase, kept)
          for path, every, phase, kept in plan["files"] if "/hp/" in path}
    assert hp["cpuacct/owca-fixture/hp/cpuacct.usage"] == (1, 0, True)
    assert hp["memory/owca-fixture/hp/memory.stat"] == (1, 0, True)
    assert hp["memory/owca-fixture/hp/memory.numa_stat"] == (10, 0, True)
    be_phases = {phase for path, _every, phase, _kept in plan["files"] if "/be/" in path}
    assert be_phases == {1}
    assert plan["perf_cgroups"] == [] and plan["perf_events"] == []


@pytest.mark.parametrize("data", [
    b"some avg10=0.12 avg60=0.05 avg300=0.01 total=12345\n"
    b"full avg10=0.00 avg60=0.00 avg300=0.00 total=2345\n",
    b"some avg10=0.28 avg60=0.23 avg300=0.26 total=3111302\n",
    b"some avg10=0.28 avg60=0.23 avg300=0.26 total=3111302 extra\n"
    b"full avg10=0.00 avg60=0.00 avg300=0.00 total=2345\n",
    b"some avg10=1 avg60=0 avg300=0 total=1\nfull avg10=2 avg60=0 avg300=0 total=2",
])
def test_the_pressure_parser_reads_as_line_by_line(data):
    from owca.measure.sources.cgroup import parse_pressure
    avg10, stall = {}, {}
    for line in data.decode().splitlines():
        f = line.split()
        if len(f) == 5 and f[1].startswith("avg10=") and f[4].startswith("total="):
            avg10[f[0]] = float(f[1][6:])
            stall[f[0]] = int(f[4][6:]) / 1e6
    assert parse_pressure(data) == {"task_pressure_avg10_percent": avg10,
                                    "task_pressure_stall_seconds": stall}


@pytest.mark.parametrize("tree", ["cgroup_v1_tree", "cgroup_v2_tree"])
def test_unchanged_files_read_again_give_what_they_gave_parsed(fixtures_dir, tree):
    """Files whose bytes did not change are not parsed again: the reads after the
    first give the golden values all the same, and a changed file its new ones."""
    import json
    root = os.path.join(fixtures_dir, tree)
    with open(os.path.join(root, "expected.json")) as f:
        expected = json.load(f)
    for cgroup_path, want in expected.items():
        reader = TaskCgroup(Paths(cgroupfs=root), cgroup_path)
        try:
            assert [reader.read() for _ in range(3)] == [want] * 3
        finally:
            reader.close()


def test_the_run_queue_delay_finds_descendants_made_later(tmp_path):
    """A leaf's relist is one stat() where the file system counts subdirectories in
    a directory's links; a descendant made later is found all the same (tmp_path's
    file system stands in for cgroupfs: `tasks` files naming this process's threads)."""
    import threading
    from owca.core.paths import DEFAULT_PATHS
    from owca.measure.sources.cgroup import RunQueueDelay
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        (tmp_path / "tasks").write_text(f"{os.getpid()}\n")
        rq = RunQueueDelay(DEFAULT_PATHS, str(tmp_path), "v1")
        try:
            rq.read()
            assert set(rq.threads) == {str(os.getpid()).encode()}
            (tmp_path / "child").mkdir()
            (tmp_path / "child" / "tasks").write_text(f"{worker.native_id}\n")
            rq.relist()
            rq.read()
            assert set(rq.threads) == {str(os.getpid()).encode(),
                                       str(worker.native_id).encode()}
            (tmp_path / "child" / "tasks").unlink()
            (tmp_path / "child").rmdir()
            rq.relist()
            assert [f.path for f in rq.lists] == [str(tmp_path / "tasks")]
        finally:
            rq.close()
    finally:
        stop.set()
        worker.join()
