"""The lab's runner as the control matrix uses it: an `allocate:` section (owca-allocate in
the pipeline), several HP tasks, BE tasks that arrive at their first phase, surges paced
by owca-sine; the matrix's configurations; and one short live run of the matrix."""
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import FIXTURES, ROOT, tool_command, tool_env
from owca.core import config, frames
from owca.core.paths import Paths
from owca.allocate.stage import AllocateConfig

WORKLOADS = os.path.join(ROOT, "workloads")
sys.path.insert(0, WORKLOADS)

from owca_workloads import control_matrix, control_score  # noqa: E402
from owca_workloads.catalog import load_catalog, unavailable  # noqa: E402
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


def test_the_control_scenarios_are_lab_scenarios():
    paths = [p for p in glob.glob(os.path.join(ROOT, "benchmarks", "control", "*.yaml"))
             if not p.endswith("lab-controller.yaml")]  # a -c configuration
    assert len(paths) == 3
    for path in paths:
        s = control_matrix.load(path)
        assert all(b.arrives for b in s.be) and all(h.calibrate == 0 for h in hp_tasks(s))
    assert len(hp_tasks(control_matrix.load(os.path.join(ROOT, "benchmarks", "control",
                                                         "both.yaml")))) == 2


def fake_sysfs(tmp_path, online: str) -> Paths:
    cpu = tmp_path / "sys" / "devices" / "system" / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text(online + "\n")
    return Paths(sysfs=str(tmp_path / "sys"))


def test_each_configuration_is_an_allocate_section_and_the_be_cores(tmp_path):
    paths = fake_sysfs(tmp_path, "0-3")
    s = control_matrix.load(os.path.join(ROOT, "benchmarks", "control", "nginx.yaml"))
    runs = {c: control_matrix.configured(s, c, paths) for c in control_matrix.CONFIGS}
    assert {c: r.be_cpus for c, r in runs.items()} == {
        "none": "0,1,2,3", "static": "1,2,3", "controller": "0,1,2,3",
        "controller-floor": "0,1,2,3", "memory": "0,1,2,3"}
    assert runs["none"].allocate == runs["static"].allocate == "allocator: !NOPAllocator\n"
    assert runs["controller"].allocate == ("allocator: !SloController\n"
                                           "  hp_labels:\n    role: hp\n"
                                           "  be_labels:\n    role: be\n")
    assert runs["controller-floor"].allocate.endswith("  quota_floor: 0.75\n  lend_level: 1\n")
    assert runs["memory"].allocate.startswith("allocator: !MemoryProtection\n")
    memory = config.load_section(None, "allocate", AllocateConfig, text="allocate:\n" +
                                 textwrap.indent(runs["memory"].allocate, "  "))
    assert type(memory.allocator).__name__ == "MemoryProtection"
    with pytest.raises(ValueError, match="config: one of"):
        control_matrix.configured(s, "loose", paths)
    calibrated = control_matrix.with_slos(control_matrix.load(os.path.join(
        ROOT, "benchmarks", "control", "both.yaml")), {"redis": 0.004})
    assert [(h.slo, h.calibrate) for h in hp_tasks(calibrated)] == [(0.002, 0), (0.004, 0)]


def measurements_line() -> bytes:
    with open(os.path.join(FIXTURES, "recorded_stream", "stream.jsonl"), "rb") as f:
        return next(line for line in f if json.loads(line)["kind"] == "measurements")


