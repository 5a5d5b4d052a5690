"""A node's kernel interfaces on plain directory trees, for what this machine lacks.

- `FakeResctrlKernel`: a resctrl mount (no RDT here);
- `fake_cgroup_v2(root, tasks)`: a cgroup2 tree with the cpu and cpuset
  controllers' files (the cgroup2 mount here has neither controller);
- `fake_sysfs(root, cpus, nodes)`: the online CPU and NUMA node lists.

Plain files take any text: these trees cannot say what the kernel would refuse
(a cpu.max below 1 ms, a weight out of range, a cpuset wider than its parent's);
the tests on real v1 cgroups cover the kernel's own checks.

FakeResctrlKernel does what Documentation/arch/x86/resctrl.rst says the kernel does for the
operations OWCA uses, so that a test sees the tree the kernel would leave:

- mkdir of a control group creates `tasks` (empty), `cpus`, `cpus_list`, `mode`
  and `schemata` with every resource at its default (the whole cbm_mask, 100%);
  it fails with ENOSPC when every CLOSID is in use (the default group holds one);
- rmdir moves the group's threads back to the default group;
- a write of one thread id to a group's `tasks` moves the thread out of every
  other control group;
- a write to `schemata` changes only the values it names, and is refused with
  EINVAL (and a reason in info/last_cmd_status) for an unknown resource or cache
  id, a non-contiguous mask or one outside cbm_mask or below min_cbm_bits, and a
  bandwidth below min_bandwidth or above 100; a bandwidth between steps is
  rounded up to the next step, as the kernel does;
- writes to anything else under info/ are refused (EACCES).

What it cannot cover: the hardware (no cache is partitioned, no bandwidth
throttled), thread ids that do not exist (the kernel says ESRCH), MON groups
and monitoring data, CDP, pseudo-locking, exclusive mode, the `cpus` files,
and the kernel's locking between concurrent writers.  Every call is recorded in
`calls`, so tests can see what OWCA did to the filesystem.
"""
import errno
import os
import shutil

from owca.resctrl import (ResctrlFS, format_schemata, parse_schemata, parse_thread_ids)

NOT_GROUPS = ("info", "mon_groups", "mon_data")


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def fake_sysfs(root: str, cpus: str = "0-1", nodes: str = "0") -> str:
    _write(os.path.join(root, "devices", "system", "cpu", "online"), cpus + "\n")
    _write(os.path.join(root, "devices", "system", "node", "online"), nodes + "\n")
    return root


V2_DEFAULTS = {
    "cpu.max": "max 100000\n",
    "cpu.weight": "100\n",
    "cpuset.cpus": "\n",
    "cpuset.cpus.effective": "0-1\n",
    "cpuset.mems": "\n",
    "cpuset.mems.effective": "0\n",
    "cgroup.procs": "",
    "cgroup.threads": "",
}


def fake_cgroup_v2(root: str, cgroups: dict) -> str:
    """A cgroup2 mount at `root` with `cgroups`: {"/path": [thread ids]}; every
    directory on the way gets the cpu and cpuset files at their defaults."""
    _write(os.path.join(root, "cgroup.controllers"), "cpuset cpu io memory pids\n")
    for path, threads in cgroups.items():
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            d = os.path.join(root, *parts[:depth])
            if not os.path.isdir(d):
                for name, text in V2_DEFAULTS.items():
                    _write(os.path.join(d, name), text)
        ids = "".join(f"{t}\n" for t in threads)
        _write(os.path.join(root, *parts, "cgroup.threads"), ids)
        _write(os.path.join(root, *parts, "cgroup.procs"), ids)
    return root


