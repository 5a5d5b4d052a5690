"""Allocation types: what each one means, its unit, and how it is validated.

Pure functions only; writing is lib/owca/allocate/cgroup_files.py (cgroups) and
lib/owca/allocate/resctrl.py (RDT).  An allocator returns, per task, a mapping of these
types to values; `validate()` turns a value into its canonical form or raises
InvalidAllocation with a one-line reason.

| type | value | unit |
|---|---|---|
| cpu_quota | number in (0, 1] | share of the whole platform: 1.0 is every online CPU (no limit) |
| cpu_shares | number in [0.01, 100] | weight relative to the kernel's default: 1.0 is 1024 shares (v1), weight 100 (v2) |
| cpu_idle | 0 or 1 (false or true) | 1: the task's cgroup runs as the idle scheduling class |
| cpuset_cpus | "0-3,8" or [0, 1, 2, 3, 8] | online logical CPUs |
| cpuset_mems | "0" or [0] | online NUMA nodes |
| rdt | {name, l3, mb} | resctrl group `name` (prefix `owca-`), L3 way masks and memory bandwidth percentages per cache id |
| memory_min, memory_low | bytes (an integer, rounded down to a page) or "max" | memory the kernel never (min) or only last (low) reclaims from the task |
| memory_high, memory_max | bytes (an integer, rounded down to a page) or "max" (no limit) | memory above which the task is throttled and reclaimed (high), or OOM-killed (max) |
| memory_reclaim | bytes (an integer > 0) | proactive reclaim: a write this cycle, not a setting; never kept nor restored |

A value of None (JSON null) withdraws the type: OWCA restores what the task had
before OWCA's first write.
"""  # noqa: E501 (the table's rows cannot be wrapped)
import math
import re
from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional

from owca.core.kernel import MAX_LIST_ID, PAGE_SIZE, format_cpu_list, parse_cpu_list

CPU_QUOTA = "cpu_quota"
CPU_SHARES = "cpu_shares"
CPU_IDLE = "cpu_idle"
CPUSET_CPUS = "cpuset_cpus"
CPUSET_MEMS = "cpuset_mems"
RDT = "rdt"
MEMORY_MIN = "memory_min"
MEMORY_LOW = "memory_low"
MEMORY_HIGH = "memory_high"
MEMORY_MAX = "memory_max"
MEMORY_RECLAIM = "memory_reclaim"

# Settings of the memory controller, each kept and restored like the CPU types.
MEMORY_TYPES = (MEMORY_MIN, MEMORY_LOW, MEMORY_HIGH, MEMORY_MAX)
# Written, and restored, in this order: cpu_idle before cpu_shares, because the kernel
# refuses a weight for an idle cgroup and resets the weight when idle is cleared.
CGROUP_TYPES = (CPU_QUOTA, CPU_IDLE, CPU_SHARES, CPUSET_CPUS, CPUSET_MEMS) + MEMORY_TYPES
# memory_reclaim is an action: what is asked is written once, in the cycle that asks.
TYPES = CGROUP_TYPES + (RDT, MEMORY_RECLAIM)

QUOTA_MAX = 1.0
# 0.01 and 100 map into both kernels' ranges: v1 shares 2..262144 (10..102400 here),
# v2 weight 1..10000 (1..10000 here).
SHARES_MIN, SHARES_MAX = 0.01, 100.0
SHARES_V1_DEFAULT = 1024
WEIGHT_V2_DEFAULT = 100

# "max": no limit (memory_high, memory_max) or everything protected (memory_min, memory_low).
MEMORY_UNLIMITED = "max"
# Beyond what any machine holds: a typo of units, not a size.
MEMORY_BYTES_MAX = 1 << 60

# resctrl groups OWCA creates, and the only ones it writes, carry this prefix.
RDT_GROUP_PREFIX = "owca-"
RDT_GROUP_NAME = re.compile(r"owca-[A-Za-z0-9_.-]{1,58}\Z")
RDT_KEYS = ("name", "l3", "mb")
ALL_CACHE_IDS = "*"

