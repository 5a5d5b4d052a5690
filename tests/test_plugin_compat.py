"""The names plug-ins imported from the flat package before it had a folder per stage
still resolve, to the same objects, each with a DeprecationWarning naming its new home
(owca/__init__.py, docs/plugins.md)."""
import importlib
import json
import subprocess
import textwrap
import warnings

import pytest

from conftest import tool_command, tool_env

import owca
from owca import plugin
from owca.core import config, frames


@pytest.mark.parametrize("old, name, new", [
    ("owca.detect", "AnomalyDetector", plugin.AnomalyDetector),
    ("owca.detect", "ContentionAnomaly", plugin.ContentionAnomaly),
    ("owca.detect", "Platform", plugin.Platform),
    ("owca.allocators", "Allocator", plugin.Allocator),
    ("owca.storage", "Storage", plugin.Storage),
    ("owca.discover", "TaskSource", plugin.TaskSource),
    ("owca.config", "register", config.register),
    ("owca.config", "Range", config.Range),
    ("owca.frames", "sample", frames.sample),
])
def test_an_old_name_is_the_new_object_with_a_warning_naming_its_home(old, name, new):
    module = importlib.import_module(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = getattr(module, name)
    assert found is new
    assert [w.category for w in caught] == [DeprecationWarning]
    home = "owca.plugin" if getattr(plugin, name, None) is new else new.__module__
    assert str(caught[0].message) == f"{old}.{name} is deprecated: import it from {home}"


def test_a_name_the_old_module_never_had_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        importlib.import_module("owca.frames").no_such_name  # noqa: B018


def test_every_old_module_maps_to_modules_that_exist():
    for old, homes in {**owca.MOVED, **owca.MOVED_FROM_STAGE}.items():
        for home in homes:
            importlib.import_module(f"owca.{home}")
        importlib.import_module(f"owca.{old}")


def test_a_plugin_written_against_the_old_names_still_loads_and_detects(tmp_path):
    """A detector file of the old kind, loaded with -r by a real owca-detect."""
    (tmp_path / "old_detector.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass
        from owca import frames
        from owca.config import register
        from owca.detect import AnomalyDetector, ContentionAnomaly

        @register
        @dataclass
        class OldDetector(AnomalyDetector):
            def detect(self, platform, tasks_measurements, tasks_resources, tasks_labels):
                return ([ContentionAnomaly("cpu", "a", ["b"])],
                        [frames.sample("old_detector_runs", 1)])
    """))
    (tmp_path / "owca.yaml").write_text("detect:\n  detector: !OldDetector\n")
    frame = frames.measurements_frame(1, {}, {"a": {"name": "a", "cgroup_path": "/a",
                                                    "labels": {}, "resources": {},
                                                    "metrics": {}}}, ts=1.0, host="n")
    done = subprocess.run(tool_command("detect", "--once", "--no-timing", "-r",
                                       f"{tmp_path / 'old_detector.py'}:OldDetector",
                                       "-c", str(tmp_path / "owca.yaml")),
                          input=frames.encode(frame), capture_output=True, env=tool_env(),
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    out = [json.loads(line) for line in done.stdout.splitlines()]
    anomalies = [f for f in out if f["kind"] == "anomalies"][0]
    assert [a["contended_task_id"] for a in anomalies["anomalies"]] == ["a"]
    assert any(s["name"] == "old_detector_runs" for s in anomalies["metrics"])