def snapshot(root: str) -> dict:
    """{relative path: (content, mtime_ns)} of every file below `root`."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def changed_files(before: dict, after: dict) -> set:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


def copy_tree(fixture: str, dest: str) -> str:
    """A writable copy of a fixture tree (its README left out)."""
    shutil.copytree(fixture, dest, ignore=shutil.ignore_patterns("README*"))
    return dest


class FakeResctrlKernel(ResctrlFS):

    def __init__(self, root: str):
        super().__init__(root)
        self.calls = []

    # -- helpers ------------------------------------------------------------------

    def _text(self, *parts):
        with open(self.path(*parts)) as f:
            return f.read()

    def _put(self, text, *parts):
        with open(self.path(*parts), "w") as f:
            f.write(text)

    def _info(self, resource, name, default=None):
        try:
            return self._text("info", resource, name).strip()
        except FileNotFoundError:
            return default

    def _fail(self, err, reason, path):
        self._put(reason + "\n", "info", "last_cmd_status")
        raise OSError(err, os.strerror(err), path)

    def _groups(self):
        return [n for n in os.listdir(self.root)
                if os.path.isdir(self.path(n)) and n not in NOT_GROUPS]

    def _tasks_file(self, group):
        return (group, "tasks") if group else ("tasks",)

    def _thread_ids(self, group):
        return parse_thread_ids(self._text(*self._tasks_file(group)))

    def _set_thread_ids(self, group, ids):
        self._put("".join(f"{i}\n" for i in ids), *self._tasks_file(group))

    def num_closids(self):
        counts = [int(self._info(r, "num_closids")) for r in ("L3", "MB")
                  if self._info(r, "num_closids") is not None]
        return min(counts)

    # -- the operations ------------------------------------------------------------

    def mkdir(self, name):
        self.calls.append(("mkdir", name))
        path = self.path(name)
        if os.path.exists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
        if len(self._groups()) + 1 >= self.num_closids():
            self._fail(errno.ENOSPC, "Out of CLOSIDs", path)
        default = parse_schemata(self._text("schemata"))
        for resource, domains in default.items():
            full = (self._info(resource, "cbm_mask") if resource.startswith("L")
                    else "100")
            default[resource] = {i: full for i in domains}
        os.mkdir(path)
        self._put(format_schemata(default), name, "schemata")
        self._put("", name, "tasks")
        self._put("0\n", name, "cpus")
        self._put("\n", name, "cpus_list")
        self._put("shareable\n", name, "mode")
        self._put("ok\n", "info", "last_cmd_status")

    def rmdir(self, name):
        self.calls.append(("rmdir", name))
        if name in NOT_GROUPS or not name:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), self.path(name))
        moved = self._thread_ids(name)
        self._set_thread_ids("", self._thread_ids("") + moved)
        shutil.rmtree(self.path(name))

    def write(self, text, *parts):
        self.calls.append(("write", "/".join(parts), text))
        path = self.path(*parts)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if parts[0] == "info":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        group = "" if len(parts) == 1 else parts[0]
        if parts[-1] == "tasks":
            self._write_tasks(group, text, path)
        elif parts[-1] == "schemata":
            self._write_schemata(group, text, path)
        else:
            self._put(text, *parts)
        self._put("ok\n", "info", "last_cmd_status")

    def _write_tasks(self, group, text, path):
        fields = text.split()
        if len(fields) != 1 or not fields[0].isdigit():
            self._fail(errno.EINVAL, "one task id per write", path)
        thread_id = int(fields[0])
        for other in [""] + self._groups():
            ids = self._thread_ids(other)
            if thread_id in ids and other != group:
                self._set_thread_ids(other, [i for i in ids if i != thread_id])
        ids = self._thread_ids(group)
        if thread_id not in ids:
            self._set_thread_ids(group, ids + [thread_id])

    def _write_schemata(self, group, text, path):
        current = parse_schemata(self._text(*((group, "schemata") if group else ("schemata",))))
        try:
            wanted = parse_schemata(text)
        except ValueError as e:
            self._fail(errno.EINVAL, str(e), path)
        for resource, domains in wanted.items():
            if resource not in current:
                self._fail(errno.EINVAL, f"Unknown or unsupported resource name '{resource}'",
                           path)
            for cache_id, value in domains.items():
                if cache_id not in current[resource]:
                    self._fail(errno.EINVAL, f"Unknown domain ID {cache_id}", path)
                if resource.startswith("L"):
                    self._check_mask(resource, value, path)
                else:
                    value = self._check_bandwidth(value, path)
                current[resource][cache_id] = value
        self._put(format_schemata(current), *((group, "schemata") if group else ("schemata",)))

    def _check_mask(self, resource, value, path):
        cbm_mask = int(self._info(resource, "cbm_mask"), 16)
        min_bits = int(self._info(resource, "min_cbm_bits"))
        mask = int(value, 16)
        if mask & ~cbm_mask:
            self._fail(errno.EINVAL, f"Mask out of range", path)
        low = mask >> ((mask & -mask).bit_length() - 1) if mask else 0
        if low & (low + 1):
            self._fail(errno.EINVAL, f"mask {value} has non-consecutive 1-bits", path)
        if bin(mask).count("1") < min_bits:
            self._fail(errno.EINVAL, f"Need at least {min_bits} bits in the mask", path)

    def _check_bandwidth(self, value, path):
        min_bw = int(self._info("MB", "min_bandwidth"))
        gran = int(self._info("MB", "bandwidth_gran"))
        bw = int(value)
        if bw < min_bw or bw > 100:
            self._fail(errno.EINVAL, f"MB value {bw} out of range [{min_bw},100]", path)
        return str(min(100, -(-bw // gran) * gran))
