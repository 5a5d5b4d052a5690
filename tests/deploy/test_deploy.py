"""The Ansible role rolls OWCA out onto a booted systemd, and systemd runs its pipeline.

A Debian bookworm container, booted with systemd-nspawn (owca_nspawn.py), is the
node; ansible/site.yml reaches it over ssh on a loopback port as a real rollout
would, building the release from this checkout. The tests run in file order on
that one node: rollout, idempotency, check mode, the running pipeline, a crash of
each stage, a change of one stage's configuration, broken rollouts (refused
configurations, a stage running what its files no longer say, perf_event_paranoid
at 3), upgrades, removal, and last a fresh rollout whose owca-allocate is killed
with caps applied before it is removed.

What this container cannot show: its cgroup v1 controllers are mounted
read-only, so owca-allocate runs with --dry-run here and no allocation is
written; the tasks are measured through its writable cgroup v2 tree.
"""
import re
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml

import owca_nspawn
from conftest import wait_for
from owca.core.paths import Paths
from owca_ansible import REPO, Playbook, recap

STAGES = ("discover", "measure", "detect", "allocate", "ship")
FIFO_STAGES = STAGES[1:]
UNITS = ([f"owca-{s}.service" for s in STAGES] + [f"owca-{s}.socket" for s in FIFO_STAGES]
         + ["owca-allocate-restore.service", "owca.target"])
# The shipped stream, appended cycle by cycle (the default storage overwrites).
SHIPPED = "/var/lib/owca-ship/metrics.log"
# A unit of the node, standing in for a task: it burns a little CPU.
LOAD_UNIT = "load-generator.service"
HOST = "owca-node"

EXTRA_VARS = """\
owca_release_dir: {release}
owca_interval: 1
# The container's cgroup v1 controllers are read-only: report, write nothing.
owca_allocate_dry_run: true
owca_discover_config: |
  source: !CgroupDiscovery
    root: /system.slice
    max_depth: 1
    hierarchies: [unified]
owca_measure_config: |
  cgroup_version: v2
  perf_events: [task-clock, context-switches]
owca_ship_config: |
  storages:
    - !FileStorage
      path: {shipped}
"""

# Paths whose changes are not the role's: Ansible's own temporary files, logs,
# systemd's and sshd's runtime state, and what every boot or login writes.
# /run/private is systemd's, made on the first use of DynamicUser= with a
# RuntimeDirectory= (as Debian's systemd makes /var/lib/private); it must be
# left empty, which test_absent_leaves_nothing_behind checks. /var/backups is
# written by Debian's dpkg-db-backup.timer at midnight, whatever the role does.
SNAPSHOT = (
    r"find / -xdev \( -path /root/.ansible -o -path /tmp -o -path /var/tmp"
    r" -o -path /var/log -o -path /var/lib/systemd -o -path /var/cache"
    r" -o -path /var/backups \) -prune -o -print;"
    r" find /run -xdev \( -path /run/systemd -o -path /run/user -o -path /run/log"
    r" -o -path /run/sshd -o -path /run/credentials -o -path /run/agetty.reload"
    r" -o -path /run/private \) -prune"
    r" -o -print"
)


@pytest.fixture(scope="module")
def node():
    """A booted bookworm container reachable over ssh; stopped by its pid at the end."""
    reason = owca_nspawn.missing_requirements()
    if reason:
        pytest.skip(f"no booted systemd node: {reason}")
    with owca_nspawn.booted_node() as container:
        yield container


@pytest.fixture(scope="module")
def pristine(node):
    """The node's files before OWCA was ever deployed."""
    return snapshot(node)


@pytest.fixture(scope="module")
def playbook(node, tmp_path_factory):
    home = tmp_path_factory.mktemp("ansible")
    extra = home / "vars.yml"
    extra.write_text(EXTRA_VARS.format(release=home / "release", shipped=SHIPPED))
    return Playbook(node.inventory(home / "inventory.yml"), extra, home)


@pytest.fixture(scope="module")
def deployed(node, playbook, pristine):
    node.ssh(f"systemd-run --unit={LOAD_UNIT} sh -c 'while :; do i=0;"
             f" while [ $i -lt 2000 ]; do i=$((i+1)); done; sleep 0.2; done'")
    result = playbook.run()
    return result


def snapshot(node):
    return set(node.ssh(SNAPSHOT).stdout.splitlines())


