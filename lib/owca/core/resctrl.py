"""The resctrl filesystem as files: its mount, the schemata format, thread lists.

Shared by measurement (monitoring groups, owca-measure) and allocation (control
groups, owca-allocate); what each does with the groups lives in its stage.
Kernel interface: Documentation/arch/x86/resctrl.rst.
"""
import os
from typing import Dict, List, Mapping

# A group's `tasks` is a thread list, as a cgroup's is.
from owca.core.kernel import parse_thread_ids as parse_thread_ids  # re-exported


L3, MB = "L3", "MB"


DEFAULT_GROUP = ""  # the root directory: the default control group


NOT_GROUPS = frozenset(("info", "mon_groups", "mon_data"))


def parse_schemata(text: str) -> Dict[str, Dict[str, str]]:
    """`L3:0=7ff;1=7ff` lines to {"L3": {"0": "7ff", "1": "7ff"}} (names padded or not)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        name, sep, values = line.partition(":")
        if not sep:
            raise ValueError(f"schemata line {line!r:.60} has no ':'")
        domains = {}
        for item in values.split(";"):
            item = item.strip()
            if not item:
                continue
            cache_id, eq, value = item.partition("=")
            if not eq or not cache_id.strip().isdigit():
                raise ValueError(f"schemata item {item!r:.40} is not <cache id>=<value>")
            domains[str(int(cache_id))] = value.strip()
        out[name.strip()] = domains
    return out


def format_schemata(lines: Mapping[str, Mapping[str, object]]) -> str:
    """The inverse of parse_schemata, ids in numeric order."""
    return "".join(
        f"{name}:" + ";".join(f"{i}={v}" for i, v in sorted(domains.items(),
                                                          key=lambda kv: int(kv[0]))) + "\n"
        for name, domains in lines.items())


class ResctrlFS:
    """The resctrl mount through the few operations OWCA uses, one kernel command each.

    Tests substitute a subclass that applies the kernel's documented behaviour to a
    plain directory tree (tests/fake_node.py).
    """

    def __init__(self, root: str):
        self.root = root

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def mounted(self) -> bool:
        return os.path.isdir(self.path("info"))

    def read(self, *parts: str) -> str:
        fd = os.open(self.path(*parts), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode("ascii", "replace")
        finally:
            os.close(fd)

    def directories(self, *parts: str) -> List[str]:
        with os.scandir(self.path(*parts)) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]

    def write(self, text: str, *parts: str) -> None:
        fd = os.open(self.path(*parts), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def mkdir(self, name: str) -> None:
        os.mkdir(self.path(name))

    def rmdir(self, name: str) -> None:
        os.rmdir(self.path(name))
