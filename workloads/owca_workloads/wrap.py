"""owca-wrap's engine: run a command, parse its output, publish APM metrics for a task.

The command runs as a child in its own session (so that its whole process group
can be stopped by the recorded id), without a shell unless asked.  Its stdout
and/or stderr are read line by line and fed to the parsers; the latest value of
each metric is kept with the time it arrived.  Every interval the wrapper
publishes the values younger than max_value_age, the derived service levels
and its own counters:
- to the APM directory, one file for the task, replaced atomically
  (lib/owca/measure/sources/apm.py), which owca-measure merges into the task's metrics;
- with --frames, as a `measurements` frame on stdout, for standalone use
  (`owca-wrap --frames ... | owca-ship`).
A child that exits or crashes is reported (one line), counted and, under the
restart policy, started again; lines no parser understood are counted.
"""
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from owca.measure.sources import apm
from owca.core import frames
from owca.core.stream import FrameWriter, OutputClosed

from owca_workloads.cli import ToolError, describe_exit
from owca_workloads.lines import PipeLines
from owca_workloads.parsers import ParserSet

log = logging.getLogger("owca.wrap")

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RESTART_POLICIES = ("never", "on-failure", "always")


@dataclass
class ServiceLevel:
    """How apm_sli, apm_slo and apm_sli_normalized are derived."""
    slo: float
    sli_metric: str = "apm_latency_p99_seconds"
    higher_is_better: bool = False

    def derive(self, metrics: Dict[str, float]) -> Dict[str, float]:
        sli = metrics.get(self.sli_metric)
        if sli is None:
            return {}
        out = {"apm_sli": sli, "apm_slo": self.slo}
        if self.higher_is_better:
            out["apm_sli_normalized"] = sli / self.slo
        elif sli > 0:
            # Inverted so that, for either kind, 1 is the objective and below 1 violates it.
            out["apm_sli_normalized"] = self.slo / sli
        return out


@dataclass
class WrapConfig:
    command: List[str]
    task_id: str
    task_name: Optional[str] = None
    labels: Dict[str, str] = field(default_factory=dict)
    streams: tuple = ("stdout",)
    apm_dir: Optional[str] = apm.DEFAULT_APM_DIR
    frames: bool = False
    interval: float = 1.0
    max_value_age: float = 30.0
    service_level: Optional[ServiceLevel] = None
    restart: str = "never"
    restart_delay: float = 1.0
    max_restarts: Optional[int] = None
    stop_timeout: float = 5.0
    echo: bool = False


