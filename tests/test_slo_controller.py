"""SloController on synthetic SLI streams: growth, shrink, the cut on violation, rollback
after a harmful step, hold on a missing or stale SLI, the bounds (maximum step, minimum
dwell, hysteresis), the detector's named antagonist, the kubelet CPU manager's
checkpoint, another manager's rewrite, and RDT values against a resctrl tree.

The allocator is driven cycle by cycle with made-up measurements, and what it would
give the BE tasks is read back as the next cycle's current allocations (what
owca-allocate does on a node).  No test depends on time: a cycle is a call.
tests/test_slo_controller_cgroups.py runs it in owca-allocate on real cgroups.
"""
import json
import os
import shutil

import pytest

from conftest import ROOT
from fake_node import fake_sysfs
from owca.core import allocation, config, frames
from owca.allocate.stage import Allocate, AllocateConfig
from owca.plugin import Platform
from owca.allocate.resctrl import ResctrlInfo, validate_on_platform, INFO_FILES
from owca.allocate.allocators.slo_controller import SloController

LABELS = {"web": {"priority": "hp", "workload": "nginx"},
          "batch1": {"priority": "be"}, "batch2": {"priority": "be"}}
BE = ("batch1", "batch2")


@pytest.fixture
def sysfs(tmp_path):
    return fake_sysfs(str(tmp_path / "sys"), cpus="0-3")


def controller(sysfs, **kw):
    kw.setdefault("min_dwell", 1)
    return SloController(sysfs=sysfs, **kw)


class Node:
    """Feeds a controller one cycle at a time; its BE allocations become the tasks'
    current allocations, as owca-allocate reads them back."""

    def __init__(self, ctl, labels=LABELS, hp_cpus="0"):
        self.ctl = ctl
        self.labels = labels
        self.platform = Platform(cpus=4, cores=4, sockets=1, numa_nodes=1, metrics={})
        self.current = {t: {"cpu_quota": 1.0, "cpu_shares": 1.0, "cpuset_cpus": "0-3"}
                        for t in labels}
        for t, l in labels.items():
            if l.get("priority") == "hp":
                self.current[t]["cpuset_cpus"] = hp_cpus
        self.seq = 0
        self.last = None

    def cycle(self, pressure=None, load=100.0, measurements=None, apply=True):
        """One cycle with the HP task at SLI/SLO = `pressure` (None: no SLI)."""
        self.seq += 1
        if measurements is None:
            m = {}
            if pressure is not None:
                # A new load report every cycle: the throughput differs.
                m = {"apm_sli": 0.002 * pressure, "apm_slo": 0.002,
                     "apm_sli_normalized": 1.0 / pressure,
                     "apm_throughput_per_second": 1000.0 + self.seq,
                     "apm_load_target_rate_per_second": load}
            measurements = {t: (m if l.get("priority") == "hp" else {})
                            for t, l in self.labels.items()}
        allocations, anomalies, metrics = self.ctl.allocate(
            self.platform, measurements, {t: {} for t in self.labels}, self.labels,
            {t: dict(v) for t, v in self.current.items()})
        assert anomalies == []
        if apply:
            for t, values in allocations.items():
                self.current[t].update(values)
        self.last = (allocations, metrics)
        return allocations

    def metric(self, name, **labels):
        out = [s["value"] for s in self.last[1] if s["name"] == name and
               all(s.get("labels", {}).get(k) == v for k, v in labels.items())]
        return out[0] if out else None

    def action(self):
        return [s["labels"]["action"] for s in self.last[1]
                if s["name"] == "slo_controller_decision"][0]


def test_ample_slack_grows_be_step_by_step_to_the_ceiling(sysfs):
    node = Node(controller(sysfs, max_step=1, min_dwell=2, verify_intervals=2))
    levels, quotas, at_level = [], [], {}
    for _ in range(40):
        allocations = node.cycle(pressure=0.3)
        levels.append(node.ctl.level)
        quotas.append(allocations["batch1"]["cpu_quota"])
        at_level[node.ctl.level] = allocations["batch1"]
    assert levels[-1] == node.ctl.levels
    steps = [b - a for a, b in zip(levels, levels[1:]) if b != a]
    assert steps and all(s == 1 for s in steps)           # max_step
    changed = [i for i, (a, b) in enumerate(zip(levels, levels[1:])) if a != b]
    assert all(b - a >= 2 for a, b in zip(changed, changed[1:]))   # min_dwell
    assert quotas == sorted(quotas) and quotas[-1] == 1.0 and quotas[0] < 0.2
    # Below lend_level BE keeps to the cores no HP task uses; one level below, it has
    # them in full (what static isolation gives: 3 of 4 CPUs, shared by the 2 BE tasks).
    lend = node.ctl.lend_level
    assert at_level[lend - 1]["cpuset_cpus"] == "1-3"
    assert at_level[lend - 1]["cpu_quota"] == pytest.approx(0.75 / 2)
    assert at_level[lend]["cpuset_cpus"] == "0-3"
    assert at_level[lend]["cpu_quota"] > 0.75 / 2
    final = node.cycle(pressure=0.3)
    # At the ceiling BE has the HP core too, and the ceiling's shares.
    assert final["batch1"]["cpuset_cpus"] == "0-3"
    assert final["batch1"]["cpu_shares"] == node.ctl.shares_ceiling


