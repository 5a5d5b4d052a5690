"""SloController inside owca-allocate, on real cgroup v1 directories with real processes:
what it changed on the BE task is all given back when owca-allocate stops.

The HP and BE tasks are two sibling cgroups (tests/test_allocate_cgroups.py's
`family`); the HP task's SLI comes in the frames, as owca-measure would merge it
from the wrapper's APM file.  Skipped where the machine has no writable v1 cpu,
cpuacct and cpuset hierarchies.
"""
import json
import signal
import subprocess

import pytest

from cgroup_helpers import read_int, read_str
from conftest import ROOT, tool_command, tool_env
from owca.core import frames
from test_allocate_cgroups import (CONTROLLERS, family, online_cpus,  # noqa: F401
                                   settings, start)
from cgroup_helpers import v1_missing

pytestmark = pytest.mark.skipif(v1_missing(controllers=CONTROLLERS) is not None,
                                reason=str(v1_missing(controllers=CONTROLLERS)))

CONFIG = ("allocate:\n  allocator: !SloController\n    min_dwell: 1\n"
          "    verify_intervals: 1\n    start_level: 0\n")


def frame(seq, hp, be, normalized):
    tasks = {
        "hp": {"name": "hp", "cgroup_path": hp.path, "labels": {"priority": "hp"},
               "resources": {}, "metrics": {"apm_sli": 0.002 / normalized, "apm_slo": 0.002,
                                            "apm_sli_normalized": normalized,
                                            "apm_throughput_per_second": 1000.0 + seq}},
        "be": {"name": "be", "cgroup_path": be.path, "labels": {"priority": "be"},
               "resources": {}, "metrics": {}}}
    return frames.encode(frames.measurements_frame(
        seq, {"platform_topology_cpus": online_cpus()}, tasks, ts=float(seq), host="n1")).decode()


@pytest.mark.parametrize("stop", ["eof", "sigterm"])
def test_stopping_owca_allocate_restores_what_the_controller_changed(family, tmp_path,  # noqa: F811
                                                                      stop):
    parent, be, hp = family
    start(be)
    start(hp)
    before = settings(parent, be, hp)
    config = tmp_path / "owca.yaml"
    config.write_text(CONFIG)
    with subprocess.Popen(tool_command("allocate", "-c", str(config)), stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env(),
                          cwd=ROOT, text=True) as tool:
        try:
            run_and_stop(tool, hp, be, before, stop)
        finally:
            if tool.poll() is None:
                tool.kill()
    assert settings(parent, be, hp) == before
    assert read_str(be.file("cpuset", "cpuset.cpus")) == read_str(parent.file("cpuset", "cpuset.cpus"))


def run_and_stop(tool, hp, be, before, stop):
    def cycle(seq, normalized):
        tool.stdin.write(frame(seq, hp, be, normalized))
        tool.stdin.flush()
        assert json.loads(tool.stdout.readline())["kind"] == "measurements"
        return json.loads(tool.stdout.readline())

    levels = []
    for seq in range(1, 6):           # ample slack: BE grows each cycle
        out = cycle(seq, 4.0)
        assert out["kind"] == "allocations" and out["errors"] == []
        levels.append([s["value"] for s in out["metrics"]
                       if s["name"] == "slo_controller_be_level"][0])
    assert levels == [1, 2, 3, 4, 5]
    period = read_int(be.file("cpu", "cpu.cfs_period_us"))
    assert read_int(be.file("cpu", "cpu.cfs_quota_us")) > 0
    assert read_int(be.file("cpu", "cpu.shares")) < 1024
    quota_grown = read_int(be.file("cpu", "cpu.cfs_quota_us"))
    out = cycle(6, 0.8)               # the SLO broken: BE cut to its floor
    assert out["allocations"]["be"]["cpu_quota"] == 0.05
    assert read_int(be.file("cpu", "cpu.cfs_quota_us")) == \
        round(0.05 * period * online_cpus()) < quota_grown
    assert read_int(be.file("cpu", "cpu.shares")) == round(0.02 * 1024)
    # The HP task's cgroup was never written.
    assert settings(hp) == {k: v for k, v in before.items() if k.startswith(
        tuple(hp.dirs.values()))}
    if stop == "eof":
        tool.stdin.close()
    else:
        tool.send_signal(signal.SIGTERM)
    assert tool.wait(timeout=30) == 0, tool.stderr.read()
    last = [json.loads(line) for line in tool.stdout.read().splitlines()]
    assert last and last[-1]["shutdown"] is True
    assert set(last[-1]["restored"]["be"]) == {"cpu_quota", "cpu_shares", "cpuset_cpus"}
