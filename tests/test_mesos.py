"""Discovery from a Mesos agent (lib/owca/discover/sources/mesos.py).

The recorded operator API answers (tests/fixtures/mesos_*/) are parsed against
their expected task lists, then served by a real HTTP server on loopback, and
by an HTTPS one with a test CA and HTTP basic credentials, through the
owca-discover stage.  Cgroup trees for the existence check are directories
laid out like the v1 and v2 hierarchies.
"""
import base64
import dataclasses
import logging
import os

import pytest

from conftest import FIXTURES, ROOT
from orchestrator_server import (ReplayServer, fake_cgroupfs, golden, load_json,
                                 pki, server_tls)  # noqa: F401 (pki: a fixture)
from owca.core import config, frames
from owca.discover.stage import Discover, DiscoverConfig
from owca.plugin import DiscoveryError
from owca.discover.sources.mesos import MesosDiscovery, parse_containers, parse_state
from owca.core.paths import Paths
from owca.core.priority import PriorityRule

AURORA = os.path.join(FIXTURES, "mesos_agent_aurora")
TASK_GROUP = os.path.join(FIXTURES, "mesos_agent_task_group")
DOCKER = os.path.join(FIXTURES, "mesos_agent_docker")
EXECUTOR = "4f2c8a1e-9b3d-4e5f-a6b7-c8d9e0f1a2b3"


def routes(fixture, state="get_state.json"):
    return {"POST /api/v1 GET_CONTAINERS": load_json(fixture, "get_containers.json"),
            "POST /api/v1 GET_STATE": load_json(fixture, state)}


def parse(fixture, state="get_state.json"):
    containers, problems = parse_containers(load_json(fixture, "get_containers.json"))
    tasks, more = parse_state(load_json(fixture, state), containers)
    return tasks, problems + more


# -- pure parts -----------------------------------------------------------------------------

def test_containers_are_keyed_by_framework_and_executor():
    answer = {"type": "GET_CONTAINERS", "get_containers": {"containers": [
        {"container_id": {"value": "c1"}, "executor_id": {"value": "e1"},
         "framework_id": {"value": "f1"}},
        {"container_id": {"value": "n1", "parent": {"value": "c1"}},
         "executor_id": {"value": "e1"}, "framework_id": {"value": "f1"}},  # nested
        {"container_id": {"value": "s1"}},  # standalone
        {"container_id": {"value": "c2"}, "executor_id": {"value": 7},
         "framework_id": {"value": "f1"}},
    ]}}
    found, problems = parse_containers(answer)
    assert found == {("f1", "e1"): "c1"}
    assert problems == ["mesos: container left out: GET_CONTAINERS containers[3].executor_id"
                        ".value: expected str, got int 7"]


def test_a_command_task_is_its_own_executor_and_mesos_units_are_converted():
    state = {"type": "GET_STATE", "get_state": {"get_tasks": {"launched_tasks": [
        {"task_id": {"value": "t1"}, "framework_id": {"value": "f1"}, "name": "job",
         "state": "TASK_RUNNING",
         "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.5}},
                       {"name": "mem", "type": "SCALAR", "scalar": {"value": 100}},
                       {"name": "mem", "type": "SCALAR", "scalar": {"value": 28},
                        "allocation_info": {"role": "b"}, "revocable": {}},
                       {"name": "disk", "type": "SCALAR", "scalar": {"value": 1.5}},
                       {"name": "network.bandwidth", "type": "SCALAR", "scalar": {"value": 10}},
                       {"name": "ports", "type": "RANGES",
                        "ranges": {"range": [{"begin": 1, "end": 2}]}}],
         "labels": {"labels": [{"key": "app.name", "value": "x"}]}},
    ]}}}
    tasks, problems = parse_state(state, {("f1", "t1"): "c9"}, "sys/mesos")
    assert problems == []
    assert tasks == [{
        "id": "t1", "name": "job", "cgroup_path": "/sys/mesos/c9",
        "labels": {"app_name": "x", "framework_id": "f1",
                   "executor_id": "t1", "container_id": "c9", "role": "b",
                   "revocable": "true"},
        "resources": {"cpus": 0.5, "mem_bytes": 128 * 2 ** 20, "disk_bytes": 1.5 * 2 ** 20,
                      "network_bandwidth": 10}}]


