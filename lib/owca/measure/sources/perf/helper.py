"""The owca-perf helper's wire protocol and its process.

The protocol is written once, at the top of bin/owca-perf.c (and explained in
docs/perf.md): a text hello, text requests and replies, and one binary record
per task in a read reply.  The parsers here decode it; Helper runs one helper
process and speaks the protocol with deadlines, so that a helper that dies,
hangs or speaks out of protocol raises HelperGone instead of hanging
owca-measure.
"""
import collections
import math
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, List, Tuple

PROTOCOL_VERSION = 1
HELPER_NAME = 'owca-perf'
# make helper builds it here, in the source tree: lib/owca/measure/sources/perf/ is
# five levels below the tree's root.
BUILT_HELPER = Path(__file__).resolve().parents[5] / 'build' / HELPER_NAME
# Replies to at most this many requests are waiting in the pipe at once, so
# that neither side blocks writing while the other does (replies < 200 bytes).
REQUEST_CHUNK = 256


class HelperGone(Exception):
    """The helper died, closed its output, hung, or spoke out of protocol."""


Hello = collections.namedtuple('Hello', 'version ncpus events skipped')
Skipped = collections.namedtuple('Skipped', 'name errno text')
Reply = collections.namedtuple('Reply', 'slot errno text')
Record = collections.namedtuple(
    'Record', 'slot cpus_counted cpus_unknown values scale_avg scale_max')


def parse_hello(text):
    """Parses the helper's hello (up to and including "ready")."""
    lines = text.splitlines()
    if not lines or lines[-1] != 'ready':
        raise HelperGone('hello does not end with "ready": %r' % text[-80:])
    first = lines[0].split()
    if len(first) != 3 or first[0] != HELPER_NAME or not first[1].isdigit() \
            or not first[2].isdigit():
        raise HelperGone('bad hello line %r' % lines[0])
    events: List[str] = []
    skipped: List[Skipped] = []
    for line in lines[1:-1]:
        parts = line.split(' ', 3)
        if parts[0] == 'event' and len(parts) == 3 and parts[1] == str(len(events)):
            events.append(parts[2])
        elif parts[0] == 'skip' and len(parts) >= 3:
            skipped.append(Skipped(parts[1], parts[2], parts[3] if len(parts) > 3 else ''))
        else:
            raise HelperGone('bad hello line %r' % line)
    return Hello(int(first[1]), int(first[2]), events, skipped)


def parse_reply(line):
    """Parses "ok SLOT" or "error SLOT|- ERRNO TEXT" into a Reply."""
    parts = line.split(' ', 3)
    if parts[0] == 'ok' and len(parts) == 2 and parts[1].isdigit():
        return Reply(int(parts[1]), None, '')
    if parts[0] == 'error' and len(parts) >= 3 and (parts[1].isdigit() or parts[1] == '-'):
        slot = int(parts[1]) if parts[1].isdigit() else None
        return Reply(slot, parts[2], parts[3] if len(parts) > 3 else '')
    raise HelperGone('bad reply %r' % line)


def parse_values_header(line):
    """Parses "values NTASKS NBYTES"; returns (ntasks, nbytes)."""
    parts = line.split()
    if len(parts) != 3 or parts[0] != 'values' or not parts[1].isdigit() or not parts[2].isdigit():
        raise HelperGone('bad values header %r' % line)
    return int(parts[1]), int(parts[2])


def record_struct(nevents):
    return struct.Struct('=IHH%dQdd' % nevents)


def parse_values(blob, nevents, ntasks):
    """Decodes the binary records of a read reply into [Record]."""
    layout = record_struct(nevents)
    if len(blob) != layout.size * ntasks:
        raise HelperGone('values: %d bytes for %d records of %d bytes'
                         % (len(blob), ntasks, layout.size))
    return [Record(r[0], r[1], r[2], r[3:3 + nevents], r[-2], r[-1])
            for r in layout.iter_unpack(blob)]


