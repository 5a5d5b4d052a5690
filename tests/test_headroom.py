"""The headroom on synthetic measurements frames: the derivation and its terms, the risk
cut (slack, a broken SLO, the detector's flag, the controller's cut), the bounded growth
steps, the staleness fallback, the NUMA split, and the hook in owca-allocate.

A cycle is a frame with a `ts`: the headroom's clock is the frames', so no test
depends on time.  Node: 4 CPUs, 8 GiB; one HP task, one BE task.
"""
import pytest

from fake_node import fake_sysfs
from owca.allocate.headroom import PAGE_SIZE, Headroom, metric_name
from owca.allocate.stage import Allocate, AllocateConfig
from owca.core import frames

GIB = 2 ** 30
HZ = 100


class Node:
    """Measurements frames of a node whose usage the test sets each cycle."""

    def __init__(self, cpus=4, memory=8 * GIB, numa=None):
        self.cpus = cpus
        self.memory = memory
        self.numa = numa   # {node: (cpus, bytes)}
        self.ts = 1_700_000_000.0
        self.seq = 0
        self.ticks = {str(c): 0 for c in range(cpus)}
        self.task_cpu = {"hp": 0.0, "be": 0.0}

    def frame(self, hp_cores=1.0, be_cores=1.0, system_cores=0.5, hp_mem=2 * GIB,
              be_mem=1 * GIB, system_mem=1 * GIB, pressure=0.5, step=1.0, cpu=True,
              memory=True, sli_report=None, hp_cpus=None, hp_numa_pages=None):
        """The next cycle, `step` seconds on: busy CPU spread evenly over `hp_cpus` (all)."""
        self.seq += 1
        self.ts += step
        self.task_cpu["hp"] += hp_cores * step
        self.task_cpu["be"] += be_cores * step
        spread = hp_cpus or list(self.ticks)
        busy = (hp_cores + be_cores + system_cores) * step * HZ
        for c in self.ticks:
            self.ticks[c] += busy / len(self.ticks) if hp_cpus is None else \
                (hp_cores * step * HZ / len(spread) if c in spread else 0) + \
                (be_cores + system_cores) * step * HZ / len(self.ticks)
        platform = {"platform_topology_cpus": self.cpus}
        if cpu:
            platform["platform_cpu_usage"] = dict(self.ticks)
        if memory:
            platform["platform_mem_total_bytes"] = self.memory
            platform["platform_mem_usage_bytes"] = hp_mem + be_mem + system_mem
        if self.numa:
            share = {n: b / self.memory for n, (_, b) in self.numa.items()}
            platform["platform_mem_numa_used_bytes"] = {
                n: round((hp_mem + be_mem + system_mem) * s) for n, s in share.items()}
            platform["platform_mem_numa_free_bytes"] = {
                n: b - platform["platform_mem_numa_used_bytes"][n]
                for n, (_, b) in self.numa.items()}
        hp_metrics = {"task_cpu_usage_seconds": self.task_cpu["hp"], "task_mem_usage_bytes": hp_mem}
        if hp_numa_pages is not None:
            hp_metrics["task_mem_numa_pages"] = hp_numa_pages
        if pressure is not None:
            # A wrapper's report changes each time (its throughput, here the cycle);
            # `sli_report` repeats one report, as a stalled wrapper does.
            hp_metrics.update({"apm_sli": pressure if sli_report is None else sli_report,
                               "apm_slo": 1.0 if sli_report is None else sli_report / pressure,
                               "apm_throughput_per_second": self.seq if sli_report is None
                               else 1})
        tasks = {
            "hp": {"name": "hp", "cgroup_path": "/hp", "labels": {"priority": "hp"},
                   "metrics": hp_metrics},
            "be": {"name": "be", "cgroup_path": "/be", "labels": {"priority": "be"},
                   "metrics": {"task_cpu_usage_seconds": self.task_cpu["be"],
                               "task_mem_usage_bytes": be_mem}},
        }
        return frames.measurements_frame(self.seq, platform, tasks, ts=self.ts, host="n1")


def values(samples, labels=None):
    """{name: value} of the samples (with `labels`, only those that have them)."""
    out = {}
    for s in samples:
        if labels is None and s.get("labels"):
            continue
        if labels is not None and s.get("labels") != labels:
            continue
        out[s["name"]] = s["value"]
    return out


def reasons(samples):
    return {s["labels"]["reason"] for s in samples if s["name"] == "headroom_reason"}


