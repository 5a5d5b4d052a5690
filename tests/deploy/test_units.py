"""The role, the units in systemd/ and the default configuration, checked without a node.

The units in systemd/ and configs/node-systemd.yaml are the role's templates
rendered with its defaults (ansible/render-defaults.yml); these tests fail when
they drift apart, when a role variable is not validated or documented, or when
ansible-lint's production profile finds fault with the role.
"""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from owca_ansible import ANSIBLE_DIR, REPO, ansible_env, recap, tail

ROLE = ANSIBLE_DIR / "roles" / "owca"
VENV_BIN = Path(sys.executable).parent


def test_systemd_dir_and_default_config_are_what_the_role_renders(tmp_path):
    if not (VENV_BIN / "ansible-playbook").exists():
        pytest.skip("ansible-core is not installed (requirements/test.txt)")
    result = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "--check", "--diff",
         str(ANSIBLE_DIR / "render-defaults.yml")],
        capture_output=True, text=True, env=ansible_env(tmp_path), cwd=REPO, timeout=300)
    assert result.returncode == 0, tail(result.stdout + result.stderr)
    assert recap(result.stdout)["localhost"]["changed"] == 0, (
        "systemd/ or configs/node-systemd.yaml differ from the role's templates; "
        "regenerate them with: ansible-playbook ansible/render-defaults.yml\n"
        + tail(result.stdout, 80))


def test_ansible_lint_production_profile_passes():
    lint = VENV_BIN / "ansible-lint"
    if not lint.exists():
        pytest.skip("ansible-lint is not installed (requirements/test.txt)")
    result = subprocess.run([str(lint), "--offline", "--nocolor"], capture_output=True,
                            text=True, cwd=ANSIBLE_DIR, timeout=300)
    assert result.returncode == 0, tail(result.stdout + result.stderr)
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def test_debians_ansible_lint_production_profile_passes(tmp_path):
    """Debian bookworm's ansible-lint (6.13), with its own ansible-core, as an
    operator on a bookworm controller runs it (requirements/apt.txt)."""
    lint = Path("/usr/bin/ansible-lint")
    if not lint.exists():
        pytest.skip("Debian's ansible-lint is not installed (requirements/apt.txt)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    result = subprocess.run([str(lint), "--offline", "--nocolor"], capture_output=True,
                            text=True, cwd=ANSIBLE_DIR, timeout=300, env=env)
    assert result.returncode == 0, tail(result.stdout + result.stderr)
    assert "Passed with production profile" in result.stdout + result.stderr


def test_min_ansible_version_is_the_tested_one():
    """meta/main.yml's minimum is the ansible-core the tests pin and run."""
    meta = yaml.safe_load((ROLE / "meta" / "main.yml").read_text())
    pins = dict(re.findall(r"^([\w-]+)==(\S+)$",
                           (REPO / "requirements" / "test.txt").read_text(), re.M))
    assert "ansible-core" in pins and "ansible-lint" in pins
    assert ".".join(pins["ansible-core"].split(".")[:2]) == meta["galaxy_info"][
        "min_ansible_version"]
    if (VENV_BIN / "ansible-playbook").exists():
        from importlib.metadata import version
        assert version("ansible-core") == pins["ansible-core"]
        assert version("ansible-lint") == pins["ansible-lint"]


def test_the_role_refuses_the_ansible_core_older_than_the_tested_one():
    """The role's own check (tasks/ansible-version.yml) uses meta/main.yml's minimum."""
    meta = yaml.safe_load((ROLE / "meta" / "main.yml").read_text())
    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert role_vars["owca_min_ansible_version"] == meta["galaxy_info"]["min_ansible_version"]
    for tasks in ("preflight.yml", "release.yml"):
        first = yaml.safe_load((ROLE / "tasks" / tasks).read_text())
        assert {"ansible.builtin.import_tasks": "ansible-version.yml"}.items() <= \
            first[0].items(), tasks


