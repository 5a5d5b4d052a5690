"""The catalog, its cluster descriptions (Kubernetes, Aurora), the tools' help and the docs
kept in step with each other."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import tool_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
sys.path.insert(0, WORKLOADS)

from owca_workloads.catalog import (CatalogError, _entry, fill, load_catalog,  # noqa: E402
                                    wrapped_load)

CATALOG = load_catalog()
TOOLS = ("owca-wrap", "owca-sine", "owca-launch", "owca-scenario")


def test_the_catalog_has_hp_services_and_be_antagonists():
    roles = {name: w.role for name, w in CATALOG.items()}
    assert {"nginx", "redis", "memcached"} <= {n for n, r in roles.items() if r == "hp"}
    be = {n: w.resource for n, w in CATALOG.items() if w.role == "be"}
    assert {"cpu", "llc", "memory_bandwidth"} <= set(be.values())
    assert all(w.load is not None and w.slo for w in CATALOG.values() if w.role == "hp")


def test_every_binary_of_the_catalog_is_in_requirements_apt():
    """Installed here, or at least named by requirements/apt.txt's packages."""
    with open(os.path.join(ROOT, "requirements", "apt.txt")) as f:
        packages = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    package_of = {"nginx": "nginx-light", "wrk": "wrk", "redis-server": "redis-server",
                  "redis-benchmark": "redis-tools", "memcached": "memcached",
                  "memcaslap": "libmemcached-tools", "stress-ng": "stress-ng",
                  "sysbench": "sysbench", "/usr/bin/python3": "python3-prometheus-client"}
    for w in CATALOG.values():
        for binary in [w.command[0]] + ([w.load.command[0]] if w.load else []):
            assert package_of[binary] in packages, binary


def test_prepare_fills_placeholders_and_leaves_other_braces(tmp_path):
    nginx = CATALOG["nginx"]
    argv = nginx.prepare(str(tmp_path), 12345)
    assert argv == ["nginx", "-c", f"{tmp_path}/nginx.conf", "-p", str(tmp_path), "-g",
                    "daemon off;"]
    conf = (tmp_path / "nginx.conf").read_text()
    assert "listen 127.0.0.1:12345;" in conf and "events { worker_connections 1024; }" in conf
    assert "{run_dir}" not in conf
    assert len((tmp_path / "www" / "index.html").read_text()) == 4096
    assert oct(os.stat(tmp_path).st_mode & 0o777) == "0o755"  # nginx's workers read it
    load = nginx.load_command(str(tmp_path), 12345)
    assert "http://127.0.0.1:12345/" in load and "-d{duration}s" in load
    assert fill("{port}{unknown}{", {"port": "1"}) == "1{unknown}{"


def test_bad_entries_are_refused_with_their_name():
    with pytest.raises(CatalogError, match="x: role 'vip'"):
        _entry("x", {"role": "vip", "command": ["true"]})
    with pytest.raises(CatalogError, match="x: an hp workload needs a load"):
        _entry("x", {"role": "hp", "command": ["true"]})
    with pytest.raises(CatalogError, match="x: KeyError"):
        _entry("x", {"role": "be"})


def test_wrapped_load_nests_wrapper_driver_and_generator():
    argv = wrapped_load(CATALOG["nginx"], "/s/nginx", "/run", 8080, "/apm", 800, 400, 60,
                        labels={"scenario": "s"})
    generator = CATALOG["nginx"].load_command("/run", 8080)
    assert argv[-len(generator) - 1:] == ["--"] + generator
    assert argv.index(os.path.join(WORKLOADS, "owca-wrap")) \
        < argv.index(os.path.join(WORKLOADS, "owca-sine")) < len(argv) - len(generator)
    assert argv[argv.index("--task-id") + 1] == "/s/nginx"
    assert "owca-sine" in argv and "scenario=s" in argv and "--slo" in argv
    fixed = wrapped_load(CATALOG["memcached"], "/s/mc", "/run", 11211, "/apm", 1, 1, 1)
    assert os.path.join(WORKLOADS, "owca-sine") not in fixed and "memcaslap" in fixed
    assert fixed[fixed.index("--sli-metric") + 1] == "apm_latency_avg_seconds"


# -- clusters ---------------------------------------------------------------------------------

def kubernetes_docs():
    docs = {}
    for name in sorted(os.listdir(os.path.join(WORKLOADS, "kubernetes"))):
        with open(os.path.join(WORKLOADS, "kubernetes", name)) as f:
            docs[name] = [d for d in yaml.safe_load_all(f) if d]
    return docs