@pytest.mark.parametrize("answer", [
    [], {"type": "GET_STATE"}, {"type": "GET_HEALTH", "get_state": {}},
    {"type": "GET_STATE", "get_state": {"get_tasks": {"launched_tasks": {}}}},
    {"type": "GET_STATE", "get_state": {"get_tasks": []}},
])
def test_an_answer_of_the_wrong_shape_is_a_discovery_error(answer):
    with pytest.raises(DiscoveryError):
        parse_state(answer, {})


# -- recorded answers ---------------------------------------------------------------------

@pytest.mark.parametrize("fixture", [AURORA, TASK_GROUP, DOCKER])
def test_recorded_answers_give_the_expected_tasks(fixture):
    tasks, problems = parse(fixture)
    golden(os.path.join(fixture, "expected_tasks.json"), {"tasks": tasks, "problems": problems})


def test_recorded_aurora_task():
    tasks, problems = parse(AURORA)
    assert problems == []
    (task,) = tasks
    assert task["id"] == "root-staging14-cassandra--9043-0-9ee9fbf1-b51b-4bb3-9748-6a4327fd7e0e"
    assert task["cgroup_path"] == "/mesos/ceab3bec-9282-43aa-b05f-095736cc169e"
    assert task["labels"]["org_apache_aurora_tier"] == "preemptible"
    assert task["labels"]["org_apache_aurora_metadata_application"] == "cassandra"
    assert task["labels"]["framework_name"] == "Aurora"
    assert task["resources"] == {"cpus": 8, "mem_bytes": 2048 * 2 ** 20,
                                 "disk_bytes": 10240 * 2 ** 20}


def test_docker_containerizer_tasks_are_refused_with_a_reason_others_listed():
    tasks, problems = parse(DOCKER)
    assert problems == [
        "mesos: task 'web.4b8f0e6a-1c2d-11ef-9b3a-0242ac110004' left out: it runs in the "
        "Docker containerizer (container.type DOCKER), whose cgroups are Docker's, not the "
        "agent's: not supported; run it in the Mesos containerizer (docs/discovery.md)"]
    (report,) = tasks
    assert report["cgroup_path"] == "/mesos/6e5d4c3b-2a19-4f8e-9d7c-6b5a4f3e2d1c"


def test_an_empty_task_name_is_the_task_id_and_sums_keep_mesos_precision():
    (report,), _ = parse(DOCKER)
    assert report["name"] == report["id"] == "report.9d2c7e10-1c2e-11ef-9b3a-0242ac110004"
    # 0.1 + 0.048 cpus; 100.5 + 27.3 MB (Mesos keeps three decimals; bytes are whole)
    assert report["resources"] == {"cpus": 0.148, "mem_bytes": 134008013,  # 127.8 MiB
                                   "disk_bytes": 64 * 2 ** 20}
    assert report["labels"]["role"] == "*,analytics"


def test_null_lists_are_empty():
    state = load_json(AURORA, "get_state.json")
    (task,) = state["get_state"]["get_tasks"]["launched_tasks"]
    task["labels"]["labels"] = None
    task["statuses"] = None
    task["resources"] = None
    state["get_state"]["get_frameworks"]["frameworks"] = None
    containers, _ = parse_containers(load_json(AURORA, "get_containers.json"))
    tasks, problems = parse_state(state, containers)
    assert problems == [] and len(tasks) == 1 and tasks[0]["resources"] == {}
    empty = {"type": "GET_STATE", "get_state": {"get_tasks": {"launched_tasks": None},
                                                "get_frameworks": None}}
    assert parse_state(empty, {}) == ([], [])
    assert parse_state({"type": "GET_STATE", "get_state": {"get_tasks": None}}, {}) == ([], [])
    assert parse_containers({"type": "GET_CONTAINERS",
                             "get_containers": {"containers": None}}) == ({}, [])


def test_wrong_types_in_fields_owca_does_not_use_do_not_matter():
    # The recorded invalid answer has numbers for the agent id, an executor
    # id of another executor, the executor pid and a status's container id.
    assert parse(AURORA, "get_state_invalid_types.json") == parse(AURORA)


def test_task_group_forgeries_and_orphans_are_reported_and_left_out():
    tasks, problems = parse(TASK_GROUP)
    assert [t["id"] for t in tasks] == ["web.frontend-0", "web.logger-0", "batch.sim-17"]
    nested = "9e8d7c6b-5a4f-4e3d-b2c1-a0f9e8d7c6b5"
    assert tasks[0]["cgroup_path"] == f"/mesos/{EXECUTOR}/mesos/{nested}"
    text = "\n".join(problems)
    assert "'../../../../sys/fs/cgroup' cannot be part of a cgroup path" in text
    assert "'web.escape-1' left out: the agent lists no container" in text
    assert "'web.orphan-3' left out" in text
    assert "'web.negative-2' left out" in text and ">= 0, got -1" in text
    assert "label 'bad value'" in text
    assert tasks[1]["labels"]["stream"] == ""  # a Mesos label may have no value
    assert "bad_value" not in tasks[1]["labels"]


