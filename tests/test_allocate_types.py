"""Allocation types, their units and validation, and the cgroup conversions: pure
functions on literal values."""
import pytest

from owca.core import allocation, config
from owca.core.allocation import InvalidAllocation, Topology, validate
from owca.allocate.allocators.static import StaticAllocator, StaticRule
from owca.allocate.memory_files import canonical_memory, memory_text, parse_memory
from owca.allocate.cgroup_files import (format_cpu_max, kernel_to_shares, parse_cpu_max,
                                        quota_to_us, shares_to_kernel, us_to_quota)

TWO_CPUS = Topology(cpus=frozenset((0, 1)), numa_nodes=frozenset((0,)))


@pytest.mark.parametrize("type_, value, canonical", [
    ("cpu_quota", 0.2, 0.2), ("cpu_quota", 1, 1.0),
    ("cpu_shares", 0.5, 0.5), ("cpu_shares", 100, 100.0), ("cpu_shares", 0.01, 0.01),
    ("cpuset_cpus", "1,0", "0-1"), ("cpuset_cpus", [1], "1"),
    ("cpuset_mems", "0", "0"),
    ("cpu_idle", True, 1), ("cpu_idle", False, 0), ("cpu_idle", 1, 1), ("cpu_idle", 0, 0),
    ("rdt", {"name": "owca-be", "l3": "0x3"}, {"name": "owca-be", "l3": {"*": "3"}}),
    ("rdt", {"name": "owca-be", "l3": {0: "f0", "1": 3}, "mb": {"*": 50}},
     {"name": "owca-be", "l3": {"0": "f0", "1": "3"}, "mb": {"*": 50}}),
    ("memory_min", 0, 0), ("memory_low", 1 << 30, 1 << 30), ("memory_high", "max", "max"),
    ("memory_max", 2.0 ** 20, 1 << 20), ("memory_reclaim", 4096, 4096),
    ("memory_high", (1 << 20) + 1, 1 << 20),    # whole pages, as the kernel keeps them
])
def test_valid_allocations_get_their_canonical_form(type_, value, canonical):
    assert validate(type_, value, TWO_CPUS) == canonical


@pytest.mark.parametrize("type_, value, reason", [
    ("cpu_quota", 0, "out of range (0, 1]"),
    ("cpu_quota", 1.5, "out of range (0, 1]"),
    ("cpu_quota", -0.1, "out of range"),
    ("cpu_quota", "0.2", "expected a number"),
    ("cpu_quota", True, "expected a number"),
    ("cpu_quota", float("nan"), "expected a number"),
    ("cpu_shares", 0.001, "out of range [0.01, 100]"),
    ("cpu_shares", 101, "out of range"),
    ("cpuset_cpus", "", "empty"),
    ("cpuset_cpus", "0-2", "CPU 2 not online (online: 0-1)"),
    ("cpuset_cpus", "x", "is not a number or a range"),
    ("cpuset_cpus", [0, -1], "expected a list"),
    ("cpuset_cpus", 1, "expected a list"),
    ("cpuset_mems", "1", "NUMA node 1 not online (online: 0)"),
    ("rdt", "owca-be", "expected {name, l3, mb}"),
    ("rdt", {"name": "be", "l3": "3"}, "must be 'owca-'"),
    ("rdt", {"name": "owca-../x", "l3": "3"}, "must be 'owca-'"),
    ("rdt", {"name": "owca-be"}, "neither l3 nor mb"),
    ("rdt", {"name": "owca-be", "l3": "xyz"}, "expected a hex mask"),
    ("rdt", {"name": "owca-be", "l3": 0}, "has no bits set"),
    ("rdt", {"name": "owca-be", "l3": {"a": "3"}}, "cache id 'a' is not a number"),
    ("rdt", {"name": "owca-be", "l3": {}}, "no cache ids"),
    ("rdt", {"name": "owca-be", "mb": 0}, "out of range (0, 100]"),
    ("rdt", {"name": "owca-be", "mb": 50.5}, "expected a whole percentage"),
    ("rdt", {"name": "owca-be", "l2": "3"}, "unknown key 'l2'"),
    ("cpu_idle", 2, "expected 0 or 1"),
    ("cpu_idle", "1", "expected 0 or 1"),
    ("cpu_idle", 0.5, "expected 0 or 1"),
    ("cpu_quotas", 0.1, "unknown allocation type"),
    ("memory_high", -1, "out of range [0, 2^60] bytes"),
    ("memory_max", "1G", "expected bytes (an integer) or \"max\""),
    ("memory_low", 1.5, "expected bytes"),
    ("memory_min", True, "expected bytes"),
    ("memory_min", 1 << 61, "out of range"),
    ("memory_reclaim", 0, "0 bytes reclaims nothing"),
    ("memory_reclaim", "max", "expected bytes"),
])
def test_invalid_allocations_are_refused_with_a_reason(type_, value, reason):
    with pytest.raises(InvalidAllocation) as e:
        validate(type_, value, TWO_CPUS)
    assert reason in str(e.value)
    assert "\n" not in str(e.value)


def test_without_a_topology_only_form_and_range_are_checked():
    assert validate("cpuset_cpus", "0-63") == "0-63"
    with pytest.raises(InvalidAllocation):
        validate("cpuset_cpus", "")


# -- cgroup conversions -------------------------------------------------------------