def test_kubernetes_hp_pods_wrap_their_load_with_the_pod_uid():
    docs = kubernetes_docs()
    for name in ("nginx", "redis", "memcached"):
        (deployment,) = docs[f"{name}.yaml"]
        assert deployment["kind"] == "Deployment"
        pod = deployment["spec"]["template"]["spec"]
        assert pod["priorityClassName"] == "owca-hp"
        load = [c for c in pod["containers"] if c["command"][0] == "owca-wrap"]
        assert load, name
        command = load[0]["command"]
        assert command[command.index("--task-id") + 1] == "$(POD_UID)"
        assert {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}} \
            in load[0]["env"]
        assert {"name": "apm", "hostPath": {"path": "/run/owca/apm",
                                            "type": "DirectoryOrCreate"}} in pod["volumes"]
        server = [c for c in pod["containers"] if c is not load[0]][0]
        assert server["command"][0] == CATALOG[name].command[0]
        assert command[command.index("--parser") + 1] == CATALOG[name].load.parser


def test_kubernetes_antagonists_are_the_catalogs_and_best_effort():
    docs = kubernetes_docs()["antagonists.yaml"]
    commands = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]
                for d in docs}
    for name, w in CATALOG.items():
        if w.role != "be":
            continue
        container = commands[f"owca-{name}"]
        assert container["command"] == w.command
        assert "resources" not in container  # BestEffort
    assert {d["metadata"]["name"] for d in kubernetes_docs()["priority-classes.yaml"]} == \
        {"owca-hp", "owca-be"}


def test_aurora_jobs_parse_and_follow_the_catalog():
    sources = {}
    for name in sorted(os.listdir(os.path.join(WORKLOADS, "aurora"))):
        with open(os.path.join(WORKLOADS, "aurora", name)) as f:
            sources[name] = f.read()
        ast.parse(sources[name], name)  # Aurora's configuration language is Python
    for name in ("nginx", "redis", "memcached"):
        text = sources[f"{name}.aurora"]
        assert "owca-wrap --task-id {{thermos.task_id}}" in text
        assert f"exec {CATALOG[name].command[0]} " in text
    antagonists = sources["antagonists.aurora"]
    for name, w in CATALOG.items():
        if w.role == "be":
            assert f"'{' '.join(w.command)}'" in antagonists, name
    assert "tier='revocable'" in antagonists


# -- the tools' help and the docs ----------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("tool", TOOLS)
def test_help_has_the_common_sections_and_exits_0(tool):
    out = subprocess.run([sys.executable, os.path.join(WORKLOADS, tool), "--help"],
                         capture_output=True, text=True, timeout=30, env=tool_env())
    assert out.returncode == 0
    for section in ("Usage:", "Options:", "Input:", "Output:", "Exit status:", "Examples:"):
        assert section in out.stdout, (tool, section)


@pytest.mark.integration
def test_docs_describe_every_workload_and_every_wrapper_option():
    with open(os.path.join(ROOT, "docs", "workloads.md")) as f:
        doc = f.read()
    for name in CATALOG:
        assert f"`{name}`" in doc, name
    out = subprocess.run([sys.executable, os.path.join(WORKLOADS, "owca-wrap"), "--help"],
                         capture_output=True, text=True, timeout=30, env=tool_env())
    options = set(re.findall(r"^\s+(?:-\w, )?(--[a-z-]+)", out.stdout.split("Input:")[0], re.M))
    options -= {"--help", "--version", "--log-level", "--debug", "--shell"}
    assert options, "no options found in owca-wrap --help"
    for option in options:
        assert f"`{option}" in doc or f"`-{option[2]}, {option}" in doc, option
    for parser in ("regex", "wrk", "redis-benchmark", "sysbench", "memaslap", "specjbb",
                   "owca-sine"):
        assert f"| `{parser}` |" in doc, parser


def test_the_image_installs_what_the_catalog_runs():
    with open(os.path.join(WORKLOADS, "image", "Dockerfile")) as f:
        dockerfile = f.read()
    for package in ("nginx-light", "wrk", "redis-server", "redis-tools", "memcached",
                    "libmemcached-tools", "stress-ng", "sysbench"):
        assert re.search(rf"\s{re.escape(package)}\s", dockerfile), package


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx-light not installed")
def test_the_images_nginx_configuration_is_valid(tmp_path):
    conf = tmp_path / "nginx.conf"
    text = open(os.path.join(WORKLOADS, "image", "nginx.conf")).read()
    conf.write_text(text.replace("/tmp/", f"{tmp_path}/").replace("listen 8080", "listen 127.0.0.1:1"))
    out = subprocess.run(["nginx", "-t", "-c", str(conf), "-p", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
