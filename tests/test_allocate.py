"""owca-allocate as a stage: what it reads, writes, refuses and restores.

These tests run on a cgroup2 tree of plain files (tests/fake_node.py): the
machine's cgroup2 mount has no cpu or cpuset controller, so the v2 files
cannot be real here.  Plain files cannot refuse a value the kernel would;
tests/test_allocate_cgroups.py writes real v1 cgroups with processes in them.
"""
import json
import logging
import os
import shutil
import subprocess

import pytest

from conftest import ROOT, tool_command, tool_env
from fake_node import changed_files, fake_cgroup_v2, fake_sysfs, snapshot
from owca.core import frames, metrics
from owca.allocate.stage import Allocate, AllocateConfig
from owca.plugin import Allocator
from owca.allocate.cgroup_files import CgroupRefused, cgroup_dir

TASKS = {"a": "/owca/a", "b": "/owca/b"}


class Scripted(Allocator):
    """Returns the given allocations, one per cycle, and keeps what it was shown."""

    def __init__(self, *cycles):
        self.cycles = list(cycles)
        self.seen = []

    def allocate(self, platform, tasks_measurements, tasks_resources, tasks_labels,
                 tasks_allocations):
        self.seen.append(tasks_allocations)
        if not self.cycles:
            return {}, [], []
        step = self.cycles.pop(0)
        if isinstance(step, Exception):
            raise step
        return step, [], []


@pytest.fixture
def node(tmp_path):
    cgroupfs = fake_cgroup_v2(str(tmp_path / "cgroup"), {
        "/owca/a": [5001, 5002], "/owca/b": [5003], "/owca/sibling": [5004],
        "/owca/c": [], "/owca/d": [], "/owca/e": []})
    sysfs = fake_sysfs(str(tmp_path / "sys"))
    return {"--cgroupfs": cgroupfs, "--sysfs": sysfs,
            "--resctrlfs": str(tmp_path / "no-resctrl"), "--state-dir": str(tmp_path / "state")}


def measurements(seq, tasks=TASKS, labels=None):
    frame = frames.measurements_frame(
        seq, {"platform_topology_cpus": 2},
        {i: {"name": i, "cgroup_path": p, "labels": (labels or {}).get(i, {}),
             "resources": {}, "metrics": {}} for i, p in tasks.items()},
        ts=1700000000.0 + seq, host="n1")
    return frames.validate(frames.decode(frames.encode(frame)))


def stage(node, *cycles, dry_run=False, **cfg):
    allocator = Scripted(*cycles)
    s = Allocate(AllocateConfig(allocator=allocator, **cfg),
                 {**node, "--dry-run": dry_run, "--no-timing": True})
    return s, allocator


def cycle(s, seq, tasks=TASKS):
    out = s.process(measurements(seq, tasks))
    frames.validate(out[0])
    assert out[0]["kind"] == "allocations" and out[0]["seq"] == seq
    return out[0]


def cg(node, path, name):
    with open(os.path.join(node["--cgroupfs"], path.lstrip("/"), name)) as f:
        return f.read().strip()


def put(node, path, name, text):
    with open(os.path.join(node["--cgroupfs"], path.lstrip("/"), name), "w") as f:
        f.write(text + "\n")


def samples(frame, name):
    return {tuple(sorted(s["labels"].items())): s["value"] for s in frame["metrics"]
            if s["name"] == name}


# -- reading -------------------------------------------------------------------------

def test_the_allocator_is_given_what_the_tasks_have_now(node):
    s, allocator = stage(node, {"a": {"cpu_quota": 0.1}})
    cycle(s, 1)
    assert allocator.seen[0]["a"] == {"cpu_quota": 1.0, "cpu_shares": 1.0,
                                      "cpuset_cpus": "0-1", "cpuset_mems": "0"}
    cycle(s, 2)
    assert allocator.seen[1]["a"]["cpu_quota"] == 0.1   # read back, not remembered
    put(node, "/owca/a", "cpu.max", "50000 100000")    # someone else changes it
    frame = cycle(s, 3)
    assert allocator.seen[2]["a"]["cpu_quota"] == 0.25
    # OWCA keeps what it was asked for until it is withdrawn: it writes it again.
    assert frame["allocations"] == {"a": {"cpu_quota": 0.1}}
    assert cg(node, "/owca/a", "cpu.max") == "20000 100000"
    s.close()


