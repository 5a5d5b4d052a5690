"""lib/owca/core/kernel.py: the CPU-list format and thread lists on literal strings,
the v1/v2 probe, thread lists and online CPUs and nodes on small trees laid out
like the kernel's."""
import os

import pytest

from fake_node import fake_cgroup_v2, fake_sysfs
from owca.core.kernel import (MAX_LIST_ID, UNIFIED, CgroupGone, CgroupRefused,
                              cgroup_hierarchy, cgroup_thread_ids, cpu_cgroup_version,
                              format_cpu_list, online_cpus, online_nodes, parse_cpu_list,
                              parse_thread_ids, read_thread_ids)
from owca.core.paths import Paths


# -- the CPU-list format -----------------------------------------------------------------

@pytest.mark.parametrize("text, ids", [
    ("0-1\n", {0, 1}),
    ("0\n", {0}),
    ("0-3,8,10-11\n", {0, 1, 2, 3, 8, 10, 11}),
    ("\n", set()),
    ("", set()),
    ("0-1,4,6-7\n", {0, 1, 4, 6, 7}),
    (" 2 , 5-5 ", {2, 5}),
    (f"{MAX_LIST_ID - 1}", {MAX_LIST_ID - 1}),
])
def test_cpu_list(text, ids):
    assert parse_cpu_list(text) == frozenset(ids)


@pytest.mark.parametrize("text", ["a", "3-1", "1-", "-1", "0-99999999", "1;2", "+1",
                                  "1 - 2", f"{MAX_LIST_ID}", "0x1"])
def test_cpu_list_refuses_garbage(text):
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_format_cpu_list_is_the_kernels_canonical_form():
    assert format_cpu_list([7, 0, 1, 2, 4, 6]) == "0-2,4,6-7"
    assert format_cpu_list([3]) == "3"
    assert format_cpu_list([]) == ""
    assert format_cpu_list([0, 1, 1]) == "0-1"


@pytest.mark.parametrize("kernel", ["0", "0-1", "0-3,8,10-11", "0,2,4,6"])
def test_a_list_the_kernel_wrote_formats_back_to_itself(kernel):
    assert format_cpu_list(parse_cpu_list(kernel + "\n")) == kernel


# -- thread lists --------------------------------------------------------------------------

@pytest.mark.parametrize("text, ids", [
    ("", []), ("\n", []), ("12\n", [12]), ("12\n13\n7\n", [12, 13, 7]),
])
def test_thread_ids(text, ids):
    assert parse_thread_ids(text) == ids


def test_a_thread_list_that_is_not_numbers_is_refused():
    with pytest.raises(ValueError):
        parse_thread_ids("12\nx\n")


def v1_tree(root, cgroups) -> str:
    """{controller: {"/path": [thread ids]}} as v1 hierarchies below `root`."""
    for controller, paths in cgroups.items():
        for path, threads in paths.items():
            directory = os.path.join(root, controller, path.strip("/"))
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "tasks"), "w") as f:
                f.write("".join(f"{t}\n" for t in threads))
    return str(root)


def test_read_thread_ids_reads_tasks_in_v1_and_cgroup_threads_in_v2(tmp_path):
    (tmp_path / "tasks").write_text("1\n2\n")
    (tmp_path / "cgroup.threads").write_text("3\n")
    assert read_thread_ids(str(tmp_path), "v1") == [1, 2]
    assert read_thread_ids(str(tmp_path), "v2") == [3]
    with pytest.raises(FileNotFoundError):
        read_thread_ids(str(tmp_path / "gone"), "v1")


def test_cgroup_thread_ids_in_v2(tmp_path):
    paths = Paths(cgroupfs=fake_cgroup_v2(str(tmp_path), {"/pod/a": [10, 11], "/pod/b": []}))
    assert cgroup_thread_ids(paths, "/pod/a") == [10, 11]
    assert cgroup_thread_ids(paths, "/pod/b") == []
    with pytest.raises(CgroupGone):
        cgroup_thread_ids(paths, "/pod/nosuch")


