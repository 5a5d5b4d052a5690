"""The package's shape (docs/architecture.md), checked on the source and on live tools.

The rule: `owca.core` imports nothing else of the package; `owca.plugin` imports
only the core; a stage's package (`owca.discover`, `owca.measure`, `owca.detect`,
`owca.allocate`, `owca.ship`) imports only the core, the plug-in module and itself;
`owca.profile` (owca-profile, not a stage) those and the detector, whose signals it
reuses.
No module imports, through any chain, one that imports it back.  Each tool, once
started, holds only its own stage's modules, the core and the plug-ins its
configuration names.
"""
import json
import os
import subprocess
import sys

import pytest

import import_graph
from conftest import BIN, FIXTURES, ROOT, tool_env

PACKAGE = os.path.join(ROOT, "lib", "owca")
STAGES = ("discover", "measure", "detect", "allocate", "ship")


def module_files():
    """{module name: path} of every module of the package."""
    return import_graph.module_files(PACKAGE)


def imports_of(path: str, name: str, modules) -> set:
    """The package's modules that `path` imports, at any depth of its code."""
    return import_graph.imports_of(path, name, modules, "owca")


def graph():
    return import_graph.graph(PACKAGE)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "owca"
    return parts[1] if parts[1] in STAGES + ("core", "profile") else module


ALLOWED = {
    "core": {"core"},
    "owca.plugin": {"core"},
    "owca.docs": {"core"},
    "owca": set(),
    **{stage: {"core", "owca.plugin", stage} for stage in STAGES},
    "profile": {"core", "owca.plugin", "detect", "profile"},
}


def test_the_package_has_the_layers_the_docs_describe():
    modules = module_files()
    assert {layer(m) for m in modules} == set(ALLOWED)
    for stage in STAGES:
        assert f"owca.{stage}.stage" in modules, f"owca.{stage} has no stage module"


def test_each_layer_imports_only_what_the_rule_allows():
    broken = []
    for module, targets in graph().items():
        allowed = ALLOWED[layer(module)]
        for target in sorted(targets):
            if layer(target) not in allowed and target != "owca":
                broken.append(f"{module} imports {target}")
    assert broken == []


def test_no_import_cycle():
    assert [" -> ".join(c) for c in import_graph.cycles(graph())] == []


def test_the_checker_sees_a_stage_to_stage_import(tmp_path):
    """The rule's test can fail: a detect module importing the allocate stage is named."""
    modules = {"owca.detect.x": None, "owca.allocate.stage": None, "owca.core.frames": None}
    path = tmp_path / "x.py"
    path.write_text("from owca.allocate import stage\nfrom owca.core import frames\n"
                    "def f():\n    import owca.allocate.stage\n")
    targets = imports_of(str(path), "owca.detect.x", modules)
    assert targets == {"owca.allocate.stage", "owca.core.frames"}
    assert layer("owca.allocate.stage") not in ALLOWED[layer("owca.detect.x")]


# -- what each tool holds once it runs ---------------------------------------------------

