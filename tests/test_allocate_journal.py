"""The allocation journal: originals survive a crashed owca-allocate; changes made by
other writers are seen; the stream of a clean stop ends with what the kernel holds.

The crash tests kill a real process with SIGKILL: owca-allocate itself on real v1
cgroups with a process in them, and a forked stage on the fake resctrl tree (no RDT
here; tests/fake_node.py says what that tree cannot show).  Where a test only needs
"the previous run is gone without a word", `crash()` does in-process what a SIGKILL
leaves: the journal on disk, nothing restored, the directory's lock released.
"""
import atexit
import glob
import hashlib
import json
import logging
import os
import signal
import subprocess
import time

import pytest

from cgroup_helpers import v1_missing
from conftest import ROOT, tool_command, tool_env
from fake_node import FakeResctrlKernel
from owca.core import frames
from owca.allocate import journal
from owca.allocate.stage import Allocate, AllocateConfig
from owca.core.stage import DataError
from test_allocate import TASKS, Scripted, cg, measurements, node, put, samples  # noqa: F401
from test_resctrl import BE, threads
from test_resctrl import node as resctrl_node  # noqa: F401

V1 = ("cpu", "cpuacct", "cpuset")


class Always(Scripted):
    """The same allocations every cycle."""

    def __init__(self, allocations, reapply=True):
        super().__init__()
        self.allocations = allocations
        self.reapply_external_changes = reapply
        self.asked = []

    def allocate(self, *args):
        super().allocate(*args)
        return self.allocations, [], []

    def reapply_external_change(self, task_id, type_, wanted, found):
        self.asked.append((task_id, type_, wanted, found))
        return super().reapply_external_change(task_id, type_, wanted, found)


def stage(node, allocator, **options):
    return Allocate(AllocateConfig(allocator=allocator),
                    {**node, "--no-timing": True, **options})


def crash(s):
    """What a SIGKILL leaves of an in-process stage: its journal, nothing restored."""
    atexit.unregister(s._restore_everything)
    s._closed = True
    s.journal.close()


def journal_file(node):
    return os.path.join(node["--state-dir"], journal.NAME)


def read_journal(node):
    with open(journal_file(node), "rb") as f:
        return json.loads(f.read())


def write_journal(node, body):
    encoded = journal.encode_body(body)
    doc = {"format": journal.FORMAT, "version": journal.VERSION,
           "sha256": hashlib.sha256(encoded).hexdigest(), "body": body}
    os.makedirs(node["--state-dir"], exist_ok=True)
    with open(journal_file(node), "w") as f:
        json.dump(doc, f)


# -- the journal ----------------------------------------------------------------------

def test_the_journal_holds_the_originals_on_disk_before_the_first_write(node):
    put(node, "/owca/a", "cpu.max", "50000 100000")
    s = stage(node, Always({"a": {"cpu_quota": 0.125, "cpuset_cpus": "1"}}))
    s.process(measurements(1))
    doc = read_journal(node)
    assert doc["format"] == "owca-allocate-journal" and doc["version"] == 1
    assert doc["sha256"] == hashlib.sha256(journal.encode_body(doc["body"])).hexdigest()
    entry = doc["body"]["tasks"]["a"]
    assert entry["cgroup_path"] == "/owca/a"
    quota = entry["types"]["cpu_quota"]
    assert quota["original"] == "50000 100000" and quota["value"] == 0.25
    assert quota["ours"] == ["25000 100000"]
    assert quota["path"].endswith("owca/a/cpu.max") and len(quota["identity"]) == 2
    assert entry["types"]["cpuset_cpus"]["original"] == ""     # v2: inherited
    assert os.stat(journal_file(node)).st_mode & 0o777 == 0o600
    inode = os.stat(journal_file(node)).st_ino
    s.process(measurements(2))                       # nothing to change: not rewritten
    assert os.stat(journal_file(node)).st_ino == inode
    s.close()
    assert not os.path.exists(journal_file(node))   # all restored: nothing left to keep


