"""Configuration: YAML whose tags build objects, checked against dataclass annotations.

    detect:
      detector: !ThresholdDetector
        metric: task_cpu_usage_seconds
        threshold: 0.9

`!ThresholdDetector` names a class registered with `@register` (or loaded with
`-r module:Class`), or a built-in of a stage (`add_builtins`: imported only when
a configuration names it); its mapping becomes the constructor's keyword arguments,
each checked against the class's annotations before the object is built, so a
wrong type, a missing field or an unknown one fails at start with the file, the
line and the field.  Objects nest: a field annotated with a base class accepts
any registered subclass, which is how dependencies are injected.
"""
import dataclasses
import importlib
import math
import re
import types
import typing

_REGISTRY: typing.Dict[str, type] = {}
# Built-in plug-ins, tag -> "module:Class": imported the first time a configuration
# names the tag, so that a tool loads only the plug-ins its configuration uses.  Each
# stage adds its folder's list (`BUILTINS`) when it is imported; the core's are here.
_BUILTINS: typing.Dict[str, str] = {"PriorityRule": "owca.core.priority:PriorityRule"}


class ConfigError(Exception):
    """A configuration that cannot be used; str() is `file:line: reason`."""


# A configuration is a few kilobytes: a bigger file is a mistake (a log, a core
# file given to -c), and reading it whole must not take a node's memory.
MAX_CONFIG_BYTES = 1 << 20
# Collections in collections, the mapping of sections counting as one: a real
# configuration nests less than 10 deep; loading and checking it recurse per level.
MAX_DEPTH = 32


# -- ranges of numeric fields ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric field takes, declared on its annotation:

        interval: Annotated[float, Range(0, 3600, min_excluded=True)] = 5.0
        port: Annotated[int, Range(1, 65535)] = 9477

    Checked when the configuration is loaded; a value outside is `file:line`.
    """
    min: typing.Optional[float] = None
    max: typing.Optional[float] = None
    min_excluded: bool = False

    def refuses(self, value) -> bool:
        if self.min is not None and (value < self.min or (self.min_excluded and value == self.min)):
            return True
        return self.max is not None and value > self.max

    def __str__(self) -> str:
        low = None if self.min is None else f"{'>' if self.min_excluded else '>='} {self.min:.15g}"
        high = None if self.max is None else f"<= {self.max:.15g}"
        return " and ".join(p for p in (low, high) if p) or "any number"


MAX_SECONDS = 365 * 86400.0
SECONDS = Range(0, MAX_SECONDS, min_excluded=True)   # a duration or an interval
POSITIVE = Range(0, min_excluded=True)
COUNT = Range(0)                                      # a count, a size, a limit
Seconds = typing.Annotated[float, SECONDS]

# A numeric field without a declared Range gets one from its name: a duration
# must be positive (an interval of 0 or -5 spins a CPU), a count, size or
# limit must not be negative.  Every float must be finite.
_DURATION_NAME = re.compile(r"(?:^|_)(?:interval|timeout|deadline|backoff|period|age|"
                            r"staleness|seconds|duration)(?:_|$)")
_SUBSECOND_NAME = re.compile(r"_(?:ms|us|ns)$")
_COUNT_NAME = re.compile(r"(?:^|_)(?:max|min|bytes|count|cycles|retries|every|depth|port|"
                         r"connections|bits|size|limit)(?:_|$)")


def range_for(name: str, hint) -> typing.Optional[Range]:
    """The Range a field is checked against: declared, else implied by its name."""
    declared = _declared_range(hint)
    if declared is not None:
        return declared
    if _SUBSECOND_NAME.search(name):
        return POSITIVE
    if _DURATION_NAME.search(name):
        return SECONDS
    if _COUNT_NAME.search(name):
        return COUNT
    return None


def _declared_range(hint):
    if typing.get_origin(hint) is typing.Annotated:
        for extra in hint.__metadata__:
            if isinstance(extra, Range):
                return extra
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            found = _declared_range(arg)
            if found is not None:
                return found
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def add_builtins(table: typing.Dict[str, str]) -> None:
    """Declare built-in plug-ins, {tag: "module:Class"}, without importing them."""
    _BUILTINS.update(table)


def register(cls=None, *, name: typing.Optional[str] = None):
    """Make a class buildable from YAML as `!Name` (use as `@register`)."""
    def add(c):
        tag = name or c.__name__
        builtin = _BUILTINS.get(tag)
        if builtin is not None and builtin != f"{c.__module__}:{c.__qualname__}":
            raise ValueError(f"tag !{tag} is already registered for "
                             f"{builtin.replace(':', '.')}")
        existing = _REGISTRY.get(tag)
        if existing is not None and existing is not c and \
                (existing.__module__, existing.__qualname__) != (c.__module__, c.__qualname__):
            raise ValueError(f"tag !{tag} is already registered for {existing.__module__}."
                             f"{existing.__qualname__}")
        _REGISTRY[tag] = c
        return c
    return add(cls) if cls is not None else add


def registered(tag: str):
    """The class of `!tag`: registered, or a built-in imported now; None if unknown."""
    cls = _REGISTRY.get(tag)
    if cls is None and tag in _BUILTINS:
        module_name, _, class_name = _BUILTINS[tag].partition(":")
        cls = _REGISTRY[tag] = getattr(importlib.import_module(module_name), class_name)
    return cls


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
    except (Exception, SystemExit, KeyboardInterrupt) as e:  # noqa: BLE001 any import-time
        # failure of a plug-in, sys.exit() or a KeyboardInterrupt of its own too, is a usage
        # error that names the plug-in's line (a real SIGINT while a tool starts ends it
        # before it gets here: owca.core.startup)
        where = _where_raised(e)
        raise ConfigError(f"{where + ': ' if where else ''}-r {spec}: cannot import "
                          f"{module_name}: {_import_failure(e)}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigError(f"-r {spec}: {module_name} has no class {class_name}")
    return register(cls)


def _import_failure(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r}) while being imported"
    if isinstance(e, KeyboardInterrupt):
        return "it raised KeyboardInterrupt while being imported"
    return f"{type(e).__name__}: {e}" if not isinstance(e, ImportError) else str(e)


def _where_raised(e: BaseException) -> str:
    """`file:line` of the plug-in's line that failed: a syntax error's own, else the
    innermost frame of the traceback outside the import machinery."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}"
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "importlib" not in f.filename and f.filename != __file__]
    if frames:
        return f"{frames[-1].filename}:{frames[-1].lineno}"
    return ""


