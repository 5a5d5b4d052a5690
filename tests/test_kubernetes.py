"""Discovery from a Kubernetes kubelet (lib/owca/discover/sources/kubernetes.py).

The pure parts (quantities, cgroup layouts, QoS, requests and limits) are
tested on literal values; the recorded PodLists (tests/fixtures/kubelet_*/)
against their expected task lists; then the whole source against a real HTTP
server on loopback replaying them, and against an HTTPS one with a test CA,
a bearer token and a client certificate.  Cgroup trees for the existence
check are directories laid out like the v1 and v2 hierarchies (the real
hierarchies are the end-to-end test's: tests/test_discovery_e2e.py).
"""
import dataclasses
import json
import logging
import os
import re
import subprocess

import pytest

from conftest import FIXTURES, ROOT, tool_command, tool_env
from orchestrator_server import (ReplayServer, fake_cgroupfs, golden, kubelet_tls, load_json,
                                 make_kubelet_serving_cert, pki,  # noqa: F401 (pki: a fixture)
                                 server_tls)
from owca.core import config, frames
from owca.discover.stage import Discover, DiscoverConfig
from owca.plugin import DiscoveryError
from owca.discover.sources.kubernetes import (KubernetesDiscovery, container_cgroup_path,
                                              parse_pods, parse_quantity, pod_cgroup_path,
                                              pod_resources, qos_class)
from owca.discover.sources.orchestrator import InvalidEntry
from owca.core.priority import PriorityRule

DOCKER = os.path.join(FIXTURES, "kubelet_docker")
CONTAINERD = os.path.join(FIXTURES, "kubelet_containerd")
SIDECAR = os.path.join(FIXTURES, "kubelet_sidecar")
EMPTY_NODE = os.path.join(FIXTURES, "kubelet_empty_node")
UID = "5a1e2c3d-4b5f-4a6e-8d7c-9e0f1a2b3c4d"
CID = "c1bf9798c49a3d128bbf920781af5c745c7c28ce694be0245c092a487d73ab3f"


# -- pure parts ------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [
    ("100m", 0.1), ("2", 2), ("1.5", 1.5), ("250m", 0.25), ("64Mi", 64 * 2 ** 20),
    ("1Gi", 2 ** 30), ("500M", 500_000_000), ("1k", 1000), ("2e3", 2000), ("1E3", 1000),
    ("1E", 10 ** 18), ("12n", 12e-9), ("0", 0), (".5", 0.5), ("3Ki", 3072), (4, 4),
])
def test_quantities(text, value):
    assert parse_quantity(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["", "1.2.3", "10 Mi", "1e", "Mi", "0x10", "1Qi", None, "1e999"])
def test_bad_quantities_are_invalid_entries(text):
    with pytest.raises(InvalidEntry):
        parse_quantity(text)


@pytest.mark.parametrize("driver, qos, root, expected", [
    ("cgroupfs", "Guaranteed", [], f"/kubepods/pod{UID}"),
    ("cgroupfs", "Burstable", [], f"/kubepods/burstable/pod{UID}"),
    ("cgroupfs", "BestEffort", [], f"/kubepods/besteffort/pod{UID}"),
    ("cgroupfs", "Burstable", ["kube"], f"/kube/kubepods/burstable/pod{UID}"),
    ("systemd", "Guaranteed", [], "/kubepods.slice/kubepods-pod5a1e2c3d_4b5f_4a6e_8d7c_"
                                  "9e0f1a2b3c4d.slice"),
    ("systemd", "Burstable", [], "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-"
                                 "pod5a1e2c3d_4b5f_4a6e_8d7c_9e0f1a2b3c4d.slice"),
    ("systemd", "BestEffort", [], "/kubepods.slice/kubepods-besteffort.slice/kubepods-"
                                  "besteffort-pod5a1e2c3d_4b5f_4a6e_8d7c_9e0f1a2b3c4d.slice"),
    ("systemd", "Guaranteed", ["my-root"],
     "/my_root.slice/my_root-kubepods.slice/my_root-kubepods-pod5a1e2c3d_4b5f_4a6e_8d7c_"
     "9e0f1a2b3c4d.slice"),
])
def test_pod_cgroup_path_for_each_driver_and_qos(driver, qos, root, expected):
    uid = UID.replace("-", "_") if driver == "systemd" else UID
    assert pod_cgroup_path(uid, qos, driver, root) == expected