def test_quota_is_normalised_to_the_whole_platform():
    # 2 CPUs, 100 ms period: 0.1 of the platform is 0.2 of one CPU, 20 ms per period.
    assert quota_to_us(0.1, 100000, 2) == 20000
    assert quota_to_us(1.0, 100000, 2) == -1
    assert us_to_quota(20000, 100000, 2) == 0.1
    assert us_to_quota(-1, 100000, 2) == 1.0
    assert us_to_quota(300000, 100000, 2) == 1.5  # read back as it is, above 1.0


def test_quota_below_the_kernels_minimum_is_refused():
    assert quota_to_us(0.005, 100000, 2) == 1000
    with pytest.raises(InvalidAllocation, match="below the kernel's minimum of 1000 us"):
        quota_to_us(0.004, 100000, 2)


def test_cpu_max():
    assert parse_cpu_max("max 100000\n") == (-1, 100000)
    assert parse_cpu_max("20000 50000") == (20000, 50000)
    assert format_cpu_max(-1, 100000) == "max 100000"
    assert format_cpu_max(20000, 100000) == "20000 100000"
    with pytest.raises(ValueError):
        parse_cpu_max("max")


def test_shares_are_relative_to_the_kernels_default():
    assert shares_to_kernel(1.0, "v1") == 1024
    assert shares_to_kernel(1.0, "v2") == 100
    assert shares_to_kernel(0.01, "v1") == 10
    assert shares_to_kernel(0.01, "v2") == 1
    assert shares_to_kernel(100, "v1") == 102400
    assert shares_to_kernel(100, "v2") == 10000
    assert kernel_to_shares(512, "v1") == 0.5
    assert kernel_to_shares(250, "v2") == 2.5


def test_memory_values_are_whole_pages_and_max_is_each_hierarchys_spelling():
    import os
    page = os.sysconf("SC_PAGE_SIZE")
    assert memory_text(10 * page + 1, "v2") == str(10 * page)
    assert memory_text("max", "v2") == "max" and memory_text("max", "v1") == "-1"
    # v1 reads back -1 as the page counter's maximum: the same value.
    assert parse_memory("9223372036854771712\n") == "max" == parse_memory("max")
    assert canonical_memory("-1") == canonical_memory("9223372036854771712") == "max"
    assert parse_memory("8192") == 8192


# -- StaticAllocator ------------------------------------------------------------------

STATIC = """\
allocate:
  allocator: !StaticAllocator
    rules:
      - name: best effort
        labels: {priority: be}
        allocations:
          cpu_quota: 0.1
          rdt: {name: owca-be, l3: "3"}
      - labels: {priority: be, app: noisy}
        allocations: {cpu_quota: 0.05}
      - labels: {priority: hp}
        allocations: {cpu_shares: 4}
"""


def load(text):
    from owca.allocate.stage import AllocateConfig
    return config.load_section(None, "allocate", AllocateConfig, text=text)


def test_static_allocator_applies_matching_rules_in_order():
    allocator = load(STATIC).allocator
    assert isinstance(allocator, StaticAllocator)
    labels = {"a": {"priority": "be"}, "b": {"priority": "be", "app": "noisy"},
              "c": {"priority": "hp"}, "d": {}}
    allocations, anomalies, extra = allocator.allocate(None, {}, {}, labels, {})
    assert allocations == {
        "a": {"cpu_quota": 0.1, "rdt": {"name": "owca-be", "l3": {"*": "3"}}},
        "b": {"cpu_quota": 0.05, "rdt": {"name": "owca-be", "l3": {"*": "3"}}},
        "c": {"cpu_shares": 4.0},
    }
    assert anomalies == [] and extra == []


def test_static_allocator_withdraws_what_a_task_no_longer_matches():
    allocator = StaticAllocator(rules=[StaticRule(labels={"priority": "be"},
                                                  allocations={"cpu_quota": 0.1})])
    assert allocator.allocate(None, {}, {}, {"a": {"priority": "be"}}, {})[0] == \
        {"a": {"cpu_quota": 0.1}}
    assert allocator.allocate(None, {}, {}, {"a": {"priority": "hp"}}, {})[0] == \
        {"a": {"cpu_quota": None}}
    assert allocator.allocate(None, {}, {}, {"a": {"priority": "hp"}}, {})[0] == {}


@pytest.mark.parametrize("rule, line, reason", [
    ("{allocations: {cpu_quota: 2}}", 4, "out of range (0, 1]"),
    ("{allocations: {cpu_quotas: 0.1}}", 4, "unknown allocation type"),
    ("{allocations: {rdt: {name: be, l3: '3'}}}", 4, "must be 'owca-'"),
    ("{allocations: {}}", 4, "allocations: empty"),
    ("{labels: {priority: 1}, allocations: {cpu_quota: 0.1}}", 4, "expected str"),
])
def test_a_bad_rule_fails_at_start_with_its_line(rule, line, reason):
    text = f"allocate:\n  allocator: !StaticAllocator\n    rules:\n      - {rule}\n"
    with pytest.raises(config.ConfigError) as e:
        load(text)
    assert str(e.value).startswith(f"<config>:{line}:")
    assert reason in str(e.value)


def test_max_changes_per_cycle_must_be_positive():
    with pytest.raises(config.ConfigError, match="max_changes_per_cycle"):
        load("allocate:\n  max_changes_per_cycle: 0\n")


def test_the_example_configuration_loads(fixtures_dir):
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(fixtures_dir)), "configs",
                        "static-allocator.yaml")
    from owca.allocate.stage import AllocateConfig
    cfg = config.load_section(path, "allocate", AllocateConfig)
    assert isinstance(cfg.allocator, StaticAllocator)
    assert cfg.allocator.rules
    assert allocation.TYPES  # every type the docs name exists