def test_no_journal_no_write(node, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    s = stage(node, Always({"a": {"cpu_quota": 0.1}}), **{"--state-dir": str(blocker / "s")})
    frame = s.process(measurements(1))[0]
    assert cg(node, "/owca/a", "cpu.max") == "max 100000"
    assert frame["allocations"] == {}
    assert "not written: state directory" in frame["errors"][0]["reason"]
    assert samples(frame, "allocation_journal_errors_total")[(("reason", "write"),)] == 1
    s.close()


def test_a_restart_adopts_the_journal_and_restores_on_withdrawal_and_stop(node):
    put(node, "/owca/a", "cpu.max", "50000 100000")
    first = stage(node, Always({"a": {"cpu_quota": 0.125, "cpu_shares": 2},
                                "b": {"cpu_shares": 3}}))
    first.process(measurements(1))
    crash(first)
    assert cg(node, "/owca/a", "cpu.max") == "25000 100000"
    # The next run sees OWCA's values in the files; the journal says they are not the
    # originals.
    second = stage(node, Scripted({"a": {"cpu_quota": 0.125, "cpu_shares": 2},
                                   "b": {"cpu_shares": 3}}, {"a": {"cpu_quota": None}}))
    frame = second.process(measurements(2))[0]
    assert frame["allocations"] == {} and frame["restored"] == {}   # all there already
    frame = second.process(measurements(3))[0]
    assert frame["restored"] == {"a": {"cpu_quota": 0.25}}
    assert cg(node, "/owca/a", "cpu.max") == "50000 100000"
    out = second.close()
    assert out[0]["restored"] == {"a": {"cpu_shares": 1.0}, "b": {"cpu_shares": 1.0}}
    assert cg(node, "/owca/a", "cpu.weight") == "100" and cg(node, "/owca/b", "cpu.weight") == "100"
    assert not os.path.exists(journal_file(node))


def test_adopted_values_the_new_allocator_does_not_set_are_restored_at_once(node):
    """The rules changed while OWCA was down: what a clean stop and start would leave."""
    first = stage(node, Always({"a": {"cpu_quota": 0.125, "cpu_shares": 2},
                                "b": {"cpu_shares": 3}}))
    first.process(measurements(1))
    crash(first)
    second = stage(node, Scripted(RuntimeError("not yet"), {"a": {"cpu_quota": 0.125}}))
    frame = second.process(measurements(2))[0]
    assert frame["restored"] == {}                  # an allocator that failed said nothing
    frame = second.process(measurements(3))[0]
    assert frame["restored"] == {"a": {"cpu_shares": 1.0}, "b": {"cpu_shares": 1.0}}
    assert cg(node, "/owca/a", "cpu.max") == "25000 100000"     # still wanted
    assert sorted(read_journal(node)["body"]["tasks"]) == ["a"]
    out = second.close()
    assert out[0]["restored"] == {"a": {"cpu_quota": 1.0}}


def test_a_journaled_task_that_is_gone_is_dropped(node, caplog):
    first = stage(node, Always({"a": {"cpu_shares": 2}, "b": {"cpu_shares": 3}}))
    first.process(measurements(1))
    crash(first)
    for name in os.listdir(os.path.join(node["--cgroupfs"], "owca", "b")):
        os.unlink(os.path.join(node["--cgroupfs"], "owca", "b", name))
    os.rmdir(os.path.join(node["--cgroupfs"], "owca", "b"))
    with caplog.at_level(logging.INFO):
        second = stage(node, Scripted())
    assert sorted(read_journal(node)["body"]["tasks"]) == ["a"]
    assert sorted(second.originals) == ["a"]
    assert any("task b: its cgroup /owca/b is gone" in r.getMessage() for r in caplog.records)
    out = second.close()
    assert out[0]["restored"] == {"a": {"cpu_shares": 1.0}}


@pytest.mark.parametrize("damage, reason", [
    (lambda doc: b"{\"format\": \"owca-allocate-jour", "not JSON"),
    (lambda doc: json.dumps({**doc, "version": 7}).encode(), "version 7"),
    (lambda doc: json.dumps(doc).replace('"50000 100000"', '"5000 100000"').encode(),
     "checksum mismatch"),
])
def test_a_corrupt_journal_is_reported_set_aside_and_not_trusted(node, caplog, damage, reason):
    put(node, "/owca/a", "cpu.max", "50000 100000")
    first = stage(node, Always({"a": {"cpu_quota": 0.125}}))
    first.process(measurements(1))
    crash(first)
    doc = read_journal(node)
    with open(journal_file(node), "wb") as f:
        f.write(damage(doc))
    with caplog.at_level(logging.INFO):
        second = stage(node, Scripted())
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert f"is corrupt ({reason}" in errors[0] and "set aside as allocations.journal.corrupt-" \
        in errors[0]
    assert not os.path.exists(journal_file(node))
    assert len(glob.glob(journal_file(node) + ".corrupt-*")) == 1
    assert second.originals == {}
    frame = second.process(measurements(2))[0]
    assert samples(frame, "allocation_journal_errors_total")[(("reason", "corrupt"),)] == 1
    second.close()
    assert cg(node, "/owca/a", "cpu.max") == "25000 100000"   # unknown original: left


def test_a_journal_cannot_make_owca_write_elsewhere(node, tmp_path):
    """A well-formed journal (checksum and all) naming a file that is not the task's."""
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    identity = [os.stat(victim).st_dev, os.stat(victim).st_ino]
    write_journal(node, journal.body("n1", {"a": {"cgroup_path": "/owca/a", "types": {
        "cpu_shares": {"path": str(victim), "identity": identity, "original": "1",
                       "value": 0.001, "ours": ["100"]}}}}, []))
    s = stage(node, Scripted())
    assert s.originals == {}
    s.process(measurements(1))
    s.close()
    assert victim.read_text() == "keep\n" and cg(node, "/owca/a", "cpu.weight") == "100"


def test_a_second_run_on_the_same_state_directory_is_refused(node):
    first = stage(node, Always({"a": {"cpu_shares": 2}}))
    first.process(measurements(1))
    with pytest.raises(DataError, match="is in use by another owca-allocate"):
        stage(node, Scripted())
    first.close()


# -- changes made by other writers -------------------------------------------------------

def test_a_value_changed_under_owca_is_counted_once_and_written_again(node, caplog):
    put(node, "/owca/a", "cpu.max", "50000 100000")
    allocator = Always({"a": {"cpu_quota": 0.125}})
    s = stage(node, allocator)
    s.process(measurements(1))
    put(node, "/owca/a", "cpu.max", "50000 100000")    # the kubelet resets it
    with caplog.at_level(logging.DEBUG, logger="owca.allocate"):
        frames_ = [s.process(measurements(seq))[0] for seq in (2, 3, 4)]
    assert frames_[0]["allocations"] == {"a": {"cpu_quota": 0.125}}
    assert cg(node, "/owca/a", "cpu.max") == "25000 100000"
    key = (("file", "cpu.max"), ("task_id", "a"), ("type", "cpu_quota"))
    assert [samples(f, "allocation_external_changes_total")[key] for f in frames_] == [1, 1, 1]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "cpu.max was changed by another writer to '50000 100000'" \
        in warned[0]
    assert allocator.asked == [("a", "cpu_quota", 0.125, 0.25)]
    # The other writer's value was not taken for the original.
    assert s.originals["a"]["cpu_quota"].text == "50000 100000"
    put(node, "/owca/a", "cpu.max", "60000 100000")    # and again: a second change
    frame = s.process(measurements(5))[0]
    assert samples(frame, "allocation_external_changes_total")[key] == 2
    s.close()
    assert cg(node, "/owca/a", "cpu.max") == "50000 100000"


def test_an_allocator_that_leaves_other_writers_values_alone(node):
    put(node, "/owca/a", "cpu.max", "50000 100000")
    allocator = Always({"a": {"cpu_quota": 0.125}}, reapply=False)
    s = stage(node, allocator)
    s.process(measurements(1))
    put(node, "/owca/a", "cpu.max", "40000 100000")     # systemd rewrites its unit's value
    for seq in (2, 3, 4):
        frame = s.process(measurements(seq))[0]
        assert frame["allocations"] == {}
    assert cg(node, "/owca/a", "cpu.max") == "40000 100000"
    assert samples(frame, "allocation_external_changes_total")[
        (("file", "cpu.max"), ("task_id", "a"), ("type", "cpu_quota"))] == 1
    assert len(allocator.asked) == 1
    out = s.close()
    # Not restored over: the file is the other writer's now.
    assert cg(node, "/owca/a", "cpu.max") == "40000 100000"
    assert out[0]["restored"] == {}


def test_a_schemata_changed_under_owca_is_counted(resctrl_node):
    options, fs = resctrl_node()
    s = Allocate(AllocateConfig(allocator=Always({"a": {"rdt": BE}})),
                 options, resctrl_fs=fs)
    tasks = {"a": {"name": "a", "cgroup_path": "/owca/a", "labels": {}, "resources": {},
                   "metrics": {}}}
    s.process(frames.validate(frames.measurements_frame(1, {}, tasks, ts=1, host="n1")))
    fs.write("L3:0=7ff\n", "owca-be", "schemata")        # another writer
    frame = s.process(frames.validate(frames.measurements_frame(2, {}, tasks, ts=2,
                                                                host="n1")))[0]
    assert samples(frame, "allocation_external_changes_total") == {
        (("file", "owca-be/schemata"), ("task_id", "a"), ("type", "rdt")): 1}
    assert fs.read("owca-be", "schemata") == "L3:0=3;1=3\nMB:0=50;1=50\n"   # written again
    s.close()


# -- the last frames --------------------------------------------------------------------

def test_the_shutdown_frame_ends_a_clean_stop_with_nothing_to_restore(node):
    s = stage(node, Scripted())
    s.process(measurements(1))
    out = s.close()
    assert len(out) == 1 and out[0]["shutdown"] is True and out[0]["restored"] == {}
    frames.validate(out[0])
    assert samples(out[0], "allocation_cpu_quota") == {(("task_id", "a"),): 1.0,
                                                        (("task_id", "b"),): 1.0}
    assert s.close() == []


def test_the_shutdown_frame_ships_the_restored_values(node):
    s = stage(node, Always({"a": {"cpu_quota": 0.1, "cpuset_cpus": "1"}}))
    frame = s.process(measurements(1))[0]
    assert samples(frame, "allocation_cpu_quota")[(("task_id", "a"),)] == 0.1
    out = s.close()[0]
    assert out["shutdown"] is True and out["ts"] >= frame["ts"]
    assert samples(out, "allocation_cpu_quota")[(("task_id", "a"),)] == 1.0
    assert samples(out, "allocation_cpuset_cpus") == {(("cpus", "0-1"), ("task_id", "a")): 2,
                                                      (("cpus", "0-1"), ("task_id", "b")): 2}
    assert samples(out, "owca_frames_written_total") is not None


@pytest.mark.integration
def test_the_tool_ends_every_clean_stop_with_a_shutdown_frame(node, tmp_path):
    args = [f"{k}={v}" for k, v in node.items() if k != "--state-dir"] + ["--no-timing"]
    stdin = frames.encode(measurements(1))
    result = subprocess.run(tool_command("allocate", *args), input=stdin, capture_output=True,
                            env={**tool_env(), "STATE_DIRECTORY": node["--state-dir"]},
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["kind"] for f in out] == ["measurements", "allocations", "allocations"]
    assert out[-1]["shutdown"] is True and out[-1]["restored"] == {}


# -- SIGKILL -------------------------------------------------------------------------------

STATIC = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
          "      - labels: {priority: be}\n"
          "        allocations: {cpu_quota: 0.125, cpuset_cpus: '1'}\n")


