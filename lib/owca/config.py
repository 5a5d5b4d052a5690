"""Configuration: YAML whose tags build objects, checked against dataclass annotations.

    detect:
      detector: !ThresholdDetector
        metric: task_cpu_usage_seconds
        threshold: 0.9

`!ThresholdDetector` names a class registered with `@register` (or loaded with
`-r module:Class`); its mapping becomes the constructor's keyword arguments,
each checked against the class's annotations before the object is built, so a
wrong type, a missing field or an unknown one fails at start with the file, the
line and the field.  Objects nest: a field annotated with a base class accepts
any registered subclass, which is how dependencies are injected.
"""
import dataclasses
import importlib
import types
import typing

_REGISTRY: typing.Dict[str, type] = {}


class ConfigError(Exception):
    """A configuration that cannot be used; str() is `file:line: reason`."""


def register(cls=None, *, name: str = None):
    """Make a class buildable from YAML as `!Name` (use as `@register`)."""
    def add(c):
        tag = name or c.__name__
        existing = _REGISTRY.get(tag)
        if existing is not None and existing is not c and \
                (existing.__module__, existing.__qualname__) != (c.__module__, c.__qualname__):
            raise ValueError(f"tag !{tag} is already registered for {existing.__module__}."
                             f"{existing.__qualname__}")
        _REGISTRY[tag] = c
        return c
    return add(cls) if cls is not None else add


def registered(tag: str):
    return _REGISTRY.get(tag)