@pytest.mark.parametrize("runtime, driver, name", [
    ("docker", "cgroupfs", CID), ("containerd", "cgroupfs", CID),
    ("cri-o", "cgroupfs", f"crio-{CID}"),
    ("docker", "systemd", f"docker-{CID}.scope"),
    ("containerd", "systemd", f"cri-containerd-{CID}.scope"),
    ("cri-o", "systemd", f"crio-{CID}.scope"),
])
def test_container_cgroup_for_each_runtime_and_driver(runtime, driver, name):
    assert container_cgroup_path("/p", f"{runtime}://{CID}", driver) == f"/p/{name}"


@pytest.mark.parametrize("container_id", [
    "rkt://abc", f"docker://{CID}/../../x", "docker://", CID, "docker://ab cd", "Docker://ab"])
def test_unusable_container_ids_are_invalid(container_id):
    with pytest.raises(InvalidEntry):
        container_cgroup_path("/p", container_id, "cgroupfs")


def c(requests=None, limits=None, name="c"):
    return {"name": name, "resources": {k: v for k, v in (("requests", requests),
                                                          ("limits", limits)) if v}}


@pytest.mark.parametrize("containers, init, expected", [
    ([c({"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"})], [], "Guaranteed"),
    ([c(None, {"cpu": "1", "memory": "1Gi"})], [], "Guaranteed"),  # requests default to limits
    ([c({"cpu": "1"}, {"cpu": "2", "memory": "1Gi"})], [], "Burstable"),
    ([c({"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"}), c()], [], "Burstable"),
    ([c(), c()], [], "BestEffort"),
    ([c()], [c({"cpu": "100m"})], "Burstable"),  # init containers count
    ([c({"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"})], [], "BestEffort"),
    # a zero quantity is not set (the kubelet compares with zero)
    ([c({"cpu": "0", "memory": "0"})], [], "BestEffort"),
    ([c({"cpu": "0", "memory": "64Mi"}, {"cpu": "0", "memory": "64Mi"})], [], "Burstable"),
    # Guaranteed compares the pod's sums of requests and limits
    ([c({"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"})],
     [c({"cpu": "100m", "memory": "64Mi"}, {"cpu": "100m", "memory": "64Mi"})], "Guaranteed"),
])
def test_qos_class_computed_as_the_kubelet_does(containers, init, expected):
    assert qos_class({"containers": containers, "initContainers": init}, "spec") == expected


def test_pod_requests_take_init_containers_and_overhead_into_account():
    spec = {"containers": [c({"cpu": "500m", "memory": "512Mi"}, {"memory": "1Gi"}, "a"),
                           c({"cpu": "250m"}, {"cpu": "1", "memory": "1Gi"}, "b")],
            "initContainers": [c({"cpu": "2", "memory": "64Mi"}, {"cpu": "2"}, "init")],
            "overhead": {"cpu": "100m", "memory": "10Mi"}}
    assert pod_resources(spec, "spec") == {
        "cpus": pytest.approx(2.1), "mem_bytes": (512 + 10) * 2 ** 20,
        # cpu: container a has no limit, so the pod has none
        "limit_mem_bytes": (2048 + 10) * 2 ** 20}
    assert pod_resources(spec, "spec", only="b") == {
        "cpus": 0.25, "limit_cpus": 1, "limit_mem_bytes": 2 ** 30}


def sidecar(requests, limits, name):
    return {**c(requests, limits, name), "restartPolicy": "Always"}


def test_sidecars_count_beside_the_app_containers_and_before_later_init_containers():
    spec = {"containers": [c({"cpu": "500m", "memory": "256Mi"}, {"cpu": "1", "memory": "512Mi"},
                             "app")],
            "initContainers": [c({"cpu": "100m", "memory": "1Gi"}, {"cpu": "2", "memory": "1Gi"},
                                 "first"),
                               sidecar({"cpu": "100m", "memory": "128Mi"},
                                       {"cpu": "2", "memory": "1Gi"}, "proxy"),
                               c({"cpu": "1", "memory": "64Mi"}, {"cpu": "1", "memory": "64Mi"},
                                 "after")]}
    assert pod_resources(spec, "spec") == {
        "cpus": 1.1,                 # "after" (1) runs beside "proxy" (0.1)
        "mem_bytes": 2 ** 30,        # "first" runs alone
        "limit_cpus": 3,             # app 1 + proxy 2
        "limit_mem_bytes": 3 * 2 ** 29}
    # the sidecar's own, in container mode
    assert pod_resources(spec, "spec", only="proxy") == {
        "cpus": 0.1, "mem_bytes": 128 * 2 ** 20, "limit_cpus": 2, "limit_mem_bytes": 2 ** 30}
    # a sidecar without a limit makes the pod unlimited, as an app container does
    spec["initContainers"][1] = sidecar({"cpu": "100m"}, None, "proxy")
    assert "limit_cpus" not in pod_resources(spec, "spec")