def test_growth_waits_while_the_hp_load_is_near_its_peak(sysfs):
    node = Node(controller(sysfs, peak_loads={"nginx": 1000.0}, load_threshold=0.8))
    for _ in range(10):
        node.cycle(pressure=0.3, load=900.0)
    assert node.ctl.level == 0
    for _ in range(3):
        node.cycle(pressure=0.3, load=500.0)
    assert node.ctl.level > 0


def test_narrowing_slack_shrinks_in_steps_and_the_band_between_holds(sysfs):
    node = Node(controller(sysfs, start_level=8, shrink_step=2, shrink_slack=0.15,
                           grow_slack=0.4))
    node.cycle(pressure=0.9)               # slack 0.1 < shrink_slack
    assert node.ctl.level == 6 and node.action() == "shrink"
    node.cycle(pressure=0.9)
    assert node.ctl.level == 4
    for _ in range(20):                    # slack 0.3: inside the hysteresis band
        node.cycle(pressure=0.7)
        assert node.ctl.level == 4 and node.action() == "hold"


def test_a_broken_slo_cuts_be_to_the_floor_at_once(sysfs):
    ctl = controller(sysfs, start_level=9, min_dwell=5)
    node = Node(ctl)
    node.cycle(pressure=0.5)
    allocations = node.cycle(pressure=1.3)
    assert ctl.level == 0 and node.action() == "cut"    # the dwell does not delay a cut
    for task in BE:
        assert allocations[task] == {"cpu_quota": round(ctl.quota_floor / 2, 4),
                                     "cpu_shares": ctl.shares_floor,
                                     "cpuset_cpus": "1-3"}   # off the HP's core


def test_a_harmful_step_is_rolled_back_and_growth_backs_off_doubling(sysfs):
    ctl = controller(sysfs, start_level=3, verify_intervals=2, backoff=4, noise_floor=0.1)
    node = Node(ctl)
    for _ in range(3):
        node.cycle(pressure=0.5)           # steady: baseline 0.5, no noise
    grown = ctl.level
    assert grown > 3 and ctl._trial is not None
    node.cycle(pressure=0.62)              # worse than 0.5 + 10 %, still within the SLO
    node.cycle(pressure=0.62)
    assert node.action() == "rollback"
    assert ctl.level == grown - 1
    assert node.metric("slo_controller_rollbacks_total") == 1
    # Backing off: no growth for `backoff` cycles, though the slack is ample again.
    levels = []
    for _ in range(4):
        node.cycle(pressure=0.5)
        levels.append(ctl.level)
    assert levels[:3] == [grown - 1] * 3 and levels[3] == grown
    node.cycle(pressure=0.64)
    node.cycle(pressure=0.64)
    assert ctl.rollbacks_total == 2
    waited = 0
    while ctl.level == grown - 1 and waited < 20:
        node.cycle(pressure=0.5)
        waited += 1
    assert waited == 8                     # twice the first backoff


def test_a_step_within_the_noise_is_kept(sysfs):
    ctl = controller(sysfs, verify_intervals=2, noise_floor=0.2)
    node = Node(ctl)
    node.cycle(pressure=0.5)
    assert ctl.level == 1
    node.cycle(pressure=0.55)
    node.cycle(pressure=0.55)              # 10 % worse: inside noise_floor
    assert ctl.rollbacks_total == 0 and ctl.level >= 1


def test_a_violation_while_a_step_is_watched_counts_as_a_rollback(sysfs):
    ctl = controller(sysfs, start_level=4)
    node = Node(ctl)
    node.cycle(pressure=0.4)
    assert ctl.level == 5 and ctl._trial is not None
    node.cycle(pressure=1.2)
    assert ctl.level == 0 and ctl.rollbacks_total == 1


