"""OWCA: the package from lib/, the five tools from bin/, and the C perf helper;
from a source tree also the workload tools of workloads/ (owca-launch, owca-wrap,
owca-sine, owca-scenario) as commands.

The helper (bin/owca-perf.c) is compiled with the system's C compiler when the
scripts are built, and installed beside the tools as `owca-perf`.
"""
import glob
import os
import subprocess

from setuptools import find_packages, setup
# After setuptools, which provides distutils where the standard library has none (3.12).
from distutils.command.build_scripts import build_scripts

HELPER_SOURCE = os.path.join("bin", "owca-perf.c")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"]


class BuildScriptsWithHelper(build_scripts):
    """Build the Python tools, and compile the perf helper next to them."""

    def run(self):
        super().run()
        if not os.path.exists(HELPER_SOURCE):
            return
        os.makedirs(self.build_dir, exist_ok=True)
        target = os.path.join(self.build_dir, "owca-perf")
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, *CFLAGS, "-o", target, HELPER_SOURCE], check=True)


def read_version():
    with open(os.path.join("lib", "owca", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split('"')[1]
    raise RuntimeError("no __version__ in lib/owca/__init__.py")


# The workload tools (docs/workloads.md) are installed as commands where the tree has
# workloads/; they read its catalog.yaml and scripts/, so `make venv`'s editable
# install keeps them where they are.  An install without workloads/ (the workloads
# image copies it elsewhere) has the five pipeline tools only.
WORKLOADS_PACKAGE = os.path.join("workloads", "owca_workloads")
WORKLOAD_TOOLS = {"owca-launch": "launch_tool", "owca-wrap": "wrap_tool",
                  "owca-sine": "sine_tool", "owca-scenario": "scenario_tool"}
HAS_WORKLOADS = os.path.isdir(WORKLOADS_PACKAGE)

setup(
    name="owca",
    version=read_version(),
    description="Orchestration-aware Workload Collocation Agent",
    python_requires=">=3.10",
    package_dir={"": "lib", **({"owca_workloads": WORKLOADS_PACKAGE} if HAS_WORKLOADS else {})},
    packages=find_packages("lib") + (["owca_workloads"] if HAS_WORKLOADS else []),
    entry_points={"console_scripts": [f"{name}=owca_workloads.{module}:main"
                                      for name, module in WORKLOAD_TOOLS.items()]}
    if HAS_WORKLOADS else {},
    scripts=sorted(p for p in glob.glob("bin/owca-*") if not p.endswith(".c")),
    install_requires=[
        "PyYAML>=5.4",
        "kafka-python>=2.0",
        "requests>=2.25",
        "docopt-ng>=0.9",
        # owca-measure's sli source parses services' Prometheus expositions with it
        # (imported only when the configuration has an sli section).
        "prometheus-client>=0.12",
    ],
    # `owca-scenario score --plot` draws its pictures with matplotlib; `owca-profile`
    # computes on Dask distributed (a local cluster or a scheduler's).
    extras_require={"plot": ["matplotlib>=3.5"],
                    "profile": ["dask[distributed]>=2024.1"]},
    cmdclass={"build_scripts": BuildScriptsWithHelper},
)