def register_external(spec: str) -> type:
    """`module:Class` (the `-r` option): import the module, register the class."""
    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"-r {spec}: expected module:Class or path/to/file.py:Class")
    try:
        if module_name.endswith(".py"):
            module = _import_file(module_name)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # any import-time failure of a plug-in is a usage error
        raise ConfigError(f"-r {spec}: cannot import {module_name}: {e}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"-r {spec}: {module_name} has no class {class_name}")
    return register(cls)


def _import_file(path: str):
    """A plug-in given as a file: imported under its base name."""
    import importlib.util
    import os
    import sys
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ImportError(f"not a Python file: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- loading ----------------------------------------------------------------------
# PyYAML is imported only when a file is loaded: a tool run on its embedded
# defaults stays a few MB smaller, and five of them run on every node.

def _loader_class():
    import yaml

    class _Loader(yaml.SafeLoader):
        pass
    return _Loader


def load_section(path: str, section: str, schema: type, text: str = None):
    """Build `schema` from the `section:` mapping of the YAML file at `path`.

    A missing file section (or no file at all, path None) gives the schema's
    defaults.  Top-level keys that are not sections of any tool are errors.
    """
    if path is None and text is None:
        return schema()
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    where = path or "<config>"
    import yaml
    try:
        root = yaml.compose(text, Loader=_loader_class())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}:{line}: invalid YAML: {problem}") from None
    if root is None:
        return schema()
    builder = _Builder(where)
    if not isinstance(root, yaml.MappingNode) or root.tag != "tag:yaml.org,2002:map":
        raise ConfigError(f"{where}:{root.start_mark.line + 1}: expected a mapping of "
                          f"sections ({', '.join(SECTIONS)})")
    node = None
    for key_node, value_node in root.value:
        key = key_node.value
        if key not in SECTIONS:
            raise ConfigError(f"{where}:{key_node.start_mark.line + 1}: unknown section "
                              f"{key!r} (expected one of {', '.join(SECTIONS)})")
        if key == section:
            node = value_node
    if node is None or (isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null")):
        return schema()
    return builder.build(node, schema, section)


SECTIONS = ("discover", "measure", "detect", "allocate", "ship")


class _Builder:
    def __init__(self, filename: str):
        self.filename = filename
        self.scalars = _loader_class()("")

    def error(self, node, message):
        raise ConfigError(f"{self.filename}:{node.start_mark.line + 1}: {message}")

    def build(self, node, expected, where):
        import yaml
        if node.tag.startswith("!"):
            return self.build_tagged(node, expected, where)
        origin = typing.get_origin(expected)
        args = typing.get_args(expected)
        if expected is typing.Any:
            return self.build_any(node, where)
        if origin is typing.Union or origin is types.UnionType:
            return self.build_union(node, args, where)
        if origin is typing.Literal:
            value = self.build_any(node, where)
            if value not in args:
                self.error(node, f"{where}: expected one of {', '.join(map(repr, args))}, "
                                 f"got {value!r}")
            return value
        if origin in (list, typing.List) or expected is list:
            if not isinstance(node, yaml.SequenceNode):
                self.error(node, f"{where}: expected a list")
            item = args[0] if args else typing.Any
            return [self.build(n, item, f"{where}[{i}]") for i, n in enumerate(node.value)]
        if origin in (dict, typing.Dict) or expected is dict:
            if not isinstance(node, yaml.MappingNode):
                self.error(node, f"{where}: expected a mapping")
            key_t, value_t = args if args else (typing.Any, typing.Any)
            out = {}
            for k, v in node.value:
                key = self.build(k, key_t, f"{where} key")
                out[key] = self.build(v, value_t, f"{where}.{key}")
            return out
        if dataclasses.is_dataclass(expected) and isinstance(node, yaml.MappingNode):
            return self.construct(expected, node, where)
        value = self.build_any(node, where)
        return self.check_scalar(node, value, expected, where)

    def build_union(self, node, args, where):
        if node.tag.endswith(":null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return self.build(node, arg, where)
            except ConfigError as e:
                errors.append(str(e).split(": ", 1)[1])
        self.error(node, errors[0] if len(errors) == 1 else
                   f"{where}: matches none of {', '.join(_type_name(a) for a in args)}")

    def build_any(self, node, where):
        import yaml
        if node.tag.startswith("!"):
            return self.build_tagged(node, typing.Any, where)
        if isinstance(node, yaml.SequenceNode):
            return [self.build_any(n, f"{where}[{i}]") for i, n in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            return {self.build_any(k, where): self.build_any(v, f"{where}.{k.value}")
                    for k, v in node.value}
        try:
            return self.scalars.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            self.error(node, f"{where}: {getattr(e, 'problem', e)}")

    def build_tagged(self, node, expected, where):
        import yaml
        cls = _REGISTRY.get(node.tag[1:])
        if cls is None:
            self.error(node, f"{where}: unknown tag {node.tag} (register the class, or load it "
                             f"with -r module:Class)")
        if expected is not typing.Any and isinstance(expected, type) \
                and not issubclass(cls, expected):
            self.error(node, f"{where}: {node.tag} is not a {expected.__name__}")
        if isinstance(node, yaml.ScalarNode):
            if node.value not in ("", "~", "null"):
                self.error(node, f"{where}: {node.tag} takes a mapping of arguments")
            return self.construct(cls, yaml.MappingNode("tag:yaml.org,2002:map", [],
                                                        node.start_mark, node.end_mark), where)
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{where}: {node.tag} takes a mapping of arguments")
        return self.construct(cls, node, where)

    def construct(self, cls, node, where):
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls)
            fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
            required = {n for n, f in fields.items()
                        if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING}
        else:
            import inspect
            hints = typing.get_type_hints(cls.__init__)
            params = list(inspect.signature(cls).parameters.values())
            fields = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                               p.KEYWORD_ONLY)}
            required = {p.name for p in fields.values() if p.default is p.empty}
        kwargs = {}
        key_nodes = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in fields:
                known = ", ".join(sorted(fields)) or "none"
                self.error(key_node, f"{cls.__name__}: unknown field {key!r} (fields: {known})")
            key_nodes[key] = key_node
            kwargs[key] = self.build(value_node, hints.get(key, typing.Any),
                                     f"{cls.__name__}.{key}")
        missing = sorted(required - kwargs.keys())
        if missing:
            self.error(node, f"{cls.__name__}: missing field {', '.join(map(repr, missing))}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            # A check that names its field ("port: expected ...") points at that field's line.
            field_name = str(e).split(":", 1)[0].strip()
            self.error(key_nodes.get(field_name, node), f"{cls.__name__}: {e}")

    def check_scalar(self, node, value, expected, where):
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if expected is int and isinstance(value, bool):
            self.error(node, f"{where}: expected int, got {value!r}")
        if isinstance(expected, type) and not isinstance(value, expected):
            self.error(node, f"{where}: expected {_type_name(expected)}, got "
                             f"{type(value).__name__} {value!r:.60}")
        return value


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")