def test_a_missing_sli_holds_be_where_it_is_and_says_why(sysfs):
    ctl = controller(sysfs, start_level=5)
    node = Node(ctl)
    before = node.cycle(pressure=0.5)
    level = ctl.level
    for _ in range(5):
        held = node.cycle(pressure=None)
        assert ctl.level == level
        assert node.metric("slo_controller_hold", reason="missing_sli") == 1
        assert held == {t: before[t] for t in BE}       # the last setting, not the floor


def test_a_stale_sli_holds(sysfs):
    ctl = controller(sysfs, start_level=2, stale_cycles=3)
    node = Node(ctl)
    stale = {"web": {"apm_sli": 0.0006, "apm_slo": 0.002, "apm_sli_normalized": 3.33,
                     "apm_throughput_per_second": 900.0}, "batch1": {}, "batch2": {}}
    node.cycle(measurements=stale)
    level = ctl.level
    for _ in range(8):
        node.cycle(measurements=stale)
    assert ctl.level == level
    assert node.metric("slo_controller_hold", reason="stale_sli") == 1


def test_a_steady_sli_with_new_report_times_is_fresh_and_lets_be_grow(sysfs):
    # A calm service (or a p99 read from histogram buckets) reports the same values
    # again and again; its report time says they are new reports, not a stalled source.
    ctl = controller(sysfs, stale_cycles=3)
    node = Node(ctl)
    for cycle in range(1, 12):
        steady = {"web": {"apm_sli": 0.0006, "apm_slo": 0.002, "apm_sli_normalized": 3.33,
                          "apm_throughput_per_second": 900.0,
                          "apm_report_timestamp_seconds": 1000.0 + cycle},
                  "batch1": {}, "batch2": {}}
        node.cycle(measurements=steady)
        assert node.metric("slo_controller_hold", reason="stale_sli") is None
        assert node.metric("slo_controller_hold", reason="no_new_sli") is None
    assert ctl.level > 3


def test_a_report_time_that_stops_moving_is_stale_whatever_the_values(sysfs):
    ctl = controller(sysfs, start_level=2, stale_cycles=3)
    node = Node(ctl)
    levels = []
    for cycle in range(8):
        node.cycle(measurements={
            "web": {"apm_sli": 0.0006 + cycle * 1e-5, "apm_slo": 0.002,
                    "apm_sli_normalized": 3.0, "apm_throughput_per_second": 900.0 + cycle,
                    "apm_report_timestamp_seconds": 1000.0},
            "batch1": {}, "batch2": {}})
        levels.append(ctl.level)
    assert levels == [3] * 8       # the first report only: later values are no new report
    assert node.metric("slo_controller_hold", reason="stale_sli") == 1


def test_with_the_cpu_idle_knob_every_be_task_runs_as_idle_class_at_every_level(sysfs):
    ctl = controller(sysfs, knobs=["cpu_quota", "cpu_idle", "cpuset_cpus"])
    node = Node(ctl)
    for pressure in (0.5, 0.5, 0.5, 1.2, 0.5):
        allocations = node.cycle(pressure=pressure)
        assert {t: allocations[t]["cpu_idle"] for t in BE} == {"batch1": 1, "batch2": 1}
        assert all("cpu_shares" not in allocations[t] for t in BE)


def test_cpu_idle_and_cpu_shares_together_are_refused_at_start(sysfs):
    with pytest.raises(ValueError, match="cpu_idle or cpu_shares, not both"):
        controller(sysfs, knobs=["cpu_quota", "cpu_idle", "cpu_shares"])


def test_the_named_antagonist_is_cut_first(sysfs):
    ctl = controller(sysfs, start_level=8)
    node = Node(ctl)
    ctl.observe_anomalies([{"type": "contention", "resource": "cpu",
                            "contended_task_id": "web", "contending_task_ids": ["batch2"]}])
    allocations = node.cycle(pressure=0.7)
    assert allocations["batch2"]["cpu_quota"] < allocations["batch1"]["cpu_quota"]
    assert allocations["batch2"]["cpuset_cpus"] == "1-3"
    assert node.metric("slo_controller_named_cut", task_id="batch2") == 1
    node.cycle(pressure=1.2)              # broken: the named one is at the floor, the rest shrinks
    assert node.action() == "cut_named" and ctl.level == 6
    node.cycle(pressure=1.2)              # still broken: everything is cut
    assert node.action() == "cut" and ctl.level == 0