# The kernel's list format ("0-3,8") is owca.core.kernel's; these are the names the
# allocate stage and its allocators import it by.


class InvalidAllocation(ValueError):
    """An allocation OWCA will not write; str() is the one-line reason."""


@dataclass(frozen=True)
class Topology:
    """The online CPUs and NUMA nodes of the node OWCA writes to."""
    cpus: FrozenSet[int]
    numa_nodes: FrozenSet[int]


# -- validation -----------------------------------------------------------------------

def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise InvalidAllocation(f"{what}: expected a number, got {value!r:.60}")
    return float(value)


def validate_cpu_quota(value, topology: Optional[Topology] = None) -> float:
    quota = _number(value, CPU_QUOTA)
    if not 0 < quota <= QUOTA_MAX:
        raise InvalidAllocation(f"{CPU_QUOTA} {quota:g} is out of range (0, 1]: 1.0 is the "
                                f"whole platform")
    return quota


def validate_cpu_shares(value, topology: Optional[Topology] = None) -> float:
    shares = _number(value, CPU_SHARES)
    if not SHARES_MIN <= shares <= SHARES_MAX:
        raise InvalidAllocation(f"{CPU_SHARES} {shares:g} is out of range "
                                f"[{SHARES_MIN:g}, {SHARES_MAX:g}]: 1.0 is the kernel's default")
    return shares


def validate_cpu_idle(value, topology: Optional[Topology] = None) -> int:
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    raise InvalidAllocation(f"{CPU_IDLE}: expected 0 or 1 (or false or true), got "
                            f"{value!r:.60}")


def _id_set(value, type_: str) -> FrozenSet[int]:
    if isinstance(value, str):
        try:
            ids = parse_cpu_list(value)
        except ValueError as e:
            raise InvalidAllocation(f"{type_} {value!r:.60}: {e}") from None
    elif isinstance(value, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_LIST_ID
            for i in value):
        ids = frozenset(value)
    else:
        raise InvalidAllocation(f"{type_}: expected a list like \"0-3,8\" or [0, 1], "
                                f"got {value!r:.60}")
    if not ids:
        raise InvalidAllocation(f"{type_}: empty")
    return ids


def _validate_ids(value, type_: str, online, noun: str) -> str:
    ids = _id_set(value, type_)
    if online is not None and not ids <= online:
        raise InvalidAllocation(f"{type_} {format_cpu_list(ids)}: {noun} "
                                f"{format_cpu_list(ids - online)} not online (online: "
                                f"{format_cpu_list(online)})")
    return format_cpu_list(ids)


def validate_cpuset_cpus(value, topology: Optional[Topology] = None) -> str:
    return _validate_ids(value, CPUSET_CPUS, topology and topology.cpus, "CPU")


def validate_cpuset_mems(value, topology: Optional[Topology] = None) -> str:
    return _validate_ids(value, CPUSET_MEMS, topology and topology.numa_nodes, "NUMA node")


def _per_cache_id(value, what: str, parse) -> dict:
    """{cache_id: parsed} from a mapping, or {"*": parsed} from one value for every id."""
    if not isinstance(value, dict):
        return {ALL_CACHE_IDS: parse(value, what)}
    if not value:
        raise InvalidAllocation(f"{what}: no cache ids")
    out = {}
    for key, item in value.items():
        cache_id = str(key)
        if cache_id != ALL_CACHE_IDS and not cache_id.isdigit():
            raise InvalidAllocation(f"{what}: cache id {key!r:.20} is not a number or '*'")
        out[str(int(cache_id)) if cache_id.isdigit() else cache_id] = \
            parse(item, f"{what}.{cache_id}")
    return out


