"""owca-discover with the cgroup and static sources, on real cgroups."""
import json
import os
import subprocess

import pytest

from cgroup_helpers import needs_v1, needs_v2, new_name, v1_cgroup, v2_cgroup
from conftest import ROOT, tool_command, tool_env
from owca.discover.sources.cgroup import CgroupDiscovery
from owca.discover.sources.static import StaticDiscovery, load_static_tasks
from owca.plugin import DiscoveryError
from owca.core.frames import sanitize_label_name
from owca.core.paths import DEFAULT_PATHS, Paths

SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"


def discover(*args, config_text=None, tmp_path=None):
    argv = ["--once", *args]
    if config_text is not None:
        path = tmp_path / "owca.yaml"
        path.write_text(config_text)
        argv += ["--config", str(path)]
    result = subprocess.run(tool_command("discover", *argv), capture_output=True,
                            env=tool_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr.decode()


@pytest.mark.integration
@needs_v1
def test_cgroup_source_finds_cgroups_with_processes_in_v1(tmp_path):
    parent = new_name()
    with v1_cgroup(path=parent) as top, v1_cgroup(path=parent + "/busy") as busy, \
            v1_cgroup(path=parent + "/empty"):
        child = busy.start_python(SLEEP)
        assert child.stdout.readline().strip() == "running"
        cfg = (f"discover:\n  labels: {{node_role: worker}}\n  source: !CgroupDiscovery\n"
               f"    root: {parent}\n    hierarchies: [cpuacct]\n")
        frame, _ = discover(config_text=cfg, tmp_path=tmp_path)
        again, _ = discover(config_text=cfg, tmp_path=tmp_path)
        assert frame["kind"] == "tasks"
        assert [t["id"] for t in frame["tasks"]] == [parent + "/busy"]  # empty ones left out
        task = frame["tasks"][0]
        assert task["cgroup_path"] == parent + "/busy" and task["name"] == "busy"
        assert task["labels"] == {"node_role": "worker"}
        assert [t["id"] for t in again["tasks"]] == [parent + "/busy"]  # stable ids
        assert top.path == parent


@pytest.mark.integration
@needs_v2
def test_cgroup_source_finds_cgroups_in_v2():
    with v2_cgroup() as cg:
        child = cg.start_python(SLEEP)
        assert child.stdout.readline().strip() == "running"
        source = CgroupDiscovery(root="/", hierarchies=["unified"], max_depth=1)
        ids = [t["id"] for t in source.list_tasks(DEFAULT_PATHS)]
        assert cg.path in ids


@pytest.mark.integration
def test_static_source_from_a_file_and_missing_cgroups_left_out(tmp_path):
    cgroupfs = tmp_path / "cgroup"
    (cgroupfs / "cpuacct" / "web").mkdir(parents=True)
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text(
        "- {cgroup_path: /web, name: web, labels: {priority: hp}, resources: {cpus: 2}}\n"
        "- {cgroup_path: /gone, name: gone}\n")
    cfg = f"discover:\n  source: !StaticDiscovery {{file: {tasks_file}}}\n"
    frame, stderr = discover("--cgroupfs", str(cgroupfs), config_text=cfg, tmp_path=tmp_path)
    assert [(t["id"], t["labels"], t["resources"]) for t in frame["tasks"]] == \
        [("/web", {"priority": "hp"}, {"cpus": 2})]
    assert "task /gone left out: its cgroup /gone does not exist on this node" in stderr
    counters = {s["name"]: s["value"] for s in frame["metrics"]}
    assert counters["owca_tasks"] == 1 and counters["owca_tasks_dropped_total"] == 1


def static_file_stage(tmp_path):
    """(the stage, its task file, its first frame): a static source read from a file
    that lists /web, a cgroup that exists."""
    cgroupfs = tmp_path / "cgroup"
    (cgroupfs / "cpuacct" / "web").mkdir(parents=True)
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text("- {cgroup_path: /web}\n")
    from owca.discover.stage import Discover, DiscoverConfig
    stage = Discover(DiscoverConfig(source=StaticDiscovery(file=str(tasks_file))),
                     {"--cgroupfs": str(cgroupfs)})
    return stage, tasks_file, stage.produce()[0]


def assert_last_good_list_kept(first, second):
    assert [t["id"] for t in second["tasks"]] == [t["id"] for t in first["tasks"]] == ["/web"]
    assert {s["name"]: s["value"] for s in second["metrics"]}["owca_discovery_errors_total"] == 1
    assert second["seq"] == first["seq"] + 1


def test_static_file_that_breaks_keeps_the_last_good_list(tmp_path):
    stage, tasks_file, first = static_file_stage(tmp_path)
    tasks_file.write_text("- {cgroup_path: [broken\n")
    assert_last_good_list_kept(first, stage.produce()[0])


@pytest.mark.integration
@pytest.mark.parametrize("config, message", [
    ("discover:\n  source: !CgroupDiscovery {root: relative}\n", "absolute cgroup path"),
    ("discover:\n  source: !CgroupDiscovery {hierarchies: [blkio2]}\n", "unknown hierarchy"),
    ("discover:\n  source: !StaticDiscovery\n    tasks: [{cgroup_path: /a/../b}]\n",
     "without '..'"),
])
def test_bad_source_configuration_fails_at_start(tmp_path, config, message):
    path = tmp_path / "owca.yaml"
    path.write_text(config)
    result = subprocess.run(tool_command("discover", "--once", "--config", str(path)),
                            capture_output=True, env=tool_env(), timeout=60)
    assert result.returncode == 2
    assert message in result.stderr.decode() and f"{path}:" in result.stderr.decode()


def test_label_names_from_orchestrators_are_sanitised():
    assert sanitize_label_name("app.kubernetes.io/name") == "app_kubernetes_io_name"
    assert sanitize_label_name("9lives") == "_9lives"


def test_cgroup_source_on_a_recorded_tree_is_sorted_and_bounded(tmp_path):
    mount = tmp_path / "cpuacct"
    for d in ("a", "a/x", "a/x/deep/deeper", "b"):
        (mount / d).mkdir(parents=True, exist_ok=True)
        (mount / d / "cgroup.procs").write_text("1\n")
    source = CgroupDiscovery(hierarchies=["cpuacct"], max_depth=2)
    ids = [t["id"] for t in source.list_tasks(Paths(cgroupfs=str(tmp_path)))]
    assert ids == ["/a", "/a/x", "/b"]
    assert os.path.isdir(mount / "a/x/deep/deeper")  # beyond max_depth: not a task


@pytest.mark.parametrize("make, reason", [
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_text("- &a {cgroup_path: /web}\n- *a\n"), "aliases"),
    (lambda p: p.write_text("- {cgroup_path: /web}\n" + "#" * (1 << 20) + "\n"),
     "larger than"),
])
def test_a_static_file_that_could_hang_or_exhaust_discovery_is_a_cycle_error(tmp_path, make,
                                                                            reason):
    """The task file is read under a configuration file's limits, each cycle: a FIFO put
    in its place does not block (no writer ever comes), an alias or a huge file is
    refused; the last good list is kept."""
    stage, tasks_file, first = static_file_stage(tmp_path)
    tasks_file.unlink()
    make(tasks_file)
    with pytest.raises(DiscoveryError, match=reason):
        load_static_tasks(str(tasks_file))
    assert_last_good_list_kept(first, stage.produce()[0])
