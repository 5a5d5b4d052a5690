"""OWCA: the package from lib/, the five tools from bin/, and the C perf helper.

The helper (bin/owca-perf.c) is compiled with the system's C compiler when the
scripts are built, and installed beside the tools as `owca-perf`.
"""
import glob
import os
import subprocess

from setuptools import find_packages, setup
from distutils.command.build_scripts import build_scripts  # noqa: E402 (setuptools provides distutils)

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


setup(
    name="owca",
    version=read_version(),
    description="Orchestration-aware Workload Collocation Agent",
    python_requires=">=3.9",
    package_dir={"": "lib"},
    packages=find_packages("lib"),
    scripts=sorted(p for p in glob.glob("bin/owca-*") if not p.endswith(".c")),
    install_requires=[
        "PyYAML>=5.4",
        "kafka-python>=2.0",
        "requests>=2.25",
        "docopt-ng>=0.9",
    ],
    cmdclass={"build_scripts": BuildScriptsWithHelper},
)