def terms(samples, resource, labels=None):
    v = values(samples, labels)
    numa = labels is not None
    return {t: v[metric_name(resource, t, numa)]
            for t in ("capacity", "hp", "system", "reserve", "risk")}, \
        v[metric_name(resource, None, numa)]


def settle(h, node, cycles=200, **kw):
    out = None
    for _ in range(cycles):
        out = h.cycle(node.frame(**kw))
    return out


def test_calm_node_grows_to_capacity_less_hp_system_and_reserve():
    h = Headroom(grow_after=0, grow_step_ratio=0.05, window=30)
    out = settle(h, Node())
    cpu, cpu_headroom = terms(out, "cpu")
    assert cpu["capacity"] == 4
    assert cpu["hp"] == pytest.approx(1.0, abs=0.02)
    # the system's own use: the node's busy CPU less every task's (BE included)
    assert cpu["system"] == pytest.approx(0.5, abs=0.02)
    assert cpu["reserve"] == pytest.approx(0.2)
    assert cpu["risk"] == pytest.approx(0.0, abs=1e-6)
    assert cpu_headroom == pytest.approx(2.3, abs=0.03)
    mem, mem_headroom = terms(out, "memory")
    assert mem["hp"] == 2 * GIB and mem["system"] == 1 * GIB
    assert mem_headroom == pytest.approx(8 * GIB - 3 * GIB - 0.05 * 8 * GIB)
    assert reasons(out) == {"none"}


@pytest.mark.parametrize("resource", ["cpu", "memory"])
def test_the_terms_add_up_in_every_cycle(resource):
    h = Headroom(grow_after=5)
    node = Node()
    for i in range(120):
        out = h.cycle(node.frame(hp_cores=1 + (i % 7) / 3, pressure=0.3 + (i % 11) / 12,
                                 hp_mem=GIB * (1 + i % 5)))
        t, headroom = terms(out, resource)
        assert t["capacity"] - t["hp"] - t["system"] - t["reserve"] - t["risk"] == \
            pytest.approx(headroom, abs=1e-3 * max(1, t["capacity"]) * 1e-3)
        assert min(t.values()) >= 0 and headroom >= 0


def test_hp_usage_is_the_percentile_of_the_window_not_the_last_cycle():
    h = Headroom(grow_after=0, percentile=95, window=100)
    node = Node()
    for i in range(100):   # 1 core, but 3.5 cores in every tenth second
        out = h.cycle(node.frame(hp_cores=3.5 if i % 10 == 0 else 1.0, be_cores=0,
                                 system_cores=0))
    cpu, _ = terms(out, "cpu")
    assert cpu["hp"] == pytest.approx(3.5, abs=0.02)   # the 95th: among the peaks
    h99 = Headroom(grow_after=0, percentile=50, window=100)
    node = Node()
    for i in range(100):
        out = h99.cycle(node.frame(hp_cores=3.5 if i % 10 == 0 else 1.0, be_cores=0,
                                   system_cores=0))
    assert terms(out, "cpu")[0]["hp"] == pytest.approx(1.0, abs=0.02)


def test_growth_is_bounded_per_cycle_and_waits_after_an_alarm():
    h = Headroom(grow_after=10, grow_step_ratio=0.02, window=30)
    node = Node()
    seen = []
    for _ in range(20):
        out = h.cycle(node.frame())
        seen.append(values(out)["headroom_cpu_cores"])
        if seen[-1] > 0:
            assert "growth_step" in reasons(out)
    steps = [b - a for a, b in zip(seen, seen[1:])]
    assert max(steps) == pytest.approx(0.02 * 4)
    assert seen[-1] > seen[15] > 0
    for _ in range(30):
        out = h.cycle(node.frame())
    assert values(out)["headroom_cpu_cores"] == pytest.approx(2.3, abs=0.03)
    # an SLO broken: zero at once, then no growth for grow_after seconds
    out = h.cycle(node.frame(pressure=1.2))
    assert values(out)["headroom_cpu_cores"] == 0 and "slo_broken" in reasons(out)
    after = [h.cycle(node.frame()) for _ in range(10)]
    assert [values(out)["headroom_cpu_cores"] for out in after[:9]] == [0] * 9
    assert all("growth_wait" in reasons(out) for out in after[:9])
    later = [values(h.cycle(node.frame()))["headroom_cpu_cores"] for _ in range(5)]
    assert later[-1] > 0


def test_narrowing_slack_shrinks_at_once_in_proportion():
    h = Headroom(grow_after=0, grow_step_ratio=1, calm_slack=0.4, window=30)
    node = Node()
    settle(h, node, 40, pressure=0.5)                  # slack 0.5: no cut
    out = h.cycle(node.frame(pressure=0.8))            # slack 0.2: half of the rest withheld
    cpu, headroom = terms(out, "cpu")
    assert values(out)["headroom_risk_ratio"] == pytest.approx(0.5)
    assert cpu["risk"] == pytest.approx(headroom, rel=0.02)
    assert "slack" in reasons(out)


