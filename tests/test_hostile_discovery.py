"""Hostile orchestrators and hostile files for owca-discover (docs/discovery.md).

A kubelet or Mesos agent that dribbles its answer a byte a second, an answer
nested 100 000 levels deep, lone surrogates (`\\ud800`) in names and labels,
Kubernetes quantities up to `Ei` and beyond what a frame can carry; secret
files and CA bundles that are FIFOs, devices, directories or huge.  Each is
served by a real HTTP(S) server on loopback (tests/orchestrator_server.py) or
lies in a real file, and goes through the real tool or the stage: the cycle
ends, says what went wrong in one line, counts it, and the stream goes on.
Waits are bounded generously; what is asserted is that the tool did not wait
for the peer (the server counts the dribbles it finished), not how soon.
"""
import os
import subprocess

import pytest

from conftest import FIXTURES, tool_command, tool_env
from orchestrator_server import DRIBBLE, NORMAL, ReplayServer, load_json
from owca.core import frames

KUBELET = os.path.join(FIXTURES, "kubelet_docker")
AGENT = os.path.join(FIXTURES, "mesos_agent_aurora")
MAX_QUANTITY = 2 ** 63 - 1
# A bound on waits for what must happen, far above how long it takes.
GUARD = 60


def kubelet_routes(pods=None):
    return {"GET /pods": pods if pods is not None else load_json(KUBELET, "pods.json")}


def agent_routes(state=None):
    return {"POST /api/v1 GET_CONTAINERS": load_json(AGENT, "get_containers.json"),
            "POST /api/v1 GET_STATE": state if state is not None
            else load_json(AGENT, "get_state.json")}


SOURCES = {"kubernetes": ("KubernetesDiscovery", kubelet_routes, "GET /pods"),
           "mesos": ("MesosDiscovery", agent_routes, "POST /api/v1 GET_STATE")}


def pod(pods: dict, name: str) -> dict:
    (found,) = [p for p in pods["items"] if p["metadata"]["name"] == name]
    return found


def counters(frame) -> dict:
    return {s["name"]: s["value"] for s in frame["metrics"]}


def run_once(tmp_path, source_yaml: str, *args):
    """`owca-discover --once` (tasks kept whatever their cgroup): (result, frame or None)."""
    config = tmp_path / "owca.yaml"
    config.write_text("discover:\n  require_cgroup: false\n  source: " + source_yaml)
    result = subprocess.run(tool_command("discover", "--once", "--config", str(config), *args),
                            check=False, capture_output=True, text=True, env=tool_env(),
                            timeout=GUARD)
    frame = frames.validate(frames.decode(result.stdout.encode())) if result.stdout else None
    return result, frame


def check_config(tmp_path, source_yaml: str):
    config = tmp_path / "owca.yaml"
    config.write_text("discover:\n  source: " + source_yaml)
    return subprocess.run(tool_command("discover", "--check-config", "--config", str(config)),
                          check=False, capture_output=True, text=True, env=tool_env(),
                          timeout=GUARD)


def error_lines(stderr: str) -> list:
    return [line for line in stderr.splitlines() if ": error:" in line]


# -- 1. a peer that dribbles its headers cannot stretch the deadline ------------------------

@pytest.mark.parametrize("source", sorted(SOURCES))
def test_headers_dribbled_a_byte_a_second_do_not_stretch_the_deadline(tmp_path, source):
    """Each byte comes well within `timeout`, so only a deadline for the whole
    request ends it; the answer would take minutes to arrive in full."""
    tag, routes, _ = SOURCES[source]
    with ReplayServer(routes()) as server:
        server.mode = DRIBBLE
        result, frame = run_once(tmp_path, f"!{tag}\n    url: {server.url}\n"
                                           "    timeout: 5\n    deadline: 4\n")
        assert server.requests, "no request arrived"
        assert server.dribbles_outlasted == 0
    assert result.returncode == 0, result.stderr
    (line,) = error_lines(result.stderr)
    assert "no answer before the deadline (4 s)" in line and server.url in line, line
    assert frame["tasks"] == []
    assert counters(frame)["owca_discovery_errors_total"] == 1


def test_normal_mode_is_unchanged_by_the_watchdog(tmp_path):
    """A good answer through the deadline machinery: the recorded pods, as before."""
    with ReplayServer(kubelet_routes()) as server:
        server.mode = NORMAL
        result, frame = run_once(tmp_path, f"!KubernetesDiscovery\n    url: {server.url}\n"
                                           "    cgroup_driver: cgroupfs\n")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    expected = load_json(KUBELET, "expected_tasks_cgroupfs.json")["tasks"]
    for t in frame["tasks"]:
        t["labels"].pop("priority")
    assert frame["tasks"] == expected
