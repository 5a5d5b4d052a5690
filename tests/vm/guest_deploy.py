"""The systemd units of systemd/ on a unified hierarchy systemd owns; run INSIDE the test guest.

tests/deploy/ rolls the suite out with Ansible into a container on this host,
whose kernel binds cpu and perf_event to cgroup v1.  Here, in the QEMU guest
(tests/vm/test_v2_guest.py boots it), the same units run on a pure cgroup v2
kernel: installed as the role installs them (the tools in /opt/owca/bin, one
configuration per stage in /etc/owca, the units in /etc/systemd/system), but
from the shared source tree instead of a release (the guest has no network
for pip).  Checked: every unit starts, systemd owns the FIFOs, the stream
carries the v2 tree's tasks with their perf counters, a SIGKILLed stage is
restarted alone and the stream resumes, and each unit's exposure is the one
docs/deploy.md gives.  Outside the guest every test is skipped.
"""
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

import conftest
from conftest import ROOT

IN_GUEST = os.environ.get("OWCA_IN_GUEST") == "1"
pytestmark = pytest.mark.skipif(not IN_GUEST, reason="runs inside the v2 test guest only "
                                                      "(tests/vm/test_v2_guest.py boots it)")
STAGES = ("discover", "measure", "detect", "allocate", "ship")
SHIPPED = "/var/lib/owca-ship/metrics.log"
LOAD_UNIT = "load-generator.service"
CONFIG = {
    "discover": "interval: 1\nsource: !CgroupDiscovery\n  root: /system.slice\n"
                "  max_depth: 1\n  hierarchies: [unified]\n",
    "measure": "cgroup_version: v2\nperf_events: [task-clock, context-switches]\n"
               "perf_helper: /opt/owca/bin/owca-perf\n",
    "detect": "interval: 1\ndetector: !NOPAnomalyDetector\n",
    "allocate": "interval: 1\nallocator: !NOPAllocator\n",
    "ship": f"interval: 1\nstorages:\n  - !FileStorage\n    path: {SHIPPED}\n",
}


def sh(command, check=True):
    return subprocess.run(["sh", "-c", command], check=check, capture_output=True, text=True)


def units_state(units, props=("ActiveState", "SubState", "MainPID", "NRestarts")):
    out = sh(f"systemctl show -p Id -p {' -p '.join(props)} {' '.join(units)}").stdout
    state = {}
    for block in out.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        state[fields.pop("Id")] = fields
    return state


def shipped_seqs():
    try:
        text = Path(SHIPPED).read_text()
    except FileNotFoundError:
        return []
    return [int(s) for s in re.findall(r"^# owca metrics seq=(\d+)", text, re.M)]


def wait_for(predicate, timeout, what):
    """conftest.wait_for, with the units' last journal lines when it times out."""
    return conftest.wait_for(predicate, timeout, what, step=0.5, detail=lambda: sh(
        "journalctl --no-pager -n 40 -u 'owca-*'", check=False).stdout)


def wait_for_new_cycles(count, timeout=180):
    start = len(shipped_seqs())
    wait_for(lambda: len(shipped_seqs()) >= start + count, timeout,
             f"{count} more shipped cycles")