def test_the_detectors_flag_on_an_hp_task_cuts_and_holds_growth():
    h = Headroom(grow_after=0, grow_step_ratio=1, contention_cut=0.5, contention_hold=5,
                 window=30)
    node = Node()
    full = values(settle(h, node, 40))["headroom_cpu_cores"]
    h.observe_anomalies([{"contended_task_id": "be", "contending_task_ids": ["hp"]}], {"hp"},
                        node.ts)   # a BE task contended: not the node's problem
    assert values(h.cycle(node.frame()))["headroom_cpu_cores"] == pytest.approx(full, rel=0.01)
    h.observe_anomalies([{"contended_task_id": "hp", "contending_task_ids": ["be"]}], {"hp"},
                        node.ts)
    out = h.cycle(node.frame())
    assert values(out)["headroom_cpu_cores"] == pytest.approx(full / 2, rel=0.02)
    assert "contention" in reasons(out)
    for _ in range(6):
        out = h.cycle(node.frame())
    assert "contention" not in reasons(out)


def test_the_controllers_cut_or_rollback_counts_as_an_alarm():
    h = Headroom(grow_after=0, grow_step_ratio=1, contention_cut=0.25, window=30)
    node = Node()
    full = values(settle(h, node, 40))["headroom_cpu_cores"]
    h.observe_allocator([frames.sample("slo_controller_decision", 1, {"action": "rollback"})])
    out = h.cycle(node.frame())
    assert values(out)["headroom_cpu_cores"] == pytest.approx(full * 0.75, rel=0.02)
    assert "controller" in reasons(out)
    h.observe_allocator([frames.sample("slo_controller_decision", 1, {"action": "cut"})])
    assert values(h.cycle(node.frame()))["headroom_cpu_cores"] == 0
    h.observe_allocator([frames.sample("slo_controller_decision", 1, {"action": "hold"})])
    assert "controller" not in reasons(h.cycle(node.frame()))


def test_missing_inputs_hold_then_go_to_zero_after_stale_after_and_say_why():
    h = Headroom(grow_after=0, grow_step_ratio=1, stale_after=10, window=30)
    node = Node()
    full = values(settle(h, node, 40))["headroom_cpu_cores"]
    out = h.cycle(node.frame(cpu=False))
    assert values(out)["headroom_cpu_cores"] == pytest.approx(full, rel=0.02)
    assert "input_missing" in reasons(out)
    for _ in range(10):
        out = h.cycle(node.frame(cpu=False))
    assert values(out)["headroom_cpu_cores"] == 0
    assert values(out)["headroom_memory_bytes"] == 0
    assert reasons(out) == {"stale_cpu"}
    assert values(out, {"input": "cpu"})["headroom_input_age_seconds"] == 11
    # back: the first frame gives no rate yet (the one before had no CPU figures), then
    # it grows again from zero
    out = h.cycle(node.frame())
    assert values(out)["headroom_cpu_cores"] == 0 and reasons(out) == {"stale_cpu"}
    out = h.cycle(node.frame())
    assert 0 < values(out)["headroom_cpu_cores"] and reasons(out) == {"none"}


def test_an_hp_task_without_an_sli_or_with_a_frozen_one_goes_to_zero():
    h = Headroom(grow_after=0, grow_step_ratio=1, stale_after=5, window=30)
    node = Node()
    settle(h, node, 20)
    for _ in range(6):
        out = h.cycle(node.frame(pressure=None))
    assert values(out)["headroom_cpu_cores"] == 0 and reasons(out) == {"stale_sli"}
    settle(h, node, 3)
    for _ in range(7):   # the same report over and over: the wrapper stalled
        out = h.cycle(node.frame(sli_report=0.123))
    assert values(out)["headroom_cpu_cores"] == 0 and reasons(out) == {"stale_sli"}
    nosli = Headroom(grow_after=0, grow_step_ratio=1, stale_after=5, window=30,
                     require_sli=False)
    assert values(settle(nosli, Node(), 20, pressure=None))["headroom_cpu_cores"] > 0


def test_measurements_stopping_for_longer_than_stale_after_restart_from_zero():
    h = Headroom(grow_after=0, grow_step_ratio=1, stale_after=10, window=30)
    node = Node()
    settle(h, node, 30)
    out = h.cycle(node.frame(step=60))   # the first frame after a minute's silence
    assert values(out)["headroom_cpu_cores"] == 0
    assert {"stale_cpu", "stale_memory", "stale_sli"} >= reasons(out) > set()


