"""Lines from a child's pipes, waited for together with the stop signals.

A line is at most MAX_LINE_BYTES: a longer one is cut there (and the rest is
the next line), so that a child that never writes a newline cannot grow our
memory.  The last line of a pipe is returned even without its newline.
"""
import os
import selectors
import time
from typing import List

MAX_LINE_BYTES = 64 * 1024


class PipeLines:
    def __init__(self, signals=None):
        self.signals = signals
        self.selector = selectors.DefaultSelector()
        self.buffers = {}  # open pipe -> its partial line
        if signals is not None:  # a signal wakes the select at once
            self.selector.register(signals.fileno(), selectors.EVENT_READ, "signals")

    def add(self, pipe) -> None:
        os.set_blocking(pipe.fileno(), False)
        self.selector.register(pipe, selectors.EVENT_READ, "pipe")
        self.buffers[pipe] = bytearray()

    @property
    def open(self) -> bool:
        return bool(self.buffers)

    def read(self, timeout: float) -> List[bytes]:
        """The lines that arrive within `timeout` seconds (fewer when a signal came)."""
        if not self.buffers:
            if self.signals is not None:
                self.signals.sleep(timeout)
            else:
                time.sleep(timeout)
            return []
        lines = []
        for key, _ in self.selector.select(timeout):
            if key.data == "signals":
                self.signals.drain()
                continue
            try:
                data = os.read(key.fileobj.fileno(), 65536)
            except BlockingIOError:
                continue
            if not data:
                lines.extend(self._close(key.fileobj))
                continue
            buf = self.buffers[key.fileobj]
            buf += data
            start = 0
            while True:
                nl = buf.find(b"\n", start)
                if nl < 0:
                    break
                lines.append(bytes(buf[start:nl]))
                start = nl + 1
            del buf[:start]
            while len(buf) > MAX_LINE_BYTES:
                lines.append(bytes(buf[:MAX_LINE_BYTES]))
                del buf[:MAX_LINE_BYTES]
        return lines

    def drain(self, seconds: float) -> List[bytes]:
        """What is left in the pipes, for at most `seconds` (a grandchild may hold one)."""
        lines = []
        deadline = time.monotonic() + seconds
        while self.buffers and time.monotonic() < deadline:
            lines.extend(self.read(min(0.05, max(0.0, deadline - time.monotonic()))))
        return lines + self.close()

    def _close(self, pipe) -> List[bytes]:
        rest = self.buffers.pop(pipe)
        self.selector.unregister(pipe)
        pipe.close()
        return [bytes(rest)] if rest else []

    def close(self) -> List[bytes]:
        lines = []
        for pipe in list(self.buffers):
            lines.extend(self._close(pipe))
        return lines

    def shutdown(self) -> None:
        self.close()
        self.selector.close()
