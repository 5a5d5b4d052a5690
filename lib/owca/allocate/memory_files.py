"""The memory types' files, what the node's kernel can express, and proactive reclaim.

| type | v1 file (memory hierarchy) | v2 file | written as |
|---|---|---|---|
| memory_min | - | memory.min | bytes, rounded down to a page; "max" |
| memory_low | memory.soft_limit_in_bytes | memory.low | bytes, rounded down to a page; "max" (v1: -1) |
| memory_high | - | memory.high | bytes, rounded down to a page; "max" |
| memory_max | memory.limit_in_bytes | memory.max | bytes, rounded down to a page; "max" (v1: -1) |
| memory_reclaim | - | memory.reclaim | bytes, at most memory_reclaim_max_bytes per task and cycle |

v1 has no floor the kernel keeps (memory.min), no throttling limit (memory.high) and
no proactive reclaim (memory.reclaim, kernel 5.19+): `MemorySupport` says so once at
the start, and the planner refuses those types from then on without touching a file.
A v1 soft limit is the nearest v1 has to memory.low (a group above it is reclaimed
first under global pressure; one below it, last), and is written for memory_low.
"""  # noqa: E501 (the table's rows cannot be wrapped)
import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from owca.core.allocation import (MEMORY_HIGH, MEMORY_LOW, MEMORY_MAX, MEMORY_MIN,
                                  MEMORY_RECLAIM, MEMORY_TYPES, MEMORY_UNLIMITED)
from owca.core.kernel import PAGE_SIZE, read_file
from owca.core.paths import Paths

log = logging.getLogger("owca.allocate")

V1_FILES = {MEMORY_LOW: "memory.soft_limit_in_bytes", MEMORY_MAX: "memory.limit_in_bytes"}
V2_FILES = {MEMORY_MIN: "memory.min", MEMORY_LOW: "memory.low", MEMORY_HIGH: "memory.high",
            MEMORY_MAX: "memory.max", MEMORY_RECLAIM: "memory.reclaim"}
# v1's "no limit" reads back as the page counter's maximum (LONG_MAX rounded down to a
# page on 64-bit kernels); anything this large is no limit.
V1_UNLIMITED_FROM = 1 << 62


def parse_memory(text: str):
    """A memory file's value: bytes, or "max" (v2 `max`, v1 -1 or the counter's maximum)."""
    text = text.strip()
    if text == MEMORY_UNLIMITED:
        return MEMORY_UNLIMITED
    value = int(text)
    return MEMORY_UNLIMITED if value < 0 or value >= V1_UNLIMITED_FROM else value


def memory_text(value, version: str) -> str:
    """What to write for a validated value: whole pages (the kernel keeps whole pages,
    so the file reads back what was written)."""
    if value == MEMORY_UNLIMITED:
        return "-1" if version == "v1" else MEMORY_UNLIMITED
    return str(value // PAGE_SIZE * PAGE_SIZE)


def canonical_memory(text: str) -> str:
    try:
        return str(parse_memory(text))
    except ValueError:
        return " ".join(text.split())


@dataclass
class MemorySupport:
    """What the node's memory controller can be given: `hierarchy` v1, v2 or None (no
    memory controller), and why each type it cannot express is refused."""
    hierarchy: Optional[str]
    refused: Dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """The one line said at the start ("" when every type can be written)."""
        if not self.refused:
            return ""
        where = {"v1": "cgroup v1's memory hierarchy", "v2": "this kernel's cgroup2",
                 None: "this node (no memory controller mounted)"}[self.hierarchy]
        return (f"memory: {', '.join(sorted(self.refused))} cannot be written on {where}: "
                f"{'; '.join(sorted(set(self.refused.values())))}; allocations of them "
                f"are refused without a write")


def memory_support(paths: Paths) -> MemorySupport:
    v1 = paths.cgroup_v1("memory")
    if os.path.exists(os.path.join(v1, "memory.limit_in_bytes")):
        reason = "v1 has no memory.min, memory.high nor memory.reclaim"
        return MemorySupport("v1", {t: reason for t in (MEMORY_MIN, MEMORY_HIGH,
                                                         MEMORY_RECLAIM)})
    root = paths.cgroup_v2_root
    try:
        controllers = read_file(os.path.join(root, "cgroup.controllers")).split()
    except OSError:
        controllers = []
    if "memory" not in controllers:
        reason = "no memory controller in cgroup v1 or cgroup2"
        return MemorySupport(None, {t: reason for t in MEMORY_TYPES + (MEMORY_RECLAIM,)})
    if not os.path.exists(os.path.join(root, "memory.reclaim")):
        return MemorySupport("v2", {MEMORY_RECLAIM: "the kernel has no memory.reclaim "
                                                    "(added in Linux 5.19)"})
    return MemorySupport("v2")


def write_reclaim(path: str, amount: int) -> bool:
    """One proactive reclaim of `amount` bytes; whether the kernel reclaimed all of it
    (EAGAIN: it reclaimed less, which is no error)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.write(fd, f"{amount}\n".encode())
        return True
    except OSError as e:
        if e.errno == errno.EAGAIN:
            return False
        raise
    finally:
        os.close(fd)