def test_each_numa_node_has_its_own_terms_and_the_node_is_their_sum(tmp_path):
    sysfs = fake_sysfs(str(tmp_path / "sys"), cpus="0-3")
    for node, cpus in (("0", "0-1"), ("1", "2-3")):
        d = tmp_path / "sys" / "devices" / "system" / "node" / f"node{node}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpulist").write_text(cpus + "\n")
    h = Headroom(grow_after=0, grow_step_ratio=1, window=30, sysfs=sysfs)
    node = Node(numa={"0": ([0, 1], 4 * GIB), "1": ([2, 3], 4 * GIB)})
    out = None
    for _ in range(30):   # the HP task runs on node 0's CPUs only (its cpuset says so)
        f = node.frame(hp_cores=1.5, be_cores=0, system_cores=0, hp_cpus=["0", "1"],
                       hp_numa_pages={"0": 2 * GIB // PAGE_SIZE, "1": 0})
        out = h.cycle(f, {"hp": {"cpuset_cpus": "0-1"}, "be": {"cpuset_cpus": "0-3"}})
    n0, h0 = terms(out, "cpu", {"numa_node": "0"})
    n1, h1 = terms(out, "cpu", {"numa_node": "1"})
    assert n0["capacity"] == n1["capacity"] == 2
    assert n0["hp"] == pytest.approx(1.5, abs=0.02) and n1["hp"] == 0
    assert h0 < h1
    whole, headroom = terms(out, "cpu")
    assert headroom == pytest.approx(h0 + h1)
    for t in whole:
        assert whole[t] == pytest.approx(n0[t] + n1[t])
    # memory: the HP task's pages are all on node 0 (task_mem_numa_pages)
    m0, _ = terms(out, "memory", {"numa_node": "0"})
    m1, _ = terms(out, "memory", {"numa_node": "1"})
    assert m0["capacity"] == m1["capacity"] == 4 * GIB
    assert m0["hp"] == 2 * GIB and m1["hp"] == 0


def test_cpus_limits_the_capacity_and_the_busy_time_counted():
    h = Headroom(grow_after=0, grow_step_ratio=1, window=30, cpus="0-1")
    node = Node()
    out = None
    for _ in range(20):   # 2.5 cores busy, spread over the 4 CPUs: 1.25 on CPUs 0-1
        out = h.cycle(node.frame())
    cpu, headroom = terms(out, "cpu")
    assert cpu["capacity"] == 2
    assert cpu["hp"] == pytest.approx(1.0) and cpu["system"] == pytest.approx(0)
    assert headroom == pytest.approx(2 - 1 - 0.1)
    # CPUs that are not online: no CPU capacity, and no error
    out = Headroom(cpus="7", window=30).cycle(node.frame())
    assert terms(out, "cpu") == ({"capacity": 0, "hp": 0, "system": 0, "reserve": 0,
                                  "risk": 0}, 0)
    out = Headroom(cpus="7", window=30)
    for _ in range(3):
        samples = out.cycle(node.frame())
    assert terms(samples, "cpu")[1] == 0


@pytest.mark.parametrize("bad", [dict(percentile=0), dict(cpus="x"), dict(window=0), dict(reserve_ratio=1),
                                 dict(calm_slack=0), dict(grow_step_ratio=0),
                                 dict(stale_after=0), dict(contention_cut=2)])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        Headroom(**bad)


def test_owca_allocate_puts_the_headroom_in_every_allocations_frame(tmp_path):
    stage = Allocate(AllocateConfig(headroom=Headroom(grow_after=0, window=30)),
                     {"--dry-run": True, "--cgroupfs": str(tmp_path)})
    node = Node()
    out = []
    for _ in range(5):
        out = stage.process(node.frame())
        anomalies = frames.anomalies_frame(node.seq, [
            {"type": "contention", "resource": "cpu", "contended_task_id": "hp",
             "contending_task_ids": ["be"], "uuid": "x"}], ts=node.ts, host="n1")
        stage.process(anomalies)
    allocations = [f for f in out if f["kind"] == "allocations"][0]
    names = {s["name"] for s in allocations["metrics"]}
    assert {"headroom_cpu_cores", "headroom_memory_risk_bytes", "headroom_reason",
            "headroom_errors_total"} <= names
    assert "contention" in reasons(allocations["metrics"])
    assert "anomalies" in stage.consumes
    stage.close()
