"""OWCA, the Orchestration-aware Workload Collocation Agent.

The package reads as the pipeline (docs/architecture.md): `owca.core` under
everything, `owca.plugin` for plug-in authors, and one package per stage
(`discover`, `measure`, `detect`, `allocate`, `ship`).

The modules of the flat layout this replaced (`owca.frames`, `owca.config`,
`owca.allocators`, ...) and the names external plug-ins imported from them still
resolve, each with a DeprecationWarning that names the new home; they will be
removed in a later release.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__version__ = "0.1.0"

# Old module -> the modules its names live in now (the first that has a name wins).
MOVED = {
    "frames": ("core.frames",), "stream": ("core.stream",), "stage": ("core.stage",),
    "config": ("core.config",), "startup": ("core.startup",), "paths": ("core.paths",),
    "metrics": ("core.metrics",), "digest": ("core.digest",), "priority": ("core.priority",),
    "allocation": ("core.allocation",),
    "http": ("discover.sources.http",), "orchestrator": ("discover.sources.orchestrator",),
    "kubernetes": ("discover.sources.kubernetes",), "mesos": ("discover.sources.mesos",),
    "cgroups": ("measure.sources.cgroup", "core.kernel"),
    "platform": ("measure.sources.platform",), "apm": ("measure.sources.apm",),
    "rdt_monitor": ("measure.sources.rdt",), "perf": ("measure.sources.perf",),
    "contention": ("detect.detectors.contention",),
    "cgroup_allocation": ("allocate.cgroup_files",),
    "resctrl": ("allocate.resctrl", "core.resctrl"), "journal": ("allocate.journal",),
    "cpu_manager_state": ("allocate.cpu_manager_state",),
    "allocators": ("plugin", "allocate.allocators.static"),
    "slo_controller": ("allocate.allocators.slo_controller",),
    "exposition": ("ship.exposition",), "spool": ("ship.spool",),
    "storage": ("plugin", "ship.storages.local"),
    "kafka": ("ship.storages.kafka",), "prometheus": ("ship.storages.prometheus",),
}
# The stages' packages answer for what their single modules held.
MOVED_FROM_STAGE = {
    "discover": ("discover.stage", "plugin", "discover.sources.cgroup",
                 "discover.sources.static", "core.frames"),
    "measure": ("measure.stage",),
    "detect": ("detect.stage", "plugin"),
    "allocate": ("allocate.stage",),
    "ship": ("ship.stage",),
}


def moved_names(old: str, homes):
    """A module `__getattr__` for `old`: each name from its new home, with a warning."""
    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        for home in homes:
            module = importlib.import_module(f"{__name__}.{home}")
            if hasattr(module, name):
                found = getattr(module, name)
                warnings.warn(f"{old}.{name} is deprecated: import it from "
                              f"{_recommended_home(found, name, module.__name__)}",
                              DeprecationWarning, stacklevel=2)
                return found
        raise AttributeError(f"module {old!r} has no attribute {name!r}")
    return __getattr__


def _recommended_home(found, name: str, where: str) -> str:
    """Where to import `found` from now: owca.plugin for what plug-ins use, else the
    module that defines it (a stage's module may only pass it on)."""
    plugin = importlib.import_module(f"{__name__}.plugin")
    if getattr(plugin, name, None) is found:
        return plugin.__name__
    defined_in = getattr(found, "__module__", None)
    return defined_in if isinstance(defined_in, str) and defined_in.startswith(__name__) \
        else where


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of `owca.<old>` get a module whose names come from the new tree."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, leaf = fullname.rpartition(".")
        if package == __name__ and leaf in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name, f"Deprecated: moved to {__name__}."
                                             f"{MOVED[spec.name.rpartition('.')[2]][0]}")
        # PEP 562: a module's __getattr__ is a plain attribute (typeshed has a method).
        module.__getattr__ = moved_names(  # type: ignore[method-assign]
            spec.name, MOVED[spec.name.rpartition(".")[2]])
        return module

    def exec_module(self, module):
        pass


# First: an old name must never find a stale file of the flat layout left on sys.path.
sys.meta_path.insert(0, _MovedModules())
