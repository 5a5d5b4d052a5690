"""The memory policy (!MemoryProtection) on synthetic measurements: what it protects,
when it lowers and raises BE memory.high, when it reclaims, and why (its decision
metric); then once through owca-allocate onto a hand-made cgroup2 tree (its memory
files are plain files: the kernel's effect is tests/vm's and
tests/test_allocate_memory_cgroups.py's)."""
import os

import pytest

from owca.core import config, frames
from owca.core.kernel import PAGE_SIZE
from owca.plugin import Platform
from owca.allocate.allocators.memory_protection import MemoryProtection
from owca.allocate.allocators.slo_controller import SloController
from owca.allocate.stage import Allocate, AllocateConfig
from test_allocate import cg, node, put, samples  # noqa: F401

MIB = 1 << 20
GIB = 1 << 30
LABELS = {"hp": {"priority": "hp"}, "be": {"priority": "be"}}


def hp_metrics(ws=512 * MIB, psi=0.0, refaults=0):
    return {"task_mem_working_set_bytes": ws, "task_mem_usage_bytes": ws,
            "task_pressure_avg10_percent": {"memory": {"some": psi, "full": psi / 2}},
            "task_mem_workingset_refaults": {"anon": 0, "file": refaults}}


def be_metrics(usage=2 * GIB, psi=0.0):
    return {"task_mem_usage_bytes": usage, "task_mem_working_set_bytes": usage,
            "task_pressure_avg10_percent": {"memory": {"some": psi}}}


class Run:
    """A policy fed one synthetic cycle at a time."""

    def __init__(self, **options):
        self.policy = MemoryProtection(hierarchy=options.pop("hierarchy", "v2"), **options)

    def cycle(self, hp=None, be=None, node_psi=0.0, resources=None, labels=LABELS):
        platform = {"platform_mem_total_bytes": 16 * GIB,
                    "platform_mem_pressure_avg10_percent": {"some": node_psi}}
        allocations, anomalies, metrics = self.policy.allocate(
            Platform.from_frame({"platform": platform}),
            {"hp": hp or hp_metrics(), "be": be or be_metrics()},
            resources or {}, labels, {})
        assert anomalies == []
        return allocations, metrics


def decisions(metrics):
    return sorted((s["labels"]["task_id"], s["labels"]["action"], s["labels"]["reason"])
                  for s in metrics if s["name"] == "memory_protection_decision")