def find_helper(configured=None):
    """Path of the helper binary: the configured one, else beside the Python
    executable (a venv's bin), else build/ of this source tree, else PATH."""
    if configured:
        if not os.access(configured, os.X_OK):
            raise FileNotFoundError('perf helper %s is not an executable file' % configured)
        return configured
    candidates = [os.path.join(os.path.dirname(sys.executable), HELPER_NAME),
                  str(BUILT_HELPER)]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(HELPER_NAME)
    if found:
        return found
    raise FileNotFoundError('perf helper %s not found beside %s, in build/ (make helper) '
                            'or on PATH' % (HELPER_NAME, sys.executable))


class Helper:
    """One running helper process and its protocol; raises HelperGone."""

    def __init__(self, argv, timeout=10.0):
        self.timeout = timeout
        self._buffer = bytearray()
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        close_fds=True)
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None, "both are PIPE"
        self._pipes: Tuple[IO[bytes], IO[bytes]] = (stdin, stdout)
        self._stdin = stdin.fileno()
        self._stdout = stdout.fileno()
        # Writes wait with a deadline too: a hung helper must not hang us.
        os.set_blocking(self._stdin, False)
        # poll, not select: a helper restarted while owca-measure holds
        # thousands of cgroup files gets pipe fds above select's 1024.
        self._readable = select.poll()
        self._readable.register(self._stdout, select.POLLIN)
        self._writable = select.poll()
        self._writable.register(self._stdin, select.POLLOUT)
        try:
            lines: List[str] = []
            while not lines or lines[-1] != 'ready':
                lines.append(self._line())
            self.hello = parse_hello('\n'.join(lines) + '\n')
            if self.hello.version != PROTOCOL_VERSION:
                raise HelperGone('speaks protocol %d, owca-measure %d'
                                 % (self.hello.version, PROTOCOL_VERSION))
        except HelperGone:
            self.close()
            raise

    @property
    def pid(self):
        return self.process.pid

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._readable.poll(math.ceil(remaining * 1000)):
            raise HelperGone('no answer within %.1f s' % self.timeout)
        chunk = os.read(self._stdout, 1 << 16)
        if not chunk:
            raise HelperGone('exited (status %s)' % self.process.poll())
        self._buffer += chunk

    def _line(self, deadline=None):
        deadline = deadline or time.monotonic() + self.timeout
        while True:
            end = self._buffer.find(b'\n')
            if end >= 0:
                line = self._buffer[:end].decode('utf-8', 'replace')
                del self._buffer[:end + 1]
                return line
            self._fill(deadline)

    def _exactly(self, nbytes, deadline):
        while len(self._buffer) < nbytes:
            self._fill(deadline)
        data = bytes(self._buffer[:nbytes])
        del self._buffer[:nbytes]
        return data

    def _send(self, text):
        data = memoryview(text.encode())
        deadline = time.monotonic() + self.timeout
        while data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._writable.poll(math.ceil(remaining * 1000)):
                raise HelperGone('not reading its input within %.1f s' % self.timeout)
            try:
                data = data[os.write(self._stdin, data):]
            except BlockingIOError:
                continue
            except OSError as e:
                raise HelperGone('stdin closed: %s' % e.strerror) from None

    def request(self, lines):
        """Sends request lines, in chunks; returns one Reply per line."""
        replies: List[Reply] = []
        for start in range(0, len(lines), REQUEST_CHUNK):
            chunk = lines[start:start + REQUEST_CHUNK]
            self._send(''.join(line + '\n' for line in chunk))
            deadline = time.monotonic() + self.timeout
            replies.extend(parse_reply(self._line(deadline)) for _ in chunk)
        return replies

    def read(self):
        """Sends "read"; returns [Record]."""
        self._send('read\n')
        deadline = time.monotonic() + self.timeout
        ntasks, nbytes = parse_values_header(self._line(deadline))
        return parse_values(self._exactly(nbytes, deadline), len(self.hello.events), ntasks)

    def close(self):
        """Asks the helper to quit, kills it if it does not; reaps it."""
        if self.process.poll() is None:
            try:
                os.write(self._stdin, b'quit\n')
            except OSError:
                pass  # gone already, or hung with a full pipe: killed below
            try:
                self.process.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
                self.process.wait()
        for pipe in self._pipes:   # stdin, then stdout
            pipe.close()