def assert_same_files(now, before):
    assert sorted(now - before) == [], "files left behind"
    assert sorted(before - now) == [], "files removed that were not the role's"


def units_state(node, units, props=("ActiveState", "SubState", "MainPID", "NRestarts")):
    """{unit: {property: value}} from systemctl show."""
    out = node.ssh(f"systemctl show -p Id -p {' -p '.join(props)} {' '.join(units)}").stdout
    state = {}
    for block in out.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        state[fields.pop("Id")] = fields
    return state


def shipped_seqs(node):
    """The seq of every metrics cycle shipped so far, in file order."""
    out = node.ssh(f"grep -o '^# owca metrics seq=[0-9]*' {SHIPPED} || true").stdout
    return [int(line.rsplit("=", 1)[1]) for line in out.split()if "=" in line]


def last_metrics_block(node):
    text = node.ssh(f"tail -c 200000 {SHIPPED}").stdout
    return text.rsplit("# owca metrics seq=", 1)[-1]


def wait_for_restart(node, unit, before):
    """Until systemd has restarted `unit` once since its state `before`, and it runs."""
    def restarted():
        now = units_state(node, [unit])[unit]
        return (int(now["NRestarts"]) == int(before["NRestarts"]) + 1
                and now["MainPID"] not in ("0", before["MainPID"])
                and now["SubState"] == "running")
    wait_for(restarted, 30, f"systemd to restart {unit}")


def wait_for_new_cycles(node, count, timeout=30):
    start = len(shipped_seqs(node))
    wait_for(lambda: len(shipped_seqs(node)) >= start + count, timeout,
             f"{count} more shipped cycles")


# -- rollout -------------------------------------------------------------------

def test_check_mode_on_a_fresh_node_changes_nothing(node, playbook, pristine):
    result = playbook.run("--check", "--diff")
    assert recap(result.stdout)[HOST]["failed"] == 0
    # The diff shows what a run would write, e.g. the FIFO into measure.
    assert "+ListenFIFO=/run/owca/measure.fifo" in result.stdout
    assert_same_files(snapshot(node), pristine)


def test_rollout_starts_every_unit(node, deployed):
    assert recap(deployed.stdout)[HOST]["changed"] > 0

    def settled():
        state = units_state(node, UNITS)
        return state if all(s["ActiveState"] == "active" for s in state.values()) else None
    try:
        state = wait_for(settled, 15, "every unit to be active")
    except AssertionError:
        journal = node.ssh("journalctl --no-pager -n 60 -u 'owca*'", check=False).stdout
        raise AssertionError(f"{units_state(node, UNITS)}\n{journal}") from None
    for stage in STAGES:
        assert state[f"owca-{stage}.service"]["SubState"] == "running"
    assert node.ssh("systemctl is-enabled owca.target").stdout.strip() == "enabled"
    assert node.ssh("test -x /opt/owca/bin/owca-perf", check=False).returncode == 0


def test_second_run_changes_nothing(node, playbook, deployed):
    result = playbook.run()
    counts = recap(result.stdout)
    assert counts[HOST]["changed"] == 0, result.stdout
    assert counts["localhost"]["changed"] == 0


def test_check_diff_after_rollout_reports_no_change(node, playbook, deployed):
    before = units_state(node, [f"owca-{s}.service" for s in STAGES])
    result = playbook.run("--check", "--diff")
    assert recap(result.stdout)[HOST]["changed"] == 0
    assert units_state(node, [f"owca-{s}.service" for s in STAGES]) == before


def test_systemd_analyze_verify_passes_for_every_unit(node, deployed):
    paths = " ".join(f"/etc/systemd/system/{u}" for u in UNITS)
    result = node.ssh(f"systemd-analyze verify {paths}", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "owca" not in result.stdout + result.stderr


def test_security_exposure_is_the_one_in_the_docs(node, deployed):
    documented = dict(re.findall(r"^\| `(owca-\w+\.service)` \| (\d+\.\d) \|",
                                 (REPO / "docs" / "deploy.md").read_text(), re.M))
    assert sorted(documented) == sorted(f"owca-{s}.service" for s in STAGES)
    for unit, exposure in documented.items():
        out = node.ssh(f"systemd-analyze security --no-pager {unit}").stdout
        measured = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out).group(1)
        assert measured == exposure, f"{unit}: docs/deploy.md says {exposure}, systemd {measured}"