def test_resource_sums_are_rounded_to_the_quantities_precision():
    spec = {"containers": [c({"cpu": "100m", "memory": "1.5Ki"}, None, "a"),
                           c({"cpu": "48m", "memory": "100m"}, None, "b")]}
    # 0.1 + 0.048 is 0.14800000000000002 in floats; memory is whole bytes
    assert pod_resources(spec, "spec") == {"cpus": 0.148, "mem_bytes": 1536}


def test_extended_resources_keep_their_sanitised_names():
    spec = {"containers": [c({"nvidia.com/gpu": "2", "hugepages-2Mi": "64Mi"},
                             {"nvidia.com/gpu": "2", "hugepages-2Mi": "64Mi"})]}
    assert pod_resources(spec, "spec") == {
        "nvidia_com_gpu": 2, "hugepages_2Mi": 64 * 2 ** 20,
        "limit_nvidia_com_gpu": 2, "limit_hugepages_2Mi": 64 * 2 ** 20}


# -- recorded answers -------------------------------------------------------------------------

@pytest.mark.parametrize("fixture, driver", [
    (DOCKER, "cgroupfs"), (DOCKER, "systemd"), (CONTAINERD, "cgroupfs"), (CONTAINERD, "systemd")])
def test_recorded_pod_lists_give_the_expected_tasks(fixture, driver):
    tasks, problems = parse_pods(load_json(os.path.join(fixture, "pods.json")), driver=driver)
    golden(os.path.join(fixture, f"expected_tasks_{driver}.json"),
           {"tasks": tasks, "problems": problems})
    # every task is a valid frame entry
    frames.validate(frames.tasks_frame(1, tasks, ts=1.0, host="h"))


def test_recorded_docker_pods_ids_paths_labels_resources():
    tasks, problems = parse_pods(load_json(os.path.join(DOCKER, "pods.json")), driver="cgroupfs")
    assert problems == []
    by_name = {t["name"]: t for t in tasks}
    # Pending static pods (no status, no containers) are not tasks
    assert sorted(by_name) == ["default/test", "default/test2", "kube-system/calico-node-vz6m6",
                               "kube-system/coredns-6fd7dbf94c-tf9zx",
                               "kube-system/kube-proxy-hhxg5"]
    test = by_name["default/test"]
    assert test["id"] == "4d6a81df-3448-11e9-8e1d-246e96663c22"
    assert test["cgroup_path"] == "/kubepods/burstable/pod4d6a81df-3448-11e9-8e1d-246e96663c22"
    assert test["subcgroup_paths"] == [test["cgroup_path"] + "/eb9c378219b6a4efc034ea8898b19faa0e"
                                                             "27c7b20b8eb254fda361cceacf8e90"]
    assert test["labels"]["exampleKey"] == "value"
    assert test["labels"]["qos_class"] == "Burstable"
    assert test["resources"] == {"cpus": 0.25, "mem_bytes": 64 * 2 ** 20}
    proxy = by_name["kube-system/kube-proxy-hhxg5"]
    assert proxy["cgroup_path"].startswith("/kubepods/besteffort/pod650ef8d1")
    assert proxy["labels"]["annotation_scheduler_alpha_kubernetes_io_critical_pod"] == ""
    calico = by_name["kube-system/calico-node-vz6m6"]
    assert calico["resources"] == {"cpus": 0.15, "mem_bytes": 64e6, "limit_cpus": 0.3,
                                   "limit_mem_bytes": 500e6}


