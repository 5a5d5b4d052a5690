"""Issue #3's acceptance: the whole pipeline on real cgroups with real processes.

Two cgroup v1 tasks: one process that burnt a known amount of CPU, one that holds
a known amount of memory.  `owca-discover` (a static list naming exactly those
cgroups) | `owca-measure` | `owca-detect` | `owca-ship` run as real processes for a
few cycles; the Prometheus text that owca-ship writes is parsed and checked
against the kernel's own counters (cpuacct.usage, memory.usage_in_bytes, read by
the test) and against what the processes did.
"""
import os
import select
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cgroup_helpers import (ALLOCATE, BURN_THEN_SLEEP, kill, needs_v1, process_cpu_seconds,
                            read_int, tell, v1_cgroup, wait_line)
from conftest import tool_command, tool_env

MIB = 1 << 20
BURN_SECONDS = 1.0
HOLD_MIB = 64
CYCLES = 3


def run_pipeline(config: str, cycles: int, logs, timeout: float = 90.0) -> str:
    """The four tools, piped, until owca-ship has written `cycles` measurements.
    Their stderr goes to files in `logs` (a pipe nobody reads could fill up)."""
    env = tool_env()
    stages = {"discover": tool_command("discover", "-c", config, "--interval", "0.4"),
              "measure": tool_command("measure", "-c", config), "detect": tool_command("detect"),
              "ship": tool_command("ship")}
    procs = []

    def stderr_of_all() -> str:
        return "".join((logs / f"{name}.log").read_text() for name in stages)

    try:
        for name, argv in stages.items():
            stdin = procs[-1].stdout if procs else subprocess.DEVNULL
            with open(logs / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                              stderr=log, env=env))
            if stdin is not subprocess.DEVNULL:
                stdin.close()  # the next stage holds it now
        ship = procs[-1]
        out = b""
        deadline = time.monotonic() + timeout
        while out.count(b"\ntask_cpu_usage_seconds_total{") < 2 * cycles:  # two tasks a cycle
            left = deadline - time.monotonic()
            assert left > 0, f"fewer than {cycles} cycles in {timeout} s: {stderr_of_all()}"
            ready, _, _ = select.select([ship.stdout], [], [], left)
            if ready:
                chunk = os.read(ship.stdout.fileno(), 65536)
                assert chunk, "owca-ship ended early: " + stderr_of_all()
                out += chunk
        # End as the pipeline is meant to: stop the source, the rest ends on EOF.
        procs[0].send_signal(signal.SIGTERM)
        out += ship.communicate(timeout=60)[0]
        for p in procs:
            assert p.wait(timeout=60) == 0, (p.args, stderr_of_all())
        return out.decode()
    finally:
        for p in procs:
            kill(p)


def latest_samples(text: str) -> dict:
    """(name, task_name or cpu or '') -> (value, timestamp) of the last cycle; also
    the number of cycles each name was seen in."""
    latest, cycles = {}, {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # the family's name: the parser calls a counter's samples NAME_total
            key = (family.name, s.labels.get("task_name", s.labels.get("cpu", "")))
            if key not in latest or s.timestamp >= latest[key][1]:
                latest[key] = (s.value, s.timestamp)
            cycles.setdefault(key, set()).add(s.timestamp)
    return latest, {k: len(v) for k, v in cycles.items()}


@needs_v1
def test_shipped_metrics_match_the_kernel_and_the_processes(tmp_path):
    with v1_cgroup() as burner, v1_cgroup() as holder:
        burning = burner.start_python(BURN_THEN_SLEEP % {"seconds": BURN_SECONDS})
        holding = holder.start_python(ALLOCATE % {"mib": HOLD_MIB})
        wait_line(holding, "started")
        baseline = read_int(holder.file("memory", "memory.usage_in_bytes"))
        tell(holding)
        wait_line(holding, "allocated")
        wait_line(burning, "done")

        config = tmp_path / "owca.yaml"
        config.write_text(
            "discover:\n"
            "  source: !StaticDiscovery\n"
            "    tasks:\n"
            f"      - {{cgroup_path: '{burner.path}', name: burner}}\n"
            f"      - {{cgroup_path: '{holder.path}', name: holder}}\n")
        text = run_pipeline(str(config), CYCLES, tmp_path)

        kernel_cpu = read_int(burner.file("cpuacct", "cpuacct.usage")) / 1e9
        kernel_mem = read_int(holder.file("memory", "memory.usage_in_bytes"))
        burnt = process_cpu_seconds(burning.pid)

    latest, cycles = latest_samples(text)
    assert cycles[("task_cpu_usage_seconds", "burner")] >= CYCLES

    cpu, _ = latest[("task_cpu_usage_seconds", "burner")]
    assert cpu == pytest.approx(kernel_cpu, rel=0.01)
    assert cpu == pytest.approx(burnt, rel=0.10)
    assert cpu == pytest.approx(BURN_SECONDS, rel=0.10)

    mem, _ = latest[("task_mem_usage_bytes", "holder")]
    assert mem == pytest.approx(kernel_mem, rel=0.02)
    assert mem - baseline == pytest.approx(HOLD_MIB * MIB, rel=0.10)
    assert latest[("task_mem_usage_bytes", "burner")][0] < mem - HOLD_MIB * MIB / 2

    # the other stages ran: the platform was measured, the detector was asked
    assert ("platform_cpu_usage_seconds", "0") in latest    # seconds (ticks in frames)
    assert ("anomalies", "") in latest     # anomaly_count in frames