def test_no_hp_task_lets_be_grow(sysfs):
    labels = {"batch1": {"priority": "be"}}
    node = Node(controller(sysfs), labels=labels)
    for _ in range(5):
        node.cycle()
    assert node.ctl.level > 0


CHECKPOINT = {
    "policyName": "static",
    "defaultCpuSet": "0-1,6-7",
    "entries": {"6d9f1c5e-0a4b-4f7e-9d7c-2b1f0e3c4a55": {"db": "2-3"},
                "0b3c2a1d-7e6f-4d5c-8b9a-1f2e3d4c5b6a": {"app": "4-5", "sidecar": "5"}},
    "checksum": 2795364101,
}


def test_cpus_the_kubelet_gives_guaranteed_pods_or_reserves_are_never_given_to_be(tmp_path):
    sysfs = fake_sysfs(str(tmp_path / "sys"), cpus="0-7")
    state = tmp_path / "cpu_manager_state"
    state.write_text(json.dumps(CHECKPOINT))
    ctl = controller(sysfs, cpu_manager_state=str(state), reserved_cpus="0")
    node = Node(ctl, hp_cpus="2-3")
    node.platform = Platform(cpus=8, cores=8, sockets=1, numa_nodes=1, metrics={})
    seen = set()
    for _ in range(40):
        allocations = node.cycle(pressure=0.2)
        for task in BE:
            seen.add(allocations[task]["cpuset_cpus"])
    assert ctl.level == ctl.levels
    assert seen == {"1,6-7"}       # 0 reserved, 2-5 exclusive: never given
    assert node.metric("slo_controller_excluded_cpus", cpus="0,2-5") == 5
    # The kubelet pins another pod: the next cycle keeps off its CPUs too.
    CHECKPOINT["entries"]["new-pod"] = {"c": "7"}
    state.write_text(json.dumps(CHECKPOINT))
    os.utime(state, ns=(1, 1))     # a new mtime even within the clock's granularity
    assert node.cycle(pressure=0.2)["batch1"]["cpuset_cpus"] == "1,6"
    del CHECKPOINT["entries"]["new-pod"]


def test_an_unreadable_checkpoint_leaves_cpusets_alone(tmp_path):
    sysfs = fake_sysfs(str(tmp_path / "sys"), cpus="0-3")
    state = tmp_path / "cpu_manager_state"
    state.write_text('{"policyName": "static", "entries": {"p": {"c": "2-x"}}}')
    node = Node(controller(sysfs, cpu_manager_state=str(state)))
    allocations = node.cycle(pressure=0.2)
    assert all("cpuset_cpus" not in allocations[t] for t in BE)
    assert "cpu_quota" in allocations["batch1"]
    assert node.metric("slo_controller_cpu_manager_state_errors_total") == 1
    assert node.metric("slo_controller_hold", reason="cpu_manager_state") == 1


def test_a_value_someone_else_rewrote_is_reported_not_fought(sysfs):
    ctl = controller(sysfs, override_backoff=5)
    node = Node(ctl)
    node.cycle(pressure=0.7)               # hysteresis band: the level stays
    node.cycle(pressure=0.7)               # read back as set: confirmed
    node.current["batch1"]["cpuset_cpus"] = "0-3"   # another manager rewrites it
    allocations = node.cycle(pressure=0.7)
    assert allocations["batch1"]["cpuset_cpus"] == "0-3"   # theirs: nothing to write
    assert allocations["batch2"]["cpuset_cpus"] == "1-3"
    assert node.metric("slo_controller_overridden", task_id="batch1",
                       type="cpuset_cpus") == 1
    assert node.metric("slo_controller_overrides_total") == 1
    kept = 1
    while node.cycle(pressure=0.7)["batch1"]["cpuset_cpus"] == "0-3" and kept < 30:
        kept += 1
    assert kept == 5                       # override_backoff cycles, then OWCA's value again
    assert node.current["batch1"]["cpuset_cpus"] == "1-3"
    # Rewritten again once OWCA's value was back: it waits twice as long.
    node.cycle(pressure=0.7)
    node.current["batch1"]["cpuset_cpus"] = "0-3"
    kept = 0
    while node.cycle(pressure=0.7)["batch1"]["cpuset_cpus"] == "0-3" and kept < 30:
        kept += 1
    assert kept == 10 and ctl.overrides_total == 2


def test_a_value_not_yet_written_is_no_override(sysfs):
    ctl = controller(sysfs)
    node = Node(ctl)
    for _ in range(4):                      # owca-allocate never wrote (deferred, refused)
        node.cycle(pressure=0.7, apply=False)
    assert ctl.overrides_total == 0