def test_each_stage_runs_with_only_what_it_needs(node, deployed):
    services = [f"owca-{s}.service" for s in STAGES]
    pids = {u: s["MainPID"] for u, s in units_state(node, services, props=("MainPID",)).items()}
    status = {}
    for unit, pid in pids.items():
        text = node.ssh(f"cat /proc/{pid}/status").stdout
        status[unit] = dict(re.findall(r"^(Uid|CapEff|CapBnd|NoNewPrivs):\s+(\S+)", text, re.M))
    cap_perfmon = f"{1 << 38:016x}"
    for unit, fields in status.items():
        assert fields["NoNewPrivs"] == "1", unit
        if unit == "owca-allocate.service":
            assert fields["Uid"] == "0"
        else:
            assert fields["Uid"] != "0", f"{unit} runs as root"
        if unit == "owca-measure.service":
            assert fields["CapEff"] == fields["CapBnd"] == cap_perfmon
        else:
            assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0, unit
    # allocate sees the system read-only except the cgroup (and resctrl) trees.
    inside = f"nsenter --mount --target {pids['owca-allocate.service']}"
    cgroup = f"/sys/fs/cgroup/unified/system.slice/{LOAD_UNIT}/cgroup.freeze"
    assert node.ssh(f"{inside} sh -c 'echo 0 > {cgroup}'", check=False).returncode == 0
    for path in ("/opt/owca/bin/owca-allocate", "/sys/kernel/mm/ksm/run"):
        attempt = node.ssh(f"{inside} sh -c ': >> {path}'", check=False)
        assert attempt.returncode != 0 and "Read-only file system" in attempt.stderr, path


def test_each_stage_reads_only_its_own_configuration(node, deployed):
    """No stage sees another's configuration, nor (allocate, which runs as root)
    any of the node's own root-only files: each gets its file as a credential."""
    services = [f"owca-{s}.service" for s in STAGES]
    pids = {u: s["MainPID"] for u, s in units_state(node, services, props=("MainPID",)).items()}
    secrets = [f"/etc/owca/{s}.yaml" for s in STAGES]
    for unit, pid in pids.items():
        # Its own mount namespace, with its own user's rights (setpriv drops root's).
        uid = node.ssh(f"awk '/^Uid:/ {{print $2}}' /proc/{pid}/status").stdout.strip()
        inside = (f"nsenter --mount --target {pid} setpriv --reuid={uid} --regid={uid}"
                  f" --clear-groups")
        for path in secrets:
            read = node.ssh(f"{inside} cat {path}", check=False)
            assert read.returncode != 0 and read.stdout == "", f"{unit} reads {path}"
        own = node.ssh(f"{inside} cat /run/credentials/{unit}/config", check=False)
        assert own.returncode == 0 and unit.split("-")[1].split(".")[0] + ":" in own.stdout, unit
    allocate = f"nsenter --mount --target {pids['owca-allocate.service']}"
    keys = node.ssh("ls /etc/ssh/ssh_host_*_key").stdout.split()
    assert keys
    for path in keys + ["/etc/shadow"]:
        read = node.ssh(f"{allocate} cat {path}", check=False)
        assert read.returncode != 0 and read.stdout == "", f"allocate reads {path}"


# -- the running pipeline --------------------------------------------------------

def test_pipeline_ships_metrics_of_the_nodes_units(node, deployed):
    wait_for_new_cycles(node, 2)
    block = last_metrics_block(node)
    task = f'task_id="/system.slice/{LOAD_UNIT}"'
    samples = {m: float(v) for m, v in re.findall(
        r"^(\w+)\{[^}]*" + re.escape(task) + r"[^}]*\} (\S+)", block, re.M)}
    why = "\n".join(line for line in block.splitlines() if LOAD_UNIT in line) or block[:3000]
    why += node.ssh("journalctl --no-pager -n 20 -u owca-measure", check=False).stdout
    assert samples.get("task_cpu_usage_seconds_total", 0) > 0, why   # the exposition name
    # perf counters in cgroup mode (owca-measure holds CAP_PERFMON and nothing
    # else) need the perf_event controller on cgroup2. The kernel is the host's:
    # while the host binds perf_event to a v1 hierarchy (hierarchy id not 0 in
    # /proc/cgroups), this container, which has no such mount, cannot count.
    hierarchy = node.ssh("awk '$1 == \"perf_event\" {print $2}' /proc/cgroups").stdout.strip()
    if hierarchy == "0":
        assert samples.get("task_task_clock_seconds_total", 0) > 0, why
    assert 'task_id="/system.slice/ssh.service"' in block
    # Every stage put its own counters in the stream: no bad frame anywhere.
    bad = re.findall(r'^owca_bad_frames_total\{[^}]*stage="(\w+)"[^}]*\} (\S+)', block, re.M)
    assert {stage for stage, _ in bad} >= {"discover", "measure"}
    assert all(float(v) == 0 for _, v in bad)


