"""Every configuration shipped in configs/ loads in every tool that reads it."""
import glob
import importlib
import os

import pytest

from conftest import ROOT
from owca.core import config

SCHEMAS = {
    "discover": ("owca.discover.stage", "DiscoverConfig"),
    "measure": ("owca.measure.stage", "MeasureConfig"),
    "detect": ("owca.detect.stage", "DetectConfig"),
    "allocate": ("owca.allocate.stage", "AllocateConfig"),
    "ship": ("owca.ship.stage", "ShipConfig"),
}
# The built-in plug-ins, from the one list each plug-in folder keeps (the stages hand
# the same lists to the configuration loader).
BUILTIN_LISTS = ("owca.discover.sources", "owca.detect.detectors", "owca.allocate.allocators",
                 "owca.ship.storages")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def schema(section):
    module, name = SCHEMAS[section]
    return getattr(importlib.import_module(module), name)


def builtins():
    table = dict(config._BUILTINS)
    for module in BUILTIN_LISTS:
        table.update(importlib.import_module(module).BUILTINS)
    return table


@pytest.mark.parametrize("tag", sorted(builtins()))
def test_every_builtin_resolves_to_the_class_its_tag_names(tag):
    module_name, _, class_name = builtins()[tag].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    assert isinstance(cls, type) and cls.__name__ == tag


def test_each_stage_declares_its_folders_builtins_and_none_other():
    """A tag resolves in the tool whose folder lists it; a tool builds no other folder's
    plug-ins (owca-detect's configuration cannot name a storage)."""
    for section, folder in zip(("discover", "detect", "allocate", "ship"), BUILTIN_LISTS):
        schema(section)  # the stage's import declares its list
        tags = importlib.import_module(folder).BUILTINS
        assert set(tags) <= set(config._BUILTINS)


def test_no_builtin_registers_itself_on_import():
    """Registration is the lists' job: a module of the package that registers a class
    as a side effect of being imported would make what a tool loads depend on import
    order again."""
    offenders = []
    for directory, _dirs, names in os.walk(os.path.join(ROOT, "lib", "owca")):
        for name in (n for n in names if n.endswith(".py")):
            with open(os.path.join(directory, name)) as f:
                if any(line.strip().startswith("@register") for line in f):
                    offenders.append(os.path.join(directory, name))
    assert offenders == []


@pytest.mark.integration
@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_loads(path):
    import yaml
    with open(path) as f:
        sections = list((yaml.load(f, Loader=_TagIgnoringLoader) or {}).keys())
    assert sections, f"{path} configures no stage"
    for section in sections:
        cfg = config.load_section(path, section, schema(section))
        assert cfg is not None


def test_example_detector_config_loads_with_its_plugin():
    config.register_external(os.path.join(ROOT, "configs", "examples",
                                          "threshold_detector.py") + ":ThresholdDetector")
    cfg = config.load_section(os.path.join(ROOT, "configs", "examples",
                                           "threshold-detector.yaml"), "detect",
                              schema("detect"))
    assert cfg.detector.threshold == 100.0


def _ignore_tag(loader, suffix, node):
    return None


import yaml  # noqa: E402


class _TagIgnoringLoader(yaml.SafeLoader):
    pass


_TagIgnoringLoader.add_multi_constructor("!", _ignore_tag)