RESCTRL = os.path.join(ROOT, "tests", "fixtures", "resctrl_l3_mb")


def resctrl_info():
    files = {}
    for name in INFO_FILES:
        path = os.path.join(RESCTRL, "info", *name.split("/"))
        if os.path.exists(path):
            files[name] = open(path).read()
    files["schemata"] = open(os.path.join(RESCTRL, "schemata")).read()
    return ResctrlInfo.parse(files)


def test_rdt_ways_and_bandwidth_follow_the_level_within_what_the_platform_takes(sysfs):
    # A recorded resctrl tree (no RDT on this machine): the values are checked against
    # its info/ as owca-allocate would; writing them is tests/test_resctrl.py's part.
    from owca.allocate.allocators.slo_controller import SloRdt
    ctl = controller(sysfs, knobs=["cpu_quota", "rdt"],
                     rdt=SloRdt(resctrlfs=RESCTRL, mb_floor=10))
    node = Node(ctl)
    info = resctrl_info()
    seen = []
    for _ in range(30):
        allocations = node.cycle(pressure=0.2)
        value = allocations["batch1"]["rdt"]
        validate_on_platform(allocation.validate("rdt", value), info)   # raises if the hardware would refuse it
        seen.append((int(value["l3"], 16), value["mb"]))
    assert seen[0][0] < seen[-1][0] == info.l3.cbm_mask
    assert seen[0][1] < seen[-1][1] == 100
    assert all(a <= b for a, b in zip(seen, seen[1:]))


def test_the_yaml_tag_builds_it_and_bad_values_fail_at_start(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("allocate:\n  allocator: !SloController\n    hp_labels: {role: hp}\n"
                    "    be_labels: {role: be}\n    grow_slack: 0.5\n")
    cfg = config.load_section(str(good), "allocate", AllocateConfig)
    assert isinstance(cfg.allocator, SloController) and cfg.allocator.grow_slack == 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text("allocate:\n  allocator: !SloController\n    grow_slack: 0.1\n"
                   "    shrink_slack: 0.2\n")
    with pytest.raises(config.ConfigError, match=r"bad.yaml:\d+: .*hysteresis"):
        config.load_section(str(bad), "allocate", AllocateConfig)


@pytest.mark.integration  # its Allocate keeps the default state directory, /var/lib/owca-allocate
def test_owca_allocate_hands_the_detectors_anomalies_to_the_controller(tmp_path):
    from fake_node import fake_cgroup_v2
    cgroupfs = fake_cgroup_v2(str(tmp_path / "cgroup"), {"/hp": [], "/be": []})
    sysfs = fake_sysfs(str(tmp_path / "sys"))
    ctl = SloController(sysfs=sysfs, start_level=6)
    stage = Allocate(AllocateConfig(allocator=ctl), {"--cgroupfs": cgroupfs, "--sysfs": sysfs,
                                                     "--resctrlfs": str(tmp_path / "none")})
    assert "anomalies" in stage.consumes
    tasks = {"hp": {"name": "hp", "cgroup_path": "/hp", "labels": {"priority": "hp"},
                    "resources": {}, "metrics": {"apm_sli_normalized": 1.5,
                                                 "apm_throughput_per_second": 10}},
             "be": {"name": "be", "cgroup_path": "/be", "labels": {"priority": "be"},
                    "resources": {}, "metrics": {}}}
    stage.process(frames.measurements_frame(1, {"platform_topology_cpus": 2}, tasks,
                                            ts=1.0, host="n"))
    stage.process(frames.anomalies_frame(1, [{"type": "contention", "resource": "cpu",
                                              "contended_task_id": "hp",
                                              "contending_task_ids": ["be"]}], ts=1.0,
                                         host="n"))
    out = stage.process(frames.measurements_frame(2, {"platform_topology_cpus": 2}, tasks,
                                                  ts=2.0, host="n"))
    names = {(s["name"], s.get("labels", {}).get("task_id")) for s in out[0]["metrics"]}
    assert ("slo_controller_named_cut", "be") in names
    stage.close()
    shutil.rmtree(cgroupfs)


def test_every_parameter_is_in_docs_control_md_with_its_default():
    import dataclasses
    import re
    with open(os.path.join(ROOT, "docs", "control.md")) as f:
        rows = {m.group(1): m.group(2) for m in
                re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", f.read(), re.M)}
    for f in dataclasses.fields(SloController):
        assert f.name in rows, f"docs/control.md: no row for {f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            assert re.match(rf"{default:g}\b", rows[f.name]), (f.name, rows[f.name])
