"""owca-sine: the target's arithmetic, and a real wrk driven against a real nginx."""
import math
import os
import re
import signal
import subprocess
import sys
import uuid

import pytest

from cgroup_helpers import kill
from conftest import tool_env, wait_for
from owca.core.paths import Paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = os.path.join(ROOT, "workloads")
SINE = [sys.executable, os.path.join(WORKLOADS, "owca-sine")]
sys.path.insert(0, WORKLOADS)

from owca_workloads.catalog import load_catalog, start, unavailable  # noqa: E402
from owca_workloads.launch import Launcher  # noqa: E402
from owca_workloads.sine import (MAX_CORRECTION, MIN_CORRECTION, Sine,  # noqa: E402
                                 render, step_values)


def test_target_follows_base_plus_amplitude_sine():
    s = Sine(base=800, amplitude=400, period=60)
    assert s.at(0) == pytest.approx(800)
    assert s.at(15) == pytest.approx(1200)
    assert s.at(45) == pytest.approx(400)
    assert Sine(100, 400, 60).at(45) == 1.0  # never below min_rate


def test_the_mean_of_a_step_is_the_integral_of_the_sine():
    s = Sine(base=800, amplitude=400, period=60)
    assert s.mean(0, 60) == pytest.approx(800)
    assert s.mean(0, 30) == pytest.approx(800 + 400 * 2 / math.pi)
    # a fine Riemann sum agrees
    n = 10000
    riemann = sum(s.at(10 + 2 * (i + 0.5) / n) for i in range(n)) / n
    assert s.mean(10, 12) == pytest.approx(riemann, rel=1e-6)


def test_bad_sines_are_refused():
    with pytest.raises(ValueError):
        Sine(800, 400, 0)
    with pytest.raises(ValueError):
        Sine(-1, 400, 60)


def test_placeholders_are_filled_and_other_braces_kept():
    values = step_values(rate=500.0, duration=2.0, connections=4)
    argv = render(["wrk", "-c{connections}", "-d{duration}s", "{delay_ms}", "{requests}",
                   "{rate_int}", "{not_ours}", "{"], values)
    assert argv == ["wrk", "-c4", "-d2s", "8.0000", "1000", "500", "{not_ours}", "{"]


@pytest.mark.integration
def test_without_a_generator_owca_sine_says_so_in_one_line():
    out = subprocess.run(SINE + ["--base", "10", "--amplitude", "5", "--period", "10",
                                 "--duration", "1", "--", "/nonexistent/gen"],
                         capture_output=True, text=True, timeout=30, env=tool_env())
    assert out.returncode == 1
    assert "cannot run /nonexistent/gen" in out.stderr


@pytest.mark.integration
def test_usage_errors():
    out = subprocess.run(SINE + ["--base", "10", "--amplitude", "5", "--period", "0", "true"],
                         capture_output=True, text=True, timeout=30, env=tool_env())
    assert out.returncode == 2 and "--period" in out.stderr


@pytest.mark.integration
def test_a_generator_that_finishes_early_waits_for_the_step_and_sees_its_count():
    """{requests} for a generator that takes a count: each step lasts its full length."""
    out = subprocess.run(SINE + ["--base", "100", "--amplitude", "50", "--period", "2",
                                 "--step", "0.5", "--duration", "2", "--",
                                 "echo", "n={requests} d={duration}"],
                         capture_output=True, text=True, timeout=60, env=tool_env())
    assert out.returncode == 0, out.stderr
    counts = [int(n) for n in re.findall(r"^n=(\d+) d=0\.500$", out.stdout, re.M)]
    assert len(counts) == 4
    starts = step_starts(out.stdout)
    targets = [target for _, target, _ in starts]
    assert counts == [max(1, round(t * 0.5)) for t in targets]
    # By its own clock, no step began before the one ahead of it had its half second
    # (elapsed_seconds is printed to the millisecond).
    elapsed = [at for at, _, _ in starts]
    assert all(b - a >= 0.5 - 0.001 for a, b in zip(elapsed, elapsed[1:])), elapsed
    # Each target is the sine's mean over the step, from when the step began.  Both are
    # printed to 1/1000, and such a mean moves at most 2 x amplitude / step a second.
    sine = Sine(base=100, amplitude=50, period=2)
    tolerance = 0.0005 + 0.0005 * 2 * 50 / 0.5
    assert targets == [pytest.approx(sine.mean(at, at + 0.5), abs=tolerance) for at in elapsed]


