"""owca-discover | owca-measure | owca-ship against a served orchestrator answer.

The test makes real cgroup v1 directories (cpu, cpuacct, memory) under a
test-unique parent, laid out as the kubelet (cgroupfs driver) or the Mesos
containerizer lays them out, starts a process in each (one burning CPU, one
sleeping), serves a copy of a recorded kubelet or agent answer whose ids are
replaced with fresh ones, and runs the three tools as processes.  The shipped
exposition must carry task_cpu_usage_seconds for exactly the served tasks,
with their labels.
"""
import contextlib
import re
import subprocess
import uuid

import pytest

from cgroup_helpers import BURN_FOREVER, let_burn, needs_v1, new_name, v1_cgroup, wait_line
from conftest import FIXTURES, ROOT, tool_command, tool_env
from orchestrator_server import ReplayServer, load_json

pytestmark = needs_v1

SLEEP = "import sys\nprint('running', flush=True)\nsys.stdin.readline()\n"


def hex_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex


def kubelet_answer():
    """The recorded PodList, reduced to two running pods with fresh ids: (answer, tasks).

    tasks: (uid, [cgroup path components below the root], program) per pod; the
    process runs in the pod's container cgroup, as under a real kubelet.
    """
    answer = load_json(FIXTURES, "kubelet_docker", "pods.json")
    pods = [p for p in answer["items"] if p["metadata"]["name"] in ("test", "test2")]
    tasks = []
    for pod, program in zip(pods, (BURN_FOREVER, SLEEP)):
        uid = str(uuid.uuid4())
        pod["metadata"]["uid"] = uid
        (status,) = pod["status"]["containerStatuses"]
        cid = hex_id()
        status["containerID"] = f"docker://{cid}"
        qos = pod["status"]["qosClass"].lower()
        tasks.append((uid, ["kubepods", qos, f"pod{uid}", cid], program))
    answer["items"] = pods
    return {"GET /pods": answer}, tasks


def mesos_answer():
    """The recorded agent answers with a fresh task id and container id."""
    state = load_json(FIXTURES, "mesos_agent_aurora", "get_state.json")
    containers = load_json(FIXTURES, "mesos_agent_aurora", "get_containers.json")
    (task,) = state["get_state"]["get_tasks"]["launched_tasks"]
    task_id = f"root-e2e-cassandra-{uuid.uuid4()}"
    task["task_id"]["value"] = task_id
    executor = task["executor_id"]["value"]
    cid = str(uuid.uuid4())
    for c in containers["get_containers"]["containers"]:
        if c["executor_id"]["value"] == executor:
            c["container_id"]["value"] = cid
    return ({"POST /api/v1 GET_STATE": state, "POST /api/v1 GET_CONTAINERS": containers},
            [(task_id, ["mesos", cid], BURN_FOREVER)])


def source_config(kind: str, url: str, root: str) -> str:
    if kind == "kubernetes":
        return (f"  source: !KubernetesDiscovery\n    url: {url}\n"
                f"    cgroup_driver: cgroupfs\n    cgroup_root: {root}\n")
    return (f"  source: !MesosDiscovery\n    url: {url}\n"
            f"    cgroups_root: {root.lstrip('/')}/mesos\n")


def exposition_values(text: str, metric: str) -> dict:
    """task_id -> (labels text, value) of a metric's samples."""
    out = {}
    for m in re.finditer(rf"^{metric}\{{(.*)\}} (\S+)", text, re.M):
        labels = m.group(1)
        task_id = re.search(r'task_id="([^"]*)"', labels).group(1)
        out[task_id] = (labels, float(m.group(2)))
    return out


@pytest.mark.parametrize("kind", ["kubernetes", "mesos"])
def test_discover_measure_ship_against_real_cgroups(tmp_path, kind):
    routes, tasks = kubelet_answer() if kind == "kubernetes" else mesos_answer()
    root = new_name("owca-e2e")
    with contextlib.ExitStack() as stack:
        made = {}  # each directory level once, removed innermost first
        children = []
        for task_id, parts, program in tasks:
            path = root
            cg = None
            for part in [""] + parts:
                path = path if not part else f"{path}/{part}"
                if path not in made:
                    made[path] = stack.enter_context(v1_cgroup(path=path))
                cg = made[path]
            child = cg.start_python(program)
            wait_line(child, "running")
            children.append((task_id, child, program))
        burning = [c for _, c, p in children if p is BURN_FOREVER]
        let_burn(burning[0], 0.2)
        with ReplayServer(routes) as server:
            config = tmp_path / "owca.yaml"
            config.write_text("discover:\n" + source_config(kind, server.url, root))
            pipeline = (" ".join(tool_command("discover", "--once", "--config", str(config)))
                        + " | " + " ".join(tool_command("measure"))
                        + " | " + " ".join(tool_command("ship")))
            result = subprocess.run(pipeline, shell=True, capture_output=True, env=tool_env(),
                                    timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    shipped = result.stdout.decode()
    usage = exposition_values(shipped, "task_cpu_usage_seconds_total")
    assert sorted(usage) == sorted(task_id for task_id, _, _ in tasks), shipped[:2000]
    for task_id, _, program in tasks:
        labels, seconds = usage[task_id]
        assert 'priority="' in labels
        if program is BURN_FOREVER:
            assert seconds >= 0.2  # what the burning child used, at least
    if kind == "kubernetes":
        burn_uid, sleep_uid = tasks[0][0], tasks[1][0]
        assert 'pod_name="test"' in usage[burn_uid][0]
        assert 'qos_class="Burstable"' in usage[burn_uid][0]
        assert 'qos_class="BestEffort"' in usage[sleep_uid][0]
        assert usage[sleep_uid][1] < usage[burn_uid][1]
    else:
        assert 'org_apache_aurora_tier="preemptible"' in usage[tasks[0][0]][0]
    assert "error" not in result.stderr.decode().lower(), result.stderr.decode()