def _import_file(path: str):
    """A plug-in given as a file: imported under its base name."""
    import importlib.util
    import os
    import sys
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
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
        """Composes a tree, never a graph: an alias (`*name`) is refused where it stands,
        because a few of them expand without bound (`a: &a [*a]`, a "billion laughs"),
        and nesting is bounded, because composing it recurses."""
        where = "<config>"
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise ConfigError(f"{self.where}:{event.start_mark.line + 1}: YAML aliases "
                                  f"(*{event.anchor}) are not allowed: write the value out")
            if not self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent):
                return super().compose_node(parent, index)
            if self.depth == MAX_DEPTH:
                raise ConfigError(f"{self.where}:{self.peek_event().start_mark.line + 1}: "
                                  f"nested deeper than {MAX_DEPTH} levels")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1
    return _Loader


def _load(text: str, where: str, compose_only: bool):
    """The document's node tree (compose_only) or its plain data, with the loader's
    limits; `where` names the file in errors."""
    loader = _loader_class()(text)
    loader.where = where
    try:
        return loader.get_single_node() if compose_only else loader.get_single_data()
    finally:
        loader.dispose()


def _compose(text: str, where: str):
    return _load(text, where, compose_only=True)


def _read_config_file(path: str) -> bytes:
    """The bytes of a configuration file: a regular file (a FIFO, a device or a pipe
    could block or never end) of at most MAX_CONFIG_BYTES."""
    import os
    import stat

    from owca.core.kernel import read_at_most
    try:
        # O_NONBLOCK: opening a FIFO would wait for a writer, for ever if none comes.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"{path}: cannot read: Is a directory")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{path}: not a regular file ({_file_kind(mode)}): a "
                              f"configuration is read from a file")
        data = read_at_most(fd, MAX_CONFIG_BYTES)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes (1 MiB): not a "
                          f"configuration")
    return data


