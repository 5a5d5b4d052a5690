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
import logging
import os
import queue
import re
import subprocess
import threading

import pytest

from conftest import FIXTURES, tool_command, tool_env
from orchestrator_server import (DRIBBLE, NORMAL, ReplayServer, load_json,
                                 pki,  # noqa: F401 (pki: a fixture)
                                 server_tls)
from owca.core import frames
from owca.discover.sources.kubernetes import parse_quantity
from owca.discover.stage import Discover, DiscoverConfig
from owca.discover.sources.kubernetes import KubernetesDiscovery
from owca.discover.sources.mesos import MesosDiscovery

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


# -- 2. secret files: FIFOs, directories, huge files ----------------------------------------

def odd_file(tmp_path, kind: str, huge: int = 64 * 1024 + 1) -> str:
    """A path to what a file option must not be: a device, a FIFO, a directory,
    a regular file of `huge` bytes (sparse: no disk), one that is no certificate."""
    if kind == "device":
        return "/dev/zero"
    path = str(tmp_path / f"odd-{kind.replace(' ', '-')}")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(huge)
    elif kind == "no certificate":
        with open(path, "w") as f:
            f.write("not a certificate\n")
    return path


SECRET_REASONS = {"fifo": "is not a regular file", "directory": "is not a regular file",
                  "huge": "larger than 65536 bytes"}


@pytest.mark.parametrize("option", ["token_file", "password_file"])
@pytest.mark.parametrize("kind", sorted(SECRET_REASONS))
def test_check_config_refuses_a_secret_file_that_is_not_a_small_regular_file(tmp_path, option,
                                                                           kind):
    path = odd_file(tmp_path, kind)
    credentials = f"    {option}: {path}\n" + (
        "    username: agent\n" if option == "password_file" else "")
    result = check_config(tmp_path, "!KubernetesDiscovery\n    url: https://127.0.0.1:10250\n"
                          + credentials)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert re.search(rf"owca\.yaml:\d+: .*{option}: .*{SECRET_REASONS[kind]}", line), line


class Tool:
    """owca-discover running on its interval: its frames as they come, stderr in a file."""

    def __init__(self, tmp_path, source_yaml: str):
        config = tmp_path / "owca.yaml"
        config.write_text("discover:\n  require_cgroup: false\n  interval: 0.2\n"
                          "  source: " + source_yaml)
        self.stderr_path = tmp_path / "stderr"
        with open(self.stderr_path, "w") as err:
            self.process = subprocess.Popen(tool_command("discover", "--config", str(config)),
                                            stdout=subprocess.PIPE, stderr=err, env=tool_env())
        self.frames: "queue.Queue[bytes]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.frames.put(line)

    def next_frame(self) -> dict:
        try:
            return frames.decode(self.frames.get(timeout=GUARD))
        except queue.Empty:
            raise AssertionError(f"no frame within {GUARD} s: the tool is stuck") from None

    def settle(self) -> dict:
        """The frame after the ones already written (an edit may race the cycle in hand)."""
        while not self.frames.empty():
            self.frames.get_nowait()
        self.next_frame()
        return self.next_frame()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(GUARD)
        self.process.stdout.close()


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_a_token_file_replaced_by_a_fifo_or_a_huge_file_fails_the_cycle_in_one_line(
        pki, tmp_path, kind):  # noqa: F811 (pki: the fixture)
    token = tmp_path / "token"
    token.write_text("good-token\n")
    with ReplayServer(kubelet_routes(), tls=server_tls(pki)) as server:
        server.authorization = "Bearer good-token"
        tool = Tool(tmp_path, f"!KubernetesDiscovery\n    url: {server.url}\n"
                              f"    ca_bundle: {pki['ca']}\n    token_file: {token}\n"
                              "    retries: 0\n")
        try:
            assert len(tool.next_frame()["tasks"]) == 5
            token.unlink()
            if kind == "fifo":
                os.mkfifo(token)  # nobody writes it: an open that waits for a writer waits forever
            else:
                token.write_text("x" * (1024 * 1024))
            failed = tool.settle()
            assert counters(failed)["owca_discovery_errors_total"] >= 1
            reason = SECRET_REASONS[kind]
            lines = [line for line in error_lines(tool.stderr()) if reason in line]
            assert lines and f"token_file: {token}" in lines[-1], tool.stderr()
            token.unlink()
            token.write_text("good-token\n")  # fixed: the next cycle is good again
            assert counters(tool.settle())["owca_discovery_tasks_age_seconds"] == 0
        finally:
            tool.stop()


