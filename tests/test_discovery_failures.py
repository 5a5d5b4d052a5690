"""An orchestrator that is slow, down, or answers garbage (docs/discovery.md).

Each test points discovery at a real HTTP server on loopback that misbehaves
on demand (tests/orchestrator_server.py) and checks the one-line error, the
counters, what the tasks frame holds meanwhile, and the recovery.  Against a
hanging server the property checked is that the cycle ends without waiting for
the server's minute-long hang (the server counts the hangs that ran out), not
how soon it ends.
"""
import logging
import os
import re
import shutil
import signal
import subprocess

import pytest

from conftest import FIXTURES, FakeClock, tool_command, tool_env
from orchestrator_server import (CLOSE, ERROR_500, GARBAGE, HANG, NORMAL, TRUNCATE,
                                 ReplayServer, fake_cgroupfs, load_json, wait_until)
from owca.core import frames
from owca.discover import stage as discover_stage
from owca.discover.stage import Discover, DiscoverConfig
from owca.plugin import DiscoveryError
from owca.discover.sources import http as discover_http
from owca.discover.sources.http import HttpClient, HttpOptions
from owca.discover.sources.kubernetes import KubernetesDiscovery
from owca.discover.sources.mesos import MesosDiscovery

KUBELET = os.path.join(FIXTURES, "kubelet_docker")
AGENT = os.path.join(FIXTURES, "mesos_agent_aurora")
FAST = dict(timeout=0.3, deadline=1.0, retries=3, backoff=0.02, backoff_max=0.05)


def kubelet_routes():
    return {"GET /pods": load_json(KUBELET, "pods.json")}


def agent_routes():
    return {"POST /api/v1 GET_CONTAINERS": load_json(AGENT, "get_containers.json"),
            "POST /api/v1 GET_STATE": load_json(AGENT, "get_state.json")}


SOURCES = {
    "kubernetes": (kubelet_routes, lambda url, **kw: KubernetesDiscovery(
        url=url, cgroup_driver="cgroupfs", **kw)),
    "mesos": (agent_routes, lambda url, **kw: MesosDiscovery(url=url, **kw)),
}


@pytest.fixture(params=sorted(SOURCES))
def setup(request, tmp_path):
    """(server, stage) for each source: a served recorded answer, its cgroups present."""
    routes, make = SOURCES[request.param]
    with ReplayServer(routes()) as probe:
        listed = make(probe.url).list_tasks(None)
    cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [t["cgroup_path"] for t in listed], "v1")
    server = ReplayServer(routes()).start()
    stage = Discover(DiscoverConfig(source=make(server.url, **FAST)), {"--cgroupfs": cgroupfs})
    yield server, stage, cgroupfs, listed
    server.stop()


def counters(frame) -> dict:
    return {s["name"]: s["value"] for s in frame["metrics"]}


def errors_logged(caplog) -> list:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("mode, reason, retried", [
    (HANG, "no answer", True),
    (ERROR_500, "HTTP 500 Internal Server Error", True),
    (GARBAGE, "malformed JSON", True),
    (TRUNCATE, "the connection closed before the end of the answer", True),
    (CLOSE, "the connection closed without an answer", True),
])
def test_a_failing_cycle_reports_one_line_counts_and_keeps_the_last_list(setup, caplog, mode,
                                                                           reason, retried):
    server, stage, _, listed = setup
    good = stage.produce()[0]
    assert len(good["tasks"]) == len(listed) > 0
    assert counters(good)["owca_discovery_tasks_age_seconds"] == 0
    server.mode = mode
    before = len(server.requests)
    with caplog.at_level(logging.ERROR):
        frame = stage.produce()[0]
    assert server.hangs_outlasted == 0  # it gave up on its own deadline
    frames.validate(frame)
    assert frame["tasks"] == good["tasks"]  # the last good list, within max_staleness
    (line,) = errors_logged(caplog)
    assert reason in line and "\n" not in line and server.url in line
    assert "keeping the" in line
    c = counters(frame)
    assert c["owca_discovery_errors_total"] == 1
    assert c["owca_discovery_tasks_age_seconds"] > 0
    # (the server may not have read the last attempt's request when it is cut short)
    assert len(server.requests) - before > 1 if retried else len(server.requests) - before == 1
    attempts = c["owca_orchestrator_requests_total"] - counters(good)[
        "owca_orchestrator_requests_total"]
    assert c["owca_orchestrator_retries_total"] == attempts - 1
    assert c["owca_orchestrator_request_failures_total"] == attempts
    assert f"({attempts} attempts in" in line
    # and it recovers on the next good answer
    server.mode = NORMAL
    recovered = stage.produce()[0]
    assert recovered["tasks"] == good["tasks"]
    assert counters(recovered)["owca_discovery_tasks_age_seconds"] == 0
    assert counters(recovered)["owca_discovery_errors_total"] == 1