def test_not_ready_pods_are_listed_with_their_running_containers_only():
    tasks, _ = parse_pods(load_json(os.path.join(DOCKER, "pods_not_ready.json")))
    # the pending pod "test" (containers waiting) is not a task yet
    assert "default/test" not in [t["name"] for t in tasks]
    assert len(tasks) == 3
    web, _ = parse_pods(load_json(os.path.join(CONTAINERD, "pods.json")))
    shop = next(t for t in web if t["name"] == "shop/web-6f7c9-ab12c")
    assert len(shop["subcgroup_paths"]) == 1  # log-shipper is still waiting


def test_recorded_invalid_types_are_reported_not_fatal():
    tasks, problems = parse_pods(load_json(os.path.join(DOCKER, "pods_invalid_types.json")))
    assert tasks == []
    assert len(problems) == 5  # the five running pods, each with uid 0
    assert all("metadata.uid: expected str, got int 0" in p for p in problems)


def test_forged_uid_and_unknown_runtime_are_left_out_with_a_reason():
    tasks, problems = parse_pods(load_json(os.path.join(CONTAINERD, "pods.json")))
    assert "shop/forged" not in [t["name"] for t in tasks]
    assert any("forged left out: metadata.uid" in p for p in problems)
    legacy = next(t for t in tasks if t["name"] == "shop/legacy-rkt-0")
    assert legacy["subcgroup_paths"] == []
    assert any("'rkt' has no known cgroup layout" in p for p in problems)


def test_long_annotations_are_not_labels():
    tasks, _ = parse_pods(load_json(os.path.join(CONTAINERD, "pods.json")))
    memcached = next(t for t in tasks if t["name"] == "cache/memcached-0")
    assert "annotation_kubectl_kubernetes_io_last_applied_configuration" not in memcached["labels"]
    assert memcached["labels"]["annotation_prometheus_io_port"] == "9150"
    only, _ = parse_pods(load_json(os.path.join(CONTAINERD, "pods.json")), annotations=["none*"])
    assert not any(k.startswith("annotation_") for t in only for k in t["labels"])


def test_the_pod_ip_is_a_label_where_it_is_an_address():
    pods = load_json(os.path.join(CONTAINERD, "pods.json"))
    tasks, problems = parse_pods(pods)
    memcached = next(t for t in tasks if t["name"] == "cache/memcached-0")
    assert memcached["labels"]["pod_ip"] == "10.244.3.21"
    for item in pods["items"]:
        if item["metadata"]["name"] == "memcached-0":
            item["status"]["podIP"] = "10.244.3.21; curl evil"
        elif item.get("status", {}).get("podIP"):
            item["status"]["podIP"] = ["10.0.0.1"]
    tasks, problems = parse_pods(pods)
    memcached = next(t for t in tasks if t["name"] == "cache/memcached-0")
    assert "pod_ip" not in memcached["labels"]           # left out, the pod kept
    assert any("memcached-0" in p and "not an IP address" in p for p in problems)
    assert not any("pod_ip" in t["labels"] for t in tasks)


def test_container_mode_lists_each_running_container():
    tasks, problems = parse_pods(load_json(os.path.join(CONTAINERD, "pods.json")), task="container",
                                 driver="systemd")
    golden(os.path.join(CONTAINERD, "expected_tasks_container_systemd.json"),
           {"tasks": tasks, "problems": problems})
    memcached = [t for t in tasks if t["labels"]["pod_name"] == "memcached-0"]
    uid = "8b5e1f4c-6a0d-4c2e-9f3b-2d7a1e5c9b40"
    assert sorted(t["id"] for t in memcached) == [f"{uid}/exporter", f"{uid}/memcached"]
    mc = next(t for t in memcached if t["labels"]["container_name"] == "memcached")
    pod = "/kubepods.slice/kubepods-pod8b5e1f4c_6a0d_4c2e_9f3b_2d7a1e5c9b40.slice"
    assert re.fullmatch(pod + r"/cri-containerd-[0-9a-f]{64}\.scope", mc["cgroup_path"])
    assert mc["resources"] == {"cpus": 2, "mem_bytes": 2 ** 30, "limit_cpus": 2,
                               "limit_mem_bytes": 2 ** 30}


def test_namespaces_filter():
    tasks, _ = parse_pods(load_json(os.path.join(DOCKER, "pods.json")), namespaces=["default"])
    assert sorted(t["name"] for t in tasks) == ["default/test", "default/test2"]


