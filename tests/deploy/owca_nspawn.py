"""A booted Debian bookworm node for deployment tests.

A root tree is made once with Debian's debootstrap and cached outside the
source tree (OWCA_TEST_CACHE, default /var/cache/owca-tests); each test run
boots a throwaway overlay of it with `systemd-nspawn --boot`, so the cached
tree is never changed. The container shares the host's network: its sshd
listens on a free loopback port and serves Ansible as a real node would.

Everything started is recorded by id (the nspawn pid, the container's init
pid, the overlay mount point) and undone by that id, also when a test fails.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from owca.core.paths import Paths

SUITE = "bookworm"
# An ordinary Debian node as Ansible finds one: systemd as PID 1 (with dbus),
# sshd, python3 and python3-apt for Ansible's modules. The role's own
# prerequisites (python3-venv; gcc and libc6-dev for the C helper) are there
# too, so that a run needs no Debian mirror and what it installs is only OWCA.
ROOT_PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "procps",
    "python3", "python3-apt", "python3-venv", "gcc", "libc6-dev",
)
# Units that a test node must not run: they reach the network on timers.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
                "fstrim.timer", "man-db.timer")
# Bump when the preparation below changes, so that cached roots are rebuilt.
ROOT_LAYOUT_VERSION = "1"

DEFAULT_CACHE = "/var/cache/owca-tests"


def cache_dir():
    return Path(os.environ.get("OWCA_TEST_CACHE", DEFAULT_CACHE))


def missing_requirements():
    """Why a booted container cannot be had here, or None."""
    if os.geteuid() != 0:
        return "debootstrap and systemd-nspawn need root"
    for tool in ("debootstrap", "systemd-nspawn", "ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (requirements/apt.txt)"
    if not Path(Paths().cgroupfs).is_dir():
        return "no cgroup file system for systemd-nspawn"
    return None


def root_key():
    text = "\n".join((SUITE, "minbase", ROOT_LAYOUT_VERSION, *ROOT_PACKAGES,
                      *MASKED_UNITS))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cached_root(log=print):
    """The path of the cached root tree, built first if it is not there."""
    base = cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    root = base / f"{SUITE}-{root_key()}"
    done = base / f"{root.name}.complete"
    with open(base / ".lock", "w") as lock:
        # Two test runs on one machine must not build the same tree twice.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return root
        building = base / f"{root.name}.building"
        if building.exists():
            shutil.rmtree(building)
        if root.exists():
            shutil.rmtree(root)
        started = time.monotonic()
        log(f"building {SUITE} root with debootstrap into {root} (once)")
        subprocess.run(
            ["debootstrap", "--variant=minbase",
             "--include=" + ",".join(ROOT_PACKAGES), SUITE, str(building)],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _prepare_root(building)
        building.rename(root)
        for stale in base.glob(f"{SUITE}-*"):
            # Roots of earlier package lists: only the current one is kept.
            if stale.name not in (root.name, done.name):
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        done.write_text(f"built in {time.monotonic() - started:.0f} s\n")
        log(done.read_text().strip())
    return root


def _prepare_root(root):
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # The downloaded packages are not needed again.
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    # nspawn hands the container a fresh machine id when this is empty.
    (root / "etc/machine-id").write_text("")


def free_loopback_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Container:
    """One booted container on an overlay of the cached root."""

    def __init__(self, root, workdir, name=None):
        self.lower = Path(root)
        self.workdir = Path(workdir)
        # Unique per run: nspawn keeps per-machine state under /run by this name.
        self.name = name or f"owca-node-{os.getpid()}"
        self.tree = self.workdir / "tree"
        self.upper = self.workdir / "upper"
        self.mounted = False
        self.process = None
        self.init_pid = None
        self.port = free_loopback_port()
        self.key = self.workdir / "id_ed25519"
        self.console_log = self.workdir / "console.log"
        self.cgroups = []

    # -- setup -----------------------------------------------------------

    def start(self, boot_timeout=90):
        self._make_tree()
        self._install_ssh_access()
        self._make_cgroups()
        with open(self.console_log, "wb") as console:
            # --register=no: the host's systemd may not be PID 1, so there may
            # be no machined to register with; the test talks to it over ssh.
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
                 f"--directory={self.tree}", f"--machine={self.name}",
                 "--console=read-only",
                 # owca-measure opens perf events in cgroup mode: nspawn's own
                 # seccomp filter denies perf_event_open unless allowed here.
                 "--capability=CAP_PERFMON", "--system-call-filter=perf_event_open"],
                stdin=subprocess.DEVNULL, stdout=console,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=self._enter_cgroups)
        self._wait_for_boot(boot_timeout)

    def _make_cgroups(self):
        """A cgroup of this container's own in each hierarchy nspawn uses.

        With --keep-unit nspawn puts the container's `payload` and its own
        `supervisor` cgroups under the cgroup it was started in: started in one
        made here, they are removed with it, and two containers never meet.
        """
        paths = Paths()
        hierarchies = [paths.cgroup_v2_root]
        if os.path.isdir(paths.cgroup_v1("systemd")):  # hybrid: the name=systemd tree
            hierarchies.append(paths.cgroup_v1("systemd"))
        for hierarchy in hierarchies:
            cgroup = Path(hierarchy) / self.name
            cgroup.mkdir(exist_ok=True)
            self.cgroups.append(cgroup)
        self._procs_files = [str(cgroup / "cgroup.procs") for cgroup in self.cgroups]

    def _enter_cgroups(self):
        # In the child, before exec: nothing but open and write.
        for procs in self._procs_files:
            fd = os.open(procs, os.O_WRONLY)
            os.write(fd, b"0")
            os.close(fd)

    def _make_tree(self):
        work = self.workdir / "overlay-work"
        for path in (self.tree, self.upper, work):
            path.mkdir(parents=True)
        options = f"lowerdir={self.lower},upperdir={self.upper},workdir={work}"
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options,
                                 str(self.tree)], capture_output=True, text=True)
        if result.returncode == 0:
            self.mounted = True
            return
        # No overlayfs (e.g. the cache is itself on one): a private copy.
        self.tree.rmdir()
        subprocess.run(["cp", "-a", "--reflink=auto", str(self.lower), str(self.tree)],
                       check=True)

    def _install_ssh_access(self):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        "owca-deploy-test", "-f", str(self.key)], check=True)
        ssh_dir = self.tree / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        keys.write_text(Path(f"{self.key}.pub").read_text())
        keys.chmod(0o600)
        (self.tree / "etc/ssh/sshd_config.d/test-node.conf").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "UseDNS no\n")
        (self.tree / "etc/hostname").write_text(f"{self.name}\n")

    def _wait_for_boot(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.process.returncode}:"
                                   f"\n{self.console_tail()}")
            if self.init_pid is None:
                self.init_pid = self._find_init_pid()
            result = self.ssh("systemctl is-system-running --wait", check=False,
                              timeout=max(1, deadline - time.monotonic()))
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.ssh("systemctl --failed --no-legend", check=False)
                    raise RuntimeError(f"container degraded:\n{failed.stdout}")
                return
            time.sleep(0.5)
        raise TimeoutError(f"container did not boot in {timeout} s:\n{self.console_tail()}")

    def _find_init_pid(self):
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        with contextlib.suppress(OSError):
            for pid in children.read_text().split():
                return int(pid)
        return None

    # -- use -------------------------------------------------------------

    def ssh_args(self):
        return ["-i", str(self.key), "-p", str(self.port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]

    def ssh(self, command, check=True, timeout=60):
        """Runs one command line on the node as root; returns the CompletedProcess."""
        try:
            result = subprocess.run(["ssh", *self.ssh_args(), "root@127.0.0.1", command],
                                    capture_output=True, text=True, timeout=timeout,
                                    stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as error:
            result = subprocess.CompletedProcess(error.cmd, 124, "", "timed out")
        if check and result.returncode != 0:
            raise RuntimeError(f"on the node: {command!r} exited {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def inventory(self, path):
        """Writes an Ansible inventory that reaches this node; returns its path."""
        path = Path(path)
        common = " ".join(self.ssh_args()[4:])
        path.write_text(
            "owca_nodes:\n  hosts:\n    owca-node:\n"
            "      ansible_host: 127.0.0.1\n"
            f"      ansible_port: {self.port}\n"
            "      ansible_user: root\n"
            f"      ansible_ssh_private_key_file: {self.key}\n"
            f"      ansible_ssh_common_args: '{common}'\n"
            "      ansible_python_interpreter: /usr/bin/python3\n")
        return path

    def console_tail(self, lines=40):
        with contextlib.suppress(OSError):
            text = self.console_log.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    # -- teardown --------------------------------------------------------

    def stop(self, timeout=20):
        """Shuts the container down by the pids recorded, then removes its tree."""
        if self.process is not None and self.process.poll() is None:
            # SIGTERM to nspawn becomes an orderly shutdown of the container.
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for pid in (self.init_pid, self.process.pid):
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        for cgroup in self.cgroups:
            # Children first; a cgroup with no process left can be removed.
            for path, _dirs, _files in sorted(os.walk(cgroup), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
        if self.mounted:
            subprocess.run(["umount", str(self.tree)], check=False)
            self.mounted = False
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def booted_node(log=print):
    """A booted container, stopped and removed on exit whatever happened."""
    root = cached_root(log)
    workdir = Path(tempfile.mkdtemp(prefix="owca-node-"))
    container = Container(root, workdir)
    try:
        container.start()
        yield container
    finally:
        container.stop()