# -- served over HTTP, through the stage -----------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_served_state_becomes_a_tasks_frame(tmp_path, caplog, version):
    expected, _ = parse(TASK_GROUP)
    # batch.sim-17's container and the task group's executor exist; of the
    # nested containers only the frontend's has its own cgroup (the logger's
    # shares its executor's, the agent's default).
    frontend, logger, sim = (t["cgroup_path"] for t in expected)
    cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [frontend, sim, f"/mesos/{EXECUTOR}"], version)
    with ReplayServer(routes(TASK_GROUP)) as agent:
        stage = Discover(DiscoverConfig(source=MesosDiscovery(url=agent.url)),
                         {"--cgroupfs": cgroupfs})
        with caplog.at_level(logging.WARNING):
            frame = stage.produce()[0]
        frames.validate(frame)
        assert [(t["id"], t["cgroup_path"]) for t in frame["tasks"]] == [
            ("web.frontend-0", frontend), ("web.logger-0", f"/mesos/{EXECUTOR}"),
            ("batch.sim-17", sim)]
        assert "executor_cgroup_path" not in frame["tasks"][0]
        # HP unless revocable, by default
        assert [t["labels"]["priority"] for t in frame["tasks"]] == ["hp", "hp", "be"]
        assert [r[:3] for r in agent.requests] == [("POST", "/api/v1", "GET_CONTAINERS"),
                                                   ("POST", "/api/v1", "GET_STATE")]
        assert agent.requests[0][3]["Content-Type"] == "application/json"
        metrics = {s["name"]: s["value"] for s in frame["metrics"]}
        assert metrics["owca_orchestrator_invalid_entries_total"] == 5
        assert metrics["owca_orchestrator_requests_total"] == 2
        assert metrics["owca_discovery_errors_total"] == 0
        # each problem is logged once, not again while it lasts
        stage.produce()
        assert caplog.text.count("web.orphan-3") == 1
        metrics = {s["name"]: s["value"] for s in stage.produce()[0]["metrics"]}
        assert metrics["owca_orchestrator_invalid_entries_total"] == 15


@pytest.mark.integration
def test_a_task_whose_cgroup_is_missing_is_reported_and_left_out(tmp_path, caplog):
    cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [], "v1")
    with ReplayServer(routes(AURORA)) as agent:
        stage = Discover(DiscoverConfig(source=MesosDiscovery(url=agent.url)),
                         {"--cgroupfs": cgroupfs})
        with caplog.at_level(logging.WARNING):
            frame = stage.produce()[0]
    assert frame["tasks"] == []
    assert "its cgroup /mesos/ceab3bec-9282-43aa-b05f-095736cc169e does not exist" in caplog.text


@pytest.mark.integration
def test_priority_from_an_aurora_tier_label(tmp_path):
    rule = PriorityRule(label="org.apache.aurora.tier", hp_values=["preferred"], roles=["web"])
    paths = Paths(cgroupfs=str(tmp_path))
    with ReplayServer(routes(TASK_GROUP)) as agent:
        tasks = MesosDiscovery(url=agent.url, priority=rule).list_tasks(paths)
    assert {t["id"]: t["labels"]["priority"] for t in tasks} == {
        "web.frontend-0": "hp", "web.logger-0": "hp", "batch.sim-17": "be"}
    with ReplayServer(routes(AURORA)) as agent:
        tasks = MesosDiscovery(url=agent.url, priority=rule).list_tasks(paths)
    assert tasks[0]["labels"]["priority"] == "be"  # tier preemptible


def test_config_with_a_cgroups_root_and_refusals(tmp_path):
    cfg = config.load_section(None, "discover", DiscoverConfig, text=(
        "discover:\n  source: !MesosDiscovery {url: 'http://127.0.0.1:5051/', "
        "cgroups_root: /sys/mesos}\n"))
    assert cfg.source.cgroups_root == "/sys/mesos"
    # A refusal that names its field points at the field's line, others at the object's.
    for bad, line, reason in [("cgroups_root: ../x", 3, "cannot be part of a cgroup path"),
                              ("username: ops", 2, "go together"),
                              ("retries: -1", 3, "retries: expected a number >= 0"),
                              ("url: 'http://user:pw@agent:5051'", 3,
                               "no query, fragment or credentials")]:
        with pytest.raises(config.ConfigError) as e:
            config.load_section("owca.yaml", "discover", DiscoverConfig,
                                text=f"discover:\n  source: !MesosDiscovery\n    {bad}\n")
        assert str(e.value).startswith(f"owca.yaml:{line}:") and reason in str(e.value), \
            str(e.value)


