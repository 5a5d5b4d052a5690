"""!KubernetesNodeStatusStorage against a real HTTPS server on loopback that answers
`PATCH /api/v1/nodes/NAME/status` as the Kubernetes API documents
(tests/kube_api_server.py), holding recorded real Node objects
(tests/fixtures/kubeapi_nodes/): the patch merged into a real status, each answer
(415, 401, 403, 404, 409, 422, 429 with Retry-After, 5xx, no answer, a CA that does not
vouch for the server) handled without stopping anything, the step and rate limits, the
resync, and zero when the headroom stops coming.

The decisions are driven with an explicit monotonic `now` (sync(now)), so no test depends
on time; the last test runs the storage's own thread inside owca-ship's stage and waits
for the server to see the PATCH.  What it cannot cover: a real API server's admission
chain and strategic merge, the kubelet rewriting the status between two PATCHes,
authentication by client certificate against a real CA's policy, and a scheduler
reading the resources.
"""
import json
import logging
import os
import subprocess

import pytest

from conftest import FIXTURES, tool_command, tool_env
from kube_api_server import PATCH_TYPES, KubeApiServer, only
from orchestrator_server import make_pki, server_tls, wait_until
from owca.core import frames
from owca.plugin import Cycle
from owca.ship.exposition import Formatter
from owca.ship.stage import Ship, ShipConfig
from owca.ship.storages.kubernetes_node import KubernetesNodeStatusStorage