@pytest.mark.integration
def test_sigterm_stops_owca_sine_and_its_generator():
    # A step of an hour: a driver that waited for its generator would outlast the
    # guard on the wait by far, however loaded the machine.
    proc = subprocess.Popen(SINE + ["--base", "10", "--amplitude", "5", "--period", "10",
                                    "--step", "3600", "--", "sleep", "{duration}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    try:
        first = proc.stdout.readline().decode()
        assert "step=1 start" in first
        (generator,) = wait_for(lambda: children(proc.pid), 60, "the generator to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: not alive(generator), 60, "the generator to end")
    finally:
        kill(proc)  # SIGKILL only if it still runs (a failed test); reaped, pipes closed


def children(pid: int) -> list:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped (by init, once its parent is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def step_starts(stdout: str) -> list:
    """(elapsed_seconds, target, asked) of each step's start line, in order."""
    return [(float(at), float(target), float(asked)) for at, target, asked in re.findall(
        r"step=\d+ start elapsed_seconds=([0-9.]+) target_rate_per_second=([0-9.]+) "
        r"asked_rate_per_second=([0-9.]+)", stdout)]


# -- the achieved rate of a real generator ------------------------------------------------------

def _missing() -> str:
    return unavailable([load_catalog()["nginx"]])


@pytest.mark.integration
def test_wrk_driven_by_owca_sine_follows_the_sine_and_corrects_its_rate(tmp_path):
    """Three periods of 8 s in 1 s steps: every step's achieved rate (wrk's own
    Requests/sec) read back, and each next step asked for at the target corrected by
    what was achieved.  How close wrk comes to the target is a figure of the machine
    (benchmarks/sine_rate.py), not a property the test can hold a loaded host to."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    launcher = Launcher(f"/owca-test-sine-{uuid.uuid4().hex[:8]}", Paths())
    try:
        nginx = load_catalog()["nginx"]
        _, port = start(launcher, nginx, "nginx", str(tmp_path / "nginx"))
        generator = nginx.load_command(str(tmp_path / "nginx"), port)
        out = subprocess.run(SINE + ["--base", "400", "--amplitude", "200", "--period", "8",
                                     "--step", "1", "--duration", "24", "--connections", "4",
                                     "--parser", "wrk", "--", *generator],
                             capture_output=True, text=True, timeout=300, env=tool_env())
    finally:
        launcher.stop_all(timeout=3)
    assert out.returncode == 0, out.stderr
    starts = step_starts(out.stdout)
    ends = [tuple(map(float, end)) for end in re.findall(
        r"step=\d+ end target_rate_per_second=([0-9.]+) achieved_rate_per_second=([0-9.]+) "
        r"error_ratio=([-+0-9.]+) correction=([0-9.]+)", out.stdout)]
    achieved = [float(r) for r in re.findall(r"^Requests/sec:\s+([0-9.]+)", out.stdout, re.M)]
    assert len(starts) == len(ends) == len(achieved) == 24, out.stdout[-2000:]
    sine = Sine(base=400, amplitude=200, period=8)
    tolerance = 0.0005 + 0.0005 * 2 * 200 / 1  # as in the test of a count above
    correction = 1.0
    for (at, target, asked), (end_target, got, error, next_correction), wrk in \
            zip(starts, ends, achieved):
        assert target == pytest.approx(sine.mean(at, at + 1), abs=tolerance)
        assert end_target == target and got == pytest.approx(wrk, abs=0.001)
        # asked: the target times the correction so far (printed to 1/10000)
        assert asked == pytest.approx(target * correction, rel=1e-4, abs=0.001)
        assert error == pytest.approx((got - target) / target, abs=1e-4)
        # halfway to the correction that would have hit the target, within its bounds
        wanted = correction * target / got
        assert next_correction == pytest.approx(
            min(MAX_CORRECTION, max(MIN_CORRECTION, (correction + wanted) / 2)), abs=2e-4)
        correction = next_correction