def test_hp_is_protected_at_its_working_set_with_a_margin_and_not_rewritten_for_noise():
    run = Run()
    allocations, metrics = run.cycle(hp=hp_metrics(ws=1000 * MIB))
    want = int(1000 * MIB * 1.1) // PAGE_SIZE * PAGE_SIZE
    assert allocations == {"hp": {"memory_min": want}}
    assert ("hp", "protect", "working_set") in decisions(metrics)
    allocations, metrics = run.cycle(hp=hp_metrics(ws=1050 * MIB))   # within 10 %
    assert allocations == {}
    assert samples({"metrics": metrics}, "memory_protection_hp_protected_bytes") == \
        {(("task_id", "hp"),): want}
    allocations, _ = run.cycle(hp=hp_metrics(ws=1300 * MIB))
    assert allocations == {"hp": {"memory_min": int(1300 * MIB * 1.1) // PAGE_SIZE * PAGE_SIZE}}


def test_hp_protected_at_its_request_with_memory_low():
    run = Run(protect="request", protect_with="low")
    allocations, metrics = run.cycle(resources={"hp": {"mem_bytes": 768 * MIB}})
    assert allocations == {"hp": {"memory_low": 768 * MIB}}
    assert ("hp", "protect", "request") in decisions(metrics)
    allocations, metrics = Run(protect="request").cycle(resources={})
    assert allocations == {} and ("hp", "hold", "no_signal") in decisions(metrics)


@pytest.mark.parametrize("hp, node_psi, reason", [
    (hp_metrics(psi=12.0), 0.0, "hp_pressure"),
    (hp_metrics(), 25.0, "node_pressure"),
])
def test_pressure_lowers_be_memory_high_fast_down_to_its_floor(hp, node_psi, reason):
    run = Run(protect="none", be_floor_bytes=1 * GIB)
    allocations, metrics = run.cycle(hp=hp, node_psi=node_psi)
    first = int(2 * GIB * 0.8) // PAGE_SIZE * PAGE_SIZE      # from its usage, 20 % less
    assert allocations == {"be": {"memory_high": first}}
    assert decisions(metrics) == [("be", "lower", reason)]
    assert samples({"metrics": metrics}, "memory_protection_trigger") == \
        {(("reason", reason),): 1}
    allocations, _ = run.cycle(hp=hp, node_psi=node_psi)
    assert allocations == {"be": {"memory_high": int(first * 0.8) // PAGE_SIZE * PAGE_SIZE}}
    for _ in range(5):
        allocations, metrics = run.cycle(hp=hp, node_psi=node_psi)
    assert allocations == {} and decisions(metrics) == [("be", "hold", "floor")]
    assert run.policy._be["be"].high == 1 * GIB


def test_hp_refaults_per_cycle_trigger_from_the_second_cycle():
    run = Run(protect="none", hp_refault_pages=100)
    assert run.cycle(hp=hp_metrics(refaults=10_000))[0] == {}    # no delta yet
    assert run.cycle(hp=hp_metrics(refaults=10_050))[0] == {}    # 50: under the threshold
    allocations, metrics = run.cycle(hp=hp_metrics(refaults=10_500))
    assert "memory_high" in allocations["be"]
    assert decisions(metrics) == [("be", "lower", "hp_refaults")]
    assert samples({"metrics": metrics}, "memory_protection_hp_refault_pages") == \
        {(("task_id", "hp"),): 450}


def test_be_memory_high_is_raised_slowly_when_calm_and_released_above_the_node():
    run = Run(protect="none", calm_cycles=3)
    run.cycle(hp=hp_metrics(psi=50))
    high = run.policy._be["be"].high
    actions = [decisions(run.cycle()[1]) for _ in range(3)]
    assert actions[:2] == [[("be", "hold", "waiting")]] * 2
    assert actions[2] == [("be", "raise", "calm")]
    assert run.policy._be["be"].high == int(high * 1.05) // PAGE_SIZE * PAGE_SIZE
    # Near the node's memory the task gets its own value back.
    run.policy._be["be"].high = 16 * GIB - MIB
    for _ in range(3):
        allocations, metrics = run.cycle()
    assert allocations == {"be": {"memory_high": None}}
    assert decisions(metrics) == [("be", "release", "calm")]


def test_pressure_again_while_raising_lowers_at_once():
    run = Run(protect="none")
    run.cycle(hp=hp_metrics(psi=50))
    high = run.policy._be["be"].high
    run.cycle()
    allocations, _ = run.cycle(hp=hp_metrics(psi=50))
    assert allocations["be"]["memory_high"] < high


def test_proactive_reclaim_only_while_be_pressure_is_under_its_target():
    run = Run(protect="none", reclaim=True, reclaim_fraction=0.01)
    allocations, metrics = run.cycle(be=be_metrics(usage=1 * GIB, psi=0.0))
    assert allocations == {"be": {"memory_reclaim": int(GIB * 0.01) // PAGE_SIZE * PAGE_SIZE}}
    assert decisions(metrics) == [("be", "reclaim", "calm")]
    allocations, metrics = run.cycle(be=be_metrics(usage=1 * GIB, psi=3.0))
    assert allocations == {} and decisions(metrics) == [("be", "hold", "be_pressure")]
    # Not while the trigger is on: memory.high does the work then.
    allocations, _ = run.cycle(hp=hp_metrics(psi=50), be=be_metrics(usage=1 * GIB))
    assert "memory_reclaim" not in allocations["be"]


def test_no_reclaim_where_the_kernel_has_no_memory_reclaim():
    run = Run(protect="none", reclaim=True)
    run.policy._refused = {"memory_reclaim"}
    assert run.cycle()[0] == {}


def test_v1_protects_with_the_soft_limit_and_limits_be_only_when_asked():
    run = Run(hierarchy="v1")
    allocations, _ = run.cycle(hp=hp_metrics(psi=50))
    assert set(allocations) == {"hp"} and "memory_low" in allocations["hp"]
    allocations, _ = Run(hierarchy="v1", v1_be_limit=True).cycle(hp=hp_metrics(psi=50))
    assert "memory_max" in allocations["be"]


def test_without_a_memory_controller_nothing_is_asked(tmp_path):
    os.makedirs(tmp_path / "memory")          # neither v1's files nor cgroup2's controller
    policy = MemoryProtection(cgroupfs=str(tmp_path), v1_be_limit=True, reclaim=True)
    allocations, _, _ = policy.allocate(
        Platform.from_frame({"platform": {}}),
        {"hp": hp_metrics(psi=50), "be": be_metrics()}, {}, LABELS, {})
    assert allocations == {}


def test_a_task_no_longer_hp_or_be_gets_its_own_values_back():
    run = Run()
    run.cycle(hp=hp_metrics(psi=50))
    neither = {"hp": {}, "be": {}}
    allocations, _ = run.cycle(labels=neither)
    assert allocations == {"hp": {"memory_min": None}, "be": {"memory_high": None}}
    assert run.cycle(labels=neither)[0] == {}


@pytest.mark.parametrize("body, reason", [
    ("raise_fraction: 0.3", "down fast, up slowly"),
    ("protect: rss", "protect: working_set, request or none"),
    ("be_floor_bytes: 0", "be_floor_bytes: at least a page"),
])
def test_a_bad_memory_policy_fails_at_start_with_its_line(body, reason):
    text = f"allocate:\n  allocator: !MemoryProtection\n    {body}\n"
    with pytest.raises(config.ConfigError) as e:
        config.load_section(None, "allocate", AllocateConfig, text=text)
    assert str(e.value).startswith("<config>:") and reason in str(e.value)


def test_inside_the_slo_controller_memory_goes_with_the_cpu_levels():
    controller = config.load_section(None, "allocate", AllocateConfig, text=(
        "allocate:\n  allocator: !SloController\n"
        "    memory: !MemoryProtection {hierarchy: v2, protect: none}\n")).allocator
    assert isinstance(controller, SloController)
    allocations, _, metrics = controller.allocate(
        Platform.from_frame({"platform": {"platform_topology_cpus": 2,
                                          "platform_mem_total_bytes": 16 * GIB}}),
        {"hp": hp_metrics(psi=50), "be": be_metrics()}, {}, LABELS, {})
    assert "memory_high" in allocations["be"]
    assert any(s["name"] == "memory_protection_decision" for s in metrics)


def test_through_owca_allocate_onto_cgroup2_files(node):  # noqa: F811
    for task in ("/owca/a", "/owca/b"):
        for name, text in (("memory.min", "0"), ("memory.high", "max")):
            put(node, task, name, text)
    frame = frames.validate(frames.decode(frames.encode(frames.measurements_frame(
        1, {"platform_topology_cpus": 2, "platform_mem_total_bytes": 16 * GIB},
        {"a": {"name": "a", "cgroup_path": "/owca/a", "labels": {"priority": "hp"},
               "resources": {}, "metrics": hp_metrics(ws=100 * MIB, psi=40.0)},
         "b": {"name": "b", "cgroup_path": "/owca/b", "labels": {"priority": "be"},
               "resources": {}, "metrics": be_metrics(usage=1 * GIB)}},
        ts=1.0, host="n1"))))
    s = Allocate(AllocateConfig(allocator=MemoryProtection(hierarchy="v2")),
                 {**node, "--no-timing": True})
    out = s.process(frame)[0]
    assert out["errors"] == []
    assert int(cg(node, "/owca/a", "memory.min")) == int(100 * MIB * 1.1) // PAGE_SIZE * PAGE_SIZE
    assert int(cg(node, "/owca/b", "memory.high")) == int(GIB * 0.8) // PAGE_SIZE * PAGE_SIZE
    assert samples(out, "allocation_memory_high_bytes") == \
        {(("task_id", "b"),): int(GIB * 0.8) // PAGE_SIZE * PAGE_SIZE}
    s.close()
    assert cg(node, "/owca/a", "memory.min") == "0"
    assert cg(node, "/owca/b", "memory.high") == "max"
    assert not os.path.exists(os.path.join(node["--state-dir"], "allocations.journal"))


def test_every_parameter_is_in_docs_control_md_with_its_default():
    import dataclasses
    import re
    from conftest import ROOT
    with open(os.path.join(ROOT, "docs", "control.md")) as f:
        text = f.read()
    section = text[text.index("## Memory"):text.index("### Memory: the lab runs")]
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `(\w+)` \| ([^|]+) \|", section, re.M)}
    for f in dataclasses.fields(MemoryProtection):
        assert f.name in rows, f"docs/control.md, Memory: no row for {f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            shown = str(default) if isinstance(default, int) else f"{default:g}"
            assert re.match(rf"{shown}\b", rows[f.name]), (f.name, rows[f.name])


def test_memory_reclaim_is_one_write_a_cycle_bounded_counted_and_never_restored(node):  # noqa: F811
    from test_allocate import Scripted, measurements
    with open(os.path.join(node["--cgroupfs"], "memory.reclaim"), "w"):
        pass                                   # the kernel has memory.reclaim (5.19+)
    put(node, "/owca/a", "memory.reclaim", "")
    ask = {"a": {"memory_reclaim": GIB}}
    s = Allocate(AllocateConfig(allocator=Scripted(ask, ask, {"a": {"memory_reclaim": None}}),
                                memory_reclaim_max_bytes=64 * MIB),
                 {**node, "--no-timing": True})
    counters = []
    for seq in (1, 2):
        out = s.process(measurements(seq))[0]
        assert out["errors"] == []
        assert out["allocations"] == {"a": {"memory_reclaim": 64 * MIB}}    # the bound
        assert cg(node, "/owca/a", "memory.reclaim") == str(64 * MIB)
        counters.append(samples(out, "allocation_memory_reclaim_requested_bytes_total"))
    assert counters == [{(): 64 * MIB}, {(): 128 * MIB}]
    put(node, "/owca/a", "memory.reclaim", "")
    out = s.process(measurements(3))[0]        # withdrawing an action: nothing to do
    assert out["allocations"] == {} and out["restored"] == {} and out["errors"] == []
    assert cg(node, "/owca/a", "memory.reclaim") == ""
    s.close()
    assert not os.path.exists(os.path.join(node["--state-dir"], "allocations.journal"))


def test_a_type_the_kernel_lacks_is_refused_once_said_and_its_withdrawal_is_silent(
        node, caplog):  # noqa: F811
    import logging
    from test_allocate import Scripted, measurements
    caplog.set_level(logging.INFO, logger="owca.allocate")
    ask = {"a": {"memory_reclaim": MIB}}   # the fake cgroup2 root has no memory.reclaim
    s = Allocate(AllocateConfig(allocator=Scripted(ask, ask, {"a": {"memory_reclaim": None}})),
                 {**node, "--no-timing": True})
    reasons = [[e["reason"] for e in s.process(measurements(seq))[0]["errors"]]
               for seq in (1, 2, 3)]
    assert reasons[:2] == [["the kernel has no memory.reclaim (added in Linux 5.19)"]] * 2
    assert reasons[2] == []
    said = [r for r in caplog.records if "cannot be written" in r.message]
    assert len(said) == 1 and said[0].message.startswith(
        "memory: memory_reclaim cannot be written on this kernel's cgroup2")
    assert not os.path.exists(os.path.join(node["--cgroupfs"], "owca", "a", "memory.reclaim"))
    s.close()