def test_recorded_sidecar_pods_give_the_kubelets_requests_qos_and_cgroups():
    pods = load_json(SIDECAR, "pods.json")
    tasks, problems = parse_pods(pods, driver="systemd")
    golden(os.path.join(SIDECAR, "expected_tasks_systemd.json"),
           {"tasks": tasks, "problems": problems})
    assert problems == []
    by_name = {t["name"]: t for t in tasks}
    checkout = by_name["shop/checkout-7b9c5d6f8-q2w8e"]
    assert checkout["resources"] == {"cpus": 1.1, "mem_bytes": 2 ** 30, "limit_cpus": 3,
                                     "limit_mem_bytes": 3 * 2 ** 29}
    # the running sidecar is measured with the app container
    assert [p.rsplit("/", 1)[1][len("cri-containerd-"):][:2]
            for p in checkout["subcgroup_paths"]] == ["d4", "b2"]
    shipper = by_name["obs/log-shipper-5d8f7-mx4zr"]
    assert shipper["labels"]["qos_class"] == "Guaranteed"
    assert shipper["resources"]["cpus"] == 0.148 and len(shipper["subcgroup_paths"]) == 2
    sleeper = by_name["batch/sleeper-6c4b9-7hk2p"]
    assert sleeper["labels"]["qos_class"] == "BestEffort"
    assert "/kubepods-besteffort.slice/" in sleeper["cgroup_path"]
    containers, problems = parse_pods(pods, driver="systemd", task="container")
    golden(os.path.join(SIDECAR, "expected_tasks_container_systemd.json"),
           {"tasks": containers, "problems": problems})
    proxy = next(t for t in containers if t["name"].endswith("/istio-proxy"))
    assert proxy["cgroup_path"].endswith("cri-containerd-" + "b2" * 32 + ".scope")
    assert proxy["resources"] == {"cpus": 0.1, "mem_bytes": 128 * 2 ** 20, "limit_cpus": 2,
                                  "limit_mem_bytes": 2 ** 30}
    assert not any(t["name"].endswith(("/migrate", "/istio-validation")) for t in containers)


def test_null_lists_are_empty():
    tasks, problems = parse_pods(load_json(EMPTY_NODE, "pods.json"))
    assert (tasks, problems) == ([], [])
    pod = load_json(SIDECAR, "pods.json")["items"][2]
    pod["metadata"]["labels"] = None
    pod["spec"]["initContainers"] = None
    pod["spec"]["containers"][0]["resources"] = {"requests": None, "limits": None}
    pod["status"]["initContainerStatuses"] = None
    tasks, problems = parse_pods({"kind": "PodList", "items": [pod]})
    assert problems == [] and len(tasks) == 1
    assert tasks[0]["labels"]["qos_class"] == "BestEffort"


@pytest.mark.integration
def test_an_empty_node_is_an_empty_list_not_a_failing_kubelet(tmp_path, caplog):
    """A node whose last pod went away: no error, no counted failure, no stale pods."""
    expected = load_json(CONTAINERD, "expected_tasks_cgroupfs.json")["tasks"]
    cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [t["cgroup_path"] for t in expected], "v1")
    with ReplayServer({"GET /pods": load_json(CONTAINERD, "pods.json")}) as server:
        stage = discover_stage(KubernetesDiscovery(url=server.url), cgroupfs)
        assert len(stage.produce()[0]["tasks"]) == 5
        server.routes["GET /pods"] = open(os.path.join(EMPTY_NODE, "pods.json"), "rb").read()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            frame = stage.produce()[0]
    assert frame["tasks"] == []
    metrics = {s["name"]: s["value"] for s in frame["metrics"]}
    assert metrics["owca_discovery_errors_total"] == 0
    assert caplog.records == []


@pytest.mark.parametrize("answer", [[], {"items": {}}, {"kind": "Status", "items": []}, "x",
                                    {"kind": "Status", "status": "Failure"}])
def test_an_answer_that_is_not_a_pod_list_is_a_discovery_error(answer):
    with pytest.raises(DiscoveryError):
        parse_pods(answer)


# -- served over HTTP -----------------------------------------------------------------------

def discover_stage(source, cgroupfs, **cfg):
    return Discover(DiscoverConfig(source=source, **cfg), {"--cgroupfs": cgroupfs})


@pytest.fixture
def kubelet():
    with ReplayServer({"GET /pods": load_json(os.path.join(CONTAINERD, "pods.json"))}) as server:
        yield server


