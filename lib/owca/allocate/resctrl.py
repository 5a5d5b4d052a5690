"""RDT allocation through the resctrl filesystem: L3 cache ways and memory bandwidth.

Kernel interface (Documentation/arch/x86/resctrl.rst):

- `info/L3/{cbm_mask,min_cbm_bits,num_closids}` (and `sparse_masks` on newer
  kernels), `info/MB/{min_bandwidth,bandwidth_gran,num_closids}`: what the
  platform allows.  The kernel keeps the smallest num_closids of the enabled
  resources; the default (root) group holds one CLOSID.
- a control group is a directory of the mount; `mkdir` creates it (initialised
  by the kernel), `rmdir` removes it and moves its tasks back to the default group.
- `schemata`: one line per resource, `L3:<cache_id>=<hex mask>;...` and
  `MB:<cache_id>=<percent>;...`; a write needs only the values that change.
- `tasks`: the thread ids of the group; writing one id moves that thread into
  the group (out of every other control group).

OWCA writes only groups named `owca-*`, and the default group's `tasks` file
only to move a thread it had moved back to where it was.  CDP (L3CODE/L3DATA),
L2 and the mba_MBps mount option are not supported: allocations that need them
are reported invalid.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca.core.resctrl import (DEFAULT_GROUP, L3, MB, NOT_GROUPS, ResctrlFS, format_schemata,
                               parse_schemata, parse_thread_ids)
from owca.core.allocation import (ALL_CACHE_IDS, RDT, RDT_GROUP_NAME, RDT_GROUP_PREFIX,
                                  InvalidAllocation)


@dataclass(frozen=True)
class CacheInfo:
    cbm_mask: int
    min_cbm_bits: int
    num_closids: int
    sparse_masks: bool = False


@dataclass(frozen=True)
class BandwidthInfo:
    min_bandwidth: int
    bandwidth_gran: int
    num_closids: int


@dataclass(frozen=True)
class ResctrlInfo:
    """What the platform allows, and its cache ids per resource (from the root schemata)."""
    l3: Optional[CacheInfo]
    mb: Optional[BandwidthInfo]
    domains: Dict[str, List[str]]
    unsupported: Dict[str, str] = field(default_factory=dict)  # resource: why

    @property
    def num_closids(self) -> int:
        counts = [r.num_closids for r in (self.l3, self.mb) if r is not None]
        return min(counts) if counts else 0

    @classmethod
    def parse(cls, files: Dict[str, str]) -> "ResctrlInfo":
        """From the texts of `info/<resource>/<file>` and the root `schemata`, keyed
        "L3/cbm_mask", ..., "schemata"; absent keys are absent files."""
        domains = {name: sorted(ids, key=int)
                   for name, ids in parse_schemata(files.get("schemata", "")).items()}
        unsupported = {}
        l3 = mb = None
        if "L3CODE/cbm_mask" in files:
            unsupported[L3] = "L3 code/data prioritisation (cdp) is on"
        elif "L3/cbm_mask" in files:
            l3 = CacheInfo(cbm_mask=int(files["L3/cbm_mask"].strip(), 16),
                           min_cbm_bits=int(files["L3/min_cbm_bits"]),
                           num_closids=int(files["L3/num_closids"]),
                           sparse_masks=files.get("L3/sparse_masks", "0").strip() == "1")
        if "MB/bandwidth_gran" in files:
            root_mb = parse_schemata(files.get("schemata", "")).get(MB, {})
            if any(int(v) > 100 for v in root_mb.values()):
                # mba_MBps: the values are MB/s, the default the largest u32.
                unsupported[MB] = "memory bandwidth in MBps (mba_MBps) is on"
            else:
                mb = BandwidthInfo(min_bandwidth=int(files["MB/min_bandwidth"]),
                                   bandwidth_gran=int(files["MB/bandwidth_gran"]),
                                   num_closids=int(files["MB/num_closids"]))
        return cls(l3=l3, mb=mb, domains=domains, unsupported=unsupported)


INFO_FILES = ("L3/cbm_mask", "L3/min_cbm_bits", "L3/num_closids", "L3/sparse_masks",
              "L3CODE/cbm_mask", "MB/min_bandwidth", "MB/bandwidth_gran", "MB/num_closids")


# -- validation against the platform --------------------------------------------------

def check_mask(mask: int, cache: CacheInfo, what: str) -> None:
    if mask & ~cache.cbm_mask:
        raise InvalidAllocation(f"{what}: mask {mask:x} is outside cbm_mask {cache.cbm_mask:x}")
    if not cache.sparse_masks:
        lowest_run = mask >> ((mask & -mask).bit_length() - 1)
        if lowest_run & (lowest_run + 1):
            raise InvalidAllocation(f"{what}: mask {mask:x} is not contiguous (the "
                                    f"platform wants one run of 1 bits)")
    bits = bin(mask).count("1")
    if bits < cache.min_cbm_bits:
        raise InvalidAllocation(f"{what}: mask {mask:x} has {bits} bit(s), fewer than "
                                f"min_cbm_bits {cache.min_cbm_bits}")


def check_bandwidth(percent: int, mb: BandwidthInfo, what: str) -> None:
    if percent < mb.min_bandwidth:
        raise InvalidAllocation(f"{what}: {percent}% is below min_bandwidth {mb.min_bandwidth}%")
    if percent != 100 and (percent - mb.min_bandwidth) % mb.bandwidth_gran:
        raise InvalidAllocation(f"{what}: {percent}% is not a step of the platform (min_bandwidth "
                                f"{mb.min_bandwidth} + n x bandwidth_gran {mb.bandwidth_gran})")


def _expand(per_id: dict, ids: List[str], resource: str, what: str) -> dict:
    if ALL_CACHE_IDS in per_id:
        expanded = {i: per_id[ALL_CACHE_IDS] for i in ids}
        expanded.update({k: v for k, v in per_id.items() if k != ALL_CACHE_IDS})
        per_id = expanded
    for cache_id in per_id:
        if cache_id not in ids:
            raise InvalidAllocation(f"{what}: cache id {cache_id} does not exist ({resource} "
                                    f"cache ids: {','.join(ids) or 'none'})")
    return per_id


def validate_on_platform(value: dict, info: ResctrlInfo) -> dict:
    """An rdt value (allocation.validate_rdt's form) checked against `info`, every
    cache id spelled out; InvalidAllocation says what the platform refuses."""
    out = {"name": value["name"]}
    for key, resource in (("l3", L3), ("mb", MB)):
        if key not in value:
            continue
        what = f"{RDT}.{key}"
        limits = info.l3 if resource == L3 else info.mb
        if limits is None:
            why = info.unsupported.get(resource, "not available on this platform")
            raise InvalidAllocation(f"{what}: {resource} allocation: {why}")
        per_id = _expand(value[key], info.domains.get(resource, []), resource, what)
        for cache_id, v in per_id.items():
            if isinstance(limits, CacheInfo):   # L3's
                check_mask(int(v, 16), limits, f"{what}.{cache_id}")
            else:
                check_bandwidth(v, limits, f"{what}.{cache_id}")
        out[key] = per_id
    return out


def schemata_of(value: dict) -> Dict[str, Dict[str, object]]:
    """An rdt value's schemata lines: {"L3": {...}, "MB": {...}}."""
    out = {}
    if "l3" in value:
        out[L3] = dict(value["l3"])
    if "mb" in value:
        out[MB] = dict(value["mb"])
    return out


def schemata_matches(wanted: Dict[str, Dict[str, object]],
                     current: Dict[str, Dict[str, str]]) -> bool:
    """Whether the group already has every value wanted (masks compared as numbers)."""
    for resource, domains in wanted.items():
        have = current.get(resource, {})
        for cache_id, v in domains.items():
            if cache_id not in have:
                return False
            base = 16 if resource == L3 else 10
            if int(str(v), base) != int(have[cache_id], base):
                return False
    return True


def is_owca_group(name: str) -> bool:
    return bool(RDT_GROUP_NAME.match(name))


# -- the filesystem -----------------------------------------------------------------


@dataclass
class Group:
    """A control group as read this cycle."""
    name: str
    thread_ids: set
    schemata: Dict[str, Dict[str, str]]


class Resctrl:
    """Reads the control groups; writes only OWCA's (the policy lives here, not in the fs)."""

    def __init__(self, fs: ResctrlFS):
        self.fs = fs
        self._info: Optional[ResctrlInfo] = None   # read on first use

    def available(self) -> bool:
        return self.fs.mounted()

    def info(self) -> ResctrlInfo:
        if self._info is None:
            files = {}
            for name in INFO_FILES:
                try:
                    files[name] = self.fs.read("info", *name.split("/"))
                except FileNotFoundError:
                    pass
            files["schemata"] = self.fs.read("schemata")
            self._info = ResctrlInfo.parse(files)
        return self._info

    def groups(self) -> Dict[str, Group]:
        """Every control group but the default one, with its threads and schemata."""
        out = {}
        for name in sorted(self.fs.directories()):
            if name in NOT_GROUPS:
                continue
            try:
                out[name] = Group(name, set(parse_thread_ids(self.fs.read(name, "tasks"))),
                                  parse_schemata(self.fs.read(name, "schemata")))
            except FileNotFoundError:  # removed while we read
                continue
        return out

    # -- writes, each refused unless it touches an OWCA group ------------------------

    @staticmethod
    def _own(name: str) -> None:
        if not is_owca_group(name):
            raise PermissionError(f"resctrl group {name!r} is not OWCA's ({RDT_GROUP_PREFIX}*)")

    def create_group(self, name: str) -> None:
        self._own(name)
        self.fs.mkdir(name)

    def write_schemata(self, name: str, lines: Dict[str, Dict[str, object]]) -> None:
        self._own(name)
        self.fs.write(format_schemata(lines), name, "schemata")

    def move_thread(self, thread_id: int, name: str) -> None:
        """Into OWCA's group `name`, or back to the default group ("")."""
        if name != DEFAULT_GROUP:
            self._own(name)
            self.fs.write(f"{thread_id}\n", name, "tasks")
        else:
            self.fs.write(f"{thread_id}\n", "tasks")

    def remove_group(self, name: str) -> None:
        self._own(name)
        self.fs.rmdir(name)