DUMP = r"""
import atexit, json, os, runpy, sys
def dump():
    with open(os.environ["OWCA_TEST_MODULES"], "w") as f:
        json.dump(sorted(sys.modules), f)
atexit.register(dump)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def loaded_modules(tmp_path, tool: str, args, stdin: bytes = b"") -> set:
    """The modules of a real run of bin/owca-<tool> ARGS, taken as it exits."""
    out = tmp_path / f"{tool}.modules.json"
    env = tool_env()
    env["OWCA_TEST_MODULES"] = str(out)
    done = subprocess.run([sys.executable, "-c", DUMP, os.path.join(BIN, f"owca-{tool}"),
                           *args], input=stdin, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    with open(out) as f:
        return set(json.load(f))


def owca_modules(modules) -> set:
    return {m for m in modules if m == "owca" or m.startswith("owca.")}


def recorded_frame(kind: str) -> bytes:
    with open(os.path.join(FIXTURES, "recorded_stream", "stream.jsonl"), "rb") as f:
        for line in f:
            if json.loads(line)["kind"] == kind:
                return line
    raise AssertionError(f"no {kind} frame in the recorded stream")


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "owca.yaml"
    path.write_text(text)
    return str(path)


def tasks_frame() -> bytes:
    frame = json.loads(recorded_frame("measurements"))
    tasks = [{k: t[k] for k in ("name", "cgroup_path", "labels", "resources")} | {"id": i}
             for i, t in frame["tasks"].items()]
    return json.dumps({"v": 1, "kind": "tasks", "ts": frame["ts"], "host": frame["host"],
                       "seq": 1, "tasks": tasks}).encode() + b"\n"


def runs(tmp_path):
    """(tool, args, stdin, modules it must hold, modules it must not hold)."""
    state = tmp_path / "state"
    state.mkdir()
    cgroups = os.path.join(FIXTURES, "cgroup_v1_tree")
    measurements = recorded_frame("measurements")
    return [
        ("discover", ["--once", "--cgroupfs", cgroups], b"",
         {"owca.discover.sources.cgroup"},
         {"owca.discover.sources.kubernetes", "owca.discover.sources.mesos",
          "owca.discover.sources.http", "owca.discover.sources.static", "requests", "yaml"}),
        ("discover", ["--once", "--cgroupfs", cgroups, "-c", os.path.join(
            ROOT, "configs", "examples", "recorded-tree.yaml")], b"",
         {"owca.discover.sources.static"},
         {"owca.discover.sources.kubernetes", "owca.discover.sources.mesos", "requests"}),
        ("measure", ["--once", "--cgroupfs", cgroups], tasks_frame(),
         {"owca.measure.sources.cgroup", "owca.measure.sources.platform"},
         {"owca.measure.sources.perf", "owca.measure.sources.rdt", "owca.measure.sources.apm",
          "owca.measure.sources.sli", "prometheus_client"}),
        ("detect", ["--once"], measurements, set(),
         {"owca.detect.detectors.contention", "yaml"}),
        ("detect", ["--once", "-c", os.path.join(ROOT, "configs", "examples",
                                                 "contention-lab.yaml")], measurements,
         {"owca.detect.detectors.contention", "owca.core.priority"}, set()),
        ("allocate", ["--once", "--dry-run", "--state-dir", str(state)], measurements, set(),
         {"owca.allocate.allocators.static", "owca.allocate.allocators.slo_controller"}),
        ("allocate", ["--once", "--dry-run", "--state-dir", str(state), "--cgroupfs",
                      str(tmp_path), "-c", os.path.join(ROOT, "configs",
                                                        "static-allocator.yaml")],
         measurements, {"owca.allocate.allocators.static"},
         {"owca.allocate.allocators.slo_controller"}),
        ("ship", ["--once"], measurements, {"owca.ship.storages.local"},
         {"owca.ship.storages.kafka", "owca.ship.storages.prometheus", "kafka"}),
        ("ship", ["--once", "-c", write_config(tmp_path, "ship:\n  storages:\n"
                                               "    - !FileStorage {path: out.prom}\n")],
         measurements, {"owca.ship.storages.local"},
         {"owca.ship.storages.kafka", "owca.ship.storages.prometheus", "kafka"}),
    ]


@pytest.mark.integration
@pytest.mark.parametrize("index", range(9), ids=lambda i: f"run{i}")
def test_a_tool_holds_its_stage_the_core_and_the_plugins_its_configuration_names(
        tmp_path, index, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tool, args, stdin, wanted, unwanted = runs(tmp_path)[index]
    modules = loaded_modules(tmp_path, tool, args, stdin)
    mine = owca_modules(modules)
    foreign = sorted(m for m in mine
                     if layer(m) not in ("core", "owca", "owca.plugin", tool))
    assert foreign == [], f"owca-{tool} {' '.join(args)} loaded other stages' modules"
    assert f"owca.{tool}.stage" in mine
    assert wanted <= modules, f"owca-{tool} did not load {sorted(wanted - modules)}"
    assert sorted(unwanted & modules) == [], f"owca-{tool} {' '.join(args)} loaded them"