@pytest.mark.parametrize("config", control_matrix.CONFIGS)
def test_the_runners_configuration_is_what_owca_allocate_reads(tmp_path, config):
    """The pipeline's file carries the scenario's section, tags and all: owca-allocate
    builds its allocator from it; without a -c configuration it is the runner's file."""
    s = control_matrix.configured(control_matrix.load(os.path.join(
        ROOT, "benchmarks", "control", "both.yaml")), config, fake_sysfs(tmp_path, "0-1"))
    runner = Runner(s, str(tmp_path / "out"))
    assert runner.stages() == ["discover", "measure", "detect", "allocate", "tee", "ship"]
    os.makedirs(tmp_path / "out")
    path = runner.write_pipeline_config()
    (tmp_path / "state").mkdir()
    done = subprocess.run(tool_command("allocate", "--once", "--dry-run", "--state-dir",
                                       str(tmp_path / "state"), "-c", path),
                          input=measurements_line(), capture_output=True, env=tool_env(),
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    kinds = [frames.decode(line)["kind"] for line in done.stdout.splitlines()]
    assert "allocations" in kinds


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
    assert "oom_kills" not in got           # no /proc/vmstat: not counted, not zero
    (proc / "vmstat").write_text("nr_free_pages 100\noom_kill 3\npgfault 9\n")
    sampler.sample()
    (proc / "vmstat").write_text("nr_free_pages 100\noom_kill 5\npgfault 9\n")
    assert sampler.sample()["oom_kills"] == 2


# -- a short live run of the matrix ------------------------------------------------------

SHORT = """
name: matrix-short
duration: 14
interval: 1
warmup: 2
cpus: "0"
hp:
  - {workload: nginx, slo: 0.002, calibrate: 0,
     load: {base: 300, amplitude: 0, period: 60, step: 1, connections: 2}}
  - {workload: redis, name: cache, calibrate: 2,
     load: {base: 500, amplitude: 0, period: 60, step: 1, connections: 1}}
be:
  - {name: cpu, workload: stress-cpu, arrives: true, phases: [{start: 4}]}
surges:
  - {hp: cache, start: 7, stop: 10, rate: 300, connections: 1, client: load}
"""


def test_a_control_run_is_a_lab_run_with_owca_allocate(tmp_path):
    """About half a minute: two HP tasks (redis's SLO calibrated at peak, nginx's fixed),
    a BE task that arrives at t=4, a paced surge on redis, the controller in the pipeline;
    the run's ground truth is the lab's, with the matrix's fields, and scores."""
    catalog = load_catalog()
    reason = unavailable([catalog[n] for n in ("nginx", "redis", "stress-cpu")])
    if reason:
        pytest.skip(reason)
    scenario = tmp_path / "short.yaml"
    scenario.write_text(SHORT)
    s = control_matrix.load(str(scenario))
    out = tmp_path / "run"
    truth = control_matrix.run(s, "controller", str(out), be_alone={"cpu": 1.0})
    assert truth["completed"] and truth["config"] == "controller"
    assert truth["be_alone"] == {"cpu": 1.0} and truth["version"] == 2
    nginx, cache = truth["hps"]
    assert truth["hp"] == nginx and nginx["slo"] == 0.002
    assert cache["name"] == "cache" and cache["slo_calibration"]["seconds"] == 2
    assert cache["slo"] == cache["slo_calibration"]["slo"]
    (cpu,) = [p for p in truth["phases"] if p["task"] == "cpu"]
    assert cpu["kind"] == "aggressive" and cpu["scheduled_start"] == 4
    assert cpu["start_ts"] > truth["started_ts"] and cpu["stop_ts"] == truth["ended_ts"]
    (surge,) = [p for p in truth["phases"] if p["kind"] == "surge"]
    assert surge["task"] == "cache" and surge["task_id"] == cache["task_id"]
    lines = (out / "recording.jsonl").read_bytes().splitlines()
    measurements = [frames.decode(line) for line in lines
                    if frames.sniff(line) == (1, "measurements")]
    # the BE task is in the frames from its arrival on, not before it
    be_id = cpu["task_id"]
    assert any(be_id not in m["tasks"] for m in measurements)
    assert be_id in measurements[-1]["tasks"]
    allocations = [frames.decode(line) for line in lines
                   if frames.sniff(line) == (1, "allocations")]
    assert allocations and any(x["name"] == "slo_controller_be_level"
                               for a in allocations for x in a.get("metrics", []))
    scored = control_score.score_dir(str(out))
    assert scored["config"] == "controller" and scored["intervals"] > 0
    assert set(scored["recovery_intervals"]) == {"cpu", "surge"}