def test_cgroup_thread_ids_in_v1_come_from_the_cpu_hierarchy(tmp_path):
    paths = Paths(cgroupfs=v1_tree(tmp_path, {"cpu": {"/a": [1, 2]}, "cpuset": {"/a": [3],
                                                                               "/b": [4]},
                                              "cpuacct": {"/c": [5]}}))
    assert cgroup_thread_ids(paths, "/a") == [1, 2]
    # held by cpuset alone: v1 to CPU allocation, and not in the cpu hierarchy
    with pytest.raises(CgroupGone):
        cgroup_thread_ids(paths, "/b")
    # held by none of cpu and cpuset: v2 to CPU allocation, and not in cgroup2
    with pytest.raises(CgroupGone):
        cgroup_thread_ids(paths, "/c")


@pytest.mark.parametrize("path, reason", [
    ("/", "root"), ("/a/../a", "'..'"), ("a", "not absolute"), ("/link", "symlink"),
])
def test_cgroup_thread_ids_refuses_what_is_never_followed(tmp_path, path, reason):
    root = fake_cgroup_v2(str(tmp_path / "cg"), {"/a": [1]})
    os.symlink(os.path.join(root, "a"), os.path.join(root, "link"))
    with pytest.raises(CgroupRefused, match=reason):
        cgroup_thread_ids(Paths(cgroupfs=root), path)


# -- which hierarchy holds a cgroup ----------------------------------------------------------

@pytest.fixture
def hybrid(tmp_path):
    """v1 cpu, cpuacct and memory hierarchies and cgroup2 at unified/."""
    for d in ("cpu/both", "cpuacct/both", "memory/both", "memory/memonly", "unified/both",
              "unified/v2only"):
        os.makedirs(tmp_path / d)
    return Paths(cgroupfs=str(tmp_path))


def test_v1_is_preferred_where_a_v1_hierarchy_holds_the_cgroup(hybrid):
    assert cgroup_hierarchy(hybrid, "/both") == "cpu"
    assert cgroup_hierarchy(hybrid, "/both", ("cpuacct", "cpu")) == "cpuacct"
    assert cgroup_hierarchy(hybrid, "/memonly") == "memory"
    assert cpu_cgroup_version(hybrid, "/both") == "v1"


def test_the_unified_hierarchy_answers_where_no_v1_one_holds_it(hybrid):
    assert cgroup_hierarchy(hybrid, "/v2only") == UNIFIED
    assert cgroup_hierarchy(hybrid, "/both", ()) == UNIFIED
    assert cgroup_hierarchy(hybrid, "/memonly", ("cpu", "cpuset")) is None
    assert cgroup_hierarchy(hybrid, "/nosuch") is None
    assert cpu_cgroup_version(hybrid, "/v2only") == "v2"
    assert cpu_cgroup_version(hybrid, "/memonly") == "v2"   # held by neither: v2 to it


def test_on_a_unified_host_the_mount_itself_is_cgroup2(tmp_path):
    paths = Paths(cgroupfs=fake_cgroup_v2(str(tmp_path), {"/a": [1]}))
    assert cgroup_hierarchy(paths, "/a") == UNIFIED
    assert cgroup_hierarchy(paths, "/") == UNIFIED


# -- online CPUs and NUMA nodes ----------------------------------------------------------

def test_online_cpus_and_nodes_are_read_from_sysfs(tmp_path):
    paths = Paths(sysfs=fake_sysfs(str(tmp_path), cpus="0-3,8", nodes="0-1"))
    assert paths.online_cpus_file == str(tmp_path / "devices/system/cpu/online")
    assert online_cpus(paths) == frozenset((0, 1, 2, 3, 8))
    assert online_nodes(paths) == frozenset((0, 1))


def test_online_lists_that_are_absent_or_malformed_raise(tmp_path):
    paths = Paths(sysfs=str(tmp_path))
    with pytest.raises(FileNotFoundError):
        online_cpus(paths)
    with pytest.raises(FileNotFoundError):
        online_nodes(paths)
    fake_sysfs(str(tmp_path), cpus="0-x", nodes="\u0661")   # ARABIC-INDIC DIGIT ONE
    with pytest.raises(ValueError):
        online_cpus(paths)
    with pytest.raises(ValueError):
        online_nodes(paths)