def parse_mask(value, what: str = "mask") -> int:
    """A cache way mask: hex text ("7ff", "0x7ff") or a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        mask = value
    elif isinstance(value, str) and re.fullmatch(r"(0[xX])?[0-9a-fA-F]{1,16}", value.strip()):
        mask = int(value.strip(), 16)
    else:
        raise InvalidAllocation(f"{what}: expected a hex mask like \"7f0\", got {value!r:.40}")
    if mask <= 0:
        raise InvalidAllocation(f"{what}: mask {mask:x} has no bits set")
    return mask


def _percent(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise InvalidAllocation(f"{what}: expected a whole percentage, got {value!r:.40}")
    if not 0 < value <= 100:
        raise InvalidAllocation(f"{what}: {value}% is out of range (0, 100]")
    return value


def validate_rdt(value, topology: Optional[Topology] = None) -> dict:
    """The shape of an rdt value; lib/owca/allocate/resctrl.py checks it against the platform.

    Canonical form: {"name": "owca-x", "l3": {cache_id: "hexmask"}, "mb": {cache_id: percent}}
    with cache ids as strings, "*" standing for every cache id.
    """
    if not isinstance(value, dict):
        raise InvalidAllocation(f"{RDT}: expected {{name, l3, mb}}, got {value!r:.60}")
    unknown = sorted(set(map(str, value)) - set(RDT_KEYS))
    if unknown:
        raise InvalidAllocation(f"{RDT}: unknown key {unknown[0]!r} (keys: name, l3, mb)")
    name = value.get("name")
    if not isinstance(name, str) or not RDT_GROUP_NAME.match(name):
        raise InvalidAllocation(f"{RDT}: group name {name!r:.70} must be '{RDT_GROUP_PREFIX}' "
                                f"and 1 to 58 of [A-Za-z0-9_.-]: OWCA writes only its own "
                                f"groups")
    if value.get("l3") is None and value.get("mb") is None:
        raise InvalidAllocation(f"{RDT} {name}: neither l3 nor mb given")
    out: Dict[str, object] = {"name": name}
    if value.get("l3") is not None:
        masks = _per_cache_id(value["l3"], f"{RDT}.l3", parse_mask)
        out["l3"] = {k: format(m, "x") for k, m in masks.items()}
    if value.get("mb") is not None:
        out["mb"] = _per_cache_id(value["mb"], f"{RDT}.mb", _percent)
    return out


def _memory_bytes(value, type_: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAllocation(f"{type_}: expected bytes (an integer) or \"max\", got "
                                f"{value!r:.60}")
    if not 0 <= value <= MEMORY_BYTES_MAX:
        raise InvalidAllocation(f"{type_} {value}: out of range [0, 2^60] bytes")
    return value


def validate_memory(type_: str):
    def validate_memory_type(value, topology: Optional[Topology] = None):
        if value == MEMORY_UNLIMITED:
            return MEMORY_UNLIMITED
        # The kernel keeps whole pages: the canonical value is what the file will hold.
        return _memory_bytes(value, type_) // PAGE_SIZE * PAGE_SIZE
    return validate_memory_type


def validate_memory_reclaim(value, topology: Optional[Topology] = None) -> int:
    amount = _memory_bytes(value, MEMORY_RECLAIM)
    if amount == 0:
        raise InvalidAllocation(f"{MEMORY_RECLAIM}: 0 bytes reclaims nothing")
    return amount


VALIDATORS = {
    CPU_QUOTA: validate_cpu_quota,
    CPU_SHARES: validate_cpu_shares,
    CPU_IDLE: validate_cpu_idle,
    CPUSET_CPUS: validate_cpuset_cpus,
    CPUSET_MEMS: validate_cpuset_mems,
    RDT: validate_rdt,
    **{type_: validate_memory(type_) for type_ in MEMORY_TYPES},
    MEMORY_RECLAIM: validate_memory_reclaim,
}


def validate(type_: str, value, topology: Optional[Topology] = None):
    """The canonical form of `value`; InvalidAllocation when it cannot be written.

    Without a topology only the form and ranges are checked (a configuration at
    start); with one, CPUs and NUMA nodes must also be online.
    """
    check = VALIDATORS.get(type_)
    if check is None:
        raise InvalidAllocation(f"unknown allocation type {type_!r:.40} (types: "
                                f"{', '.join(TYPES)})")
    return check(value, topology)
