"""Ansible against the test node: the playbook runner and its recap."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"


def ansible_env(home):
    """Ansible's settings for a test run, every state it keeps under `home`."""
    env = dict(os.environ)
    env.update({
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(home / "cp"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "ANSIBLE_DEPRECATION_WARNINGS": "False",
        "ANSIBLE_PYTHON_INTERPRETER": "auto_silent",
    })
    # The tools of this interpreter's environment (the project's .venv).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


class Playbook:
    """Runs ansible/site.yml against the node with a fixed set of extra variables."""

    def __init__(self, inventory, extra_vars, home):
        self.inventory = inventory
        self.extra_vars = extra_vars
        self.home = home
        self.runs = 0

    def run(self, *args, check=True, timeout=420):
        self.runs += 1
        log = self.home / f"run-{self.runs}.log"
        command = [str(Path(sys.executable).parent / "ansible-playbook"),
                   "-i", str(self.inventory), "-e", f"@{self.extra_vars}",
                   *args, str(ANSIBLE_DIR / "site.yml")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env=ansible_env(self.home), cwd=REPO)
        log.write_text(result.stdout + result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(f"ansible-playbook {' '.join(args)} exited "
                                 f"{result.returncode}:\n{tail(result.stdout + result.stderr)}")
        return result


def recap(output):
    """{host: {ok: N, changed: N, ...}} from a playbook's PLAY RECAP."""
    hosts = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        hosts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return hosts


def tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])
