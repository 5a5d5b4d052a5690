"""owca-measure's sources behind one interface (lib/owca/measure/sources/base.py): which
are on, the order of what they read, and each one's owca_source_success and
owca_source_duration_seconds, 0 only when the source failed as a whole."""
import json
import os
import signal
import subprocess

import pytest

from cgroup_helpers import needs_v1, v1_cgroup, wait_line
from conftest import tool_command, tool_env
from fake_node import FakeResctrlKernel, copy_tree, fake_cgroup_v2
from owca.core import frames, metrics
from owca.measure.sources import BUILTINS, SWITCHES
from owca.measure.sources.base import Source
from owca.measure.stage import Measure, MeasureConfig, enabled_sources, source_class

SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"
FIXTURE_TASKS = ("/owca-fixture/hp", "/owca-fixture/be")


def tasks_frame(seq, *paths):
    return frames.tasks_frame(seq, [{"id": p, "name": p, "cgroup_path": p, "labels": {},
                                     "resources": {}} for p in paths], ts=1.0, host="h")


def per_source(frame: dict, name: str) -> dict:
    """{source: value} of the frame's samples of metric `name`."""
    return {s["labels"]["source"]: s["value"] for s in frame["metrics"] if s["name"] == name}


def success(frame: dict) -> dict:
    return per_source(frame, "owca_source_success")


@pytest.fixture
def recorded(fixtures_dir):
    """Options for a Measure on the recorded cgroup v1 tree and 2-CPU /proc and /sys."""
    trees = os.path.join(fixtures_dir, "procfs_sysfs_2cpus")
    return {"--cgroupfs": os.path.join(fixtures_dir, "cgroup_v1_tree"),
            "--procfs": os.path.join(trees, "proc"), "--sysfs": os.path.join(trees, "sys")}


def measure_once(cfg: MeasureConfig, options: dict, *paths) -> dict:
    stage = Measure(cfg, options)
    try:
        return stage.process(tasks_frame(1, *paths))[0]
    finally:
        stage.close()


# -- the list of sources --------------------------------------------------------------------

def test_every_builtin_is_a_source_of_its_name():
    for name in BUILTINS:
        cls = source_class(name)
        assert issubclass(cls, Source) and cls.name == name
    assert [name for name in BUILTINS if source_class(name).lists_tasks] == ["cgroup"]
    assert set(SWITCHES) <= set(BUILTINS)
    for setting in SWITCHES.values():
        assert setting in MeasureConfig.__dataclass_fields__


def test_the_configuration_turns_on_perf_apm_sli_and_rdt_and_nothing_else():
    from owca.measure.sources.sli_config import SliConfig
    assert enabled_sources(MeasureConfig()) == ["cgroup", "platform"]
    assert enabled_sources(MeasureConfig(apm_dir="/x", rdt_monitoring=True)) == \
        ["cgroup", "platform", "apm", "rdt"]
    assert enabled_sources(MeasureConfig(perf_events=["task-clock"], apm_dir="/x",
                                         sli=SliConfig(), rdt_monitoring=True)) == list(BUILTINS)


def test_both_metrics_are_registered_as_internal_gauges():
    for name in ("owca_source_success", "owca_source_duration_seconds"):
        spec = metrics.REGISTRY[name]
        assert spec.type == metrics.GAUGE and spec.scope == "internal"
    assert metrics.REGISTRY["owca_source_duration_seconds"].unit == "seconds"


# -- success and duration -----------------------------------------------------------------

def test_each_source_reports_success_and_its_duration(recorded):
    frame = measure_once(MeasureConfig(), recorded, *FIXTURE_TASKS)
    assert success(frame) == {"cgroup": 1, "platform": 1}
    durations = per_source(frame, "owca_source_duration_seconds")
    assert set(durations) == {"cgroup", "platform"}
    assert all(isinstance(d, float) and d >= 0 for d in durations.values())
    for s in frame["metrics"]:
        if s["name"].startswith("owca_source_"):
            assert s["labels"]["stage"] == "measure"
    frames.validate(frame)


def test_no_timing_leaves_the_durations_out_and_the_stage_samples_in_their_order(recorded):
    frame = measure_once(MeasureConfig(), dict(recorded, **{"--no-timing": True}),
                         *FIXTURE_TASKS)
    assert [s["name"] for s in frame["metrics"]] == [
        "owca_frames_read_total", "owca_frames_written_total", "owca_bad_frames_total",
        "owca_tasks", "owca_tasks_dropped_total", "owca_files_not_kept_open",
        "owca_source_success", "owca_source_success"]
    assert success(frame) == {"cgroup": 1, "platform": 1}


