"""Configuration: YAML tags build checked objects; every error names file and line."""
import textwrap
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Literal, Optional

import pytest

from owca.core import config
from owca.core.config import ConfigError, register


class Engine:
    pass


@register
@dataclass
class SampleEngine(Engine):
    power: float
    name: str = "e"
    modes: List[str] = field(default_factory=list)
    limits: Dict[str, int] = field(default_factory=dict)
    style: Literal["fast", "slow"] = "fast"
    spare: Optional[int] = None

    def __post_init__(self):
        if self.power < 0:
            raise ValueError("power: expected 0 or more")


@register
@dataclass
class SampleCar:
    engine: Engine
    wheels: int = 4


@dataclass
class Schema:
    car: Optional[SampleCar] = None
    interval: float = 1.0


@dataclass
class AnySchema:
    thing: Any = None


def load(tmp_path, text, section="detect"):
    path = tmp_path / "owca.yaml"
    path.write_text(textwrap.dedent(text))
    return config.load_section(str(path), section, Schema), str(path)


def test_tags_build_nested_objects_with_checked_types(tmp_path):
    cfg, _ = load(tmp_path, """
        detect:
          interval: 2
          car: !SampleCar
            engine: !SampleEngine {power: 3, modes: [a, b], limits: {x: 1}, style: slow}
    """)
    assert cfg.interval == 2.0 and isinstance(cfg.interval, float)
    assert cfg.car.engine == SampleEngine(power=3.0, modes=["a", "b"], limits={"x": 1},
                                        style="slow")
    assert cfg.car.wheels == 4


def test_a_bare_tag_builds_with_defaults(tmp_path):
    @register
    @dataclass
    class SampleBare(Engine):
        level: int = 1
    cfg, _ = load(tmp_path, "detect:\n  car: !SampleCar\n    engine: !SampleBare\n")
    assert cfg.car.engine.level == 1


def test_missing_file_section_gives_defaults(tmp_path):
    cfg, _ = load(tmp_path, "ship:\n  interval: 3\n")
    assert cfg == Schema()
    assert config.load_section(None, "detect", Schema) == Schema()


@pytest.mark.parametrize("text, line, message", [
    ("detect:\n  car: !SampleCar\n    engine: !SampleEngine {power: fast}\n", 3,
     "SampleEngine.power: expected float, got str"),
    ("detect:\n  car: !SampleCar\n    engine: !SampleEngine\n      power: 1\n      colour: red\n", 5,
     "SampleEngine: unknown field 'colour'"),
    ("detect:\n  car: !SampleCar\n    wheels: 3\n", 2, "SampleCar: missing field 'engine'"),
    ("detect:\n  car: !SampleCar\n    engine: !Nope {}\n", 3, "unknown tag !Nope"),
    ("detect:\n  car: !SampleCar\n    engine: !SampleCar {engine: !SampleEngine {power: 1}}\n", 3,
     "!SampleCar is not a Engine"),
    ("detect:\n  car: !SampleCar\n    engine: !SampleEngine {power: -1}\n", 3,
     "power: expected 0 or more"),
    ("detect:\n  car: !SampleCar\n    engine: !SampleEngine\n      name: x\n      power: -1\n",
     5, "SampleEngine: power: expected 0 or more"),
    ("detect:\n  car: !SampleCar\n    engine: !SampleEngine {power: 1, style: medium}\n", 3,
     "expected one of 'fast', 'slow'"),
    ("detect:\n  car: !SampleCar\n    engine: !SampleEngine {power: 1, modes: a}\n", 3,
     "SampleEngine.modes: expected a list"),
    ("detect:\n  car: !SampleCar\n    engine: !SampleEngine {power: 1}\n    wheels: true\n", 4,
     "SampleCar.wheels: expected int"),
    ("detect:\n  interval: [1\n", 3, "invalid YAML"),
    ("detetc:\n  interval: 1\n", 1, "unknown section 'detetc'"),
    ("- 1\n", 1, "expected a mapping of sections"),
])
def test_errors_name_file_line_and_field(tmp_path, text, line, message):
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    path = str(tmp_path / "owca.yaml")
    assert str(e.value).startswith(f"{path}:{line}: "), str(e.value)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load_section(str(tmp_path / "missing.yaml"), "detect", Schema)


