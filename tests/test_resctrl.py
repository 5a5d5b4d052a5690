"""RDT allocation against resctrl trees that follow the kernel's documented formats.

There is no RDT on this machine: tests/fixtures/resctrl_*/ are hand-written
mounts (their READMEs say what they cannot cover) driven through
tests/fake_node.FakeResctrlKernel, which does what the kernel documents for
mkdir, rmdir, and writes to `tasks` and `schemata`.  The tasks' cgroups are a
cgroup2 tree of plain files whose cgroup.threads give their thread ids.
"""
import errno
import os

import pytest

from fake_node import (FakeResctrlKernel, changed_files, copy_tree, fake_cgroup_v2,
                       fake_sysfs, snapshot)
from owca.core import frames, metrics
from owca.allocate.stage import Allocate, AllocateConfig
from owca.core.allocation import InvalidAllocation, validate_rdt
from owca.allocate.resctrl import (BandwidthInfo, CacheInfo, ResctrlInfo, check_bandwidth,
                                   check_mask, validate_on_platform)
from owca.core.resctrl import format_schemata, parse_schemata
from test_allocate import Scripted, samples

# -- pure parsing and validation ----------------------------------------------------------


def test_parse_schemata_as_the_kernel_prints_it():
    assert parse_schemata("L3:0=7ff;1=7ff\nMB:0=100;1=100\n") == \
        {"L3": {"0": "7ff", "1": "7ff"}, "MB": {"0": "100", "1": "100"}}
    # Names are right-aligned to the longest one (with CDP: L3CODE, L3DATA).
    assert parse_schemata("L3DATA:0=fffff;1=fffff\nL3CODE:0=fffff;1=fffff\n"
                          "    MB:0=100;1=100\n")["MB"] == {"0": "100", "1": "100"}
    assert parse_schemata("L3:2=3c0;\n") == {"L3": {"2": "3c0"}}
    with pytest.raises(ValueError):
        parse_schemata("L3 0=7ff")
    with pytest.raises(ValueError):
        parse_schemata("L3:x=7ff")


def test_format_schemata_orders_cache_ids_as_numbers():
    assert format_schemata({"L3": {"10": "3", "2": "3"}, "MB": {"0": 50}}) == \
        "L3:2=3;10=3\nMB:0=50\n"


def fixture_info(fixtures_dir, name):
    root = os.path.join(fixtures_dir, name)
    files = {}
    for key in ("L3/cbm_mask", "L3/min_cbm_bits", "L3/num_closids", "MB/min_bandwidth",
                "MB/bandwidth_gran", "MB/num_closids"):
        path = os.path.join(root, "info", key)
        if os.path.exists(path):
            files[key] = open(path).read()
    files["schemata"] = open(os.path.join(root, "schemata")).read()
    return ResctrlInfo.parse(files)


def test_info_of_a_platform_with_l3_and_mb(fixtures_dir):
    info = fixture_info(fixtures_dir, "resctrl_l3_mb")
    assert info.l3 == CacheInfo(cbm_mask=0x7ff, min_cbm_bits=1, num_closids=16)
    assert info.mb == BandwidthInfo(min_bandwidth=10, bandwidth_gran=10, num_closids=8)
    assert info.num_closids == 8       # the kernel uses the smallest
    assert info.domains == {"L3": ["0", "1"], "MB": ["0", "1"]}


def test_info_of_a_platform_with_l3_only(fixtures_dir):
    info = fixture_info(fixtures_dir, "resctrl_l3_only")
    assert info.mb is None and info.num_closids == 4
    assert info.l3.min_cbm_bits == 2


