"""The pipeline's tools as the lab runs them: bin/owca-<stage> of this source tree with
this interpreter (the installed command where the tree has none), and an environment
in which they import this tree's lib/ and its plug-ins (configs/)."""
import os
import sys
from typing import List

from owca_workloads.cli import WORKLOADS_DIR

ROOT = os.path.dirname(WORKLOADS_DIR)


def tool_argv(name: str) -> List[str]:
    """bin/owca-<name> of this tree with this interpreter, else the installed one."""
    path = os.path.join(ROOT, "bin", f"owca-{name}")
    return [sys.executable, path] if os.path.exists(path) else [f"owca-{name}"]


def tool_env() -> dict:
    env = dict(os.environ)
    lib = os.path.join(ROOT, "lib")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (lib, ROOT, env.get("PYTHONPATH")) if p)
    return env