def test_a_task_without_a_cgroup_has_no_allocations_and_no_error(node, caplog):
    s, allocator = stage(node)
    frame = cycle(s, 1, {"a": "/owca/a", "x": "/not/there"})
    assert allocator.seen[0]["x"] == {}
    assert frame["errors"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- writing --------------------------------------------------------------------------

def test_each_type_is_written_to_the_tasks_own_files_only(node):
    s, _ = stage(node, {"a": {"cpu_quota": 0.1, "cpu_shares": 0.5, "cpuset_cpus": [1],
                              "cpuset_mems": "0"}})
    before = snapshot(node["--cgroupfs"])
    frame = cycle(s, 1)
    after = snapshot(node["--cgroupfs"])
    assert frame["allocations"] == {"a": {"cpu_quota": 0.1, "cpu_shares": 0.5,
                                          "cpuset_cpus": "1", "cpuset_mems": "0"}}
    assert frame["dry_run"] is False and frame["errors"] == [] and frame["deferred"] == 0
    # 0.1 of a 2-CPU platform is 0.2 of one CPU: 20 ms per 100 ms period.
    assert cg(node, "/owca/a", "cpu.max") == "20000 100000"
    assert cg(node, "/owca/a", "cpu.weight") == "50"
    assert cg(node, "/owca/a", "cpuset.cpus") == "1"
    assert cg(node, "/owca/a", "cpuset.mems") == "0"
    assert changed_files(before, after) == {"owca/a/cpu.max", "owca/a/cpu.weight",
                                            "owca/a/cpuset.cpus", "owca/a/cpuset.mems"}
    # Nothing changes the second time: what is there already is not written again.
    frame = cycle(s, 2)
    assert frame["allocations"] == {}
    assert changed_files(after, snapshot(node["--cgroupfs"])) == set()
    s.close()


def test_an_invalid_allocation_is_reported_and_the_others_applied(node, caplog):
    s, _ = stage(node, {"a": {"cpu_quota": 1.5, "cpuset_cpus": "0-3", "cpu_shares": 2},
                        "b": {"cpu_quota": 0.1}, "ghost": {"cpu_quota": 0.1}},
                 {"a": {"cpu_quota": 1.5}})
    with caplog.at_level(logging.DEBUG, logger="owca.allocate"):
        frame = cycle(s, 1)
    assert frame["allocations"] == {"a": {"cpu_shares": 2.0}, "b": {"cpu_quota": 0.1}}
    reasons = {(e["task_id"], e["type"]): e["reason"] for e in frame["errors"]}
    assert set(reasons) == {("a", "cpu_quota"), ("a", "cpuset_cpus"), ("ghost", "*")}
    assert "out of range (0, 1]" in reasons[("a", "cpu_quota")]
    assert "CPU 2-3 not online" in reasons[("a", "cpuset_cpus")]
    assert reasons[("ghost", "*")] == "no such task in this cycle"
    errors = samples(frame, "allocation_error")
    assert errors[(("reason", reasons[("a", "cpu_quota")]), ("task_id", "a"),
                   ("type", "cpu_quota"))] == 1
    assert samples(frame, "allocation_errors_count") == {(): 3}
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 3 and all("\n" not in m for m in logged)
    assert "cycle 1: task a: cpu_quota 1.5 is out of range" in logged[0] + \
        logged[1] + logged[2]
    # The same error again: in the frame and the counter, logged once only.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="owca.allocate"):
        frame = cycle(s, 2)
    assert [e["type"] for e in frame["errors"]] == ["cpu_quota"]
    assert samples(frame, "allocation_errors_count") == {(): 4}
    assert not [r for r in caplog.records if r.levelno == logging.ERROR]
    assert cg(node, "/owca/a", "cpu.max") == "max 100000"
    s.close()


def test_a_quota_below_the_kernels_minimum_is_refused(node):
    s, _ = stage(node, {"a": {"cpu_quota": 0.004}})
    frame = cycle(s, 1)
    assert frame["allocations"] == {}
    assert "below the kernel's minimum of 1000 us" in frame["errors"][0]["reason"]
    s.close()


def test_unknown_types_and_bad_shapes_are_errors(node):
    s, _ = stage(node, {"a": {"cpu_quotas": 0.5}, "b": [1]})
    frame = cycle(s, 1)
    assert {(e["task_id"], e["type"]) for e in frame["errors"]} == {("a", "cpu_quotas"),
                                                                     ("b", "*")}
    s.close()


def test_an_allocator_that_fails_costs_its_cycle_only(node):
    s, _ = stage(node, RuntimeError("boom"), {"a": {"cpu_quota": 0.1}})
    frame = cycle(s, 1)
    assert frame["allocations"] == {}
    assert samples(frame, "owca_allocator_errors_total") == {(("stage", "allocate"),): 1}
    frame = cycle(s, 2)
    assert frame["allocations"] == {"a": {"cpu_quota": 0.1}}
    s.close()


def test_no_more_changes_per_cycle_than_the_limit(node):
    tasks = {t: f"/owca/{t}" for t in "abcde"}
    s, _ = stage(node, {t: {"cpu_shares": 2} for t in tasks}, max_changes_per_cycle=2)
    applied = []
    for seq in (1, 2, 3, 4):
        frame = cycle(s, seq, tasks)
        applied.append((sorted(frame["allocations"]), frame["deferred"]))
    assert applied == [(["a", "b"], 3), (["c", "d"], 1), (["e"], 0), ([], 0)]
    assert all(cg(node, f"/owca/{t}", "cpu.weight") == "200" for t in tasks)
    s.close()


# -- restoring -------------------------------------------------------------------------

def test_a_withdrawn_allocation_gets_the_original_value_back(node):
    put(node, "/owca/a", "cpu.max", "max 50000")
    s, _ = stage(node, {"a": {"cpu_quota": 0.1, "cpu_shares": 3}}, {"a": {"cpu_quota": None}})
    cycle(s, 1)
    assert cg(node, "/owca/a", "cpu.max") == "10000 50000"   # the period is kept
    frame = cycle(s, 2)
    assert cg(node, "/owca/a", "cpu.max") == "max 50000"
    assert frame["allocations"] == {"a": {"cpu_quota": None}}
    assert frame["restored"] == {"a": {"cpu_quota": 1.0}}
    assert cg(node, "/owca/a", "cpu.weight") == "300"   # not withdrawn: kept
    assert samples(frame, "allocations_count") == {(): 3}
    s.close()
    assert cg(node, "/owca/a", "cpu.weight") == "100"


def test_a_task_that_went_is_restored_if_its_cgroup_is_still_there(node):
    s, _ = stage(node, {"a": {"cpu_shares": 3}, "b": {"cpu_shares": 3}})
    cycle(s, 1)
    b_dir = os.path.join(node["--cgroupfs"], "owca", "b")
    shutil.rmtree(b_dir)                                   # b's cgroup is gone
    frame = cycle(s, 2, {})
    assert cg(node, "/owca/a", "cpu.weight") == "100"
    assert frame["restored"] == {"a": {"cpu_shares": 1.0}}
    assert frame["errors"] == []
    assert s.originals == {} and s.desired == {}
    s.close()


def test_a_cgroup_recreated_at_the_same_path_is_not_restored(node):
    s, _ = stage(node, {"a": {"cpu_shares": 3}})
    cycle(s, 1)
    # Another task's cgroup at the same path.  The kernel gives every cgroup a new
    # inode number (a 64-bit id since 5.5); made before the old one goes, a plain
    # directory gets a new one too.
    fake_cgroup_v2(node["--cgroupfs"], {"/new": [6001]})
    shutil.rmtree(os.path.join(node["--cgroupfs"], "owca", "a"))
    os.rename(os.path.join(node["--cgroupfs"], "new"),
              os.path.join(node["--cgroupfs"], "owca", "a"))
    put(node, "/owca/a", "cpu.weight", "42")
    frame = cycle(s, 2, {})
    assert cg(node, "/owca/a", "cpu.weight") == "42"
    assert frame["restored"] == {}
    s.close()


def test_shutdown_restores_every_original(node):
    originals = snapshot(node["--cgroupfs"])
    s, _ = stage(node, {"a": {"cpu_quota": 0.1, "cpu_shares": 0.5, "cpuset_cpus": "1",
                              "cpuset_mems": "0"}, "b": {"cpu_shares": 8}})
    cycle(s, 1)
    out = s.close()
    restored = {p: v[0] for p, v in snapshot(node["--cgroupfs"]).items()}
    assert restored == {p: v[0] for p, v in originals.items()}
    assert out[0]["shutdown"] is True and out[0]["seq"] == 1
    assert out[0]["allocations"] == {"a": {"cpu_quota": None, "cpu_shares": None,
                                           "cpuset_cpus": None, "cpuset_mems": None},
                                     "b": {"cpu_shares": None}}
    assert out[0]["restored"]["a"]["cpuset_cpus"] == "0-1"   # the effective set, as read
    assert s.close() == []                                    # once


# -- safety ---------------------------------------------------------------------------

def test_dry_run_writes_nothing_and_says_what_it_would(node, caplog):
    before = snapshot(node["--cgroupfs"])
    s, _ = stage(node, {"a": {"cpu_quota": 0.1, "cpuset_cpus": "1"}}, {"a": {"cpu_quota": None}},
                 dry_run=True)
    with caplog.at_level(logging.INFO, logger="owca.allocate"):
        frame = cycle(s, 1)
    assert frame["dry_run"] is True
    assert frame["allocations"] == {"a": {"cpu_quota": 0.1, "cpuset_cpus": "1"}}
    said = [r.getMessage() for r in caplog.records]
    assert any("dry-run: task a: would write '20000 100000' to " in m and
               m.endswith("owca/a/cpu.max") for m in said)
    cycle(s, 2)
    s.close()
    assert changed_files(before, snapshot(node["--cgroupfs"])) == set()


def test_the_root_cgroup_and_symlinks_are_refused(node, tmp_path):
    outside = tmp_path / "outside"
    fake_cgroup_v2(str(outside), {"/victim": []})
    os.symlink(str(outside / "victim"), os.path.join(node["--cgroupfs"], "owca", "link"))
    before = snapshot(str(tmp_path))
    s, _ = stage(node, {"root": {"cpu_shares": 2}, "link": {"cpu_shares": 2}})
    frame = cycle(s, 1, {"root": "/", "link": "/owca/link"})
    reasons = {e["task_id"]: e["reason"] for e in frame["errors"]}
    assert "the root cgroup is never written" in reasons["root"]
    assert "goes through a symlink" in reasons["link"]
    assert frame["allocations"] == {}
    s.close()
    assert changed_files(before, snapshot(str(tmp_path))) == set()


@pytest.mark.parametrize("path, reason", [
    ("/", "root cgroup"), ("relative", "not absolute"), ("/a/../b", "'.' or '..'"),
    ("/a/./b", "'.' or '..'"),
])
def test_cgroup_dir_refuses(tmp_path, path, reason):
    with pytest.raises(CgroupRefused, match=reason):
        cgroup_dir(str(tmp_path), path)


def test_every_metric_emitted_is_registered(node):
    s, _ = stage(node, {"a": {"cpu_quota": 0.1, "cpuset_cpus": "0"}, "b": {"cpu_quota": 9}})
    frame = cycle(s, 1)
    names = {m["name"] for m in frame["metrics"]}
    assert names - set(metrics.REGISTRY) == set()
    assert samples(frame, "allocation_cpu_quota") == {(("task_id", "a"),): 0.1,
                                                      (("task_id", "b"),): 1.0}
    assert samples(frame, "allocation_cpuset_cpus")[(("cpus", "0"), ("task_id", "a"))] == 1
    assert samples(frame, "allocations_count") == {(): 2}
    s.close()


# -- the tool -------------------------------------------------------------------------

@pytest.mark.integration
def test_the_tool_applies_a_static_configuration_and_restores_at_eof(node, tmp_path):
    config = tmp_path / "owca.yaml"
    config.write_text("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
                      "      - labels: {priority: be}\n"
                      "        allocations: {cpu_quota: 0.1, cpu_shares: 0.5}\n")
    labels = {"a": {"priority": "be"}, "b": {"priority": "hp"}}
    stdin = b"".join(frames.encode(measurements(seq, labels=labels)) for seq in (1, 2))
    args = ["-c", str(config), "--no-timing"] + [f"{k}={v}" for k, v in node.items()]
    before = snapshot(node["--cgroupfs"])
    dry = subprocess.run(tool_command("allocate", "--dry-run", *args), input=stdin,
                         capture_output=True, env=tool_env(), cwd=ROOT, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert changed_files(before, snapshot(node["--cgroupfs"])) == set()
    assert b"dry-run: task a: would write '20000 100000'" in dry.stderr

    result = subprocess.run(tool_command("allocate", *args), input=stdin, capture_output=True,
                            env=tool_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["kind"] for f in out] == ["measurements", "allocations", "measurements",
                                        "allocations", "allocations"]
    assert out[1]["allocations"] == {"a": {"cpu_quota": 0.1, "cpu_shares": 0.5}}
    assert out[3]["allocations"] == {}
    assert out[4]["shutdown"] is True
    # At EOF the node is as it was.
    assert {p: v[0] for p, v in snapshot(node["--cgroupfs"]).items()} == \
        {p: v[0] for p, v in before.items()}


def test_an_allocator_that_does_not_look_costs_no_cgroup_reads(node):
    """NOPAllocator: no per-task values read (only the counters), until one that looks."""
    from owca.plugin import NOPAllocator
    nop = Allocate(AllocateConfig(allocator=NOPAllocator()), {**node, "--no-timing": True})
    quiet = nop.process(measurements(1))[0]
    nop.close()
    names = {s["name"] for s in quiet["metrics"]}
    assert "allocations_count" in names
    assert not any(n.startswith("allocation_cpu") for n in names)
    looking, _ = stage(node, {})  # an allocator that reads them: every task's values
    read = cycle(looking, 1)
    looking.close()
    assert any(s["name"] == "allocation_cpu_quota" for s in read["metrics"])


def _delegate(path):
    """Mark a directory as systemd marks a delegated unit's cgroup; skip where the file
    system takes no trusted.* xattr."""
    try:
        os.setxattr(path, "trusted.delegate", b"1")
    except OSError as e:
        pytest.skip(f"no trusted.* extended attributes here: {e.strerror}")


@pytest.mark.integration  # its Allocate keeps the default state directory, /var/lib/owca-allocate
def test_a_systemd_units_own_cgroup_is_refused_unless_below_a_delegated_one(tmp_path):
    # A plain-file tree: the guest's test (tests/vm/guest_v2.py) shows systemd's resets.
    cgroupfs = fake_cgroup_v2(str(tmp_path / "cgroup"), {
        "/x.slice/plain.service": [7001], "/x.slice/deleg.service/c.scope": [7002],
        "/x.slice/deleg.service/sup": [7003]})
    _delegate(os.path.join(cgroupfs, "x.slice", "deleg.service"))
    node = {"--cgroupfs": cgroupfs, "--sysfs": fake_sysfs(str(tmp_path / "sys")),
            "--resctrlfs": str(tmp_path / "no-resctrl"), "--state-dir": str(tmp_path / "state")}
    tasks = {"plain": "/x.slice/plain.service", "inner": "/x.slice/deleg.service/c.scope",
             "unit": "/x.slice/deleg.service"}
    want = {t: {"cpu_shares": 2.0} for t in tasks}
    before = snapshot(cgroupfs)
    s, _ = stage(node, want)
    out = cycle(s, 1, tasks)
    reasons = {e["task_id"]: e["reason"] for e in out["errors"]}
    assert set(reasons) == {"plain", "unit"}
    assert "systemd unit plain.service's own cgroup" in reasons["plain"]
    # A delegated unit's own cgroup is still systemd's; below it is the delegatee's.
    assert "systemd unit deleg.service's own cgroup" in reasons["unit"]
    assert changed_files(before, snapshot(cgroupfs)) == {
        "x.slice/deleg.service/c.scope/cpu.weight"}
    s.close()
    s, _ = stage(node, want, write_systemd_units=True)
    assert cycle(s, 1, tasks)["errors"] == []
    s.close()