GIB = 2 ** 30
NODES = json.load(open(os.path.join(FIXTURES, "kubeapi_nodes", "nodes.json")))["items"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def tokens(tmp_path):
    out = {}
    for name, token in (("node101", "t-node101"), ("node102", "t-node102"),
                        ("admin", "t-admin"), ("unknown", "t-nobody")):
        path = tmp_path / f"{name}.token"
        path.write_text(token + "\n")
        out[name] = str(path)
    return out


@pytest.fixture
def api(pki):
    server = KubeApiServer(NODES, {"t-node101": "system:node:node101",
                                   "t-node102": "system:node:node102",
                                   "t-admin": "admin"},
                           tls=server_tls(pki)).start()
    yield server
    server.stop()


def storage(api, pki, tokens, **kw):
    kw.setdefault("token_file", tokens["node101"])
    kw.setdefault("node_name", "node101")
    return KubernetesNodeStatusStorage(url=api.url, ca_bundle=pki["ca"], **kw)


def cycle(cpu_cores, memory_bytes, seq=1, host="node101"):
    """An allocations cycle as owca-ship renders it, with the headroom's samples."""
    frame = frames.allocations_frame(seq, {}, ts=1_700_000_000.0 + seq, host=host, metrics=[
        frames.sample("headroom_cpu_cores", cpu_cores),
        frames.sample("headroom_cpu_hp_cores", 1.5),
        frames.sample("headroom_numa_cpu_cores", 99.0, {"numa_node": "0"}),
        frames.sample("headroom_memory_bytes", memory_bytes)], dry_run=False)
    block = Formatter().format(frame, [], False)
    return Cycle("allocations", seq, frame["ts"], block.host, block.render())


def extended(api, name="node101"):
    status = api.nodes[name]["status"]
    return ({k: v for k, v in status["capacity"].items() if k.startswith("owca.io/")},
            {k: v for k, v in status["allocatable"].items() if k.startswith("owca.io/")})


@pytest.mark.parametrize("patch_type", ["merge", "json"])
def test_the_headroom_lands_in_a_real_nodes_capacity_and_allocatable(api, pki, tokens,
                                                                     patch_type):
    before = only(NODES, "node101")
    s = storage(api, pki, tokens, patch_type=patch_type)
    s.store(cycle(2.3456, 10 * GIB))
    assert s.sync(now=1000.0) == "ok"
    capacity, allocatable = extended(api)
    assert capacity == allocatable == {"owca.io/be-cpu": "2345",
                                       "owca.io/be-memory": str(10 * GIB)}
    status = api.nodes["node101"]["status"]
    # the kubelet's own resources and everything else of the status are untouched
    assert {k: v for k, v in status["capacity"].items() if "/" not in k} == \
        before["status"]["capacity"]
    assert status["conditions"] == before["status"]["conditions"]
    assert int(api.nodes["node101"]["metadata"]["resourceVersion"]) == \
        int(before["metadata"]["resourceVersion"]) + 1
    request = api.requests[-1]
    assert request["headers"]["Content-Type"] in PATCH_TYPES
    assert request["headers"]["Authorization"] == "Bearer t-node101"
    assert request["path"] == "/api/v1/nodes/node101/status"
    assert {s["name"]: s["value"] for s in s.samples()
            if s["labels"].get("result") == "ok"} == {"owca_ship_node_status_patches_total": 1}


def test_only_changes_beyond_a_step_are_sent_at_most_once_per_interval(api, pki, tokens):
    s = storage(api, pki, tokens, cpu_step_cores=0.25, memory_step_bytes=GIB,
                min_interval=30, resync=300)
    s.store(cycle(2.0, 8 * GIB))
    assert s.sync(now=1000.0) == "ok"
    s.store(cycle(3.0, 8 * GIB))
    assert s.sync(now=1010.0) is None            # within min_interval
    s.store(cycle(2.1, 8.5 * GIB))
    assert s.sync(now=1040.0) is None            # within a step of what was published
    s.store(cycle(2.3, 8 * GIB))
    assert s.sync(now=1050.0) == "ok"            # 0.3 cores: more than a step
    assert extended(api)[0]["owca.io/be-cpu"] == "2300"
    s.store(cycle(0.0, 8 * GIB))
    assert s.sync(now=1081.0) == "ok"            # to zero: always, once the interval passed
    s.store(cycle(0.05, 8 * GIB))
    assert s.sync(now=1112.0) == "ok"            # and from zero
    assert s.sync(now=1200.0) is None
    assert s.sync(now=1412.0) == "ok"            # resync: the kubelet may have rewritten it
    assert len(api.requests) == 5


def test_no_headroom_for_stale_after_publishes_zero(api, pki, tokens):
    s = storage(api, pki, tokens, stale_after=120)
    s.store(cycle(2.0, 8 * GIB))
    s._seen_at = 1000.0   # the cycle came at monotonic 1000
    assert s.sync(now=1001.0) == "ok"
    assert s.sync(now=1100.0) is None
    assert s.sync(now=1121.0) == "ok"
    assert extended(api)[0] == {"owca.io/be-cpu": "0", "owca.io/be-memory": "0"}


def test_a_cycle_without_headroom_changes_nothing(api, pki, tokens):
    s = storage(api, pki, tokens)
    frame = frames.allocations_frame(1, {}, ts=1.0, host="node101", metrics=[])
    s.store(Cycle("allocations", 1, 1.0, "node101", Formatter().format(frame, [], False)
                  .render()))
    assert s.sync(now=s._started_at + 1) is None and api.requests == []


@pytest.mark.parametrize("answer, headers, wait", [
    (429, {"Retry-After": "7"}, 7.0),        # API Priority and Fairness: wait what it says
    (503, {"Retry-After": "12"}, 12.0),
    (500, {}, 30.0),                         # backoff from min_interval
    (409, {}, 0.0),                          # a conflict passes: the next cycle
    (415, {}, 30.0),
    (422, {}, 30.0),
])
def test_each_failed_answer_is_counted_and_paced_and_raises_nothing(api, pki, tokens, caplog,
                                                                    answer, headers, wait):
    caplog.set_level(logging.INFO)
    s = storage(api, pki, tokens, min_interval=30, stale_after=10 ** 6)
    s.store(cycle(2.0, 8 * GIB))
    api.answers = [(answer, headers), (answer, headers)]
    assert s.sync(now=1000.0) == str(answer)
    assert caplog.text.count(f"HTTP {answer}") == 1
    if wait > 0:
        assert s.sync(now=1000.0 + wait - 0.5) is None
    assert s.sync(now=1000.0 + wait) == str(answer)
    assert caplog.text.count(f"HTTP {answer}") == 1       # a repeat is not logged again
    assert s.sync(now=1000.0 + wait + 10 ** 4) == "ok"
    assert "takes the headroom again" in caplog.text
    assert extended(api)[0]["owca.io/be-cpu"] == "2000"


def test_the_servers_own_answers_401_403_404_415(api, pki, tokens):
    """Answers the server gives by its rules (not injected)."""
    nobody = storage(api, pki, tokens, token_file=tokens["unknown"])
    other = storage(api, pki, tokens, token_file=tokens["node102"])   # node102's credentials
    # with a node's own credentials an unknown node is forbidden; an operator's is told
    # it does not exist
    missing = storage(api, pki, tokens, node_name="node999", token_file=tokens["admin"])
    for s in (nobody, other, missing):
        s.store(cycle(2.0, 8 * GIB))
    assert nobody.sync(now=1.0) == "401"
    assert other.sync(now=1.0) == "403"
    assert missing.sync(now=1.0) == "404"
    assert extended(api) == ({}, {})
    # the content type the API documents is what the storage sends; any other is 415
    import requests
    answer = requests.patch(f"{api.url}/api/v1/nodes/node101/status", verify=pki["ca"],
                            headers={"Authorization": "Bearer t-node101",
                                     "Content-Type": "application/json"}, data=b"{}")
    assert answer.status_code == 415 and answer.json()["reason"] == "UnsupportedMediaType"
    # a stale precondition is a conflict
    answer = requests.patch(f"{api.url}/api/v1/nodes/node101/status", verify=pki["ca"],
                            headers={"Authorization": "Bearer t-node101",
                                     "Content-Type": "application/merge-patch+json"},
                            data=b'{"metadata":{"resourceVersion":"1"}}')
    assert answer.status_code == 409 and answer.json()["reason"] == "Conflict"


def test_no_answer_and_an_unknown_ca_are_failures_not_crashes(api, pki, tokens, caplog):
    s = KubernetesNodeStatusStorage(url=api.url, ca_bundle=pki["other_ca"],
                                    token_file=tokens["node101"], node_name="node101")
    s.store(cycle(2.0, 8 * GIB))
    assert s.sync(now=1.0) == "no_answer"
    assert "TLS" in caplog.text or "certificate" in caplog.text.lower()
    gone = storage(api, pki, tokens, timeout=2)
    url = gone.url
    api.stop()
    gone.store(cycle(2.0, 8 * GIB))
    assert gone.sync(now=1.0) == "no_answer"
    api.start()   # for the fixture's stop
    assert url   # the stopped server's port refused the connection


@pytest.mark.parametrize("bad", [
    dict(url="http://127.0.0.1:1"),                   # a token over plain http
    dict(cpu_resource="cpu"),                         # not an extended resource
    dict(memory_resource="kubernetes.io/batch-memory"),
    dict(node_name="Node_1"),
    dict(patch_type="strategic"),
    dict(min_interval=0),
])
def test_bad_configurations_are_refused(pki, tokens, bad):
    kw = dict(url="https://127.0.0.1:1", token_file=tokens["node101"], ca_bundle=pki["ca"])
    kw.update(bad)
    with pytest.raises(ValueError):
        KubernetesNodeStatusStorage(**kw)


def test_owca_ship_publishes_through_its_thread_and_never_stops_on_bad_answers(api, pki,
                                                                                tokens):
    s = storage(api, pki, tokens, node_name=None, min_interval=0.05)   # the frames' host
    ship = Ship(ShipConfig(storages=[s]), {})
    api.answers = [(500, {})] * 3 + [(401, {})]
    try:
        for seq in range(1, 4):
            frame = frames.allocations_frame(seq, {}, ts=1_700_000_000.0 + seq,
                                             host="node101", dry_run=False, metrics=[
                                                 frames.sample("headroom_cpu_cores", 1.0 * seq),
                                                 frames.sample("headroom_memory_bytes", GIB)])
            assert ship.process(frame) == []
        assert wait_until(lambda: extended(api)[0].get("owca.io/be-cpu") == "3000", 60)
    finally:
        ship.close()
    assert {r for r, n in s.results.items() if n} >= {"500", "401", "ok"}
    # owca-ship stopped: nobody vouches for the headroom any more
    assert extended(api)[0] == {"owca.io/be-cpu": "0", "owca.io/be-memory": "0"}


@pytest.mark.parametrize("failing", [False, True], ids=["answering", "failing"])
def test_the_real_tools_publish_and_never_stop_on_the_api_servers_answers(api, pki, tokens,
                                                                           tmp_path, failing):
    """owca-allocate (headroom) | owca-ship (stdout and the Node), real processes: every
    cycle is shipped whatever the API server answers; the Node gets the headroom, and zero
    when owca-ship stops."""
    from test_headroom import Node
    config = tmp_path / "owca.yaml"
    config.write_text(
        "allocate:\n"
        "  headroom: !Headroom {grow_after: 0, grow_step_ratio: 1, window: 30}\n"
        "ship:\n"
        "  storages:\n"
        "    - !StdoutStorage {}\n"
        "    - !KubernetesNodeStatusStorage\n"
        f"      url: {api.url}\n"
        f"      ca_bundle: {pki['ca']}\n"
        f"      token_file: {tokens['node101']}\n"
        "      node_name: node101\n"
        "      min_interval: 0.01\n")
    if failing:
        api.answers = [(500, {})] * 10 ** 4
    allocate = subprocess.Popen(
        tool_command("allocate", "-c", str(config), "--dry-run", "--state-dir",
                     str(tmp_path / "state"), "--cgroupfs", str(tmp_path)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=tool_env())
    ship = subprocess.Popen(tool_command("ship", "-c", str(config)), stdin=allocate.stdout,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    allocate.stdout.close()
    node = Node()
    try:
        for _ in range(10):
            allocate.stdin.write(frames.encode(node.frame()))
        allocate.stdin.flush()
        # the storage's thread has sent a headroom before the input ends
        assert wait_until(lambda: any(
            failing or json.loads(r["body"])["status"]["capacity"]["owca.io/be-cpu"] != "0"
            for r in list(api.requests)), 60)
        for _ in range(5):
            allocate.stdin.write(frames.encode(node.frame()))
        allocate.stdin.close()
        out, err = ship.communicate(timeout=120)
    finally:
        for p in (allocate, ship):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert allocate.wait() == 0 and ship.returncode == 0, err.decode()[-2000:]
    shipped = out.decode()
    assert all(f"# owca allocations seq={seq} " in shipped for seq in range(1, 16))
    if failing:
        assert extended(api) == ({}, {})
        assert "HTTP 500" in err.decode()
    else:
        assert extended(api)[0] == {"owca.io/be-cpu": "0", "owca.io/be-memory": "0"}