@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_is_restarted_and_the_stream_resumes(node, deployed, stage):
    services = [f"owca-{s}.service" for s in STAGES]
    wait_for_new_cycles(node, 2)
    before = units_state(node, services)
    shipped_before = shipped_seqs(node)
    victim = f"owca-{stage}.service"
    node.ssh(f"kill -KILL {before[victim]['MainPID']}")
    wait_for_restart(node, victim, before[victim])
    wait_for_new_cycles(node, 3)

    after = units_state(node, services)
    for other in services:
        if other != victim:
            assert after[other]["MainPID"] == before[other]["MainPID"], f"{other} was restarted"
            assert after[other]["NRestarts"] == before[other]["NRestarts"]
    new = shipped_seqs(node)[len(shipped_before):]
    last = shipped_before[-1]
    if stage == "discover":
        # A new discover counts its cycles from 1 again: what the old one had
        # written still arrives, then the new one's cycles, none missing.
        restart = new.index(1)
        assert new[:restart] == list(range(last + 1, last + 1 + restart))
        assert new[restart:] == list(range(1, len(new) - restart + 1))
    else:
        # Frames queued in the FIFOs survive; lost are at most the frames the
        # killed stage had read and not written: one cycle at this pace.
        assert new == sorted(set(new)), new
        missing = set(range(last + 1, new[-1] + 1)) - set(new)
        print(f"owca-{stage} killed: {len(missing)} cycle(s) lost of {len(new) + len(missing)}")
        assert len(missing) <= 1, f"cycles lost: {sorted(missing)}"
    bad = re.findall(r'^owca_bad_frames_total\{[^}]*\} (\S+)', last_metrics_block(node), re.M)
    assert bad and all(float(v) == 0 for v in bad)


def test_half_frame_of_a_killed_writer_is_one_bad_line_and_its_successors_frame_arrives(
        node, deployed):
    """A writer killed in mid-write leaves the head of a frame in its output FIFO.

    That happens only when the FIFO is full, which takes minutes of a stopped
    reader at this pace; here the test writes the head itself into allocate's
    output FIFO while allocate is idle, then kills allocate. Its successor's
    first write, a newline, ends that line, so ship reports exactly one bad line,
    and the successor's first frame, and every cycle after it, arrives.
    """
    services = ["owca-detect.service", "owca-allocate.service"]
    wait_for_new_cycles(node, 2)
    before = units_state(node, services)
    detect, allocate = (before[u]["MainPID"] for u in services)
    # With detect stopped, allocate drains its input and holds no frame, and
    # the cycles measured meanwhile wait in detect's input FIFO.
    node.ssh(f"kill -STOP {detect}")
    try:
        def drained():
            seqs = shipped_seqs(node)
            time.sleep(1.5)
            return seqs if shipped_seqs(node) == seqs else None
        shipped_before = wait_for(drained, 20, "the stream to stop with detect stopped")
        node.ssh("printf '%s' '{\"v\":1,\"kind\":\"measurements\",\"ts\":' > /run/owca/ship.fifo")
        node.ssh(f"kill -KILL {allocate}")
        wait_for_restart(node, "owca-allocate.service", before["owca-allocate.service"])
    finally:
        node.ssh(f"kill -CONT {detect}")
    wait_for_new_cycles(node, 3)
    new = shipped_seqs(node)[len(shipped_before):]
    last = shipped_before[-1]
    assert new == list(range(last + 1, last + 1 + len(new))), f"after {last}: {new}"
    bad = dict(re.findall(r'^owca_bad_frames_total\{[^}]*stage="(\w+)"[^}]*\} (\S+)',
                          last_metrics_block(node), re.M))
    assert float(bad["ship"]) == 1, bad
    assert all(float(v) == 0 for stage, v in bad.items() if stage != "ship"), bad
    journal = node.ssh("journalctl --no-pager -o cat -t owca-ship", check=False).stdout
    assert len(re.findall(r"error: line \d+: ", journal)) == 1, journal


