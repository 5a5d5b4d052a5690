"""A package's import graph, read from its source with ast, for the tests of its shape.

An import anywhere in a module's code counts (a lazy import inside a function is a
dependency too), and `from pkg.x import y` names the submodule pkg.x.y where there
is one.  tests/test_architecture.py checks lib/owca with it, and
tests/test_workloads_imports.py the lab's package.
"""
import ast
import os
from typing import Dict, List, Set


def module_files(package_dir: str) -> Dict[str, str]:
    """{module name: path} of every module of the package in `package_dir`."""
    top = os.path.dirname(os.path.abspath(package_dir))
    out = {}
    for directory, _dirs, names in os.walk(package_dir):
        for name in names:
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(directory, name), top)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = os.path.join(directory, name)
    return out


def imports_of(path: str, name: str, modules, package: str) -> Set[str]:
    """The modules of `package` that the module `name` (at `path`) imports."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == package or t.startswith(package + ".")}
    return found - {name}


def graph(package_dir: str) -> Dict[str, Set[str]]:
    """{module: the package's modules it imports} for every module of the package."""
    modules = module_files(package_dir)
    package = os.path.basename(os.path.normpath(package_dir))
    return {name: imports_of(path, name, modules, package) for name, path in modules.items()}


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Each import cycle found by a depth-first walk, as [a, b, ..., a]."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found