def test_cdp_and_mba_in_mbps_are_reported_unsupported():
    info = ResctrlInfo.parse({
        "L3CODE/cbm_mask": "7ff", "MB/min_bandwidth": "10", "MB/bandwidth_gran": "10",
        "MB/num_closids": "8",
        "schemata": "L3DATA:0=7ff\nL3CODE:0=7ff\n    MB:0=4294967295\n"})
    assert info.l3 is None and info.mb is None
    value = validate_rdt({"name": "owca-x", "l3": "3", "mb": 50})
    with pytest.raises(InvalidAllocation, match="code/data prioritisation"):
        validate_on_platform(value, info)
    with pytest.raises(InvalidAllocation, match="mba_MBps"):
        validate_on_platform({"name": "owca-x", "mb": {"*": 50}}, info)


L3 = CacheInfo(cbm_mask=0x7ff, min_cbm_bits=2, num_closids=16)


@pytest.mark.parametrize("mask, reason", [
    (0x800, "outside cbm_mask 7ff"),
    (0xfff, "outside cbm_mask 7ff"),
    (0x5, "not contiguous"),
    (0x606, "not contiguous"),
    (0x8, "1 bit(s), fewer than min_cbm_bits 2"),
])
def test_masks_the_platform_refuses(mask, reason):
    with pytest.raises(InvalidAllocation, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_mask(mask, L3, "rdt.l3.0")


@pytest.mark.parametrize("mask", [0x3, 0x6, 0xc, 0x7ff, 0x600])
def test_masks_the_platform_takes(mask):
    check_mask(mask, L3, "rdt.l3.0")


def test_sparse_masks_allow_gaps():
    check_mask(0x5, CacheInfo(0x7ff, 1, 16, sparse_masks=True), "rdt.l3.0")


MB = BandwidthInfo(min_bandwidth=10, bandwidth_gran=10, num_closids=8)


def test_bandwidth_in_the_platforms_steps():
    for percent in (10, 50, 100):
        check_bandwidth(percent, MB, "rdt.mb.0")
    with pytest.raises(InvalidAllocation, match="below min_bandwidth 10"):
        check_bandwidth(5, MB, "rdt.mb.0")
    with pytest.raises(InvalidAllocation, match="not a step"):
        check_bandwidth(55, MB, "rdt.mb.0")


def test_every_cache_id_is_spelled_out_and_unknown_ones_refused(fixtures_dir):
    info = fixture_info(fixtures_dir, "resctrl_l3_mb")
    value = validate_rdt({"name": "owca-be", "l3": {"*": "3", "1": "c"}, "mb": 50})
    assert validate_on_platform(value, info) == {
        "name": "owca-be", "l3": {"0": "3", "1": "c"}, "mb": {"0": 50, "1": 50}}
    with pytest.raises(InvalidAllocation, match=r"cache id 2 does not exist \(L3 cache ids: 0,1\)"):
        validate_on_platform(validate_rdt({"name": "owca-be", "l3": {2: "3"}}), info)
    l3_only = fixture_info(fixtures_dir, "resctrl_l3_only")
    with pytest.raises(InvalidAllocation, match="MB allocation: not available"):
        validate_on_platform(validate_rdt({"name": "owca-be", "mb": 50}), l3_only)


# -- the fake kernel refuses what the kernel refuses -----------------------------------------

def test_the_fake_kernel_refuses_bad_schemata_like_the_kernel(fixtures_dir, tmp_path):
    fs = FakeResctrlKernel(copy_tree(os.path.join(fixtures_dir, "resctrl_l3_mb"),
                                     str(tmp_path / "resctrl")))
    fs.mkdir("owca-x")
    for text in ("L3:0=5\n", "L3:0=800\n", "L3:7=3\n", "L2:0=3\n", "MB:0=5\n"):
        with pytest.raises(OSError) as e:
            fs.write(text, "owca-x", "schemata")
        assert e.value.errno == errno.EINVAL
        assert fs.read("info", "last_cmd_status") != "ok\n"
    fs.write("MB:1=55\n", "owca-x", "schemata")          # rounded up to the next step
    assert parse_schemata(fs.read("owca-x", "schemata")) == \
        {"L3": {"0": "7ff", "1": "7ff"}, "MB": {"0": "100", "1": "60"}}


# -- owca-allocate with resctrl --------------------------------------------------------------

@pytest.fixture
def node(tmp_path, fixtures_dir):
    def make(fixture="resctrl_l3_mb"):
        cgroupfs = fake_cgroup_v2(str(tmp_path / "cgroup"), {
            "/owca/a": [5001, 5002], "/owca/b": [5003], "/owca/c": [5004],
            "/owca/d": [5005], "/owca/batch": [4242]})
        resctrl = copy_tree(os.path.join(fixtures_dir, fixture), str(tmp_path / "resctrl"))
        options = {"--cgroupfs": cgroupfs, "--sysfs": fake_sysfs(str(tmp_path / "sys")),
                   "--resctrlfs": resctrl, "--no-timing": True,
                   "--state-dir": str(tmp_path / "state")}
        return options, FakeResctrlKernel(resctrl)
    return make


TASKS = {t: f"/owca/{t}" for t in "abcd"}


def run(options, fs, *cycles, dry_run=False, tasks=TASKS):
    """A stage with `cycles` of allocations; returns it and its allocations frames."""
    s = Allocate(AllocateConfig(allocator=Scripted(*cycles)), {**options, "--dry-run": dry_run},
                 resctrl_fs=fs)
    out = []
    for seq in range(1, len(cycles) + 1):
        frame = frames.measurements_frame(
            seq, {}, {i: {"name": i, "cgroup_path": p, "labels": {}, "resources": {},
                          "metrics": {}} for i, p in tasks.items()}, ts=seq, host="n1")
        produced = s.process(frames.validate(frame))
        frames.validate(produced[0])
        out.append(produced[0])
    return s, out


def threads(fs, group=""):
    return sorted(int(t) for t in fs.read(*((group, "tasks") if group else ("tasks",))).split())


def reasons(frame):
    return {(e["task_id"], e["type"]): e["reason"] for e in frame["errors"]}


BE = {"name": "owca-be", "l3": "3", "mb": 50}


def test_a_group_is_made_its_schemata_written_and_the_threads_moved(node):
    options, fs = node()
    before = snapshot(fs.root)
    s, out = run(options, fs, {"a": {"rdt": BE}, "b": {"rdt": BE}}, {})
    assert out[0]["allocations"] == {
        "a": {"rdt": {"name": "owca-be", "l3": {"0": "3", "1": "3"}, "mb": {"0": 50, "1": 50}}},
        "b": {"rdt": {"name": "owca-be", "l3": {"0": "3", "1": "3"}, "mb": {"0": 50, "1": 50}}}}
    assert fs.read("owca-be", "schemata") == "L3:0=3;1=3\nMB:0=50;1=50\n"
    assert threads(fs, "owca-be") == [5001, 5002, 5003]
    assert 5001 not in threads(fs) and threads(fs, "batch-team") == [4242, 4243]
    # One group for both tasks, and nothing written but OWCA's group.
    assert [c for c in fs.calls if c[0] == "mkdir"] == [("mkdir", "owca-be")]
    assert all(c[1].startswith("owca-be") for c in fs.calls)
    # The kernel gives a new control group its monitoring files (the platform has L3_MON).
    assert {p for p in changed_files(before, snapshot(fs.root))
            if not p.startswith("owca-be/mon_data/")} <= {
        "tasks", "info/last_cmd_status", "owca-be/schemata", "owca-be/tasks", "owca-be/cpus",
        "owca-be/cpus_list", "owca-be/mode"}
    # Read back in the next cycle, and nothing more to do.
    assert s.cfg.allocator.seen[1]["a"]["rdt"] == {
        "name": "owca-be", "l3": {"0": "3", "1": "3"}, "mb": {"0": 50, "1": 50}}
    assert out[1]["allocations"] == {}
    assert samples(out[1], "allocation_rdt_l3_mask")[
        (("cache_id", "1"), ("group_name", "owca-be"), ("task_id", "b"))] == 3
    assert samples(out[1], "allocation_rdt_mb_percent")[
        (("cache_id", "0"), ("group_name", "owca-be"), ("task_id", "a"))] == 50
    assert {m["name"] for m in out[1]["metrics"]} <= set(metrics.REGISTRY)
    s.close()


def test_a_new_thread_of_a_task_is_moved_in_the_next_cycle(node, tmp_path):
    options, fs = node()
    s, _ = run(options, fs, {"a": {"rdt": BE}})
    with open(os.path.join(options["--cgroupfs"], "owca", "a", "cgroup.threads"), "a") as f:
        f.write("5009\n")
    frame = s.process(frames.validate(frames.measurements_frame(
        2, {}, {"a": {"name": "a", "cgroup_path": "/owca/a", "labels": {}, "resources": {},
                      "metrics": {}}}, ts=2, host="n1")))[0]
    assert frame["allocations"] == {"a": {"rdt": {"name": "owca-be", "l3": {"0": "3", "1": "3"},
                                                  "mb": {"0": 50, "1": 50}}}}
    assert threads(fs, "owca-be") == [5001, 5002, 5009]
    s.close()


@pytest.mark.parametrize("fixture, rdt, reason", [
    ("resctrl_l3_mb", {"name": "owca-x", "l3": "5"}, "mask 5 is not contiguous"),
    ("resctrl_l3_mb", {"name": "owca-x", "l3": "800"}, "mask 800 is outside cbm_mask 7ff"),
    ("resctrl_l3_only", {"name": "owca-x", "l3": "8"},
     "mask 8 has 1 bit(s), fewer than min_cbm_bits 2"),
    ("resctrl_l3_mb", {"name": "owca-x", "l3": {3: "3"}}, "cache id 3 does not exist"),
    ("resctrl_l3_mb", {"name": "owca-x", "mb": 45}, "not a step of the platform"),
    ("resctrl_l3_mb", {"name": "owca-x", "mb": 5}, "below min_bandwidth 10"),
    ("resctrl_l3_only", {"name": "owca-x", "mb": 50}, "MB allocation: not available"),
    ("resctrl_l3_mb", {"name": "x", "l3": "3"}, "must be 'owca-'"),
    ("resctrl_l3_mb", {"name": "batch-team", "l3": "3"}, "must be 'owca-'"),
])
def test_every_validation_error_is_reported_and_nothing_written(node, fixture, rdt, reason):
    options, fs = node(fixture)
    before = snapshot(fs.root)
    s, out = run(options, fs, {"a": {"rdt": rdt, "cpu_shares": 2}})
    assert reason in reasons(out[0])[("a", "rdt")]
    assert out[0]["allocations"] == {"a": {"cpu_shares": 2.0}}   # the rest is applied
    assert samples(out[0], "allocation_error")[
        (("reason", reasons(out[0])[("a", "rdt")]), ("task_id", "a"), ("type", "rdt"))] == 1
    assert fs.calls == [] and changed_files(before, snapshot(fs.root)) == set()
    s.close()


def test_no_more_groups_than_closids(node):
    # 4 CLOSIDs: the default group and system-reserved hold two, OWCA gets two.
    options, fs = node("resctrl_l3_only")
    s, out = run(options, fs, {t: {"rdt": {"name": f"owca-{t}", "l3": "3"}} for t in "abc"})
    assert sorted(out[0]["allocations"]) == ["a", "b"]
    assert "no CLOSID left for group owca-c: num_closids 4 allows 3 groups" in \
        reasons(out[0])[("c", "rdt")]
    assert sorted(fs.directories()) == ["info", "owca-a", "owca-b", "system-reserved"]
    s.close()


def test_one_group_one_schemata(node):
    options, fs = node()
    s, out = run(options, fs, {"a": {"rdt": BE}, "b": {"rdt": {**BE, "l3": "c"}}})
    assert "group owca-be is given other values by task a" in reasons(out[0])[("b", "rdt")]
    assert fs.read("owca-be", "schemata") == "L3:0=3;1=3\nMB:0=50;1=50\n"
    assert threads(fs, "owca-be") == [5001, 5002]
    s.close()


def test_a_task_in_a_group_that_is_not_owcas_is_left_there(node):
    options, fs = node()
    s, out = run(options, fs, {"batch": {"rdt": BE}}, tasks={"batch": "/owca/batch"})
    assert "in resctrl group 'batch-team', which is not OWCA's" in reasons(out[0])[("batch", "rdt")]
    assert threads(fs, "batch-team") == [4242, 4243]
    assert fs.calls == []
    s.close()


def test_without_resctrl_rdt_is_refused_and_the_rest_applied(node, tmp_path):
    options, fs = node()
    options["--resctrlfs"] = str(tmp_path / "not-mounted")
    s = Allocate(AllocateConfig(allocator=Scripted({"a": {"rdt": BE, "cpu_shares": 2}})),
                 options)
    frame = s.process(frames.validate(frames.measurements_frame(
        1, {}, {"a": {"name": "a", "cgroup_path": "/owca/a", "labels": {}, "resources": {},
                      "metrics": {}}}, ts=1, host="n1")))[0]
    assert "resctrl is not mounted" in reasons(frame)[("a", "rdt")]
    assert frame["allocations"] == {"a": {"cpu_shares": 2.0}}
    s.close()


def test_withdrawal_moves_the_threads_back_and_removes_the_unused_group(node):
    options, fs = node()
    s, out = run(options, fs, {"a": {"rdt": BE}, "b": {"rdt": BE}}, {"a": {"rdt": None}},
                 {"b": {"rdt": None}})
    assert out[1]["allocations"] == {"a": {"rdt": None}}
    assert out[1]["restored"] == {"a": {"rdt": None}}
    assert 5001 in threads(fs) and 5002 in threads(fs)
    assert out[2]["allocations"] == {"b": {"rdt": None}}
    assert "owca-be" not in fs.directories() and 5003 in threads(fs)
    assert ("rmdir", "owca-be") in fs.calls
    s.close()


def test_shutdown_removes_owcas_groups_and_only_them(node):
    options, fs = node()
    before = snapshot(fs.root)
    s, _ = run(options, fs, {"a": {"rdt": BE}, "c": {"rdt": {"name": "owca-hp", "l3": "7fc"}}})
    assert sorted(fs.directories()) == ["batch-team", "info", "mon_data", "mon_groups",
                                        "owca-be", "owca-hp"]
    s.close()
    assert sorted(fs.directories()) == ["batch-team", "info", "mon_data", "mon_groups"]
    assert {5001, 5002, 5004} <= set(threads(fs))
    assert changed_files(before, snapshot(fs.root)) <= {"tasks", "info/last_cmd_status"}


def test_a_group_left_by_an_earlier_run_is_removed_when_unused(node):
    options, fs = node()
    fs.mkdir("owca-stale")
    fs.write("5005\n", "owca-stale", "tasks")
    fs.calls.clear()
    s, _ = run(options, fs, {})
    assert fs.calls == [("rmdir", "owca-stale")]
    assert 5005 in threads(fs)
    s.close()


def test_dry_run_touches_nothing(node):
    options, fs = node()
    before = snapshot(fs.root)
    s, out = run(options, fs, {"a": {"rdt": BE}}, {"a": {"rdt": None}}, dry_run=True)
    assert out[0]["dry_run"] is True
    assert out[0]["allocations"]["a"]["rdt"]["name"] == "owca-be"
    s.close()
    assert fs.calls == [] and changed_files(before, snapshot(fs.root)) == set()


def test_an_unreadable_info_directory_costs_rdt_only(node):
    options, fs = node()
    with open(os.path.join(fs.root, "info", "L3", "cbm_mask"), "w") as f:
        f.write("zz\n")
    s, out = run(options, fs, {"a": {"rdt": BE, "cpu_shares": 2}})
    assert "ValueError" in reasons(out[0])[("a", "rdt")]
    assert out[0]["allocations"] == {"a": {"cpu_shares": 2.0}}
    assert fs.calls == []
    s.close()
