"""The kubelet CPU manager's checkpoint: which CPUs belong to Guaranteed pods.

With the `static` policy the kubelet gives each container of a Guaranteed pod
that asks for whole CPUs those CPUs exclusively, and records it in its
checkpoint, by default /var/lib/kubelet/cpu_manager_state:

    {"policyName": "static", "defaultCpuSet": "0,5-7",
     "entries": {"<pod uid>": {"<container name>": "1-4"}},
     "checksum": 1234567890}

`defaultCpuSet` is the shared pool (best-effort and burstable containers, and
the CPUs reserved for the system with --reserved-cpus, which the checkpoint
does not tell apart); every set in `entries` is one container's exclusive CPUs.
With the `none` policy there are no entries.  The kubelet rewrites the file
with an atomic rename, so a reader sees the old or the new content, whole.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

from owca.core.kernel import parse_cpu_list

DEFAULT_PATH = "/var/lib/kubelet/cpu_manager_state"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; str() is the one-line reason."""


@dataclass(frozen=True)
class CpuManagerState:
    policy: str
    default_cpus: FrozenSet[int]
    # pod uid -> container -> its exclusive CPUs
    exclusive: Dict[str, Dict[str, FrozenSet[int]]] = field(default_factory=dict)

    @property
    def exclusive_cpus(self) -> FrozenSet[int]:
        return frozenset().union(*(cpus for containers in self.exclusive.values()
                                   for cpus in containers.values()))


def parse(text: str) -> CpuManagerState:
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"not JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("policyName"), str):
        raise CheckpointError("expected an object with policyName")
    try:
        default = parse_cpu_list(str(raw.get("defaultCpuSet") or ""))
    except ValueError as e:
        raise CheckpointError(f"defaultCpuSet: {e}") from None
    entries = raw.get("entries") or {}
    if not isinstance(entries, dict):
        raise CheckpointError("entries: expected an object")
    exclusive: Dict[str, Dict[str, FrozenSet[int]]] = {}
    for pod, containers in entries.items():
        if not isinstance(containers, dict):
            raise CheckpointError(f"entries.{pod:.40}: expected an object")
        for name, cpus in containers.items():
            if not isinstance(cpus, str):
                raise CheckpointError(f"entries.{pod:.40}.{name:.40}: expected a CPU list")
            try:
                exclusive.setdefault(pod, {})[name] = parse_cpu_list(cpus)
            except ValueError as e:
                raise CheckpointError(f"entries.{pod:.40}.{name:.40}: {e}") from None
    return CpuManagerState(raw["policyName"], default, exclusive)


class CheckpointReader:
    """Reads the checkpoint again only when it changed (its inode, size or mtime)."""

    def __init__(self, path: str = DEFAULT_PATH):
        self.path = path
        self._key: Optional[Tuple[int, int, int]] = None   # inode, size, mtime of _state's file
        self._state: Optional[CpuManagerState] = None

    def read(self) -> Optional[CpuManagerState]:
        """The current state; None when there is no file (no kubelet, or no CPU manager).
        Raises CheckpointError (or OSError) when the file is there but unusable."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._key, self._state = None, None
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._key:
            with open(self.path, encoding="utf-8") as f:
                state = parse(f.read())
            self._key, self._state = key, state
        return self._state
