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

Monitoring (where the tree has info/L3_MON), as the same document describes it:

- every control group, the default one included, has `mon_groups/` and
  `mon_data/mon_L3_<id>/` with the events of info/L3_MON/mon_features, and
  holds one RMID; mkdir of a control group or of a MON group
  (`<ctrl>/mon_groups/<name>`) fails with ENOSPC when num_rmids are in use
  (`rmids_in_limbo` adds RMIDs the kernel has not freed yet);
- a MON group has `tasks`, `cpus`, `cpus_list` and `mon_data/`; a thread id
  written to its `tasks` joins it only if the thread is in the parent control
  group (else EINVAL), and leaves every other MON group; a thread written to a control group leaves every MON
  group; a control group's `tasks` lists its MON groups' threads too;
- rmdir of a MON group leaves its threads in the parent control group; rmdir of
  a control group takes its MON groups with it;
- `set_counter(group, cache_id, event, value)` sets what the hardware counts for
  a group's own RMID (a number or `Unavailable`); a control group's file shows
  its own count plus its MON groups' (`Unavailable` if its own is).
  A thread id no group holds is refused with ESRCH by a MON group (control
  groups here take any id, as before).

What it cannot cover: the hardware (no cache is partitioned, no bandwidth
throttled, nothing is counted: tests say what the counters are), CDP,
pseudo-locking, exclusive mode, the `cpus` files, threads that exit (a test
calls `exit_thread`), the time RMIDs spend in limbo, and the kernel's locking
between concurrent writers.  Every call is recorded in `calls`, so tests can
see what OWCA did to the filesystem.
"""
import errno
import os
import shutil

from owca.core.resctrl import ResctrlFS, format_schemata, parse_schemata, parse_thread_ids

NOT_GROUPS = ("info", "mon_groups", "mon_data")
MON_GROUPS = "mon_groups"


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
        self.rmids_in_limbo = 0
        self.own_counts = {}     # (group, cache id, event) -> the RMID's own count
        if self.monitoring():
            # A fixture holds what differs from a fresh mount (git keeps no empty
            # directory): the kernel's mon_groups/ and mon_data/ are made here.
            for ctrl in [""] + self._groups():
                os.makedirs(self.path(ctrl, MON_GROUPS), exist_ok=True)
                if not os.path.isdir(self.path(ctrl, "mon_data")):
                    self._make_mon_data(ctrl)

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

    def monitoring(self):
        return os.path.isdir(self.path("info", "L3_MON"))

    def _mon_groups(self, ctrl):
        d = self.path(ctrl, MON_GROUPS)
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def rmids_in_use(self):
        ctrls = [""] + self._groups()
        return len(ctrls) + sum(len(self._mon_groups(c)) for c in ctrls) + self.rmids_in_limbo

    def _take_rmid(self, path):
        if self.monitoring() and \
                self.rmids_in_use() >= int(self._info("L3_MON", "num_rmids")):
            self._fail(errno.ENOSPC, "Out of RMIDs", path)

    def _make_mon_data(self, group):
        domains = sorted(parse_schemata(self._text("schemata")).get("L3", {}), key=int)
        for cache_id in domains:
            d = self.path(group, "mon_data", f"mon_L3_{int(cache_id):02d}")
            os.makedirs(d, exist_ok=True)
            for event in self._info("L3_MON", "mon_features", "").split():
                self.own_counts[(group, cache_id, event)] = 0
        for cache_id in domains:
            for event in self._info("L3_MON", "mon_features", "").split():
                self._show_count(group, cache_id, event)

    def _show_count(self, group, cache_id, event):
        """Write a group's mon_data file from the RMID counts (a control group sums its
        MON groups), then its parent control group's."""
        parts = group.split("/")
        own = self.own_counts.get((group, cache_id, event), 0)
        if MON_GROUPS not in parts:
            for name in self._mon_groups(group):
                child = self.own_counts.get((os.path.join(group, MON_GROUPS, name),
                                             cache_id, event), 0)
                if own != "Unavailable" and child != "Unavailable":
                    own += child
        parts_of_file = (group, "mon_data", f"mon_L3_{int(cache_id):02d}", event)
        if not os.path.exists(self.path(*parts_of_file)) or \
                self._text(*parts_of_file) != f"{own}\n":
            self._put(f"{own}\n", *parts_of_file)
        if MON_GROUPS in parts:
            self._show_count(parts[0] if parts[0] != MON_GROUPS else "", cache_id, event)

    def set_counter(self, group, cache_id, event, value):
        """What the hardware counted for `group`'s own RMID ("" the default group,
        "ctrl/mon_groups/name"): a number, or "Unavailable"."""
        assert os.path.isdir(self.path(group, "mon_data")), group
        self.own_counts[(group, str(cache_id), event)] = value
        self._show_count(group, str(cache_id), event)

    def exit_thread(self, thread_id):
        """A thread ended: the kernel lists it nowhere any more."""
        for ctrl in [""] + self._groups():
            for group in [ctrl] + [os.path.join(ctrl, MON_GROUPS, m)
                                   for m in self._mon_groups(ctrl)]:
                ids = self._thread_ids(group)
                if thread_id in ids:
                    self._set_thread_ids(group, [i for i in ids if i != thread_id])

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
        if MON_GROUPS in name.split("/"):
            return self._mkdir_mon(name, path)
        if len(self._groups()) + 1 >= self.num_closids():
            self._fail(errno.ENOSPC, "Out of CLOSIDs", path)
        self._take_rmid(path)
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
        if self.monitoring():
            os.mkdir(self.path(name, MON_GROUPS))
            self._make_mon_data(name)
        self._put("ok\n", "info", "last_cmd_status")

    def _mkdir_mon(self, name, path):
        ctrl, _, mon = name.rpartition(MON_GROUPS)
        ctrl = ctrl.rstrip("/")
        if not self.monitoring() or "/" in mon.strip("/") or \
                not os.path.isdir(self.path(ctrl, MON_GROUPS)) or MON_GROUPS in ctrl:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
        self._take_rmid(path)
        os.mkdir(path)
        for f, text in (("tasks", ""), ("cpus", "0\n"), ("cpus_list", "\n")):
            self._put(text, name, f)
        self._make_mon_data(name)
        self._put("ok\n", "info", "last_cmd_status")

    def rmdir(self, name):
        self.calls.append(("rmdir", name))
        if name in NOT_GROUPS or not name:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), self.path(name))
        if not os.path.isdir(self.path(name)):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.path(name))
        parts = name.split("/")
        if MON_GROUPS in parts:
            # Its threads stay in the parent control group, which counts them again.
            self._forget_counts(name)
            return
        self._forget_counts(name)
        moved = self._thread_ids(name)
        self._set_thread_ids("", self._thread_ids("") + moved)
        shutil.rmtree(self.path(name))

    def _forget_counts(self, group):
        for key in [k for k in self.own_counts if k[0] == group
                    or k[0].startswith(group + "/")]:
            del self.own_counts[key]
        parts = group.split("/")
        if MON_GROUPS in parts and os.path.isdir(self.path(group)):
            ctrl = parts[0] if parts[0] != MON_GROUPS else ""
            shutil.rmtree(self.path(group))
            for cache_id, event in {(k[1], k[2]) for k in self.own_counts if k[0] == ctrl}:
                self._show_count(ctrl, cache_id, event)

    def write(self, text, *parts):
        self.calls.append(("write", "/".join(parts), text))
        path = self.path(*parts)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if parts[0] == "info":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        group = "" if len(parts) == 1 else parts[0]
        if parts[-1] == "tasks" and MON_GROUPS in parts:
            self._write_mon_tasks("/".join(parts[:-1]), text, path)
        elif parts[-1] == "tasks":
            self._write_tasks(group, text, path)
        elif parts[-1] == "schemata":
            self._write_schemata(group, text, path)
        else:
            self._put(text, *parts)
        self._put("ok\n", "info", "last_cmd_status")

    def _one_thread_id(self, text, path):
        fields = text.split()
        if len(fields) != 1 or not fields[0].isdigit():
            self._fail(errno.EINVAL, "one task id per write", path)
        return int(fields[0])

    def _leave_mon_groups(self, thread_id, but=None):
        for ctrl in [""] + self._groups():
            for mon in self._mon_groups(ctrl):
                group = os.path.join(ctrl, MON_GROUPS, mon)
                ids = self._thread_ids(group)
                if group != but and thread_id in ids:
                    self._set_thread_ids(group, [i for i in ids if i != thread_id])

    def _write_mon_tasks(self, group, text, path):
        thread_id = self._one_thread_id(text, path)
        ctrl = group.split("/")[0] if not group.startswith(MON_GROUPS) else ""
        if not any(thread_id in self._thread_ids(g) for g in [""] + self._groups()):
            raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH), path)
        if thread_id not in self._thread_ids(ctrl):
            self._fail(errno.EINVAL, "Can't move task to different control group", path)
        self._leave_mon_groups(thread_id, but=group)
        ids = self._thread_ids(group)
        if thread_id not in ids:
            self._set_thread_ids(group, ids + [thread_id])

    def _write_tasks(self, group, text, path):
        thread_id = self._one_thread_id(text, path)
        self._leave_mon_groups(thread_id)
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
