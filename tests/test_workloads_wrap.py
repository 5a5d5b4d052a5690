"""owca-wrap: real child processes, real files; and a real load generator against a real
server on loopback, whose metrics reach owca-ship labelled with the task id."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import FakeClock, tool_command, tool_env, wait_for
from owca.measure.sources import apm
from owca.core import frames
from owca.core.paths import Paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
WRAP = [sys.executable, os.path.join(WORKLOADS, "owca-wrap")]
sys.path.insert(0, WORKLOADS)

from owca_workloads.catalog import load_catalog, start, unavailable  # noqa: E402
from owca_workloads.launch import Launcher  # noqa: E402
from owca_workloads.parsers import ParserSet, make  # noqa: E402
from owca_workloads.wrap import ServiceLevel, WrapConfig, Wrapper  # noqa: E402

LATENCY = r"--regex=lat=(?P<value>[0-9.]+)(?P<unit>ms) (?P<name>latency_p99_seconds)"
# A guard on the waits below against a hang, not a timing goal.
GUARD_SECONDS = 60
# For a child that waits for the test: wait(path) until the file exists (at most a
# minute, so that a failing test leaves no child behind).
WAIT_FOR_FILE = ("import os, time\n"
                 "def wait(path):\n"
                 "    for _ in range(600):\n"
                 "        if os.path.exists(path):\n"
                 "            return\n"
                 "        time.sleep(0.1)\n")


def py(code: str) -> list:
    """A child that runs a little Python: the workload under test."""
    return [sys.executable, "-c", code]


def wrap(*args, timeout=30, **kwargs):
    return subprocess.run(WRAP + list(args), capture_output=True, text=True, timeout=timeout,
                          env=tool_env(), **kwargs)


def frames_of(stdout: str) -> list:
    out = [frames.validate(frames.decode(line.encode())) for line in stdout.splitlines()]
    assert out, "no frames"
    return out


def last_metrics(stdout: str, task_id: str) -> dict:
    return frames_of(stdout)[-1]["tasks"][task_id]["metrics"]


def test_frames_carry_parsed_values_sli_labels_and_counters():
    child = py("print('starting'); print('lat=3ms latency_p99_seconds'); "
               "print('lat=oops latency_p99_seconds'); print('lat=4ms latency_p99_seconds')")
    out = wrap("--task-id", "/owca/app", "--task-name", "app", "--frames", "--no-apm-file",
               "--interval", "0.2", LATENCY, "--slo", "0.002", "--label", "workload=app",
               "--", *child)
    assert out.returncode == 0, out.stderr
    got = frames_of(out.stdout)
    task = got[-1]["tasks"]["/owca/app"]
    assert task["name"] == "app" and task["labels"] == {"workload": "app"}
    m = task["metrics"]
    assert m["apm_latency_p99_seconds"] == pytest.approx(0.004)
    assert m["apm_sli"] == pytest.approx(0.004) and m["apm_slo"] == 0.002
    assert m["apm_sli_normalized"] == pytest.approx(0.5)  # lower is better: slo / sli
    # 'starting' and the line whose value is not a number matched nothing usable
    assert m["apm_unparsed_lines_total"] == 2
    assert (m["apm_child_exits_total"], m["apm_child_up"]) == (1, 0)
    assert [f["seq"] for f in got] == list(range(1, len(got) + 1))


def test_the_reports_own_time_is_published_with_its_values(tmp_path):
    """apm_report_timestamp_seconds: when the latest report was parsed, not when the file
    or frame was written, so that a reader aligns a latency with the span it describes."""
    report, done = tmp_path / "report", tmp_path / "done"
    # The child reports when told to, and ends when told to: the frames before and
    # after the report are the wrapper's, however slowly this machine runs them.
    child = py(WAIT_FOR_FILE + "print('warming up', flush=True)\n"
               f"wait({str(report)!r})\nprint('lat=2ms latency_p99_seconds', flush=True)\n"
               f"wait({str(done)!r})\n")
    # (an age of an hour: the report stays in every frame after it, the last one too)
    proc = subprocess.Popen(WRAP + ["--task-id", "t", "--frames", "--no-apm-file",
                                    "--interval", "0.2", "--max-value-age", "3600", LATENCY,
                                    "--", *child],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=tool_env())
    got = []
    with proc:
        for line in proc.stdout:  # ends when the child does
            got.append(frames.validate(frames.decode(line.encode())))
            metrics = got[-1]["tasks"]["t"]["metrics"]
            if "apm_latency_p99_seconds" not in metrics:
                report.touch()
            elif sum("apm_latency_p99_seconds" in f["tasks"]["t"]["metrics"]
                     for f in got) == 3:
                done.touch()
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    before = [f for f in got if "apm_latency_p99_seconds" not in f["tasks"]["t"]["metrics"]]
    after = [f for f in got if "apm_latency_p99_seconds" in f["tasks"]["t"]["metrics"]]
    assert before and len(after) >= 3
    assert all("apm_report_timestamp_seconds" not in f["tasks"]["t"]["metrics"] for f in before)
    stamps = {f["tasks"]["t"]["metrics"]["apm_report_timestamp_seconds"] for f in after}
    assert len(stamps) == 1  # one report, republished with its own time
    stamp = stamps.pop()
    assert before[-1]["ts"] <= stamp <= after[0]["ts"] < after[-1]["ts"]


def test_higher_is_better_sli_is_not_inverted():
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", "--slo", "100",
               "--sli-metric", "apm_throughput_per_second", "--higher-is-better",
               "--regex", r"(?P<name>throughput_per_second)=(?P<value>\d+)",
               "--", *py("print('throughput_per_second=80')"))
    assert last_metrics(out.stdout, "t")["apm_sli_normalized"] == pytest.approx(0.8)


def test_a_failing_child_is_reported_restarted_then_given_up():
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", "--interval", "0.1",
               "--restart", "on-failure", "--restart-delay", "0.1", "--max-restarts", "2",
               LATENCY, "--", *py("print('lat=1ms latency_p99_seconds'); raise SystemExit(3)"))
    assert out.returncode == 1
    assert out.stderr.count("exited with status 3") == 3
    assert "gave up after 2 restarts" in out.stderr
    m = last_metrics(out.stdout, "t")
    assert (m["apm_child_exits_total"], m["apm_child_restarts_total"]) == (3, 2)


def test_a_crash_by_signal_is_reported():
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", LATENCY, "--",
               *py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert out.returncode == 1
    assert "killed by signal 9 (SIGKILL)" in out.stderr


def test_a_successful_child_without_restart_ends_the_wrapper_with_0():
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", LATENCY, "--",
               *py("print('lat=1ms latency_p99_seconds')"))
    assert out.returncode == 0


def test_sigterm_stops_the_childs_process_group_and_withdraws_the_apm_file(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    child = py("import subprocess, time, sys\n"
               f"p = subprocess.Popen(['sleep', '60']); open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
               "while True:\n    print('lat=2ms latency_p99_seconds', flush=True); time.sleep(0.1)")
    started = time.time()
    proc = subprocess.Popen(WRAP + ["--task-id", "/owca/t", "--apm-dir", str(tmp_path / "apm"),
                                    "--interval", "0.1", LATENCY, "--", *child],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    try:
        path = tmp_path / "apm" / apm.file_name("/owca/t")
        wait_for(lambda: path.exists() and "apm_latency_p99_seconds" in path.read_text()
                 and pid_file.exists() and pid_file.read_text(), GUARD_SECONDS,
                 "the APM file with the child's report", step=0.05)
        record = apm.parse(path.read_text())
        assert record.task_id == "/owca/t"
        assert record.metrics["apm_latency_p99_seconds"] == pytest.approx(0.002)
        assert started <= record.ts <= time.time()  # the wall clock's, at publication
        grandchild = int(pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not path.exists()
    assert os.listdir(tmp_path / "apm") == []  # nor a temporary file
    wait_for(lambda: not os.path.exists(f"/proc/{grandchild}"), GUARD_SECONDS,
             "the grandchild to end", step=0.05)


@pytest.mark.unit
def test_values_older_than_max_value_age_are_no_longer_published():
    clock = FakeClock(1000.0)
    wrapper = Wrapper(WrapConfig(command=["x"], task_id="t", apm_dir=None, max_value_age=0.5,
                                 service_level=ServiceLevel(slo=1.0)),
                      ParserSet([make("regex", [LATENCY.split("=", 1)[1]])]), clock=clock.time)
    wrapper.feed(b"lat=2ms latency_p99_seconds")
    clock.advance(0.5)
    fresh = wrapper.current_metrics()
    assert fresh["apm_latency_p99_seconds"] == pytest.approx(0.002) and "apm_sli" in fresh
    assert fresh["apm_report_timestamp_seconds"] == 1000.0
    clock.advance(0.001)
    stale = wrapper.current_metrics()
    assert not {"apm_latency_p99_seconds", "apm_sli", "apm_report_timestamp_seconds"} & set(stale)
    assert stale["apm_unparsed_lines_total"] == 0  # the counters are always published


def test_max_value_age_reaches_the_wrapper():
    # The child's last word is older than the age when its exit's frame is written
    # (it sleeps longer than that): parsed, yet not published.
    child = py("import time; print('lat=2ms latency_p99_seconds', flush=True); time.sleep(1.5)")
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", "--interval", "0.2",
               "--max-value-age", "0.5", "--slo", "1", LATENCY, "--", *child)
    last = frames_of(out.stdout)[-1]["tasks"]["t"]["metrics"]
    assert (last["apm_unparsed_lines_total"], last["apm_parse_errors_total"]) == (0, 0)
    assert "apm_latency_p99_seconds" not in last and "apm_sli" not in last


def test_stderr_is_parsed_when_asked_and_passed_on_otherwise():
    child = py("import sys; print('lat=2ms latency_p99_seconds', file=sys.stderr); "
               "print('stdout line')")
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", "--stream", "stderr", LATENCY,
               "--", *child)
    assert last_metrics(out.stdout, "t")["apm_latency_p99_seconds"] == pytest.approx(0.002)
    assert "stdout line" in out.stderr  # not parsed: on our stderr, not among the frames


def test_no_shell_unless_asked(tmp_path):
    marker = tmp_path / "injected"
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", LATENCY, "--",
               "echo", f"lat=1ms latency_p99_seconds; touch {marker}")
    assert out.returncode == 0 and not marker.exists()
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", "--shell", LATENCY, "--",
               f"echo lat=1ms latency_p99_seconds; touch {marker}")
    assert out.returncode == 0 and marker.exists()
    assert last_metrics(out.stdout, "t")["apm_latency_p99_seconds"] == pytest.approx(0.001)


def test_a_long_line_without_newline_is_bounded():
    out = wrap("--task-id", "t", "--frames", "--no-apm-file", LATENCY, "--",
               *py("import sys; sys.stdout.write('x' * 200000)"))
    assert out.returncode == 0
    assert last_metrics(out.stdout, "t")["apm_unparsed_lines_total"] == 4  # 64 KiB pieces


@pytest.mark.parametrize("args, reason", [
    (["--task-id", "t", "--", "true"], "needs at least one --regex"),
    (["--task-id", "t", "--parser", "nosuch", "--", "true"], "not one of regex"),
    (["--task-id", "t", "--label", "bad-name=x", LATENCY, "--", "true"], "--label"),
    (["--task-id", "t", "--no-apm-file", LATENCY, "--", "true"], "would publish nothing"),
    (["--task-id", "t", "--restart", "sometimes", LATENCY, "--", "true"], "--restart"),
    (["--task-id", "t", "--slo", "0", LATENCY, "--", "true"], "--slo"),
    (["--task-id", "", LATENCY, "--", "true"], "--task-id"),
    (["--task-id", "t", "--shell", LATENCY, "--", "a", "b"], "one argument"),
    (["--task-id", "t"], "usage error"),
])
def test_usage_errors_exit_2_with_one_line(args, reason):
    out = wrap(*args)
    assert out.returncode == 2
    assert reason in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_command_that_does_not_exist_is_one_line_and_exit_1(tmp_path):
    out = wrap("--task-id", "t", "--apm-dir", str(tmp_path), LATENCY, "--", "/nonexistent/x")
    assert out.returncode == 1 and "cannot run /nonexistent/x" in out.stderr
    assert os.listdir(tmp_path) == []


# -- the acceptance test: wrk against nginx on loopback, through the pipeline ----------------

def _real_service_missing() -> str:
    return unavailable([load_catalog()["nginx"]])


@pytest.fixture
def nginx_task(tmp_path):
    """nginx from the catalog, in its own cgroup: (task id, port)."""
    reason = _real_service_missing()
    if reason:
        pytest.skip(reason)
    launcher = Launcher(f"/owca-test-wrap-{uuid.uuid4().hex[:8]}", Paths())
    try:
        launched, port = start(launcher, load_catalog()["nginx"], "nginx",
                               str(tmp_path / "nginx"), cpus="0")
        yield launched.cgroup_path, port
    finally:
        launcher.stop_all(timeout=3)


def test_wrk_against_nginx_reaches_owca_ship_labelled_with_the_task_id(nginx_task, tmp_path):
    task_id, port = nginx_task
    apm_dir = tmp_path / "apm"
    wrapper = subprocess.Popen(
        WRAP + ["--task-id", task_id, "--apm-dir", str(apm_dir), "--parser", "wrk",
                "--slo", "0.002", "--label", "workload=nginx", "--restart", "always",
                "--restart-delay", "0", "--", "wrk", "-t1", "-c4", "-d1s", "--latency",
                f"http://127.0.0.1:{port}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=tool_env())
    try:
        path = apm_dir / apm.file_name(task_id)

        def reported():
            assert wrapper.poll() is None, wrapper.stderr.read().decode()
            return path.exists() and "apm_throughput_per_second" in path.read_text()

        wait_for(reported, GUARD_SECONDS, "an APM file with wrk's report", step=0.1)
        config = tmp_path / "owca.yaml"
        config.write_text(
            "discover:\n  source: !StaticDiscovery\n    tasks:\n"
            f"      - cgroup_path: {json.dumps(task_id)}\n        name: nginx\n"
            f"measure:\n  apm_dir: {json.dumps(str(apm_dir))}\n")
        env = tool_env()
        discover = subprocess.Popen(tool_command("discover", "-c", str(config), "--once"),
                                    stdout=subprocess.PIPE, env=env)
        measure = subprocess.Popen(tool_command("measure", "-c", str(config)),
                                   stdin=discover.stdout, stdout=subprocess.PIPE, env=env)
        discover.stdout.close()
        shipped = subprocess.run(tool_command("ship"), stdin=measure.stdout,
                                 capture_output=True, text=True, env=env, timeout=60)
        measure.stdout.close()
        assert discover.wait(30) == 0 and measure.wait(30) == 0
        assert shipped.returncode == 0, shipped.stderr
    finally:
        wrapper.send_signal(signal.SIGTERM)
        wrapper.wait(15)
    lines = shipped.stdout.splitlines()

    def sample(name):
        prefix = f'{name}{{host="{frames.hostname()}",task_id="{task_id}",task_name="nginx"'
        found = [line for line in lines if line.startswith(prefix)]
        assert found, f"no {name} for task {task_id} in owca-ship's output"
        return float(found[0].split()[-2])
    assert 0 < sample("apm_latency_p99_seconds") < 1
    assert 0 < sample("apm_latency_p50_seconds") <= sample("apm_latency_p99_seconds")
    assert sample("apm_throughput_per_second") > 0
    assert sample("apm_slo") == 0.002
    assert sample("task_cpu_usage_seconds_total") > 0  # with the task's cgroup metrics
    assert not path.exists()  # withdrawn when the wrapper stopped


def test_frames_of_a_standalone_wrapper_go_straight_to_owca_ship(nginx_task):
    task_id, port = nginx_task
    wrapper = subprocess.Popen(
        WRAP + ["--task-id", task_id, "--task-name", "nginx", "--frames", "--no-apm-file",
                "--parser", "wrk", "--", "wrk", "-t1", "-c2", "-d1s", "--latency",
                f"http://127.0.0.1:{port}/"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=tool_env())
    shipped = subprocess.run(tool_command("ship"), stdin=wrapper.stdout, capture_output=True,
                             text=True, env=tool_env(), timeout=60)
    wrapper.stdout.close()
    assert wrapper.wait(30) == 0 and shipped.returncode == 0
    assert f'apm_throughput_per_second{{host="{frames.hostname()}",task_id="{task_id}",' \
           f'task_name="nginx"' in shipped.stdout
