"""Mounting the perf_event controller as cgroup v1, and giving it back to cgroup2.

owca-measure never mounts anything: these are for the tests and benchmarks that
need a perf_event v1 hierarchy on a machine where the controller is on cgroup2
(benchmarks put tests/ on sys.path to import them).  No pytest here, so that a
benchmark can import it.
"""
import subprocess
import time

from owca.measure.sources.perf.counters import perf_event_hierarchy


def mount_perf_event_v1(mountpoint):
    """Mounts the perf_event v1 controller at `mountpoint`; raises OSError."""
    done = subprocess.run(['mount', '-t', 'cgroup', '-o', 'perf_event', 'cgroup', mountpoint],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError('mount perf_event at %s: %s' % (mountpoint, done.stderr.strip()))


def unmount_perf_event_v1(mountpoint, paths, timeout=20.0):
    """Unmounts what mount_perf_event_v1 mounted and gives perf_event back to
    cgroup2; returns False when it is still bound to v1 after `timeout`.

    A v1 hierarchy outlives its mount while removed child cgroups are still
    being freed, and stays after that: perf_event then remains bound to v1 and
    cgroup2 fds get ENOENT.  Mounting and unmounting it once it holds only its
    root releases it.  Call it only if perf_event was on cgroup2 before.
    """
    subprocess.run(['umount', mountpoint], check=True)
    remounted = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hierarchy, cgroups = perf_event_hierarchy(paths)
        if hierarchy == 0:
            return True
        if cgroups == 1 and remounted != hierarchy:
            mount_perf_event_v1(mountpoint)
            subprocess.run(['umount', mountpoint], check=True)
            remounted = hierarchy
        time.sleep(0.05)
    return False