def _read_config_text(path: str) -> str:
    data = _read_config_file(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        newline = b"\n"
        line = data.count(newline, 0, e.start) + 1
        column = e.start - data.rfind(newline, 0, e.start)
        raise ConfigError(f"{path}:{line}: not UTF-8: {e.reason} at byte {column} of "
                          f"the line") from None


def load_yaml_data(path: str):
    """Plain data (mappings, lists, scalars) from a YAML file that a plug-in reads
    itself (a static task list), under a configuration file's limits: a regular file of
    at most MAX_CONFIG_BYTES, no aliases, nesting bounded.  ConfigError, or
    yaml.YAMLError for a file that is not YAML."""
    return _load(_read_config_text(path), path, compose_only=False)


def _file_kind(mode: int) -> str:
    import stat
    for test, kind in ((stat.S_ISFIFO, "a FIFO or a pipe"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


def load_section(path: typing.Optional[str], section: str, schema: type,
                 text: typing.Optional[str] = None):
    """Build `schema` from the `section:` mapping of the YAML file at `path`.

    A missing file section (or no file at all, path None) gives the schema's
    defaults.  Top-level keys that are not sections of any tool are errors.
    """
    if text is None:
        if path is None:
            return schema()
        text = _read_config_text(path)
    where = path or "<config>"
    import yaml
    try:
        root = _compose(text, where)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{where}:{line}: invalid YAML: {problem}") from None
    if root is None:
        return schema()
    _check_keys(root, where)
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


def _check_keys(root, where: str) -> None:
    """Every key a scalar (a field, a label: a list or a mapping names nothing), and
    none repeated: YAML's last-one-wins for a repeated key hides a mistake."""
    import yaml
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                    raise ConfigError(f"{where}:{key_node.start_mark.line + 1}: a key must be "
                                      f"a name or a number, not a {kind}")
                first = seen.setdefault(key_node.value, key_node)
                if first is not key_node:
                    raise ConfigError(f"{where}:{key_node.start_mark.line + 1}: key "
                                      f"{key_node.value!r} given twice (first on line "
                                      f"{first.start_mark.line + 1})")
                stack.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


class _Builder:
    def __init__(self, filename: str):
        self.filename = filename
        self.scalars = _loader_class()("")

    def error(self, node, message):
        raise ConfigError(f"{self.filename}:{node.start_mark.line + 1}: {message}")

    def build(self, node, expected, where):
        import yaml
        origin = typing.get_origin(expected)
        if origin is typing.Annotated:
            value = self.build(node, typing.get_args(expected)[0], where)
            self.check_range(node, value, _declared_range(expected), where)
            return value
        if node.tag.startswith("!"):
            if origin in (list, typing.List) or expected is list:
                self.error(node, f"{where}: expected a list, got one {node.tag} "
                                 f"(a list of one is `- {node.tag} ...`)")
            if origin in (dict, typing.Dict) or expected is dict:
                self.error(node, f"{where}: expected a mapping, got {node.tag}")
            return self.build_tagged(node, expected, where)
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
        cls = registered(node.tag[1:])
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
            hints = typing.get_type_hints(cls, include_extras=True)
            fields: dict = {f.name: f for f in dataclasses.fields(cls) if f.init}
            required = {n for n, f in fields.items()
                        if f.default is dataclasses.MISSING
                        and f.default_factory is dataclasses.MISSING}
        else:
            import inspect
            hints = typing.get_type_hints(cls.__init__, include_extras=True)
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
            hint = hints.get(key, typing.Any)
            kwargs[key] = value = self.build(value_node, hint, f"{cls.__name__}.{key}")
            if _declared_range(hint) is None and _is_number(value):
                self.check_range(value_node, value, range_for(key, hint),
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

    def check_range(self, node, value, allowed, where):
        if not _is_number(value):
            return
        if isinstance(value, float) and not math.isfinite(value):
            self.error(node, f"{where}: expected a finite number, got {value!r}")
        if allowed is not None and allowed.refuses(value):
            self.error(node, f"{where}: expected a number {allowed}, got {value!r}")

    def check_scalar(self, node, value, expected, where):
        if expected is float and isinstance(value, float) and not math.isfinite(value):
            self.error(node, f"{where}: expected a finite number, got {value!r}")
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