@pytest.mark.integration
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_served_pods_become_a_tasks_frame_for_each_driver_and_cgroup_version(
        kubelet, tmp_path, caplog, driver, version):
    expected = load_json(os.path.join(CONTAINERD, f"expected_tasks_{driver}.json"))["tasks"]
    present = [t for t in expected if t["name"] != "shop/legacy-rkt-0"]
    cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [t["cgroup_path"] for t in present], version)
    source = KubernetesDiscovery(url=kubelet.url)  # driver: auto
    stage = discover_stage(source, cgroupfs)
    with caplog.at_level(logging.WARNING):
        frame = stage.produce()[0]
    frames.validate(frame)
    assert [t["cgroup_path"] for t in frame["tasks"]] == [t["cgroup_path"] for t in present]
    assert [t["id"] for t in frame["tasks"]] == [t["id"] for t in present]
    # the pod whose cgroup is not on this node is reported and left out
    assert "its cgroup" in caplog.text and "pod6b2f3d4e" in caplog.text.replace("_", "-")
    for got, want in zip(frame["tasks"], present):
        assert got["resources"] == want["resources"]
        assert got["labels"] == {**want["labels"], "priority": got["labels"]["priority"]}
    priorities = {t["name"]: t["labels"]["priority"] for t in frame["tasks"]}
    assert priorities == {"cache/memcached-0": "hp", "batch/stress-batch-7d9f8-x2kqp": "be",
                          "ml/trainer-5c6b7-9zt4m": "be", "shop/web-6f7c9-ab12c": "be"}
    assert kubelet.requests[-1][:2] == ("GET", "/pods")
    metrics = {s["name"]: s for s in frame["metrics"]}
    assert metrics["owca_orchestrator_requests_total"]["labels"] == {"source": "kubernetes"}
    assert metrics["owca_orchestrator_invalid_entries_total"]["value"] == 2
    assert metrics["owca_tasks_dropped_total"]["value"] == 1


@pytest.mark.integration
def test_priority_rule_from_a_label(kubelet, tmp_path):
    rule = PriorityRule(label="owca.io/priority", hp_values=["hp"], qos_classes=["Burstable"])
    tasks = KubernetesDiscovery(url=kubelet.url, priority=rule).list_tasks(_paths(tmp_path))
    got = {t["name"]: t["labels"]["priority"] for t in tasks}
    assert got["batch/stress-batch-7d9f8-x2kqp"] == "be"   # label says be, BestEffort
    assert got["shop/web-6f7c9-ab12c"] == "hp"             # Burstable
    assert got["cache/memcached-0"] == "be"                # Guaranteed is not listed here


def _paths(tmp_path):
    from owca.core.paths import Paths
    return Paths(cgroupfs=str(tmp_path))


def test_config_builds_the_source_and_refuses_bad_options(tmp_path):
    cfg_text = ("discover:\n"
                "  source: !KubernetesDiscovery\n"
                "    url: http://127.0.0.1:10255\n"
                "    task: container\n"
                "    cgroup_driver: systemd\n"
                "    priority: !PriorityRule {label: tier, hp_values: [latency-critical]}\n")
    cfg = config.load_section(None, "discover", DiscoverConfig, text=cfg_text)
    assert cfg.source.task == "container" and cfg.source.priority.hp_values == ["latency-critical"]
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    for bad, reason in [
        (f"    token_file: {token}\n", "in clear"),
        ("    cgroup_driver: upstart\n", "expected one of"),
        ("    cgroup_root: /a/../b\n", "cannot be part of a cgroup path"),
        ("    url: ftp://x\n", "expected http(s)://"),
        ("    timeout: 0\n", "timeout: expected a number > 0"),
        ("    ca_bundle: /nonexistent/ca.pem\n", "cannot read"),
        ("    priority: !PriorityRule {qos_classes: [Gold]}\n", "unknown class"),
    ]:
        text = "discover:\n  source: !KubernetesDiscovery\n" + bad
        with pytest.raises(config.ConfigError) as e:
            config.load_section("owca.yaml", "discover", DiscoverConfig, text=text)
        assert str(e.value).startswith("owca.yaml:") and reason in str(e.value), str(e.value)


# -- the secure port: TLS, bearer token, client certificate -----------------------------------

