"""Whether each owca stage runs what the node holds; run by the owca role on the node.

    python3 owca_running.py CONFIG_DIR INSTALL_DIR STAGE...

Prints one JSON object: "stale", {stage: why}, names each running stage that runs
something other than the node's files: its process started before the installed
release, or before its unit file was written, or systemd handed it a configuration
other than CONFIG_DIR/<stage>.yaml; "stopped", {stage: why}, each stage that does not
run. Both empty: every stage runs the installed release with the configuration and
the unit on disk.

Only the standard library: it runs with the node's python3 or the agent's own.
"""
import glob
import json
import os
import subprocess
import sys
import time

UNIT_DIR = "/etc/systemd/system"
# systemd (250 and later) puts a unit's credentials here, root-only, while it runs.
CREDENTIALS_DIR = "/run/credentials"


def unit_state(unit):
    out = subprocess.run(
        ["systemctl", "show", "-p", "MainPID", "-p", "SubState", "-p", "NeedDaemonReload",
         "-p", "ExecMainStartTimestampMonotonic", unit],
        capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def monotonic_to_wall_ns(monotonic_us):
    """A CLOCK_MONOTONIC time of systemd's, in microseconds, as a wall-clock time in ns."""
    offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - \
        time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    return monotonic_us * 1000 + offset


def installed_ns(install_dir):
    """When the release was installed: pip writes RECORD last, at each install."""
    records = glob.glob(os.path.join(install_dir, "lib", "python3*", "site-packages",
                                     "owca-*.dist-info", "RECORD"))
    return max((os.stat(path).st_mtime_ns for path in records), default=None)


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def why_stale(unit, state, config_dir, install_ns):
    stage = unit[len("owca-"):-len(".service")]
    started = monotonic_to_wall_ns(int(state.get("ExecMainStartTimestampMonotonic") or 0))
    if install_ns is not None and started < install_ns:
        return f"{unit} runs the release installed before the one in place"
    unit_file = os.path.join(UNIT_DIR, unit)
    if state.get("NeedDaemonReload") == "yes" or (
            os.path.exists(unit_file) and started < os.stat(unit_file).st_mtime_ns):
        return f"{unit} runs an older version of {unit_file}"
    config = os.path.join(config_dir, f"{stage}.yaml")
    running = read_bytes(os.path.join(CREDENTIALS_DIR, unit, "config"))
    if running is None or running != read_bytes(config):
        return f"{unit} runs a configuration other than {config}"
    return None


def main(argv):
    config_dir, install_dir, *stages = argv
    install_ns = installed_ns(install_dir)
    found = {"stale": {}, "stopped": {}}
    for stage in stages:
        unit = f"owca-{stage}.service"
        state = unit_state(unit)
        if state.get("MainPID", "0") == "0" or state.get("SubState") != "running":
            found["stopped"][stage] = f"{unit} is not running ({state.get('SubState')})"
            continue
        why = why_stale(unit, state, config_dir, install_ns)
        if why:
            found["stale"][stage] = why
    print(json.dumps(found, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
