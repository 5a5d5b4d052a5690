"""Every configuration shipped in configs/ loads in every tool that reads it."""
import glob
import importlib
import os

import pytest

from conftest import ROOT
from owca import config

SCHEMAS = {
    "discover": ("owca.discover", "DiscoverConfig"),
    "measure": ("owca.measure", "MeasureConfig"),
    "detect": ("owca.detect", "DetectConfig"),
    "allocate": ("owca.allocate", "AllocateConfig"),
    "ship": ("owca.ship", "ShipConfig"),
}
# Modules whose classes the shipped configurations use (registered on import).
PLUGIN_MODULES = ("owca.kubernetes", "owca.mesos", "owca.kafka", "owca.prometheus",
                  "owca.allocate", "owca.priority")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def schema(section):
    module, name = SCHEMAS[section]
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module", autouse=True)
def plugins():
    for module in PLUGIN_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # a module not written yet: its configs fail below, by name


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
