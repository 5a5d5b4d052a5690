"""owca-measure's sources behind one interface (lib/owca/measure/sources/base.py): which
are on, and the order of what they read."""
import json
import os

import pytest

from owca.core import frames
from owca.measure.sources import BUILTINS, SWITCHES
from owca.measure.sources.base import Source
from owca.measure.stage import Measure, MeasureConfig, enabled_sources, source_class

FIXTURE_TASKS = ("/owca-fixture/hp", "/owca-fixture/be")


def tasks_frame(seq, *paths):
    return frames.tasks_frame(seq, [{"id": p, "name": p, "cgroup_path": p, "labels": {},
                                     "resources": {}} for p in paths], ts=1.0, host="h")


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


def test_the_configuration_turns_on_perf_apm_and_rdt_and_nothing_else():
    assert enabled_sources(MeasureConfig()) == ["cgroup", "platform"]
    assert enabled_sources(MeasureConfig(apm_dir="/x", rdt_monitoring=True)) == \
        ["cgroup", "platform", "apm", "rdt"]
    assert enabled_sources(MeasureConfig(perf_events=["task-clock"], apm_dir="/x",
                                         rdt_monitoring=True)) == list(BUILTINS)


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
