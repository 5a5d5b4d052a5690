"""The pipe contract every tool shares: reading lines, writing frames, stopping.

- Input is read with os.read into one buffer and split on newlines, so that a
  line's size is bounded before it is parsed, and so that select() can wait on
  the input, a timer and the signals at once.
- Output is one os.write per frame: nothing sits in a userspace buffer when a
  stage is killed, and a reader downstream never waits on a flush.
- Output goes to the tool's stdout through a private copy of descriptor 1 once
  the stage takes it (take_output): descriptor 1 and sys.stdout then go to
  stderr, so that what a plug-in prints, at import or in its calls, lands in the
  log and never inside the frame stream (or owca-ship's exposition).
- SIGTERM, SIGINT and SIGHUP only set a flag (and wake select through a pipe): the
  frame in hand is finished and written before the tool exits; a second signal
  changes nothing.  A write that blocks (a reader downstream that stalled) is
  given STOP_GRACE seconds after the signal, then abandoned with OutputStalled:
  a stop is prompt whatever the neighbours do, and a stage still restores what
  it changed (close()).  Only a wait on something outside the node's control (an
  orchestrator that does not answer) is cut short at once: inside
  `Signals.interruptible()` a stop raises `Interrupted`.
"""
import contextlib
import errno
import logging
import os
import select
import signal
import sys
import time
from typing import Optional

from owca.core import frames
from owca.core.startup import STOP_SIGNALS

log = logging.getLogger("owca")

# What LineReader.read returns besides a line.
LINE, EOF, TIMEOUT, STOP, BAD = "line", "eof", "timeout", "stop", "bad"

READ_CHUNK = 1 << 16  # 64 KiB: one read per typical frame, and a small buffer

# Seconds a write blocked by a stalled reader may go on after SIGTERM/SIGINT: long
# enough for a reader that is merely slow to take the frame in hand, short beside
# systemd's stop timeout (90 s), after which SIGKILL would leave nothing restored.
STOP_GRACE = 1.0

# Shared by every writer of the process (frames, the stdout and log storages):
# set by the stop handler, and while a write is in progress.
_stop_requested = False
_in_write = False
_grace_armed = False

# The descriptor of the tool's stdout: 1, or its private copy after take_output();
# and sys.stdout as it was before.
_output = 1
_saved_stdout = None


class OutputClosed(Exception):
    """The reader of our stdout went away (`| head -1`)."""


class OutputStalled(OutputClosed):
    """A stop signal came while a write was blocked, and the write did not end in time."""


def _arm_grace():
    global _grace_armed
    if not _grace_armed:
        _grace_armed = True
        signal.setitimer(signal.ITIMER_REAL, STOP_GRACE)


def _on_alarm(_signum, _frame):
    # Only a write still blocked when the grace ends is abandoned; raised here, the
    # exception leaves the interrupted os.write (PEP 475 retries only when a handler
    # returns).
    if _in_write:
        raise OutputStalled("the reader of the output stalled: a frame was not written")


def stop_requested() -> bool:
    return _stop_requested


def write_all(fd: int, data) -> None:
    """Write all of `data` to `fd`, unless a stop signal comes while the reader stalls."""
    global _in_write, _grace_armed
    view = memoryview(data)
    _in_write = True
    try:
        if _stop_requested:
            _arm_grace()
        while view:
            view = view[os.write(fd, view):]
    finally:
        _in_write = False
        if _grace_armed:
            _grace_armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


def output_fd() -> int:
    """Where frames (and owca-ship's exposition on stdout) are written."""
    return _output


def take_output() -> None:
    """Keep the tool's stdout for frames alone: from now on they go to a private copy
    of descriptor 1, and descriptor 1 and sys.stdout go to stderr, so that a plug-in's
    print() (or a library's, or a child's write to its stdout) cannot split a frame.
    Done before the first plug-in is imported."""
    global _output, _saved_stdout
    if _output != 1:
        return
    _flush_stdout()
    _output = os.dup(1)   # close-on-exec: no child inherits the stream
    os.dup2(2, 1)
    _saved_stdout, sys.stdout = sys.stdout, sys.stderr


def give_back_output() -> None:
    """Descriptor 1 and sys.stdout as before take_output() (main() run in a test)."""
    global _output, _saved_stdout
    if _output == 1:
        return
    _flush_stdout()
    os.dup2(_output, 1)
    os.close(_output)
    _output = 1
    sys.stdout, _saved_stdout = _saved_stdout, None


def _flush_stdout() -> None:
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except (OSError, ValueError):
        pass   # what a plug-in printed to a stderr that failed: lost, not the stream


def raised_by_signal(e: BaseException) -> bool:
    """Whether `e`, caught around a plug-in's call, is how a stop signal that this
    process received shows up, not the plug-in's own doing.  Interrupted is one; a
    KeyboardInterrupt is one only while SIGINT has Python's default handler: with a
    tool's own (owca.core.startup, Signals) installed, SIGINT never raises it, so the
    code raised it itself."""
    if isinstance(e, Interrupted):
        return True
    return isinstance(e, KeyboardInterrupt) and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler


class Interrupted(BaseException):
    """A stop signal arrived inside Signals.interruptible().

    A BaseException, so that no `except Exception` of a library (requests,
    urllib3) on the way out mistakes it for an error of its own and retries.
    """


class Signals:
    """A stop signal (SIGTERM, SIGINT, SIGHUP) sets `stop`; `fileno()` becomes readable
    when one arrives.  The handler stays until close(): a second signal while the
    stage stops only sets `stop` again."""

    def __init__(self):
        self.stop = False
        self.signum = None
        self._interruptible = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        # One that is ignored stays so (nohup's SIGHUP, owca.core.startup).
        self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS
                     if signal.getsignal(s) != signal.SIG_IGN}
        self._old[signal.SIGALRM] = signal.signal(signal.SIGALRM, _on_alarm)

    def _handle(self, signum, _frame):
        global _stop_requested
        self.stop = True
        self.signum = signum
        _stop_requested = True
        if _in_write:
            _arm_grace()
        if self._interruptible:
            # Python retries a system call that a signal interrupted (PEP 475)
            # unless the handler raises: this ends a blocked socket read now.
            self._interruptible = False
            raise Interrupted()

    @contextlib.contextmanager
    def interruptible(self):
        """Within: a stop signal raises Interrupted wherever the code waits."""
        if self.stop:
            raise Interrupted()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def fileno(self) -> int:
        return self._r

    def drain(self):
        try:
            while os.read(self._r, 512):
                pass
        except BlockingIOError:
            pass

    def sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds`; False when a stop signal cut it short."""
        deadline = time.monotonic() + seconds
        while not self.stop:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            select.select([self._r], [], [], remaining)
            self.drain()
        return False

    def close(self, ignore_stops: bool = False):
        """The handlers before back; with `ignore_stops`, stop signals ignored instead (a
        tool's process about to exit: its status is decided, and a signal must not
        reach the default handler that the interpreter restores while it exits)."""
        global _stop_requested
        for s, handler in self._old.items():
            ignored = ignore_stops and s in STOP_SIGNALS
            signal.signal(s, signal.SIG_IGN if ignored else handler)
        _stop_requested = False
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)


class LineReader:
    """Newline-terminated lines from a file descriptor, each at most `max_bytes`.

    read() returns (event, payload): (LINE, bytes) for a line, including its
    newline; (BAD, reason) for a line that was too long or cut off by the end
    of input (it is consumed, so reading goes on); (TIMEOUT, None),
    (STOP, None) after a signal, (EOF, None) at the end.
    """

    def __init__(self, fd: int, signals: Optional[Signals] = None,
                 max_bytes: int = frames.MAX_FRAME_BYTES):
        self.fd = fd
        self.signals = signals
        self.max_bytes = max_bytes
        self.lineno = 0
        self._buf = bytearray()
        self._pos = 0          # start of the unread part of _buf
        self._scan = 0         # where the newline search resumes
        self._eof = False
        self._skipping = False  # inside an over-long line, dropping until its newline

    def read(self, timeout: Optional[float] = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n", self._scan)
            if nl >= 0:
                line = bytes(self._buf[self._pos:nl + 1])
                self._pos = self._scan = nl + 1
                if self._pos > READ_CHUNK and self._pos * 2 > len(self._buf):
                    del self._buf[:self._pos]
                    self._pos = self._scan = 0
                self.lineno += 1
                if self._skipping or len(line) > self.max_bytes:
                    self._skipping = False
                    return BAD, f"frame exceeds the limit of {self.max_bytes} bytes"
                return LINE, line
            self._scan = len(self._buf)
            if self._scan - self._pos > self.max_bytes:
                # Keep nothing of an over-long line: memory stays bounded.
                self._skipping = True
                del self._buf[:]
                self._pos = self._scan = 0
            if self._eof:
                if self._pos < len(self._buf) or self._skipping:
                    self.lineno += 1
                    del self._buf[:]
                    self._pos = self._scan = 0
                    self._skipping = False
                    return BAD, "truncated frame: input ended without a newline"
                return EOF, None
            if self.signals is not None and self.signals.stop:
                return STOP, None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            fds = [self.fd] if self.signals is None else [self.fd, self.signals.fileno()]
            ready, _, _ = select.select(fds, [], [], wait)
            if not ready:
                return TIMEOUT, None
            if self.signals is not None and self.signals.fileno() in ready:
                self.signals.drain()
            if self.fd in ready:
                try:
                    data = os.read(self.fd, READ_CHUNK)
                except BlockingIOError:
                    continue
                if data:
                    self._buf += data
                else:
                    self._eof = True


class FrameWriter:
    """Writes whole frames to a file descriptor (the tool's stdout by default), one write
    per frame."""

    def __init__(self, fd: Optional[int] = None):
        self.fd = output_fd() if fd is None else fd
        self.frames_written = 0

    def write(self, data) -> None:
        if isinstance(data, dict):
            data = frames.encode(data)
        try:
            write_all(self.fd, data)
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise OutputClosed() from None
            raise
        self.frames_written += 1

    def silence(self):
        """Point the fd at /dev/null so that nothing at exit writes to a closed pipe."""
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.fd)
        os.close(devnull)