@pytest.mark.integration
def test_secure_port_with_ca_bearer_token_and_client_certificate(pki, tmp_path):
    token = tmp_path / "token"
    token.write_text("first-token\n")
    routes = {"GET /pods": load_json(os.path.join(DOCKER, "pods.json"))}
    with ReplayServer(routes, tls=server_tls(pki, require_client_cert=True)) as server:
        source = KubernetesDiscovery(url=server.url, ca_bundle=pki["ca"], token_file=str(token),
                                     client_cert=pki["client_cert"], client_key=pki["client_key"],
                                     cgroup_driver="cgroupfs")
        tasks = source.list_tasks(_paths(tmp_path))
        assert [t["labels"].pop("priority") for t in tasks] == ["be"] * 5  # none Guaranteed
        assert tasks == load_json(DOCKER, "expected_tasks_cgroupfs.json")["tasks"]
        assert server.requests[-1][3]["Authorization"] == "Bearer first-token"
        token.write_text("rotated-token\n")  # a projected token is rotated in place
        source.list_tasks(_paths(tmp_path))
        assert server.requests[-1][3]["Authorization"] == "Bearer rotated-token"


@pytest.mark.integration
def test_secure_port_with_the_kubelets_own_certificate_and_the_node_name(tmp_path):
    """The kubelet's self-made certificate names the node, not 127.0.0.1.

    `url: https://127.0.0.1:10250` with that certificate as ca_bundle fails
    verification; `server_name: <node>` verifies it for the node's name, which
    is also what the client sends as SNI.
    """
    cert = make_kubelet_serving_cert(str(tmp_path / "pki"), "worker-3")
    token = tmp_path / "token"
    token.write_text("node-token\n")
    names = []
    routes = {"GET /pods": load_json(SIDECAR, "pods.json")}
    with ReplayServer(routes, tls=kubelet_tls(cert, names)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        plain = KubernetesDiscovery(url=server.url, ca_bundle=cert["crt"],
                                    token_file=str(token))
        with pytest.raises(DiscoveryError, match="verify failed: IP address mismatch"):
            plain.list_tasks(_paths(tmp_path))
        assert server.requests == []
        text = ("discover:\n  source: !KubernetesDiscovery\n"
                f"    url: {server.url}\n    ca_bundle: {cert['crt']}\n"
                f"    token_file: {token}\n    server_name: worker-3\n")
        cfg = config.load_section("owca.yaml", "discover", DiscoverConfig, text=text)
        tasks = cfg.source.list_tasks(_paths(tmp_path))
        assert [t["labels"]["node_name"] for t in tasks] == ["worker-3"] * 3
        assert names[-1] == "worker-3"
        assert server.requests[-1][3]["Host"] == server.url[len("https://"):]
        # another node's name is refused like any mismatch
        other = dataclasses.replace(cfg.source, server_name="worker-4")
        with pytest.raises(DiscoveryError, match="Hostname mismatch"):
            other.list_tasks(_paths(tmp_path))


@pytest.mark.parametrize("bad, reason", [
    ("url: http://127.0.0.1:10255\n    server_name: worker-3", "only with an https url"),
    ("url: https://127.0.0.1:10250\n    server_name: 'a/b'", "expected a DNS name"),
])
def test_server_name_is_checked_at_start(bad, reason):
    text = f"discover:\n  source: !KubernetesDiscovery\n    {bad}\n"
    with pytest.raises(config.ConfigError, match=reason):
        config.load_section("owca.yaml", "discover", DiscoverConfig, text=text)


@pytest.mark.integration
def test_verify_false_adds_one_line_at_start_and_nothing_per_request(pki, tmp_path):
    """The tool's stderr holds OWCA's one warning, not urllib3's on every request."""
    cfg = tmp_path / "owca.yaml"
    with ReplayServer({"GET /pods": load_json(SIDECAR, "pods.json")},
                      tls=server_tls(pki)) as server:
        cfg.write_text("discover:\n  require_cgroup: false\n  source: !KubernetesDiscovery\n"
                       f"    url: {server.url}\n    verify: false\n")
        result = subprocess.run(tool_command("discover", "--config", str(cfg), "--once"),
                                capture_output=True, text=True, env=tool_env(), timeout=60)
        assert result.returncode == 0, result.stderr
        assert len(server.requests) == 1
    assert len(json.loads(result.stdout)["tasks"]) == 3
    assert result.stderr.splitlines() == [
        f"owca-discover: warning: kubernetes: TLS verification is off: the answers of "
        f"{server.url} are not authenticated"]


@pytest.mark.integration
def test_verify_false_leaves_other_sessions_warnings_alone(pki, tmp_path):
    import warnings
    before = list(warnings.filters)
    with ReplayServer({"GET /pods": {"kind": "PodList", "items": []}},
                      tls=server_tls(pki)) as server:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            KubernetesDiscovery(url=server.url, verify=False).list_tasks(_paths(tmp_path))
            import urllib3
            urllib3.PoolManager(cert_reqs="CERT_NONE").request("GET", server.url + "/pods")
    assert warnings.filters == before
    # only the request that is not OWCA's warned
    assert [w.category.__name__ for w in caught] == ["InsecureRequestWarning"]


@pytest.mark.integration
def test_a_refused_token_fails_in_one_line_that_does_not_hold_it(pki, tmp_path, caplog):
    token = tmp_path / "token"
    token.write_text("s3cret-token-value\n")
    cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [], "v2")
    with ReplayServer({"GET /pods": load_json(SIDECAR, "pods.json")},
                      tls=server_tls(pki)) as server:
        server.authorization = "Bearer another-token"
        source = KubernetesDiscovery(url=server.url, ca_bundle=pki["ca"], token_file=str(token))
        with caplog.at_level(logging.DEBUG):
            frame = discover_stage(source, cgroupfs).produce()[0]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "HTTP 401 Unauthorized" in errors[0]
    assert server.requests[0][3]["Authorization"] == "Bearer s3cret-token-value"
    assert "s3cret" not in caplog.text and "s3cret" not in json.dumps(frame)


