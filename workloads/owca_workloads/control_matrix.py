"""The SLO controller's live evaluation: a scenario's runs under each allocator
configuration, each one made by the lab's runner (scenario.Runner) with an
`allocate:` section, so that its pipeline is

    owca-discover (static file) | owca-measure (apm_dir) | owca-detect
        | owca-allocate (the configuration) | tee recording.jsonl | owca-ship (file)

A scenario is a lab scenario (docs/workloads.md; benchmarks/control/*.yaml): HP
services under sine load, BE tasks that arrive at their start and run to the end,
surges of unmeasured clients.  The configurations:

    none        every BE task on every CPU, nothing applied (NOPAllocator)
    static      every BE task pinned, from its start, to the CPUs no HP task uses
    controller  BE tasks start on every CPU; !SloController (its defaults) moves them
    controller-floor  the same, with static isolation as its floor: BE never has less
                than the cores no HP uses (quota_floor = their share, lend_level 1), so
                the controller only decides when to lend it the HP cores
    memory      !MemoryProtection (its defaults; on v1 BE is limited with its hard
                limit, v1_be_limit): the memory scenarios (workloads/scenarios/memory)
                against `none`

Before a scenario's runs the matrix (benchmarks/control_eval.py) sets each HP's SLO
(`calibrate_slo`: a lab run of the HP loads alone) and measures `be_alone`
(`calibrate_be_alone`: what the BE tasks use per second with nothing else of the
scenario on the node); a run's ground truth records its `config` and `be_alone`.
workloads/owca_workloads/control_score.py scores a run directory.
"""
import dataclasses
import os
import statistics
import textwrap
import time
from typing import Dict, Optional

import yaml

from owca.core.paths import Paths

from owca_workloads.catalog import load_catalog, start
from owca_workloads.cgroup_files import read_int
from owca_workloads.launch import Launcher
from owca_workloads.scenario import (Runner, Scenario, be_tasks, hp_samples, hp_tasks,
                                     load_scenario, other_cpus)

CONFIGS = ("none", "static", "controller", "controller-floor", "memory")


def load(path: str) -> Scenario:
    return load_scenario(path)


def allocate_section(config: str, home_share: float) -> str:
    """owca-allocate's section for a configuration (the lab labels its tasks role: hp|be);
    `home_share`: the share of the platform that the cores no HP task uses are."""
    if config.startswith("controller"):
        params = {"hp_labels": {"role": "hp"}, "be_labels": {"role": "be"}}
        if config == "controller-floor":
            params.update(quota_floor=round(home_share, 4), lend_level=1)
        body = yaml.safe_dump(params, default_flow_style=False, sort_keys=False)
        return "allocator: !SloController\n" + textwrap.indent(body, "  ")
    if config == "memory":
        return ("allocator: !MemoryProtection\n  hp_labels: {role: hp}\n"
                "  be_labels: {role: be}\n  v1_be_limit: true\n")
    return "allocator: !NOPAllocator\n"


def configured(scenario: Scenario, config: str, paths: Paths) -> Scenario:
    """The scenario as the lab's runner runs it under `config`."""
    if config not in CONFIGS:
        raise ValueError(f"config: one of {', '.join(CONFIGS)}")
    online = other_cpus("", paths)
    home = scenario.loadgen_cpus or other_cpus(scenario.cpus, paths)
    share = len(home.split(",")) / len(online.split(","))
    return dataclasses.replace(scenario, allocate=allocate_section(config, share),
                               be_cpus=home if config == "static" else online)


def run(scenario: Scenario, config: str, out_dir: str,
        be_alone: Optional[Dict[str, float]] = None, paths: Paths = None) -> dict:
    """One run of the scenario under `config` into `out_dir`; its ground truth."""
    paths = paths or Paths()
    runs = configured(scenario, config, paths)
    return Runner(runs, out_dir, paths=paths,
                  truth_fields={"config": config, "be_alone": be_alone or {},
                                "scenario_file": dataclasses.asdict(runs)}).run()


def calibrate_be_alone(scenario: Scenario, out_dir: str, seconds: float = 15.0,
                       paths: Paths = None) -> Dict[str, float]:
    """CPU cores each BE workload of the scenario uses with the others of its set and
    nothing else of the run on the node (every BE task on every CPU)."""
    paths = paths or Paths()
    catalog = load_catalog()
    os.makedirs(out_dir, exist_ok=True)
    launcher = Launcher(f"/owca-control-alone-{scenario.name}-{os.getpid()}", paths,
                        state_file=os.path.join(out_dir, "launcher-state.json"))
    online = other_cpus("", paths)
    names = [b.name or b.workload for b in be_tasks(scenario)]
    rates, logs = {}, []
    try:
        for name, b in zip(names, be_tasks(scenario)):
            logs.append(open(os.path.join(out_dir, f"{name}.log"), "ab"))
            start(launcher, catalog[b.workload], name, os.path.join(out_dir, "run", name),
                  online, logs[-1])
        time.sleep(2.0)
        first = {name: _usage(launcher, name) for name in names}
        t0 = time.monotonic()
        time.sleep(seconds)
        dt = time.monotonic() - t0
        for name in names:
            rates[name] = round((_usage(launcher, name) - first[name]) / dt, 4)
    finally:
        launcher.stop_all()
        for f in logs:
            f.close()
    return rates


def calibrate_slo(scenario: Scenario, out_dir: str, seconds: float = 25.0,
                  factor: float = 3.0, paths: Paths = None) -> Dict[str, float]:
    """Each HP task's SLO: `factor` x the median of its SLI with its load alone on the node
    (no BE task, no surge, no owca-allocate), as the lab does: an SLO the quiet service
    meets with room, on this machine as it is now.  {HP task name: SLO}."""
    quiet = dataclasses.replace(scenario, name=scenario.name + "-quiet", be=[],
                                antagonists=[], surges=[], duration=seconds, allocate=None)
    truth = Runner(quiet, out_dir, paths=paths).run()
    with open(os.path.join(out_dir, "recording.jsonl"), "rb") as f:
        lines = f.read().splitlines()
    out = {}
    for hp in truth.get("hps") or [truth["hp"]]:
        values = [v for ts, v in hp_samples(lines, hp["task_id"], hp["sli_metric"])
                  if ts >= truth["started_ts"]]
        if values:
            out[hp["name"]] = round(factor * statistics.median(values), 6)
    return out


def with_slos(scenario: Scenario, slos: Dict[str, float]) -> Scenario:
    """The scenario with these SLOs for its HP tasks (by name), used as they are."""
    hps = [dataclasses.replace(h, slo=slos.get(h.name or h.workload, h.slo), calibrate=0)
           for h in hp_tasks(scenario)]
    return dataclasses.replace(scenario, hp=hps[0], other_hps=hps[1:])


def _usage(launcher: Launcher, name: str) -> float:
    return read_int(os.path.join(launcher.cgroups(name).dir("cpuacct"), "cpuacct.usage")) / 1e9