def test_register_external_by_module_and_by_file(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text("class PluginThing:\n    def __init__(self, size: int = 1):\n"
                      "        self.size = size\n")
    cls = config.register_external(f"{plugin}:PluginThing")
    assert config.registered("PluginThing") is cls
    assert config.register_external("owca.plugin:NOPAnomalyDetector").__name__ == \
        "NOPAnomalyDetector"
    for bad, message in [("nocolon", "expected module:Class"),
                         ("no_such_module_xyz:X", "cannot import"),
                         ("owca.detect.stage:NoSuchClass", "has no class")]:
        with pytest.raises(ConfigError, match=message):
            config.register_external(bad)


def test_plain_classes_are_checked_from_their_signature(tmp_path):
    plugin = tmp_path / "sig_plugin.py"
    plugin.write_text("class SigEngine:\n    def __init__(self, size: int):\n"
                      "        self.size = size\n")
    config.register_external(f"{plugin}:SigEngine")
    cfg = config.load_section(None, "detect", AnySchema, text="detect:\n"
                              "  thing: !SigEngine {size: 2}\n")
    assert cfg.thing.size == 2
    with pytest.raises(ConfigError, match="<config>:2: SigEngine.size: expected int"):
        config.load_section(None, "detect", AnySchema, text="detect:\n"
                            "  thing: !SigEngine {size: x}\n")


@register
@dataclass
class SampleRanged:
    ratio: Annotated[float, config.Range(0, 1)] = 0.5
    window: Annotated[int, config.Range(1, 100)] = 10
    pause: Optional[config.Seconds] = None
    poll_interval: float = 1.0        # a duration, by its name
    max_items: int = 5                # a count, by its name
    offset: float = 0.0               # nothing implied: any finite number


@pytest.mark.parametrize("text, message", [
    ("ratio: 1.5", "SampleRanged.ratio: expected a number >= 0 and <= 1, got 1.5"),
    ("window: 0", "SampleRanged.window: expected a number >= 1 and <= 100, got 0"),
    ("pause: 0", "SampleRanged.pause: expected a number > 0 and <= 31536000, got 0.0"),
    ("pause: .inf", "SampleRanged.pause: expected a finite number, got inf"),
    ("poll_interval: -5", "SampleRanged.poll_interval: expected a number > 0 and <= 31536000, "
                          "got -5.0"),
    ("poll_interval: .nan", "SampleRanged.poll_interval: expected a finite number, got nan"),
    ("max_items: -1", "SampleRanged.max_items: expected a number >= 0, got -1"),
    ("offset: -.inf", "SampleRanged.offset: expected a finite number, got -inf"),
])
def test_numeric_fields_are_checked_against_their_range(tmp_path, text, message):
    path = tmp_path / "owca.yaml"
    path.write_text(f"detect:\n  thing: !SampleRanged\n    {text}\n")
    with pytest.raises(ConfigError) as e:
        config.load_section(str(path), "detect", AnySchema)
    assert str(e.value) == f"{path}:3: {message}"


def test_values_within_their_range_are_built(tmp_path):
    path = tmp_path / "owca.yaml"
    path.write_text("detect:\n  thing: !SampleRanged {ratio: 1, window: 100, pause: 0.5,"
                    " poll_interval: 2, max_items: 0, offset: -3}\n")
    thing = config.load_section(str(path), "detect", AnySchema).thing
    assert (thing.ratio, thing.window, thing.pause, thing.max_items, thing.offset) == \
        (1.0, 100, 0.5, 0, -3.0)


def test_range_for_reads_a_declaration_before_the_name():
    assert config.range_for("interval", float) == config.SECONDS
    assert config.range_for("flush_timeout_seconds", float) == config.SECONDS
    assert config.range_for("period_us", int) == config.POSITIVE
    assert config.range_for("spool_max_bytes", int) == config.COUNT
    assert config.range_for("threshold", float) is None
    declared = config.Range(-1, 1)
    assert config.range_for("interval", Annotated[float, declared]) == declared
    assert config.range_for("interval", Optional[Annotated[float, declared]]) == declared
