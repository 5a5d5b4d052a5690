"""The cgroup v2 tests (tests/vm/guest_*.py), run in the QEMU guest; one boot for all.

This host binds cpu and cpuset to cgroup v1; the guest (tests/vm/owca_qemu.py)
has a real unified hierarchy owned by systemd.  The guest's pytest runs
guest_v2.py (the pipeline and owca-allocate on v2) and guest_deploy.py (the
systemd units) from the shared source tree and leaves a JUnit report; each test
here stands for one test there and passes, fails, skips or xfails as it did.
Skipped, with the reason, where QEMU or the image cannot be had.  The guest's
figures (the quota's effect) are printed and kept in the job directory.
"""
import ast
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import owca_qemu

HERE = Path(__file__).resolve().parent
GUEST_MODULES = ("guest_v2", "guest_memory", "guest_deploy")
ROOT = HERE.parent.parent


def guest_test_names():
    """(module, test function) of every test the guest runs (parametrized ones once)."""
    out = []
    for module in GUEST_MODULES:
        tree = ast.parse((HERE / f"{module}.py").read_text())
        out += [(module, n.name) for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    return out


JOB = """set -u
export OWCA_IN_GUEST=1 PYTHONDONTWRITEBYTECODE=1 OWCA_GUEST_REPORT=/job/report.json
python3 -m pytest -p no:cacheprovider -q -rfEsx --junitxml=/job/junit.xml \
  --rootdir=/owca -c /owca/pytest.ini %s
""" % " ".join(f"tests/vm/{m}.py" for m in GUEST_MODULES)


@pytest.fixture(scope="session")
def guest_run(tmp_path_factory):
    why = owca_qemu.missing_requirements()
    if why:
        pytest.skip(why)
    # The perf helper the guest's pipeline runs: built here (same Debian release).
    built = subprocess.run(["make", "-s", "-C", str(ROOT), "helper"], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    owca_qemu.build_image()
    job = tmp_path_factory.mktemp("v2-guest")
    result = owca_qemu.run_job(JOB, job)
    print(f"guest job: {result.seconds:.0f} s from boot to power-off")
    print(result.output[-6000:])
    report = job / "report.json"
    if report.exists():
        print("guest figures:", report.read_text())
    junit = job / "junit.xml"
    assert junit.exists(), (f"the guest left no test report (status {result.status}):\n"
                            f"{result.output[-3000:]}\nconsole:\n{result.console[-3000:]}")
    outcomes = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        # "tests.vm.guest_v2", "test_x[param]": every parametrized case under its function
        key = (case.get("classname").rsplit(".", 1)[-1], case.get("name").split("[")[0])
        outcomes.setdefault(key, []).append(case)
    return result, outcomes


@pytest.mark.parametrize("module, name", guest_test_names(),
                         ids=[f"{m}::{n}" for m, n in guest_test_names()])
def test_in_the_v2_guest(guest_run, module, name):
    result, outcomes = guest_run
    cases = outcomes.get((module, name))
    assert cases, f"{module}::{name} did not run in the guest:\n{result.output[-3000:]}"
    failures = [f"{case.get('name')}: {found.get('message')}\n{found.text or ''}"
                for case in cases for tag in ("failure", "error")
                for found in [case.find(tag)] if found is not None]
    if failures:
        pytest.fail("in the guest: " + "\n".join(failures)[:8000], pytrace=False)
    skipped = [case.find("skipped") for case in cases if case.find("skipped") is not None]
    if skipped:
        message = skipped[0].get("message") or ""
        if skipped[0].get("type") == "pytest.xfail":
            pytest.xfail(message)
        pytest.skip(f"in the guest: {message}")