@pytest.mark.integration
def test_secure_port_refuses_a_server_the_ca_does_not_vouch_for(pki, tmp_path):
    with ReplayServer({"GET /pods": {"kind": "PodList", "items": []}},
                      tls=server_tls(pki)) as server:
        source = KubernetesDiscovery(url=server.url, ca_bundle=pki["other_ca"])
        with pytest.raises(DiscoveryError) as e:
            source.list_tasks(_paths(tmp_path))
        message = str(e.value)
        assert "certificate verify failed" in message and "\n" not in message
        assert server.requests == []  # not one request went to the unverified server
        assert source._client.retries == 0  # a certificate does not fix itself
        # default verification (the system's CAs) refuses the test CA too
        with pytest.raises(DiscoveryError, match="certificate verify failed"):
            KubernetesDiscovery(url=server.url).list_tasks(_paths(tmp_path))


@pytest.mark.integration
def test_secure_port_without_the_required_client_certificate_fails_in_one_line(pki, tmp_path):
    with ReplayServer({"GET /pods": {"kind": "PodList", "items": []}},
                      tls=server_tls(pki, require_client_cert=True)) as server:
        source = KubernetesDiscovery(url=server.url, ca_bundle=pki["ca"], retries=0)
        with pytest.raises(DiscoveryError) as e:
            source.list_tasks(_paths(tmp_path))
        assert "\n" not in str(e.value) and server.url in str(e.value)


@pytest.mark.integration
def test_the_example_config_works_against_a_served_kubelet(tmp_path):
    cfg = config.load_section(os.path.join(ROOT, "configs", "kubernetes.yaml"), "discover",
                              DiscoverConfig)
    with ReplayServer({"GET /pods": load_json(CONTAINERD, "pods.json")}) as server:
        cfg.source = dataclasses.replace(cfg.source, url=server.url)
        expected = load_json(CONTAINERD, "expected_tasks_cgroupfs.json")["tasks"]
        cgroupfs = fake_cgroupfs(tmp_path / "cgroup", [t["cgroup_path"] for t in expected], "v1")
        frame = Discover(cfg, {"--cgroupfs": cgroupfs}).produce()[0]
    got = {t["name"]: t["labels"]["priority"] for t in frame["tasks"]}
    assert got == {"cache/memcached-0": "hp", "batch/stress-batch-7d9f8-x2kqp": "be",
                   "ml/trainer-5c6b7-9zt4m": "be", "shop/web-6f7c9-ab12c": "be",
                   "shop/legacy-rkt-0": "be"}
    memcached = frame["tasks"][0]["labels"]
    # only the annotations the example asks for
    assert memcached["annotation_prometheus_io_port"] == "9150"
    assert not any(k.startswith("annotation_kubectl") for k in memcached)