def test_a_changed_stage_configuration_restarts_only_that_stage(node, playbook, deployed):
    services = [f"owca-{s}.service" for s in STAGES]
    before = units_state(node, services)
    result = playbook.run("-e", "owca_detect_config='detector: !NOPAnomalyDetector {}'")
    assert recap(result.stdout)[HOST]["changed"] >= 2  # the file, the restart
    after = units_state(node, services)
    changed = {u for u in services if after[u]["MainPID"] != before[u]["MainPID"]}
    assert changed == {"owca-detect.service"}
    assert "detector: !NOPAnomalyDetector {}" in node.ssh("cat /etc/owca/detect.yaml").stdout


# -- a broken rollout -----------------------------------------------------------

def test_a_configuration_the_tool_refuses_fails_the_play_and_changes_nothing(
        node, playbook, deployed):
    services = [f"owca-{s}.service" for s in STAGES]
    before = units_state(node, services)
    file_before = node.ssh("cat /etc/owca/detect.yaml").stdout
    result = playbook.run("-e", "owca_detect_config='detector: !NoSuchDetector {}'",
                          check=False)
    assert result.returncode != 0
    assert recap(result.stdout)[HOST]["failed"] == 1
    out = result.stdout + result.stderr
    assert "owca-detect: error: " in out and "unknown tag !NoSuchDetector" in out, out
    assert node.ssh("cat /etc/owca/detect.yaml").stdout == file_before
    assert units_state(node, services) == before


def stage_files(node):
    return {s: node.ssh(f"cat /etc/owca/{s}.yaml").stdout for s in STAGES}


def test_a_refused_configuration_with_another_change_writes_no_file_and_restarts_nothing(
        node, playbook, deployed):
    """Every stage's configuration is checked before any is written: a changed
    interval beside a refused detect section leaves all five files, and every
    stage, as they were; the interval alone then restarts the four stages that read it."""
    services = [f"owca-{s}.service" for s in STAGES]
    before = units_state(node, services)
    files_before = stage_files(node)
    result = playbook.run("-e", "owca_interval=2",
                          "-e", "owca_detect_config='detector: !NoSuchDetector {}'", check=False)
    assert result.returncode != 0 and recap(result.stdout)[HOST]["failed"] == 1
    assert recap(result.stdout)[HOST]["changed"] == 0
    out = result.stdout + result.stderr
    # The error names the file as the node holds it, not a temporary copy.
    error = re.search(r"owca-detect: error: (\S+?):\d+: .*unknown tag !NoSuchDetector", out)
    assert error and error.group(1) == "/etc/owca/detect.yaml", out[-3000:]
    assert stage_files(node) == files_before
    assert units_state(node, services) == before

    result = playbook.run("-e", "owca_interval=2")
    after = units_state(node, services)
    restarted = {s for s in STAGES if after[f"owca-{s}.service"]["MainPID"]
                 != before[f"owca-{s}.service"]["MainPID"]}
    assert restarted == {"discover", "detect", "allocate", "ship"}
    for stage in restarted:
        assert "  interval: 2\n" in node.ssh(f"cat /etc/owca/{stage}.yaml").stdout, stage
    playbook.run()   # the suite's interval again, for the tests after this one


def test_a_stage_running_an_older_configuration_is_named_by_the_check_and_restarted(
        node, playbook, deployed):
    """owca-detect runs a configuration that is no longer the one on disk (as after
    an earlier run that failed having written it): the check on its own
    (--tags owca_check) fails naming it, and the next run restarts it alone."""
    services = [f"owca-{s}.service" for s in STAGES]
    node.ssh("cp -p /etc/owca/detect.yaml /root/detect.yaml.kept"
             " && echo '# changed by hand' >> /etc/owca/detect.yaml"
             " && systemctl restart owca-detect.service"
             " && mv /root/detect.yaml.kept /etc/owca/detect.yaml")
    check = playbook.run("--tags", "owca_check", check=False)
    out = check.stdout + check.stderr
    assert check.returncode != 0 and recap(check.stdout)[HOST]["failed"] == 1, out[-3000:]
    assert "owca-detect.service runs a configuration other than /etc/owca/detect.yaml" in out
    assert not re.search(r"owca-(discover|measure|allocate|ship)\.service runs", out), out
    before = units_state(node, services)
    result = playbook.run()
    assert recap(result.stdout)[HOST]["changed"] >= 1
    after = units_state(node, services)
    assert {u for u in services if after[u]["MainPID"] != before[u]["MainPID"]} == {
        "owca-detect.service"}
    assert all(s["SubState"] == "running" for s in after.values()), after
    playbook.run("--tags", "owca_check")