def test_the_orchestrator_goes_away_and_comes_back(setup, caplog):
    server, stage, _, listed = setup
    assert len(stage.produce()[0]["tasks"]) == len(listed)
    server.stop()
    with caplog.at_level(logging.ERROR):
        down = stage.produce()[0]
    assert len(down["tasks"]) == len(listed)
    assert "Connection refused" in errors_logged(caplog)[0]
    server.start()  # the same port
    back = stage.produce()[0]
    assert len(back["tasks"]) == len(listed)
    assert counters(back)["owca_discovery_errors_total"] == 1
    assert counters(back)["owca_discovery_tasks_age_seconds"] == 0


def test_after_max_staleness_the_list_is_emptied_until_recovery(setup, caplog, monkeypatch):
    server, stage, _, listed = setup
    clock = FakeClock(100.0)  # the stage's; the HTTP client keeps the real one
    monkeypatch.setattr(discover_stage, "time", clock)
    stage.cfg.max_staleness = 0.2
    stage.produce()
    server.mode = ERROR_500
    clock.advance(0.1)
    assert len(stage.produce()[0]["tasks"]) == len(listed)  # still within 0.2 s
    clock.advance(0.2)
    with caplog.at_level(logging.ERROR):
        stale = stage.produce()[0]
    assert stale["tasks"] == []
    assert "no tasks until it recovers" in errors_logged(caplog)[-1]
    assert counters(stale)["owca_discovery_errors_total"] == 2
    server.mode = NORMAL
    assert len(stage.produce()[0]["tasks"]) == len(listed)


def test_a_kept_task_whose_cgroup_vanished_is_left_out(setup):
    server, stage, cgroupfs, listed = setup
    stage.produce()
    for controller in ("cpu", "cpuacct", "memory"):
        shutil.rmtree(os.path.join(cgroupfs, controller, listed[0]["cgroup_path"].lstrip("/")))
    server.mode = ERROR_500
    frame = stage.produce()[0]
    assert [t["id"] for t in frame["tasks"]] == [t["id"] for t in listed[1:]]
    assert counters(frame)["owca_tasks_dropped_total"] == 1


def test_no_good_answer_yet_means_no_tasks(caplog, tmp_path):
    with ReplayServer(kubelet_routes()) as server:
        server.mode = ERROR_500
        stage = Discover(DiscoverConfig(source=KubernetesDiscovery(url=server.url, **FAST)),
                         {"--cgroupfs": str(tmp_path)})
        with caplog.at_level(logging.ERROR):
            frame = stage.produce()[0]
    assert frame["tasks"] == []
    assert "no good answer yet" in errors_logged(caplog)[0]


def test_mesos_errors_name_the_call_and_share_one_deadline(tmp_path, monkeypatch):
    routes = agent_routes()
    routes["POST /api/v1 GET_STATE"] = b"<html>502 Bad Gateway</html>"
    deadlines = []
    request_json = HttpClient.request_json

    def recording(self, method, path, body, until):
        deadlines.append((body["type"], until))
        return request_json(self, method, path, body, until)

    monkeypatch.setattr(HttpClient, "request_json", recording)
    with ReplayServer(routes) as agent:
        source = MesosDiscovery(url=agent.url, **FAST)
        with pytest.raises(DiscoveryError) as e:
            source.list_tasks(None)
        assert "/api/v1 GET_STATE: malformed JSON" in str(e.value)
        agent.hang.add("POST /api/v1 GET_STATE")
        deadlines.clear()
        with pytest.raises(DiscoveryError, match="GET_STATE: no answer"):
            source.list_tasks(None)
        assert agent.hangs_outlasted == 0  # it gave up on its own deadline
    # both calls of the cycle were given the one deadline
    (first, until), (second, same) = deadlines
    assert (first, second) == ("GET_CONTAINERS", "GET_STATE") and until == same


@pytest.mark.parametrize("answer, reason", [
    ({"kind": "Status", "status": "Failure", "items": []}, "kind is 'Status', not PodList"),
    ([1, 2, 3], "expected a PodList with items"),
    ("null", "expected a PodList"),
])
def test_valid_json_of_the_wrong_shape_is_an_error_without_retries(answer, reason):
    with ReplayServer({"GET /pods": answer}) as server:
        source = KubernetesDiscovery(url=server.url, cgroup_driver="cgroupfs", **FAST)
        with pytest.raises(DiscoveryError, match=re.escape(reason)):
            source.list_tasks(None)
        assert len(server.requests) == 1