# -- HTTPS with a test CA and HTTP basic credentials -------------------------------------------

@pytest.mark.integration
def test_https_agent_with_ca_and_basic_credentials(pki, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")
    with ReplayServer(routes(AURORA), tls=server_tls(pki)) as agent:
        source = MesosDiscovery(url=agent.url, ca_bundle=pki["ca"], username="owca",
                                password_file=str(secret))
        tasks = source.list_tasks(Paths(cgroupfs=str(tmp_path)))
        assert [t["labels"].pop("priority") for t in tasks] == ["hp"]  # not revocable
        assert tasks == parse(AURORA)[0]
        sent = agent.requests[0][3]["Authorization"]
        assert sent == "Basic " + base64.b64encode(b"owca:s3cr3t").decode()
        secret.write_text("")
        with pytest.raises(DiscoveryError, match="password_file: .* holds no usable secret"):
            source.list_tasks(Paths(cgroupfs=str(tmp_path)))


@pytest.mark.integration
def test_agent_with_authentication_refuses_wrong_credentials_in_one_line(
        pki, tmp_path, caplog):
    """An agent with --authenticate_http_readonly: 401 unless the principal's secret is right.

    The secret appears nowhere: not in the error line, the log (debug), or the frame.
    """
    secret = tmp_path / "secret"
    secret.write_text("right-s3cr3t\n")
    cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [parse(AURORA)[0][0]["cgroup_path"]], "v2")
    with ReplayServer(routes(AURORA), tls=server_tls(pki)) as agent:
        agent.authorization = "Basic " + base64.b64encode(b"owca:right-s3cr3t").decode()
        source = MesosDiscovery(url=agent.url, ca_bundle=pki["ca"], username="owca",
                                password_file=str(secret))
        stage = Discover(DiscoverConfig(source=source), {"--cgroupfs": cgroupfs})
        with caplog.at_level(logging.DEBUG):
            good = stage.produce()[0]
            assert [t["id"] for t in good["tasks"]] == [parse(AURORA)[0][0]["id"]]
            secret.write_text("wrong-s3cr3t\n")
            bad = stage.produce()[0]
            unauthenticated = MesosDiscovery(url=agent.url, ca_bundle=pki["ca"])
            with pytest.raises(DiscoveryError) as e:
                unauthenticated.list_tasks(Paths(cgroupfs=cgroupfs))
    assert str(e.value) == f"POST {agent.url}/api/v1 GET_CONTAINERS: HTTP 401 Unauthorized"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "HTTP 401 Unauthorized" in errors[0]
    assert source._client.retries == 0  # a refusal does not pass by itself
    seen = caplog.text + str(good) + str(bad)
    for leak in ("right-s3cr3t", "wrong-s3cr3t", base64.b64encode(b"owca:right").decode()[:8]):
        assert leak not in seen


@pytest.mark.integration
def test_https_agent_with_an_unknown_ca_is_refused(pki, tmp_path):
    with ReplayServer(routes(AURORA), tls=server_tls(pki)) as agent:
        source = MesosDiscovery(url=agent.url, ca_bundle=pki["other_ca"])
        with pytest.raises(DiscoveryError, match="GET_CONTAINERS: TLS certificate verify failed"):
            source.list_tasks(Paths(cgroupfs=str(tmp_path)))
        assert agent.requests == []


@pytest.mark.integration
def test_the_example_config_works_against_a_served_agent(tmp_path):
    cfg = config.load_section(os.path.join(ROOT, "configs", "mesos.yaml"), "discover",
                              DiscoverConfig)
    with ReplayServer(routes(AURORA)) as agent:
        cfg.source = dataclasses.replace(cfg.source, url=agent.url)
        cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [parse(AURORA)[0][0]["cgroup_path"]], "v2")
        frame = Discover(cfg, {"--cgroupfs": cgroupfs}).produce()[0]
    (task,) = frame["tasks"]
    assert task["labels"]["priority"] == "be"  # Aurora tier preemptible
    assert task["cgroup_path"] == "/mesos/ceab3bec-9282-43aa-b05f-095736cc169e"