def test_perf_event_paranoid_above_2_is_set_to_2_for_owca_measure(node, playbook, deployed):
    """Debian's kernels default to 3, where owca-measure's CAP_PERFMON opens no perf
    event. The container shares the host's kernel, so the test sets the host's value
    to 3 and puts the original back whatever happens; it makes the container's
    /proc/sys writable (nspawn mounts it read-only, a real node's is not) meanwhile."""
    sysctl = Path("/proc/sys/kernel/perf_event_paranoid")
    dropin = "/etc/sysctl.d/60-owca-perf-event.conf"
    inside = ["nsenter", f"--target={node.init_pid}", "--mount", "--"]
    original = sysctl.read_text()
    measure = units_state(node, ["owca-measure.service"])["owca-measure.service"]
    try:
        subprocess.run(inside + ["mount", "-o", "remount,bind,rw", "/proc/sys"], check=True)
        sysctl.write_text("3")
        result = playbook.run()
        assert sysctl.read_text().strip() == "2"
        assert node.ssh(f"cat {dropin}").stdout.splitlines()[-1] == \
            "kernel.perf_event_paranoid = 2"
        now = units_state(node, ["owca-measure.service"])["owca-measure.service"]
        assert now["MainPID"] != measure["MainPID"], "owca-measure was not restarted"
        assert recap(result.stdout)[HOST]["changed"] >= 2   # the drop-in, the value
        assert recap(playbook.run().stdout)[HOST]["changed"] == 0
    finally:
        sysctl.write_text(original)
        subprocess.run(inside + ["mount", "-o", "remount,bind,ro", "/proc/sys"], check=False)
        # The role keeps the drop-in it wrote; the node goes back to the value it had.
        node.ssh(f"rm -f {dropin}", check=False)


def test_a_stage_that_fails_after_starting_fails_the_play_naming_it(node, playbook, deployed):
    """A configuration that loads but cannot run (ship's port is taken by sshd)."""
    taken = node.port
    try:
        result = playbook.run("-e", "owca_ship_config='storages: [!PrometheusStorage "
                                    f"{{port: {taken}}}]'", check=False)
        assert result.returncode != 0 and recap(result.stdout)[HOST]["failed"] == 1
        out = result.stdout + result.stderr
        message = re.search(r"owca-ship\.service is (\w+) \((\S+)\): (.*)", out)
        assert message, out[-3000:]
        assert "Address already in use" in message.group(3), message.group(0)
        assert "owca-ship: error: " in message.group(3)
    finally:
        # the same play with the good configuration repairs it (and leaves the
        # node as the next test expects it, whatever failed above)
        result = playbook.run()
    assert recap(result.stdout)[HOST]["failed"] == 0
    state = units_state(node, [f"owca-{s}.service" for s in STAGES])
    assert all(s["SubState"] == "running" for s in state.values()), state


# -- upgrade -------------------------------------------------------------------

