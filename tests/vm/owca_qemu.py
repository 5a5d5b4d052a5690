"""A QEMU guest with a real cgroup v2 kernel, for the tests this host's kernel cannot run.

This machine binds cpu and cpuset to cgroup v1, so its cgroup2 mount has neither
controller.  The guest is Debian bookworm (tests/vm/guest-image.sh is its
recipe) booted with systemd as PID 1 on a pure unified hierarchy.  Its image is
built once and cached outside the source tree (OWCA_TEST_CACHE, default
/var/cache/owca-tests, under vm-<hash of the recipe>): a changed recipe is a new
image.  Each job boots the image with `snapshot=on`, so the cached image is
never changed and jobs never see each other's leftovers.

    python3 tests/vm/owca_qemu.py build          # the image, if not cached yet
    python3 tests/vm/owca_qemu.py run 'cat /sys/fs/cgroup/cgroup.controllers'

A job is a shell script run as root in the guest from the source tree (shared
read-only over 9p at /owca); it writes what it wants to return under /job, a
host directory shared read-write.  Its output and exit status come back.
QEMU runs in software emulation (TCG) unless kvm_intel or kvm_amd is loaded:
this machine kind's /dev/kvm cannot run a stock kernel.
"""
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_ROOT = HERE.parent.parent
RECIPE = HERE / "guest-image.sh"
DEFAULT_CACHE = "/var/cache/owca-tests"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KERNEL_ARGS = ("console=ttyS0 root=/dev/vda rw systemd.unified_cgroup_hierarchy=1 psi=1 "
               "loglevel=4 panic=-1 systemd.show_status=0")


def cache_dir() -> Path:
    return Path(os.environ.get("OWCA_TEST_CACHE", DEFAULT_CACHE))


def image_dir() -> Path:
    key = hashlib.sha256(RECIPE.read_bytes()).hexdigest()[:12]
    return cache_dir() / f"vm-{key}"


def missing_requirements():
    """Why a guest cannot be run here, or None."""
    if os.geteuid() != 0:
        return "building the guest image (debootstrap) needs root"
    for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (requirements/apt.txt)"
    if image_ready():
        return None
    try:
        with urllib.request.urlopen(mirror() + "/dists/bookworm/Release", timeout=20):
            pass
    except OSError as e:
        return f"no guest image cached and the Debian mirror {mirror()} is unreachable: {e}"
    return None


def image_ready() -> bool:
    return (image_dir() / "complete").exists()


def mirror() -> str:
    """OWCA_VM_MIRROR, else the Debian mirror this host's apt uses, else Debian's CDN."""
    if os.environ.get("OWCA_VM_MIRROR"):
        return os.environ["OWCA_VM_MIRROR"].rstrip("/")
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources + [Path("/etc/apt/sources.list")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            for word in line.split():
                if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                    return word.rstrip("/")
    return DEFAULT_MIRROR


def build_image(log=print) -> Path:
    """The cached image's directory, built first if it is not there."""
    dest = image_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / ".vm-lock", "w") as lock:
        # Two test runs on one machine must not build the same image twice.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "complete").exists():
            return dest
        started = time.monotonic()
        building = dest.with_name(dest.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        log(f"building the guest image in {dest} (once)")
        result = subprocess.run(["sh", str(RECIPE), str(building), mirror()],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = result.stdout.decode(errors="replace")[-3000:]
            raise RuntimeError(f"guest image recipe failed ({result.returncode}):\n{tail}")
        shutil.rmtree(dest, ignore_errors=True)
        building.rename(dest)
        for stale in dest.parent.glob("vm-*"):
            # Images of earlier recipes: only the current one is kept.
            if stale != dest:
                shutil.rmtree(stale, ignore_errors=True)
        (dest / "complete").write_text(f"built in {time.monotonic() - started:.0f} s\n")
    return dest


def accelerator() -> list:
    if os.path.isdir("/sys/module/kvm_intel") or os.path.isdir("/sys/module/kvm_amd"):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


@dataclass
class JobResult:
    status: int          # the job's exit status; None when the guest gave none back
    output: str          # the job's stdout and stderr
    job_dir: Path        # what the job left under /job
    console: str         # the guest's serial console (boot messages)
    seconds: float       # from QEMU's start to its end


def run_job(script: str, job_dir, timeout: float = 1200, cpus: int = 2,
            memory_mib: int = 1024) -> JobResult:
    """Boot the guest, run `script` (sh) in it from the source tree, power off."""
    image = build_image()
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "run.sh").write_text(script)
    for name in ("out.txt", "rc"):
        (job_dir / name).unlink(missing_ok=True)
    console_path = job_dir / "console.log"
    argv = ["qemu-system-x86_64", *accelerator(), "-m", str(memory_mib), "-smp", str(cpus),
            "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
            "-append", KERNEL_ARGS,
            "-drive", f"file={image / 'guest.img'},format=raw,if=virtio,snapshot=on",
            "-virtfs", f"local,path={SOURCE_ROOT},mount_tag=owcasrc,security_model=none,"
                       f"readonly=on,id=owcasrc",
            "-virtfs", f"local,path={job_dir},mount_tag=owcajob,security_model=none,"
                       f"id=owcajob"]
    started = time.monotonic()
    with open(console_path, "wb") as console:
        qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        qemu.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if qemu.poll() is None:    # ours, by pid: a guest that hung
            os.kill(qemu.pid, signal.SIGKILL)
            qemu.wait()
    seconds = time.monotonic() - started
    rc_file, out_file = job_dir / "rc", job_dir / "out.txt"
    status = int(rc_file.read_text()) if rc_file.exists() else None
    output = out_file.read_text(errors="replace") if out_file.exists() else ""
    return JobResult(status, output, job_dir,
                     console_path.read_text(errors="replace"), seconds)


def main(argv) -> int:
    if argv[1:2] == ["build"]:
        print(build_image())
        return 0
    if len(argv) == 3 and argv[1] == "run":
        import tempfile
        with tempfile.TemporaryDirectory(prefix="owca-vm-job-") as job:
            result = run_job(argv[2] + "\n", job)
        sys.stdout.write(result.output)
        if result.status is None:
            sys.stderr.write(result.console[-3000:] + "\nno exit status from the guest\n")
            return 125
        return result.status
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