def _start(config, env):
    return subprocess.Popen(tool_command("allocate", "-c", str(config)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)


def stop_tools(tools):
    """Kill (by pid) the tools that still run and close their pipes."""
    for tool in tools:
        if tool.poll() is None:
            tool.kill()
            tool.wait()
        for stream in (tool.stdin, tool.stdout, tool.stderr):
            if not stream.closed:
                stream.close()


def _cycle(tool, frame):
    tool.stdin.write(frames.encode(frame))
    tool.stdin.flush()
    return [json.loads(tool.stdout.readline()) for _ in range(2)]


@pytest.mark.integration
@pytest.mark.skipif(v1_missing(controllers=V1) is not None, reason=str(v1_missing(controllers=V1)))
def test_sigkill_then_restart_then_clean_stop_gives_the_originals_back(tmp_path):
    """The field trial: killed after it capped a task, restarted, stopped cleanly."""
    from test_allocate_cgroups import init_cpuset, measurements as cg_measurements, online_cpus, \
        start
    from cgroup_helpers import read_str as read, v1_cgroup
    if online_cpus() != 2:
        pytest.skip("the trial's figures are for a 2-CPU node")
    config = tmp_path / "owca.yaml"
    config.write_text(STATIC)
    # The state directory as systemd gives it ($STATE_DIRECTORY), so that an
    # owca-allocate without a journal runs this test too, and fails it.
    env = {**tool_env(), "STATE_DIRECTORY": str(tmp_path / "state")}
    with v1_cgroup(V1) as task:
        init_cpuset(task)
        start(task)
        with open(task.file("cpu", "cpu.cfs_quota_us"), "w") as f:
            f.write("50000")
        quota, cpus = task.file("cpu", "cpu.cfs_quota_us"), task.file("cpuset", "cpuset.cpus")
        assert (read(quota), read(cpus)) == ("50000", "0-1")
        frame = lambda seq: cg_measurements(seq, task.path, {"priority": "be"})  # noqa: E731
        tools = []
        try:
            tools.append(_start(config, env))
            _cycle(tools[0], frame(1))
            assert (read(quota), read(cpus)) == ("25000", "1")
            os.kill(tools[0].pid, signal.SIGKILL)
            assert tools[0].wait(timeout=30) == -signal.SIGKILL
            tools.append(_start(config, env))
            _, allocations = _cycle(tools[1], frame(2))
            assert allocations["allocations"] == {}         # OWCA's values are in place
            tools[1].stdin.close()
            assert tools[1].wait(timeout=30) == 0, tools[1].stderr.read()
            rest = [json.loads(line) for line in tools[1].stdout.read().splitlines()]
        finally:
            stop_tools(tools)
        assert (read(quota), read(cpus)) == ("50000", "0-1")
    last = rest[-1]
    assert last["shutdown"] is True
    assert last["restored"] == {"task": {"cpu_quota": 0.25, "cpuset_cpus": "0-1"}}
    assert samples(last, "allocation_cpu_quota") == {(("task_id", "task"),): 0.25}
    assert samples(last, "allocation_cpuset_cpus") == {(("cpus", "0-1"), ("task_id", "task")): 2}
    assert not os.path.exists(tmp_path / "state" / journal.NAME)


@pytest.mark.integration
def test_sigkill_of_a_stage_with_rdt_then_restart_restores_the_threads(resctrl_node):
    options, fs = resctrl_node()
    tasks = {t: {"name": t, "cgroup_path": f"/owca/{t}", "labels": {}, "resources": {},
                 "metrics": {}} for t in "ab"}

    def frame(seq):
        return frames.validate(frames.measurements_frame(seq, {}, tasks, ts=seq, host="n1"))

    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the run that is killed
        try:
            os.close(ready_r)
            s = Allocate(AllocateConfig(allocator=Always({"a": {"rdt": BE}, "b": {"rdt": BE}})),
                         options, resctrl_fs=FakeResctrlKernel(fs.root))
            s.process(frame(1))
            os.write(ready_w, b"1")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    assert threads(fs, "owca-be") == [5001, 5002, 5003]
    journaled = os.path.exists(journal_file(options)) and read_journal(options)["body"]
    s = Allocate(AllocateConfig(allocator=Scripted({"a": {"rdt": BE}, "b": {"rdt": BE}},
                                                   {"a": {"rdt": None}})),
                 options, resctrl_fs=fs)
    s.process(frame(2))
    out = s.process(frame(3))[0]
    assert out["restored"] == {"a": {"rdt": None}}
    assert threads(fs, "owca-be") == [5003] and {5001, 5002} <= set(threads(fs))
    s.close()
    assert "owca-be" not in fs.directories() and 5003 in threads(fs)
    assert journaled["groups"] == ["owca-be"]
    assert journaled["tasks"]["a"]["types"]["rdt"] == {"original": "", "value": None,
                                                       "ours": ["owca-be"]}


def test_the_static_allocators_policy_is_configured(node):
    from owca.core import config
    cfg = config.load_section(None, "allocate", AllocateConfig, text=(
        "allocate:\n  allocator: !StaticAllocator\n    reapply_external_changes: false\n"
        "    rules:\n      - allocations: {cpu_shares: 2}\n"))
    assert cfg.allocator.reapply_external_change("a", "cpu_shares", 2.0, 1.0) is False
    s = Allocate(cfg, {**node, "--no-timing": True})
    s.process(measurements(1))
    put(node, "/owca/a", "cpu.weight", "300")
    frame = s.process(measurements(2))[0]
    assert cg(node, "/owca/a", "cpu.weight") == "300" and frame["allocations"] == {}
    s.close()