def test_upgrade_as_documented_installs_the_new_version_and_restarts_every_stage(
        node, playbook, deployed, tmp_path):
    """docs/deploy.md, Upgrade: bump the version in the checkout, run the playbook again.

    The checkout here is a copy of this one (its source distribution, unpacked)
    with the version bumped; the release directory is the one the first run
    made. Every stage is restarted gracefully and runs the new code; the FIFOs
    are untouched.
    """
    release = playbook.home / "release"
    (sdist,) = release.glob("owca-*.tar.gz")
    version = sdist.name[len("owca-"):-len(".tar.gz")]
    new = f"{version}.post1"
    checkout = bumped_checkout(sdist, tmp_path, new)
    services = [f"owca-{s}.service" for s in STAGES]
    sockets = [f"owca-{s}.socket" for s in FIFO_STAGES]
    wait_for_new_cycles(node, 2)
    before = units_state(node, services + sockets, props=("MainPID", "ActiveEnterTimestamp"))
    shipped_before = shipped_seqs(node)

    result = playbook.run("-e", f"owca_source_dir={checkout}")
    assert recap(result.stdout)[HOST]["failed"] == 0
    assert [p.name for p in release.glob("owca-*.tar.gz")] == [f"owca-{new}.tar.gz"]
    for stage in STAGES:
        shown = node.ssh(f"/opt/owca/bin/owca-{stage} --version").stdout.strip()
        assert shown == new, f"owca-{stage} --version: {shown}"
    assert node.ssh("ls /opt/owca/release").stdout.split().count(sdist.name) == 0
    wait_for_new_cycles(node, 3)
    after = units_state(node, services + sockets, props=("MainPID", "ActiveEnterTimestamp"))
    for unit in services:
        assert after[unit]["MainPID"] != before[unit]["MainPID"], f"{unit} kept running"
    for unit in sockets:
        assert after[unit] == before[unit], f"{unit} was restarted"
    # Stopped with SIGTERM, each stage wrote what it held: the old discover's
    # cycles all arrive, then the new one's from 1, none missing in between.
    arrived = shipped_seqs(node)[len(shipped_before):]
    restart = arrived.index(1)
    assert arrived[:restart] == list(range(shipped_before[-1] + 1,
                                           shipped_before[-1] + 1 + restart))
    assert arrived[restart:] == list(range(1, len(arrived) - restart + 1))


def test_an_upgrade_with_a_refused_configuration_restarts_every_stage_onto_the_new_release(
        node, playbook, deployed, tmp_path):
    """The new release is installed before the configuration is refused: the failed
    run still restarts every stage onto it (the files stay as they were), says what
    it changed, and the check then finds every stage running what the node holds."""
    release = playbook.home / "release"
    (sdist,) = release.glob("owca-*.tar.gz")
    version = sdist.name[len("owca-"):-len(".tar.gz")]
    new = f"{re.sub(r'[.]post[0-9]+$', '', version)}.post99"   # one .post segment at most
    checkout = bumped_checkout(sdist, tmp_path, new)
    services = [f"owca-{s}.service" for s in STAGES]
    before = units_state(node, services)
    files_before = stage_files(node)

    result = playbook.run("-e", f"owca_source_dir={checkout}",
                          "-e", "owca_detect_config='detector: !NoSuchDetector {}'", check=False)
    counts = recap(result.stdout)[HOST]
    assert result.returncode != 0 and counts["failed"] == 1
    assert counts["changed"] >= 2, result.stdout[-3000:]    # the release, the restarts
    assert stage_files(node) == files_before
    after = units_state(node, services)
    for unit in services:
        assert after[unit]["MainPID"] != before[unit]["MainPID"], f"{unit} kept running"
        assert after[unit]["SubState"] == "running", (unit, after[unit])
    for stage in STAGES:
        shown = node.ssh(f"/opt/owca/bin/owca-{stage} --version").stdout.strip()
        assert shown == new, f"owca-{stage} --version: {shown}"
    playbook.run("-e", f"owca_source_dir={checkout}", "--tags", "owca_check")
    again = playbook.run("-e", f"owca_source_dir={checkout}")
    assert recap(again.stdout)[HOST]["failed"] == 0
    now = units_state(node, services)
    assert all(now[u]["MainPID"] == after[u]["MainPID"] for u in services), (after, now)


def bumped_checkout(sdist, work, version):
    """A checkout made from the source distribution `sdist`, its version bumped."""
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    (top,) = [p for p in Path(work).iterdir() if p.name.startswith("owca-")]
    init = top / "lib" / "owca" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"',
                           init.read_text()))
    (top / "PKG-INFO").unlink()
    return top


# -- removal ---------------------------------------------------------------------

