"""The reference workloads of workloads/catalog.yaml, made ready to launch.

A Workload is a catalog entry: its command and files are templates whose
{placeholders} (port, run_dir, workloads) are filled when it is prepared in
its run directory; braces that name no known placeholder (nginx's blocks,
owca-sine's per-step ones) are left alone.
"""
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from owca_workloads.cli import WORKLOADS_DIR
from owca_workloads.launch import LaunchError

CATALOG = os.path.join(WORKLOADS_DIR, "catalog.yaml")
ROLES = ("hp", "be")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class CatalogError(ValueError):
    """A catalog entry that cannot be used (one line, naming the entry)."""


def fill(template: str, values: Dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


@dataclass
class Load:
    """How an HP workload is measured: a load generator and the parser of its output."""
    command: List[str]
    parser: str
    connections: int = 1
    step: float = 2.0
    feedback: bool = True   # correct the asked rate by the achieved rate the parser reads
    fixed: bool = False     # one long run at the generator's own pace, not sine-driven


@dataclass
class Workload:
    name: str
    role: str
    command: List[str]
    description: str = ""
    resource: Optional[str] = None
    files: Dict[str, object] = field(default_factory=dict)
    ready: Dict[str, str] = field(default_factory=dict)
    load: Optional[Load] = None
    slo: Optional[float] = None
    sli_metric: str = "apm_latency_p99_seconds"
    # be: the light version of its work, a decoy of the scenarios' benign phases
    benign: Optional[List[str]] = None
    # be: its memory limit (bytes) in the scenarios, so that it reclaims under it
    memory_limit_bytes: Optional[int] = None
    # hp: extra clients of a load-only surge (templates: {rate} {duration} {connections}
    # {delay_ms} {requests} and the workload's), measured by no one
    surge: Optional[List[str]] = None

    def values(self, run_dir: str, port: Optional[int]) -> Dict[str, str]:
        values = {"run_dir": run_dir, "workloads": WORKLOADS_DIR}
        if port is not None:
            values["port"] = str(port)
        return values

    def needs_port(self) -> bool:
        texts = list(self.command) + [v for v in self.files.values() if isinstance(v, str)]
        if self.load:
            texts += self.load.command
        return any("{port}" in t for t in texts) or "tcp" in self.ready

    def prepare(self, run_dir: str, port: Optional[int]) -> List[str]:
        """Write the workload's files into run_dir; its command, filled in."""
        values = self.values(run_dir, port)
        os.makedirs(run_dir, exist_ok=True)
        # The service may drop privileges (nginx's workers, memcached -u nobody).
        os.chmod(run_dir, 0o755)
        for rel, content in self.files.items():
            path = os.path.join(run_dir, rel)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            if isinstance(content, dict):
                data = filler(int(content["size"]))
            else:
                data = fill(content, values)
            with open(path, "w") as f:
                f.write(data)
            os.chmod(path, 0o644)
        os.makedirs(os.path.join(run_dir, "tmp"), mode=0o755, exist_ok=True)
        return [fill(arg, values) for arg in self.command]

    def load_command(self, run_dir: str, port: Optional[int]) -> List[str]:
        """The load generator's template, with the workload's placeholders filled (the
        per-step ones are left for owca-sine)."""
        values = self.values(run_dir, port)
        return [fill(arg, values) for arg in self.load.command]


def filler(size: int) -> str:
    line = "OWCA reference page: the same bytes for every request.\n"
    return (line * (size // len(line) + 1))[:size]


def _entry(name: str, raw) -> Workload:
    if not isinstance(raw, dict):
        raise CatalogError(f"{name}: expected a mapping")
    try:
        load = raw.get("load")
        workload = Workload(name=name, role=raw["role"], command=[str(a) for a in raw["command"]],
                            description=" ".join(str(raw.get("description", "")).split()),
                            resource=raw.get("resource"), files=dict(raw.get("files") or {}),
                            ready={k: str(v) for k, v in (raw.get("ready") or {}).items()},
                            load=Load(**{**load, "command": [str(a) for a in load["command"]]})
                            if load else None,
                            slo=raw.get("slo"),
                            sli_metric=raw.get("sli_metric", "apm_latency_p99_seconds"),
                            benign=[str(a) for a in raw["benign"]] if raw.get("benign")
                            else None,
                            memory_limit_bytes=parse_bytes(raw["memory_limit"])
                            if raw.get("memory_limit") is not None else None,
                            surge=[str(a) for a in raw["surge"]] if raw.get("surge")
                            else None)
    except ValueError as e:
        raise CatalogError(f"{name}: {e}") from None
    except (KeyError, TypeError) as e:
        raise CatalogError(f"{name}: {type(e).__name__}: {e}") from None
    if workload.role not in ROLES:
        raise CatalogError(f"{name}: role {workload.role!r} is not one of {', '.join(ROLES)}")
    if workload.role == "hp" and workload.load is None:
        raise CatalogError(f"{name}: an hp workload needs a load")
    return workload


_SIZE = re.compile(r"^([0-9]+)([KMG]?)$")


def parse_bytes(value) -> int:
    """12345, "256M", "1G" -> bytes (K, M, G: powers of 1024)."""
    m = _SIZE.match(str(value).strip())
    if not m:
        raise ValueError(f"expected bytes such as 268435456 or 256M, got {value!r}")
    return int(m.group(1)) * 1024 ** " KMG".index(m.group(2) or " ")


def load_catalog(path: str = CATALOG) -> Dict[str, Workload]:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise CatalogError(f"{path}: expected a mapping of workloads")
    return {name: _entry(name, entry) for name, entry in raw.items()}


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_tcp(port: int, timeout: float, alive=lambda: True) -> None:
    """Until something accepts connections on the loopback port; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if not alive():
                raise TimeoutError(f"the service exited before port {port} opened") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on port {port} "
                                   f"after {timeout:.0f} s") from None
            time.sleep(0.05)


def tool(name: str) -> List[str]:
    """The argv that runs one of workloads/' tools with this interpreter."""
    return [sys.executable, os.path.join(WORKLOADS_DIR, name)]


def wrapped_load(workload: Workload, task_id: str, run_dir: str, port: Optional[int],
                 apm_dir: str, base: float, amplitude: float, period: float,
                 slo: Optional[float] = None, step: Optional[float] = None,
                 connections: Optional[int] = None, interval: float = 1.0,
                 labels: Optional[dict] = None) -> List[str]:
    """owca-wrap around owca-sine around the workload's load generator (or around the
    generator itself, for a fixed load): the argv that measures an HP workload."""
    load = workload.load
    generator = workload.load_command(run_dir, port)
    connections = connections or load.connections
    slo = slo if slo is not None else workload.slo
    wrap = tool("owca-wrap") + ["--task-id", task_id, "--apm-dir", apm_dir,
                                "--parser", load.parser, "--interval", str(interval),
                                "--label", f"workload={workload.name}",
                                "--label", f"generator={os.path.basename(generator[0])}",
                                "--restart", "on-failure", "--restart-delay", "1"]
    for key, value in (labels or {}).items():
        wrap += ["--label", f"{key}={value}"]
    if slo is not None:
        wrap += ["--slo", str(slo), "--sli-metric", workload.sli_metric]
    if load.fixed:
        return wrap + ["--"] + generator
    wrap += ["--parser", "owca-sine"]
    sine = tool("owca-sine") + ["--base", str(base), "--amplitude", str(amplitude),
                                "--period", str(period), "--step", str(step or load.step),
                                "--connections", str(connections)]
    if load.feedback:
        sine += ["--parser", load.parser]
    return wrap + ["--"] + sine + ["--"] + generator


def start(launcher, workload: Workload, name: str, run_dir: str, cpus: Optional[str] = None,
          log_file=None, ready_timeout: float = 15.0, **options):
    """Launch a catalog workload in its cgroup (options: Launcher.start's, e.g.
    cpu_quota_cores); wait until its port accepts connections.  (Launched, port)."""
    port = free_port() if workload.needs_port() else None
    argv = workload.prepare(run_dir, port)
    launched = launcher.start(name, argv, cpus=cpus, cwd=run_dir, stdout=log_file,
                              stderr=log_file, role=workload.role, workload=workload.name,
                              **options)
    if port is not None:
        try:
            wait_tcp(port, ready_timeout, alive=lambda: launcher.running(name))
        except TimeoutError as e:
            launcher.stop(name)
            raise LaunchError(f"{name}: {e}") from None
    return launched, port


def unavailable(workloads: List[Workload], paths=None) -> str:
    """Why these workloads cannot be launched here (root, cgroups, binaries), or ''."""
    from owca.core.paths import Paths
    from owca_workloads.launch import CONTROLLERS, CgroupSet
    if os.geteuid() != 0:
        return "needs root to make cgroups"
    missing = CgroupSet(paths or Paths(), "/", CONTROLLERS).missing_controllers()
    if missing:
        return f"cgroup v1 controllers not mounted: {', '.join(missing)}"
    binaries = []
    for w in workloads:
        binaries.append(w.command[0])
        if w.load is not None:
            binaries.append(w.load.command[0])
    absent = sorted({b for b in binaries if shutil.which(b) is None})
    if absent:
        return f"not installed: {', '.join(absent)} (requirements/apt.txt)"
    return ""
