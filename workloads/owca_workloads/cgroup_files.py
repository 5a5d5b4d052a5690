"""Reading and writing one cgroup file, the one way the harness does it.

The lab (launch.py's cgroups, the control matrix), benchmarks/ and tests/ all read
and write cgroup files through these three functions.  They live in the lab's
package, not in tests/cgroup_helpers.py, because that module pulls in pytest (its
skip markers) and tests/ is not shipped with the workloads image; the lab's package
is on the path of all three, and importing this module loads nothing else.
"""


def read_str(path: str) -> str:
    """A cgroup file's value, without its newline."""
    with open(path) as f:
        return f.read().strip()


def read_int(path: str) -> int:
    return int(read_str(path))


def write_str(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
