"""lib/owca/core/kernel.py: the CPU-list format on literal strings, online CPUs and
nodes on small trees laid out like sysfs."""
import pytest

from fake_node import fake_sysfs
from owca.core.kernel import (MAX_LIST_ID, format_cpu_list, online_cpus, online_nodes,
                              parse_cpu_list)
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