@pytest.fixture(scope="module")
def deployed():
    """The units installed and owca.target started; stopped and removed at the end."""
    bin_dir, config_dir = Path("/opt/owca/bin"), Path("/etc/owca")
    bin_dir.mkdir(parents=True, exist_ok=True)
    config_dir.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        tool = bin_dir / f"owca-{stage}"
        tool.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT}/lib exec /usr/bin/python3 "
                        f"{ROOT}/bin/owca-{stage} \"$@\"\n")
        tool.chmod(0o755)
        config = config_dir / f"{stage}.yaml"
        config.write_text(f"{stage}:\n" + "".join(f"  {line}\n" for line in
                                                  CONFIG[stage].splitlines()))
        config.chmod(0o600)
    subprocess.run(["install", "-m", "0755", os.path.join(ROOT, "build", "owca-perf"),
                    str(bin_dir / "owca-perf")], check=True)
    units = sorted(p for p in Path(ROOT, "systemd").iterdir() if p.name.startswith("owca"))
    for unit in units:
        Path("/etc/systemd/system", unit.name).write_text(unit.read_text())
    sh("systemctl daemon-reload")
    # Debian's kernels default to 3, which lets nothing without CAP_SYS_ADMIN count, not
    # even CAP_PERFMON: the operator's step docs/deploy.md gives (restored at the end).
    paranoid = Path("/proc/sys/kernel/perf_event_paranoid")
    paranoid_before = paranoid.read_text()
    paranoid.write_text("2\n")
    sh(f"systemd-run --quiet --unit={LOAD_UNIT} sh -c 'while :; do i=0;"
       f" while [ $i -lt 2000 ]; do i=$((i+1)); done; sleep 0.2; done'")
    sh("systemctl start owca.target")
    try:
        wait_for_new_cycles(2)
        yield [u.name for u in units]
    finally:
        sh("systemctl stop owca.target owca-discover.service owca-measure.socket "
           f"owca-detect.socket owca-allocate.socket owca-ship.socket {LOAD_UNIT}", check=False)
        paranoid.write_text(paranoid_before)


def last_metrics_block():
    return Path(SHIPPED).read_text().rsplit("# owca metrics seq=", 1)[-1]


def test_every_unit_runs_and_systemd_holds_the_fifos(deployed):
    state = units_state([u for u in deployed if u != "owca.target"])
    for unit, fields in state.items():
        assert fields["ActiveState"] == "active", (unit, fields)
    for stage in STAGES[1:]:
        assert stat.S_ISFIFO(os.stat(f"/run/owca/{stage}.fifo").st_mode), stage


def test_the_stream_carries_the_v2_tree_with_perf_counters(deployed):
    wait_for_new_cycles(2)
    block = last_metrics_block()
    task = f'task_id="/system.slice/{LOAD_UNIT}"'
    samples = {m: float(v) for m, v in re.findall(
        r"^(\w+)\{[^}]*" + re.escape(task) + r"[^}]*\} (\S+)", block, re.M)}
    why = "\n".join(line for line in block.splitlines() if LOAD_UNIT in line) or block[:3000]
    assert samples.get("task_cpu_usage_seconds_total", 0) > 0, why   # counters end in _total
    assert "task_pressure_stall_seconds_total" in samples, why
    # perf_event is always there on cgroup2: owca-measure, with CAP_PERFMON alone, counts.
    assert samples.get("task_task_clock_seconds_total", 0) > 0, why


@pytest.mark.parametrize("stage", ("measure", "allocate"))
def test_a_killed_stage_is_restarted_alone_and_the_stream_resumes(deployed, stage):
    services = [f"owca-{s}.service" for s in STAGES]
    wait_for_new_cycles(1)
    before = units_state(services)
    shipped_before = shipped_seqs()
    victim = f"owca-{stage}.service"
    sh(f"kill -KILL {before[victim]['MainPID']}")

    def restarted():
        now = units_state([victim])[victim]
        return (int(now["NRestarts"]) == int(before[victim]["NRestarts"]) + 1
                and now["MainPID"] not in ("0", before[victim]["MainPID"])
                and now["SubState"] == "running")
    wait_for(restarted, 120, f"systemd to restart {victim}")
    wait_for_new_cycles(3)
    after = units_state(services)
    for other in services:
        if other != victim:
            assert after[other]["MainPID"] == before[other]["MainPID"], f"{other} restarted"
    new = shipped_seqs()[len(shipped_before):]
    missing = set(range(shipped_before[-1] + 1, new[-1] + 1)) - set(new)
    assert new == sorted(set(new)) and len(missing) <= 1, (new, sorted(missing))


def test_each_units_exposure_is_the_one_in_the_docs(deployed):
    documented = dict(re.findall(r"^\| `(owca-\w+\.service)` \| (\d+\.\d) \|",
                                 Path(ROOT, "docs", "deploy.md").read_text(), re.M))
    assert sorted(documented) == sorted(f"owca-{s}.service" for s in STAGES)
    for unit, exposure in documented.items():
        out = sh(f"systemd-analyze security --no-pager {unit}").stdout
        measured = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out).group(1)
        assert measured == exposure, f"{unit}: docs/deploy.md says {exposure}, systemd {measured}"