def test_the_docs_name_the_packages_the_role_installs_and_removal_keeps():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    docs = (REPO / "docs" / "deploy.md").read_text()
    row = re.search(r"^\| `owca_apt_packages` \| `\[([^\]]*)\]`", docs, re.M).group(1)
    assert [p.strip() for p in row.split(",")] == defaults["owca_apt_packages"]
    # Ansible's apt module installs python3-apt when it is missing: the role says so
    assert "python3-apt" in defaults["owca_apt_packages"]


def test_every_role_variable_is_validated_and_documented():
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    validated = specs["argument_specs"]["main"]["options"]
    documented = re.findall(r"^\| `(owca_\w+)` \|", (REPO / "docs" / "deploy.md").read_text(),
                            re.M)
    assert all(name.startswith("owca_") for name in defaults)
    assert sorted(validated) == sorted(defaults)
    assert sorted(documented) == sorted(defaults)


def test_every_stage_accepts_the_default_configuration():
    from owca.core import config
    from owca.allocate.stage import AllocateConfig
    from owca.detect.stage import DetectConfig
    from owca.discover.stage import DiscoverConfig
    from owca.measure.stage import MeasureConfig
    from owca.ship.stage import ShipConfig
    path = str(REPO / "configs" / "node-systemd.yaml")
    schemas = {"discover": DiscoverConfig, "measure": MeasureConfig, "detect": DetectConfig,
               "allocate": AllocateConfig, "ship": ShipConfig}
    for stage, schema in schemas.items():
        cfg = config.load_section(path, stage, schema)
        assert isinstance(cfg, schema)
    discover = config.load_section(path, "discover", DiscoverConfig)
    assert discover.source.root == "/system.slice"
    ship = config.load_section(path, "ship", ShipConfig)
    assert [type(s).__name__ for s in ship.storages] == ["FileStorage"]


# How a stage writing into a FIFO starts: one newline into it, then the stage.
NEWLINE_FIRST = ["/bin/sh", "-c", 'echo && exec "$$0" "$$@"']


def test_units_name_no_command_the_role_does_not_install():
    """Every ExecStart= runs a tool from the agent's environment; a stage whose
    output is a FIFO writes one newline into it first (docs/protocol.md, Transport)."""
    tools = {p.name for p in (REPO / "bin").glob("owca-*") if p.suffix != ".c"}
    for unit in sorted((REPO / "systemd").glob("*.service")):
        text = unit.read_text()
        if unit.name == "owca-allocate-restore.service":
            # No process of its own: at its stop, owca-allocate writes back what
            # a killed one left (its empty stdin ends it at once).
            (stop,) = re.findall(r"^ExecStop=(.*)$", text, re.M)
            assert re.findall(r"^ExecStart=", text, re.M) == []
            assert shlex.split(stop)[0] == "/opt/owca/bin/owca-allocate"
            assert re.search(r"^StandardInput=null$", text, re.M)
            continue
        starts = re.findall(r"^ExecStart=(.*)$", text, re.M)
        assert len(starts) == 1, unit.name
        argv = shlex.split(starts[0])
        if re.search(r"^StandardOutput=fd:", text, re.M):
            assert argv[:3] == NEWLINE_FIRST, unit.name
            argv = argv[3:]
        else:
            assert unit.stem == "owca-ship"
        assert argv[0].startswith("/opt/owca/bin/")
        assert Path(argv[0]).name in tools
        assert Path(argv[0]).name == unit.stem


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_every_service_is_hardened_below_exposure_four():
    """Offline analysis of the units as written; the deployment test measures them live."""
    for unit in sorted((REPO / "systemd").glob("*.service")):
        result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                                 str(unit)], capture_output=True, text=True, timeout=60)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
        assert found, result.stdout + result.stderr
        assert float(found.group(1)) < 4.0, f"{unit.name}: {found.group(1)}"
