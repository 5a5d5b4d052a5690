"""The lab's runner as the control matrix uses it: an `allocate:` section (owca-allocate in
the pipeline), several HP tasks, BE tasks that arrive at their first phase, surges paced
by owca-sine."""
import os
import sys

import pytest

from conftest import ROOT
from owca.core.paths import Paths

WORKLOADS = os.path.join(ROOT, "workloads")
sys.path.insert(0, WORKLOADS)

from owca_workloads.catalog import load_catalog  # noqa: E402
from owca_workloads.hostload import HostLoad  # noqa: E402
from owca_workloads.scenario import (HpRun, Runner, ScenarioError, hp_tasks,  # noqa: E402
                                     parse_scenario)

TWO_HPS = """
name: two
duration: 60
hp:
  - {workload: nginx, calibrate: 0, load: {base: 100, amplitude: 50, period: 10}}
  - {workload: redis, name: cache, slo: 0.001, calibrate: 0}
be:
  - {name: cpu, workload: stress-cpu, arrives: true, phases: [{start: 15}]}
  - {name: io, workload: stress-io, phases: [{start: 5, stop: 10, mode: benign}]}
surges:
  - {hp: cache, start: 20, stop: 30, rate: 2000, connections: 2, client: load}
  - {start: 40, stop: 45}
allocate:
  allocator: !SloController
    hp_labels: {role: hp}
    be_labels: {role: be}
"""


def test_several_hp_tasks_arriving_be_tasks_and_an_allocate_section():
    s = parse_scenario(TWO_HPS)
    assert [(h.workload, h.name) for h in hp_tasks(s)] == [("nginx", None), ("redis", "cache")]
    assert s.hp is hp_tasks(s)[0]
    cpu, io = s.be
    assert cpu.arrives and [(p.start, p.stop) for p in cpu.phases] == [(15, 60)]  # to the end
    assert not io.arrives
    assert [(x.hp, x.client) for x in s.surges] == [("cache", "load"), (None, "surge")]
    # the section keeps its tags: owca-allocate builds it
    assert s.allocate.startswith("allocator: !SloController\n")
    assert "hp_labels: {role: hp}" in s.allocate


def test_a_single_hp_mapping_is_still_one_hp_task():
    s = parse_scenario(TWO_HPS.replace(
        "  - {workload: nginx, calibrate: 0, load: {base: 100, amplitude: 50, period: 10}}\n"
        "  - {workload: redis, name: cache, slo: 0.001, calibrate: 0}\n",
        "  {workload: redis, name: cache, slo: 0.001, calibrate: 0}\n"))
    assert s.other_hps == [] and s.hp.name == "cache"


@pytest.mark.parametrize("change, reason", [
    (("arrives: true, phases: [{start: 15}]", "arrives: true"), "be[0]: arrives: expected a phase"),
    (("{hp: cache,", "{hp: web,"), "surges[0].hp 'web' is not an HP task"),
    (("client: load", "client: loud"), "surges[0].client 'loud'"),
    (("{workload: redis, name: cache,", "{workload: memcached, name: cache,"),
     "memcached has a fixed load"),
    (("{name: io,", "{name: loadgen-io,"), "name 'loadgen-io' is taken"),
    (("{name: io,", "{name: cache,"), "name 'cache' is taken"),
    (("allocate:\n  allocator", "allocate: 3\nx:\n  allocator"), "allocate: expected a mapping"),
    (("allocate:\n  allocator: !SloController\n", "allocate: !SloController\nx:\n  y:\n"),
     "allocate: expected a mapping"),
    (("name: two", "name: two\nother_hps: []"), "other_hps: several HP tasks are a list"),
    (("period: 10}}", "period: 10}, quota: 0}"), "hp[0].quota: expected a positive number"),
    (("name: two", "name: [two"), "bad.yaml: line 3: expected ',' or ']'"),
])
def test_bad_control_scenarios_are_refused_with_the_reason(change, reason):
    with pytest.raises(ScenarioError) as e:
        parse_scenario(TWO_HPS.replace(*change), "bad.yaml")
    assert str(e.value).startswith("bad.yaml: ") and reason in str(e.value)


def test_a_configurations_allocate_section_wins_over_the_scenarios(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("allocate:\n  allocator: !NOPAllocator\n")
    s = parse_scenario(TWO_HPS)
    runner = Runner(s, str(tmp_path / "out"), str(config))
    assert runner.allocate_section() is None
    os.makedirs(tmp_path / "out")
    assert "\nallocate:" not in open(runner.write_pipeline_config()).read()
    assert Runner(s, str(tmp_path / "out")).allocate_section() == s.allocate


def test_a_surge_of_the_hps_own_client_is_paced_by_owca_sine():
    s = parse_scenario(TWO_HPS)
    catalog = load_catalog()
    cache = HpRun(s.other_hps[0], catalog["redis"], "cache", "/r", "loadgen-cache",
                  "calibration-cache", "/two/cache", 6379)
    web = HpRun(s.hp, catalog["nginx"], "nginx", "/n", "loadgen", "calibration", "/two/nginx",
                8080)
    runner = Runner(s, "/nonexistent")
    paced = runner.surge_argv(cache, s.surges[0])
    sine = paced.index("--base")
    assert paced[sine:paced.index("--")] == ["--base", "2000", "--amplitude", "0", "--period",
                                             "60", "--step", "1", "--duration", "10",
                                             "--connections", "2"]
    assert paced[paced.index("--") + 1:] == catalog["redis"].load_command("/r", 6379)
    surge = runner.surge_argv(web, s.surges[1])
    assert surge[0] == "wrk" and "http://127.0.0.1:8080/" in surge  # the catalog's command


def test_host_load_samples_carry_the_load_average(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "stat").write_text("cpu  1 0 1 10 0 0 0 0 0 0\ncpu0 1 0 1 10 0 0 0 0 0 0\n")
    (proc / "loadavg").write_text("1.25 0.50 0.10 1/100 4242\n")
    sampler = HostLoad(Paths(procfs=str(proc), cgroupfs=str(tmp_path / "cg")), "/x", {0})
    assert sampler.sample() is None
    (proc / "stat").write_text("cpu  9 0 1 10 0 0 0 0 0 0\ncpu0 9 0 1 10 0 0 0 0 0 0\n")
    got = sampler.sample()
    assert got["loadavg1"] == 1.25 and got["other_cpu_cores"] > 0