def test_what_the_sources_read_is_merged_as_before(recorded, fixtures_dir):
    frame = measure_once(MeasureConfig(), dict(recorded, **{"--no-timing": True}),
                         *FIXTURE_TASKS)
    with open(os.path.join(fixtures_dir, "cgroup_v1_tree", "expected.json")) as f:
        expected = json.load(f)
    assert list(frame["tasks"]) == list(FIXTURE_TASKS)
    for task_id in FIXTURE_TASKS:
        read = frame["tasks"][task_id]["metrics"]
        # the cgroup's metrics first, then the stage's bookkeeping
        assert list(read)[-2:] == ["task_up", "task_last_seen"]
        for name, value in expected[task_id].items():
            assert read[name] == value
    assert frame["platform"]["platform_topology_cpus"] == 2


# -- cgroup --------------------------------------------------------------------------------

def test_a_task_whose_cgroup_is_not_there_is_no_cgroup_failure(recorded):
    frame = measure_once(MeasureConfig(), recorded, FIXTURE_TASKS[0], "/not-there")
    assert list(frame["tasks"]) == [FIXTURE_TASKS[0]]
    assert success(frame)["cgroup"] == 1


def test_no_hierarchy_under_the_cgroup_mount_is_a_cgroup_failure(recorded, tmp_path):
    frame = measure_once(MeasureConfig(), dict(recorded, **{"--cgroupfs": str(tmp_path)}),
                         *FIXTURE_TASKS)
    assert frame["tasks"] == {}
    assert success(frame) == {"cgroup": 0, "platform": 1}
    assert frame["platform"]["platform_topology_cpus"] == 2  # the other source went on


@needs_v1
def test_a_cgroup_removed_between_cycles_costs_its_task_not_the_source():
    with v1_cgroup() as stays:
        wait_line(stays.start_python(SLEEP), "running")
        with v1_cgroup() as goes:
            stage = Measure(MeasureConfig(), {"--no-timing": True})
            first = stage.process(tasks_frame(1, stays.path, goes.path))[0]
        second = stage.process(tasks_frame(2, stays.path, goes.path))[0]
        stage.close()
    assert set(first["tasks"]) == {stays.path, goes.path}
    assert set(second["tasks"]) == {stays.path}
    assert success(second)["cgroup"] == 1


# -- platform ------------------------------------------------------------------------------