@pytest.mark.parametrize("routes, options, reason", [
    ({}, {}, "HTTP 404 Not Found"),
    (None, {"max_response_bytes": 4096}, "exceeds max_response_bytes (4096)"),
])
def test_answers_that_will_not_change_are_not_retried(routes, options, reason):
    with ReplayServer(kubelet_routes() if routes is None else routes) as server:
        source = KubernetesDiscovery(url=server.url, cgroup_driver="cgroupfs",
                                     **{**FAST, **options})
        with pytest.raises(DiscoveryError, match=re.escape(reason)):
            source.list_tasks(None)
        assert len(server.requests) == 1
        assert source._client.retries == 0


@pytest.mark.unit
def test_backoff_grows_exponentially_with_jitter_and_a_ceiling():
    client = HttpClient(HttpOptions(url="http://127.0.0.1:1", backoff=0.1, backoff_max=0.5),
                        "test")
    for attempt, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)):
        delays = [client._backoff(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jittered: nodes do not retry in step


def test_the_tool_reports_one_line_and_still_writes_a_frame(tmp_path):
    with ReplayServer(kubelet_routes()) as server:
        server.mode = ERROR_500
        config = tmp_path / "owca.yaml"
        config.write_text("discover:\n  source: !KubernetesDiscovery\n"
                          f"    url: {server.url}\n    retries: 1\n    backoff: 0.01\n")
        result = subprocess.run(tool_command("discover", "--once", "--config", str(config),
                                             "--cgroupfs", str(tmp_path)),
                                capture_output=True, env=tool_env(), timeout=60)
    assert result.returncode == 0
    errors = [line for line in result.stderr.decode().splitlines() if ": error:" in line]
    assert len(errors) == 1 and "HTTP 500 Internal Server Error (2 attempts" in errors[0]
    (frame,) = [frames.decode(line) for line in result.stdout.splitlines()]
    assert frame["tasks"] == []
    assert counters(frame)["owca_discovery_errors_total"] == 1
    assert counters(frame)["owca_orchestrator_requests_total"] == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_a_stop_during_a_hanging_request_ends_the_tool_at_once(tmp_path, source, signum):
    """SIGTERM or SIGINT while the orchestrator hangs: the tool exits 0 without waiting.

    The source's timeout and deadline are an hour, so a tool that waited for
    the request would outlive the guard below by far (the server itself hangs
    each request for a minute, then drops it); the guard is only that, a bound
    on a test that would otherwise hang. benchmarks/discover_stop.py measures
    how soon it stops.
    """
    routes, _ = SOURCES[source]
    tag = "KubernetesDiscovery" if source == "kubernetes" else "MesosDiscovery"
    with ReplayServer(routes()) as server:
        server.mode = HANG
        config = tmp_path / "owca.yaml"
        config.write_text(f"discover:\n  source: !{tag}\n    url: {server.url}\n"
                          "    timeout: 3600\n    deadline: 3600\n")
        tool = subprocess.Popen(tool_command("discover", "--config", str(config),
                                             "--cgroupfs", str(tmp_path)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
        try:
            assert wait_until(lambda: server.requests, timeout=60), "no request arrived"
            tool.send_signal(signum)
            out, err = tool.communicate(timeout=120)
        finally:
            if tool.poll() is None:
                tool.kill()
                tool.wait()
    assert tool.returncode == 0, err.decode()
    assert out == b""  # the cycle in hand had no answer: no frame, no half frame
    assert err.decode() == ""  # a stop is no error


def test_a_wait_that_overran_the_deadline_reports_the_failure_that_caused_it(setup, caplog,
                                                                             monkeypatch):
    """A loaded host may wake the client after its deadline: the error names why it
    waited (the server's 500), the attempts made, and counts no request not sent."""
    server, stage, _, _ = setup
    good = stage.produce()[0]
    server.mode = ERROR_500
    client_time = discover_http.time
    overran = []

    def sleep_past_the_deadline(seconds):
        overran.append(seconds)
        client_time.sleep(FAST["deadline"])

    monkeypatch.setattr(discover_http, "time", type("Time", (), {
        "monotonic": staticmethod(client_time.monotonic),
        "sleep": staticmethod(sleep_past_the_deadline)}))
    with caplog.at_level(logging.ERROR):
        frame = stage.produce()[0]
    assert len(overran) == 1
    (line,) = errors_logged(caplog)
    assert "HTTP 500 Internal Server Error (1 attempt in" in line, line
    assert "deadline" not in line
    c, g = counters(frame), counters(good)
    assert c["owca_orchestrator_requests_total"] - g["owca_orchestrator_requests_total"] == 1
    assert c["owca_orchestrator_retries_total"] == g["owca_orchestrator_retries_total"]
    assert (c["owca_orchestrator_request_failures_total"]
            - g["owca_orchestrator_request_failures_total"]) == 1
