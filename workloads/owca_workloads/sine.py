"""owca-sine's engine: a load generator driven at base + amplitude * sin(2*pi*t/period).

Time is cut into steps; each step runs the generator once, for the step's
length, at the mean of the target over that step (the integral of the sine,
so that the requests asked for over a period are those of the continuous
target).  The generator's command line is a template whose placeholders
({rate}, {duration}, {requests}, {connections}, {delay_ms}, {workloads}) are
filled per step.  When a parser can read the generator's achieved rate, the
driver corrects the rate it asks for by the ratio of target to achieved, so
that a generator that falls short (a closed loop's round trips) still meets
the target.  Each step is framed by two lines, `step=N start ...` before the
generator runs and `step=N end target_rate_per_second=R ...` after its output;
owca-wrap's owca-sine parser takes the target from the end line, so that the
target it publishes belongs to the same step as the generator's latency and
throughput, and a detector can tell a change of load from interference.
"""
import logging
import math
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional

from owca_workloads.cli import WORKLOADS_DIR, ToolError, describe_exit
from owca_workloads.lines import PipeLines
from owca_workloads.parsers import ParserSet

log = logging.getLogger("owca.sine")

# The correction stays within these bounds: beyond them the generator, not the
# pacing, is the problem, and chasing it would only make the load erratic.
MIN_CORRECTION, MAX_CORRECTION = 0.5, 2.0
PLACEHOLDER = re.compile(r"\{(rate|rate_int|duration|requests|connections|delay_ms|workloads)\}")


@dataclass
class Sine:
    base: float
    amplitude: float
    period: float
    min_rate: float = 1.0

    def __post_init__(self):
        if not self.period > 0:
            raise ValueError("period: expected a positive number of seconds")
        if self.base < 0 or self.amplitude < 0:
            raise ValueError("base and amplitude: expected rates of 0 or more")

    def at(self, t: float) -> float:
        """The target rate at t seconds."""
        rate = self.base + self.amplitude * math.sin(2 * math.pi * t / self.period)
        return max(self.min_rate, rate)

    def mean(self, t0: float, t1: float) -> float:
        """The target's mean over [t0, t1]: the integral of the sine, over the length."""
        if t1 <= t0:
            return self.at(t0)
        w = 2 * math.pi / self.period
        integral = self.base * (t1 - t0) + self.amplitude / w * (math.cos(w * t0) - math.cos(w * t1))
        return max(self.min_rate, integral / (t1 - t0))


def format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.3f}"


def step_values(rate: float, duration: float, connections: int) -> dict:
    return {"rate": f"{rate:.3f}", "rate_int": str(max(1, round(rate))),
            "duration": format_number(duration),
            "requests": str(max(1, round(rate * duration))),
            "connections": str(connections),
            "delay_ms": f"{connections * 1000.0 / rate:.4f}",
            "workloads": WORKLOADS_DIR}


def render(template: List[str], values: dict) -> List[str]:
    """The command of one step: known {placeholders} replaced, other braces left alone."""
    return [PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in template]


class Driver:
    def __init__(self, sine: Sine, template: List[str], step: float, connections: int = 1,
                 duration: Optional[float] = None, phase: float = 0.0,
                 parsers: Optional[ParserSet] = None, signals=None, out_fd: int = 1):
        self.sine = sine
        self.template = template
        self.step = step
        self.connections = connections
        self.duration = duration
        self.phase = phase
        self.parsers = parsers
        self.signals = signals
        self.out_fd = out_fd
        self.correction = 1.0
        self.failures = 0
        self.child = None

    def say(self, text: str):
        os.write(self.out_fd, f"owca-sine: {text}\n".encode())

    def stopping(self) -> bool:
        return self.signals is not None and self.signals.stop

    def run(self) -> int:
        origin = time.monotonic()
        # Whole steps only: a stub step would measure the generator's start-up, and
        # some generators (wrk) take whole seconds.
        steps = None if self.duration is None else max(1, round(self.duration / self.step))
        step_no = 0
        length = self.step
        while not self.stopping() and (steps is None or step_no < steps):
            started = time.monotonic()
            elapsed = started - origin
            t0 = elapsed + self.phase
            target = self.sine.mean(t0, t0 + length)
            asked = target * self.correction
            step_no += 1
            self.say(f"step={step_no} start elapsed_seconds={elapsed:.3f} "
                     f"target_rate_per_second={target:.3f} asked_rate_per_second={asked:.3f} "
                     f"duration_seconds={format_number(length)}")
            achieved = self.run_step(render(self.template,
                                            step_values(asked, length, self.connections)),
                                     length)
            end = f"step={step_no} end target_rate_per_second={target:.3f}"
            if achieved is not None and achieved > 0:
                # Halfway to the ratio that would have hit the target: steady, not jumpy.
                wanted = self.correction * target / achieved
                self.correction = min(MAX_CORRECTION, max(MIN_CORRECTION,
                                                          (self.correction + wanted) / 2))
                end += (f" achieved_rate_per_second={achieved:.3f}"
                        f" error_ratio={(achieved - target) / target:+.4f}"
                        f" correction={self.correction:.4f}")
            self.say(end)
            rest = started + length - time.monotonic()
            if rest > 0 and not self.stopping():
                self._sleep(rest)  # a generator that finished early (a fixed count)
        return 0

    def _sleep(self, seconds: float):
        if self.signals is not None:
            self.signals.sleep(seconds)
        else:
            time.sleep(seconds)

    def run_step(self, argv: List[str], length: float) -> Optional[float]:
        """Run one step's generator, pass its output on; its achieved rate, if read."""
        achieved = None
        try:
            self.child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          start_new_session=True)
        except OSError as e:
            raise ToolError(f"cannot run {argv[0]}: {e.strerror}") from None
        # A generator that overruns its step by this much is hung: it is stopped.
        deadline = time.monotonic() + length + max(10.0, length)
        pipes = PipeLines(self.signals)
        pipes.add(self.child.stdout)
        try:
            while pipes.open and not self.stopping() and time.monotonic() < deadline:
                for raw in pipes.read(min(1.0, max(0.0, deadline - time.monotonic()))):
                    os.write(self.out_fd, raw + b"\n")
                    if self.parsers is not None:
                        got = self.parsers.feed(raw.decode("utf-8", "replace").rstrip("\r"))
                        achieved = got.get("apm_throughput_per_second", achieved)
        finally:
            pipes.shutdown()
            self.stop_child(deadline)
        code = self.child.returncode
        if code != 0 and not self.stopping():
            self.failures += 1
            log.warning("step's %s %s", argv[0], describe_exit(code))
        return achieved

    def stop_child(self, deadline: float):
        """Wait for the step's generator; SIGTERM, then SIGKILL, to its group if it hangs."""
        child = self.child
        try:
            child.wait(0.5 if self.stopping() else max(0.0, deadline - time.monotonic()))
            return
        except subprocess.TimeoutExpired:
            pass
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, None)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            try:
                child.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