@pytest.mark.parametrize("missing, platform_success", [
    (None, 1), ("stat", 0), ("meminfo", 0),
])
def test_owca_measure_without_proc_stat_or_meminfo_reports_a_platform_failure(
        fixtures_dir, tmp_path, missing, platform_success):
    trees = os.path.join(fixtures_dir, "procfs_sysfs_2cpus")
    procfs = copy_tree(os.path.join(trees, "proc"), str(tmp_path / "proc"))
    if missing:
        os.unlink(os.path.join(procfs, missing))
    done = subprocess.run(
        tool_command("measure", "--once", "--no-timing", "--procfs", procfs,
                     "--sysfs", os.path.join(trees, "sys"),
                     "--cgroupfs", os.path.join(fixtures_dir, "cgroup_v1_tree")),
        input=frames.encode(tasks_frame(1, *FIXTURE_TASKS)), capture_output=True, check=False,
        env=tool_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    frame = json.loads(done.stdout)
    assert success(frame) == {"cgroup": 1, "platform": platform_success}
    assert set(frame["tasks"]) == set(FIXTURE_TASKS)


# -- apm -----------------------------------------------------------------------------------

def test_an_apm_dir_that_cannot_be_listed_is_an_apm_failure(recorded, tmp_path):
    a_file = tmp_path / "apm"
    a_file.write_text("not a directory\n")
    frame = measure_once(MeasureConfig(apm_dir=str(a_file)), recorded, *FIXTURE_TASKS)
    assert success(frame) == {"cgroup": 1, "platform": 1, "apm": 0}
    own = {s["name"]: s["value"] for s in frame["metrics"]}
    assert own["owca_apm_read_errors_total"] == 1


@pytest.mark.parametrize("state", ["missing", "malformed file", "fresh file"])
def test_an_apm_dir_not_there_yet_or_with_a_bad_file_is_no_apm_failure(recorded, tmp_path,
                                                                       state):
    from owca.measure.sources import apm
    directory = str(tmp_path / "apm")
    if state != "missing":
        os.mkdir(directory)
    if state == "malformed file":
        (tmp_path / "apm" / "x.json").write_text("{")
    if state == "fresh file":
        apm.write(directory, apm.ApmRecord(FIXTURE_TASKS[0], ts=1e12,
                                           metrics={"apm_sli": 0.5}))
    frame = measure_once(MeasureConfig(apm_dir=directory, apm_max_age=1e12),
                         dict(recorded, **{"--no-timing": True}), *FIXTURE_TASKS)
    assert success(frame) == {"cgroup": 1, "platform": 1, "apm": 1}
    names = [s["name"] for s in frame["metrics"]]
    # its own samples after the stage's, before the sources' success
    assert names[names.index("owca_files_not_kept_open") + 1] == "owca_apm_files"
    assert names[-3:] == ["owca_source_success"] * 3
    if state == "fresh file":
        assert frame["tasks"][FIXTURE_TASKS[0]]["metrics"]["apm_sli"] == 0.5


# -- rdt -----------------------------------------------------------------------------------

def test_resctrl_gone_is_an_rdt_failure_until_it_is_back(fixtures_dir, tmp_path):
    fs = FakeResctrlKernel(copy_tree(os.path.join(fixtures_dir, "resctrl_mon"),
                                     str(tmp_path / "resctrl")))
    cgroupfs = fake_cgroup_v2(str(tmp_path / "cgroup"), {"/a": [5001]})
    fs._set_thread_ids("", fs._thread_ids("") + [5001])
    stage = Measure(MeasureConfig(rdt_monitoring=True),
                    {"--resctrlfs": fs.root, "--cgroupfs": cgroupfs, "--no-timing": True})
    stage.source("rdt").monitor.fs = fs  # the fake kernel's behaviour for what it writes
    try:
        first = stage.process(tasks_frame(1, "/a"))[0]
        os.rename(fs.root, str(tmp_path / "unmounted"))
        second = stage.process(tasks_frame(2, "/a"))[0]
        os.rename(str(tmp_path / "unmounted"), fs.root)
        third = stage.process(tasks_frame(3, "/a"))[0]
    finally:
        stage.close()
    assert success(first) == {"cgroup": 1, "platform": 1, "rdt": 1}
    assert success(second) == {"cgroup": 1, "platform": 1, "rdt": 0}
    assert "task_up" in second["tasks"]["/a"]["metrics"]
    assert success(third)["rdt"] == 1


# -- perf ----------------------------------------------------------------------------------

def perf_missing():
    """Why a perf source cannot run here, or None."""
    from owca.core.paths import DEFAULT_PATHS
    from owca.measure.sources.perf import counters as perf
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    try:
        perf.find_helper()
        perf.default_cgroup_root(DEFAULT_PATHS)
    except (OSError, ValueError) as e:
        return str(e)
    return None


@needs_v1
@pytest.mark.skipif(perf_missing() is not None, reason=str(perf_missing()))
def test_a_perf_helper_killed_mid_run_is_a_perf_failure_for_that_cycle():
    from owca.core.paths import DEFAULT_PATHS
    from owca.measure.sources.perf import counters as perf
    root = perf.default_cgroup_root(DEFAULT_PATHS)
    with v1_cgroup() as cg:
        cg.dirs["perf_event"] = os.path.join(root, cg.path.lstrip("/"))
        os.mkdir(cg.dirs["perf_event"])
        wait_line(cg.start_python(SLEEP), "running")
        stage = Measure(MeasureConfig(perf_events=["task-clock", "context-switches"],
                                      perf_cgroup_root=root), {"--no-timing": True})
        try:
            first = stage.process(tasks_frame(1, cg.path))[0]
            os.kill(stage.source("perf").counters.helper.pid, signal.SIGKILL)
            second = stage.process(tasks_frame(2, cg.path))[0]
            third = stage.process(tasks_frame(3, cg.path))[0]
        finally:
            stage.close()
    assert success(first) == {"cgroup": 1, "platform": 1, "perf": 1}
    assert "task_task_clock_seconds" in first["tasks"][cg.path]["metrics"]
    assert success(second) == {"cgroup": 1, "platform": 1, "perf": 0}
    assert "task_task_clock_seconds" not in second["tasks"][cg.path]["metrics"]
    assert success(third)["perf"] == 1  # restarted in the second cycle
    assert "task_task_clock_seconds" in third["tasks"][cg.path]["metrics"]