def test_absent_leaves_nothing_behind(node, playbook, deployed, pristine):
    node.ssh(f"systemctl stop {LOAD_UNIT}")
    result = playbook.run("-e", "owca_state=absent")
    assert recap(result.stdout)[HOST]["changed"] > 0
    assert_same_files(snapshot(node), pristine)
    assert node.ssh("systemctl list-units --all --no-legend 'owca*'").stdout.strip() == ""
    assert node.ssh("find / -xdev -name '*owca*' -print -quit; ls -d /run/owca* 2>/dev/null;"
                    " find /run/private /var/lib/private -mindepth 1", check=False).stdout.strip() == ""
    again = playbook.run("-e", "owca_state=absent")
    assert recap(again.stdout)[HOST]["changed"] == 0
    # docs/deploy.md, Removal: the Debian packages of owca_apt_packages stay,
    # python3-apt among them (Ansible's apt module needs it, and installs it).
    defaults = yaml.safe_load((REPO / "ansible/roles/owca/defaults/main.yml").read_text())
    assert "python3-apt" in defaults["owca_apt_packages"]
    for package in defaults["owca_apt_packages"]:
        status = node.ssh(f"dpkg-query -W -f='${{Status}}' {package}", check=False).stdout
        assert status == "install ok installed", package


ALLOCATING_VARS = """\
owca_allocate_dry_run: false
owca_discover_config: |
  source: !CgroupDiscovery
    root: /system.slice
    max_depth: 1
    hierarchies: [unified]
    be_cgroups: [/system.slice/{load}]
owca_allocate_config: |
  allocator: !StaticAllocator
    rules:
      - name: best-effort
        labels: {{priority: be}}
        allocations: {{cpu_quota: 0.1}}
"""


def test_removal_after_a_killed_owca_allocate_writes_the_original_values_back(
        node, playbook, deployed):
    """owca-allocate caps a task, then a stop ends in SIGKILL (as one that timed
    out does); removal then leaves the task with its original quota and no journal.

    The container's cgroup v1 hierarchies are read-only: the test makes a cgroup of
    its own in the host's v1 cpu hierarchy, with the load unit's path below it, and
    binds it, writable, over the container's /sys/fs/cgroup/cpu. It is a real cgroup
    whose cpu.cfs_quota_us the kernel keeps; the load's processes are not in it (they
    are in the container's cgroup v2 tree), so the cap throttles nothing here.
    """
    own = Path(Paths().cgroup_v1("cpu")) / f"{node.name}-allocate"
    quota = own / "system.slice" / LOAD_UNIT / "cpu.cfs_quota_us"
    inside = ["nsenter", f"--target={node.init_pid}", "--mount", "--"]
    dropin = "/run/systemd/system/owca-allocate.service.d"
    extra = playbook.home / "allocating.yml"
    extra.write_text(ALLOCATING_VARS.format(load=LOAD_UNIT))
    quota.parent.mkdir(parents=True)
    try:
        original = quota.read_text()
        subprocess.run(inside + ["mount", "--bind", str(own), "/sys/fs/cgroup/cpu"], check=True)
        subprocess.run(inside + ["mount", "-o", "remount,bind,rw", "/sys/fs/cgroup/cpu"],
                       check=True)
        # (the load unit runs still where this test runs without the removal test)
        node.ssh(f"systemctl is-active --quiet {LOAD_UNIT}"
                 f" || systemd-run --unit={LOAD_UNIT} sleep infinity")
        playbook.run("-e", f"@{extra}")
        journal = "journalctl --no-pager -n 20 -t owca-allocate"
        wait_for(lambda: quota.read_text() != original, 30, "owca-allocate to cap the load",
                 detail=lambda: node.ssh(journal, check=False).stdout)
        assert node.ssh("test -s /var/lib/owca-allocate/allocations.journal",
                        check=False).returncode == 0
        # A stop that ends in SIGKILL: the stage writes nothing back itself.
        node.ssh(f"mkdir -p {dropin} && printf '[Service]\\nKillSignal=SIGKILL\\n'"
                 f" > {dropin}/kill.conf && systemctl daemon-reload"
                 " && systemctl stop owca-allocate.service")
        result = playbook.run("-e", f"@{extra}", "-e", "owca_state=absent")
        assert recap(result.stdout)[HOST]["failed"] == 0
        assert quota.read_text() == original
        assert node.ssh("ls -A /var/lib/owca-allocate", check=False).returncode != 0
        killed = node.ssh("journalctl --no-pager -o cat -u owca-allocate.service", check=False)
        assert "status=9/KILL" in killed.stdout, killed.stdout[-2000:]
    finally:
        node.ssh(f"rm -rf {dropin}; systemctl daemon-reload; systemctl stop {LOAD_UNIT}",
                 check=False)
        subprocess.run(inside + ["umount", "/sys/fs/cgroup/cpu"], check=False)
        for path in (quota.parent, quota.parent.parent, own):
            if path.exists():
                path.rmdir()