def test_a_ca_bundle_replaced_by_a_fifo_fails_the_cycle_in_one_line(pki, tmp_path):  # noqa: F811
    ca = tmp_path / "ca.pem"
    ca.write_bytes(open(pki["ca"], "rb").read())
    with ReplayServer(kubelet_routes(), tls=server_tls(pki)) as server:
        tool = Tool(tmp_path, f"!KubernetesDiscovery\n    url: {server.url}\n"
                              f"    ca_bundle: {ca}\n    retries: 0\n")
        try:
            assert len(tool.next_frame()["tasks"]) == 5
            server.stop()  # the kept-alive connection goes: the next one loads the CA again
            server.start()
            ca.unlink()
            os.mkfifo(ca)
            tool.settle()
            lines = [line for line in error_lines(tool.stderr()) if "is not a regular file" in line]
            assert lines and f"ca_bundle: {ca}" in lines[-1], tool.stderr()
        finally:
            tool.stop()


# -- 3. Kubernetes quantities: every form, and values a frame cannot carry ------------------

@pytest.mark.parametrize("text, value", [
    ("1Ei", 2 ** 60), ("1Pi", 2 ** 50), ("1Ti", 2 ** 40), ("2Gi", 2 ** 31), ("1.5Gi", 3 * 2 ** 29),
    ("0.5Ki", 512), ("1E", 10 ** 18), ("2P", 2 * 10 ** 15), ("1T", 10 ** 12), ("3G", 3 * 10 ** 9),
    ("1e3", 1000), ("1E3", 1000), ("1e+3", 1000), ("5e-1", 0.5), ("1.5e2", 150),
    ("100m", 0.1), ("1500m", 1.5), ("250u", 0.00025), ("12n", 12e-9), ("+1Ki", 1024),
    ("5.", 5), (".25", 0.25), ("0", 0), ("1.25", 1.25), ("1024", 1024),
])
def test_every_kubernetes_quantity_form_parses(text, value):
    assert parse_quantity(text) == pytest.approx(value, rel=1e-12)


def test_a_pod_with_1ei_and_quantities_beyond_the_frame_is_listed_and_clamped(tmp_path):
    """1Ei is a valid quantity (2^60 bytes); 16Ei and a sum of 8Ei ones exceed the
    largest quantity Kubernetes keeps (2^63 - 1): clamped to it, reported, counted."""
    pods = load_json(KUBELET, "pods.json")
    pod(pods, "test")["spec"]["containers"][0]["resources"] = {
        "requests": {"cpu": "1500m", "memory": "1Ei"}, "limits": {"cpu": "2", "memory": "1Ei"}}
    pod(pods, "test2")["spec"]["containers"][0]["resources"] = {"limits": {"memory": "16Ei"}}
    coredns = pod(pods, "coredns-6fd7dbf94c-tf9zx")["spec"]
    coredns["containers"][0]["resources"]["requests"]["memory"] = "8Ei"
    coredns["overhead"] = {"memory": "8Ei"}
    with ReplayServer(kubelet_routes(pods)) as server:
        result, frame = run_once(tmp_path, f"!KubernetesDiscovery\n    url: {server.url}\n")
    assert result.returncode == 0, result.stderr
    tasks = {t["name"]: t for t in frame["tasks"]}
    assert len(tasks) == 5  # every running pod: none left out
    assert tasks["default/test"]["resources"] == {
        "cpus": 1.5, "mem_bytes": 2 ** 60, "limit_cpus": 2, "limit_mem_bytes": 2 ** 60}
    assert tasks["default/test2"]["resources"] == {"limit_mem_bytes": MAX_QUANTITY}
    assert tasks["kube-system/coredns-6fd7dbf94c-tf9zx"]["resources"]["mem_bytes"] \
        == MAX_QUANTITY
    warnings = [line for line in result.stderr.splitlines() if "clamped" in line]
    assert any("default/test2" in line and "16Ei" in line for line in warnings), result.stderr
    assert any("coredns" in line for line in warnings), result.stderr
    assert all(line.startswith("owca-discover: warning: ") for line in warnings)
    assert counters(frame)["owca_orchestrator_invalid_entries_total"] == len(warnings)