class Wrapper:
    def __init__(self, cfg: WrapConfig, parsers: ParserSet, signals=None, clock=time.time):
        self.cfg = cfg
        self.parsers = parsers
        self.signals = signals
        self.clock = clock
        self.values: Dict[str, tuple] = {}   # metric -> (value, arrival time)
        self.child: Optional[subprocess.Popen] = None
        self.exits = 0
        self.restarts = 0
        self.seq = 0
        self.writer = FrameWriter(1) if cfg.frames else None
        self.pipes = PipeLines(signals)

    # -- the child --------------------------------------------------------------------
    def start_child(self):
        parsed = set(self.cfg.streams)
        # What is not parsed goes to our stderr: stdout is for frames.
        stdout = subprocess.PIPE if "stdout" in parsed else sys.stderr.fileno()
        stderr = subprocess.PIPE if "stderr" in parsed else None
        try:
            self.child = subprocess.Popen(self.cfg.command, stdin=subprocess.DEVNULL,
                                          stdout=stdout, stderr=stderr, start_new_session=True)
        except OSError as e:
            raise ToolError(f"cannot run {self.cfg.command[0]}: {e.strerror}") from None
        log.info("started %s (pid %d)", self.cfg.command[0], self.child.pid)
        for pipe in (self.child.stdout, self.child.stderr):
            if pipe is not None:
                self.pipes.add(pipe)

    def stop_child(self):
        """SIGTERM to the child's process group, SIGKILL after stop_timeout."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            child.wait(self.cfg.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) did not stop in %.0f s: killing it", self.cfg.command[0],
                        child.pid, self.cfg.stop_timeout)
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()

    # -- output -----------------------------------------------------------------------
    def feed(self, raw: bytes):
        line = _ANSI_ESCAPE.sub("", raw.decode("utf-8", "replace")).rstrip("\r")
        if self.cfg.echo:
            sys.stderr.write(line + "\n")
        errors_before = self.parsers.parse_errors
        got = self.parsers.feed(line)
        if self.parsers.parse_errors != errors_before:
            log.warning("output line not usable: %s", self.parsers.last_error)
        now = self.clock()
        for name, value in got.items():
            self.values[name] = (value, now)
        if got:  # the report's own time, so that a reader aligns it with its interval
            self.values["apm_report_timestamp_seconds"] = (now, now)

    # -- publishing -------------------------------------------------------------------
    def current_metrics(self) -> Dict[str, float]:
        now = self.clock()
        out = {name: value for name, (value, at) in self.values.items()
               if now - at <= self.cfg.max_value_age}
        if self.cfg.service_level is not None:
            out.update(self.cfg.service_level.derive(out))
        running = self.child is not None and self.child.poll() is None
        out.update({"apm_unparsed_lines_total": self.parsers.unparsed_lines,
                    "apm_parse_errors_total": self.parsers.parse_errors,
                    "apm_child_exits_total": self.exits,
                    "apm_child_restarts_total": self.restarts,
                    "apm_child_up": 1 if running else 0})
        return out

    def publish(self):
        ts = self.clock()
        metrics = self.current_metrics()
        record = apm.ApmRecord(self.cfg.task_id, ts, dict(self.cfg.labels), metrics)
        if self.cfg.apm_dir:
            try:
                apm.write(self.cfg.apm_dir, record)
            except OSError as e:
                log.error("APM file in %s not written: %s", self.cfg.apm_dir, e.strerror)
        if self.writer is not None:
            self.seq += 1
            task = {"name": self.cfg.task_name or self.cfg.task_id, "labels": record.labels,
                    "resources": {}, "metrics": metrics}
            self.writer.write(frames.measurements_frame(self.seq, {}, {self.cfg.task_id: task},
                                                        ts=ts))

    def withdraw(self):
        if self.cfg.apm_dir:
            apm.remove(self.cfg.apm_dir, self.cfg.task_id)

    # -- the loop ---------------------------------------------------------------------
    def stopping(self) -> bool:
        return self.signals is not None and self.signals.stop

    def run(self) -> int:
        """Until stopped, or until the child ends for good; the exit code."""
        code = 0
        self.start_child()
        next_publish = time.monotonic()
        restart_at = None
        try:
            while not self.stopping():
                now = time.monotonic()
                if now >= next_publish:
                    self.publish()
                    next_publish = now + self.cfg.interval
                wait = max(0.0, min(next_publish - now, 0.5))
                if restart_at is not None:
                    if now >= restart_at:
                        restart_at = None
                        self.restarts += 1
                        self.start_child()
                    else:
                        self.pipes.read(min(wait, restart_at - now))
                    continue
                for line in self.pipes.read(wait):
                    self.feed(line)
                if self.child.poll() is None:
                    continue
                for line in self.pipes.drain(0.5):
                    self.feed(line)
                returncode = self.child.returncode
                self.exits += 1
                failed = returncode != 0
                log.log(logging.WARNING if failed else logging.INFO, "%s (pid %d) %s",
                        self.cfg.command[0], self.child.pid, describe_exit(returncode))
                wanted = self.cfg.restart == "always" or \
                    (self.cfg.restart == "on-failure" and failed)
                if wanted and self.cfg.max_restarts is not None \
                        and self.restarts >= self.cfg.max_restarts:
                    log.error("gave up after %d restarts", self.restarts)
                    code = 1
                    break
                if not wanted:
                    code = 1 if failed else 0
                    break
                restart_at = time.monotonic() + self.cfg.restart_delay
            self.publish()
        except OutputClosed:
            pass
        finally:
            self.stop_child()
            self.pipes.shutdown()
            self.withdraw()
        return code