def test_mesos_scalars_beyond_the_frame_are_clamped_not_a_crash(tmp_path):
    """1e308 MB is a finite JSON number whose byte count is not (it overflows to inf)."""
    state = load_json(AGENT, "get_state.json")
    (task,) = state["get_state"]["get_tasks"]["launched_tasks"]
    for r in task["resources"]:
        if r["name"] == "mem":
            r["scalar"]["value"] = 1e308
    with ReplayServer(agent_routes(state)) as server:
        result, frame = run_once(tmp_path, f"!MesosDiscovery\n    url: {server.url}\n")
    assert result.returncode == 0, result.stderr
    (listed,) = frame["tasks"]
    assert listed["resources"]["mem_bytes"] == MAX_QUANTITY
    assert listed["resources"]["cpus"] == 8
    assert "clamped" in result.stderr
    assert counters(frame)["owca_orchestrator_invalid_entries_total"] == 1


# -- 4. an answer nested 100 000 levels deep ------------------------------------------------

DEEP = b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_an_answer_nested_100k_deep_fails_the_cycle_and_keeps_the_last_list(caplog, source):
    tag, routes, key = SOURCES[source]
    make = KubernetesDiscovery if source == "kubernetes" else MesosDiscovery
    with ReplayServer(routes()) as server:
        stage = Discover(DiscoverConfig(source=make(url=server.url, retries=1, backoff=0.01),
                                        require_cgroup=False), {})
        good = stage.produce()[0]
        assert good["tasks"]
        server.routes[key] = DEEP
        with caplog.at_level(logging.ERROR):
            frame = stage.produce()[0]
        frames.encode(frame)
        assert frame["tasks"] == good["tasks"]  # the last good list
        (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert "nested too deep" in line and "keeping the" in line and "\n" not in line
        assert counters(frame)["owca_discovery_errors_total"] == 1
        server.routes[key] = routes()[key]
        assert counters(stage.produce()[0])["owca_discovery_tasks_age_seconds"] == 0


# -- 5. lone surrogates from the orchestrator -----------------------------------------------

def test_lone_surrogates_from_the_kubelet_leave_out_only_what_holds_them(tmp_path):
    pods = load_json(KUBELET, "pods.json")
    pod(pods, "test")["metadata"]["name"] = "te\ud800st"
    pod(pods, "test2")["metadata"]["namespace"] = "\udfffdefault"
    coredns = pod(pods, "coredns-6fd7dbf94c-tf9zx")["metadata"]
    coredns["labels"]["k8s-app"] = "core\ud800dns"
    coredns["annotations"]["note"] = "\ud800"
    calico = pod(pods, "calico-node-vz6m6")
    calico["spec"]["nodeName"] = "node\ud800"
    with ReplayServer(kubelet_routes(pods)) as server:
        result, frame = run_once(tmp_path, f"!KubernetesDiscovery\n    url: {server.url}\n")
    assert result.returncode == 0, result.stderr
    tasks = {t["name"]: t for t in frame["tasks"]}
    assert sorted(tasks) == ["kube-system/calico-node-vz6m6",
                             "kube-system/coredns-6fd7dbf94c-tf9zx", "kube-system/kube-proxy-hhxg5"]
    labels = tasks["kube-system/coredns-6fd7dbf94c-tf9zx"]["labels"]
    assert "k8s_app" not in labels and "annotation_note" not in labels
    assert labels["pod_template_hash"] == "6fd7dbf94c"
    assert "node_name" not in tasks["kube-system/calico-node-vz6m6"]["labels"]
    warnings = [line for line in result.stderr.splitlines() if "surrogate" in line]
    assert len(warnings) == 5, result.stderr
    assert counters(frame)["owca_orchestrator_invalid_entries_total"] == 5


@pytest.mark.parametrize("where, left_out", [("name", "task"), ("label", "label"),
                                             ("framework", "framework_name")])
def test_lone_surrogates_from_the_mesos_agent_leave_out_only_what_holds_them(tmp_path, where,
                                                                             left_out):
    state = load_json(AGENT, "get_state.json")
    (task,) = state["get_state"]["get_tasks"]["launched_tasks"]
    if where == "name":
        task["name"] = "cassandra\ud800"
    elif where == "label":
        task["labels"]["labels"][0]["value"] = "\udc00"
    else:
        state["get_state"]["get_frameworks"]["frameworks"][0]["framework_info"]["name"] = "\ud800"
    with ReplayServer(agent_routes(state)) as server:
        result, frame = run_once(tmp_path, f"!MesosDiscovery\n    url: {server.url}\n")
    assert result.returncode == 0, result.stderr
    assert "surrogate" in result.stderr
    assert counters(frame)["owca_orchestrator_invalid_entries_total"] == 1
    if left_out == "task":
        assert frame["tasks"] == []
        return
    (listed,) = frame["tasks"]
    gone = "org_apache_aurora_tier" if left_out == "label" else left_out
    assert gone not in listed["labels"] and listed["labels"]["executor_id"]


def test_a_task_name_no_frame_can_encode_is_left_out_whatever_the_source(tmp_path):
    """The stage's own check, for sources that do not check (a static file, a plug-in)."""
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text('- {cgroup_path: /a, name: "bad\\ud800"}\n'
                     '- {cgroup_path: /b, name: b, labels: {x: "\\udfff"}}\n'
                     '- {cgroup_path: /c, name: c}\n')
    result, frame = run_once(tmp_path, f"!StaticDiscovery\n    file: {tasks}\n")
    assert result.returncode == 0, result.stderr
    assert [t["name"] for t in frame["tasks"]] == ["c"]
    assert len([line for line in result.stderr.splitlines() if "surrogate" in line]) == 2
    assert counters(frame)["owca_tasks_dropped_total"] == 2


# -- 6. CA bundles and client certificates that are not certificate files -------------------

@pytest.mark.parametrize("kind, reason", [
    ("device", "is not a regular file"), ("fifo", "is not a regular file"),
    ("directory", "is not a regular file"), ("huge", "larger than"),
    ("no certificate", "no PEM certificate"),
])
def test_check_config_refuses_a_ca_bundle_that_is_not_a_certificate_file(tmp_path, kind,
                                                                         reason):
    path = odd_file(tmp_path, kind, huge=64 * 1024 * 1024)
    result = check_config(tmp_path, "!KubernetesDiscovery\n    url: https://127.0.0.1:10250\n"
                          f"    ca_bundle: {path}\n")
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert re.search(rf"owca\.yaml:\d+: .*ca_bundle: .*{re.escape(reason)}", line), line


@pytest.mark.parametrize("option", ["client_cert", "client_key"])
def test_check_config_refuses_a_client_certificate_that_is_a_device(pki, tmp_path,  # noqa: F811
                                                                   option):
    files = {"client_cert": pki["client_cert"], "client_key": pki["client_key"],
             option: "/dev/zero"}
    result = check_config(tmp_path, "!MesosDiscovery\n    url: https://127.0.0.1:5051\n"
                          + "".join(f"    {k}: {v}\n" for k, v in files.items()))
    assert result.returncode == 2, result.stderr
    assert re.search(rf"owca\.yaml:\d+: .*{option}: /dev/zero is not a regular file",
                     result.stderr), result.stderr


def test_good_secret_and_ca_files_pass_check_config(pki, tmp_path):  # noqa: F811
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    result = check_config(tmp_path, "!KubernetesDiscovery\n    url: https://127.0.0.1:10250\n"
                          f"    ca_bundle: {pki['ca']}\n    token_file: {token}\n"
                          f"    client_cert: {pki['client_cert']}\n"
                          f"    client_key: {pki['client_key']}\n")
    assert result.returncode == 0, result.stderr
