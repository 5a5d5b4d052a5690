"""What a stage itself takes from the node: CPU time, resident memory, descriptors.

Every stage reports these three each cycle (Stats.samples() in core/stage.py), so
that the agent's own cost is a metric like any other and a leak shows on a
dashboard before it shows on the node.  Reading them is cheap enough to do every
cycle: the CPU time is one clock_gettime(CLOCK_PROCESS_CPUTIME_ID), the resident
set one pread of /proc/self/statm held open, the descriptors one stat() of
/proc/self/fd, whose size is the number of open descriptors since Linux 6.2
(older kernels report 0 there: the directory is listed instead, which costs a
few microseconds per hundred descriptors).
"""
import os
import time
from typing import NamedTuple, Optional

from owca.core.kernel import PAGE_SIZE


class Usage(NamedTuple):
    cpu_seconds: float   # user + system since the process started
    rss_bytes: int       # resident now (statm's second field)
    open_fds: int        # descriptors open now


class OwnUsage:
    """Reads this process's usage; `read()` each cycle, `close()` at the end."""

    def __init__(self, procfs: str = "/proc"):
        self.procfs = procfs
        self._statm: Optional[int] = None
        # None: not known yet whether stat() of the fd directory gives the count
        self._fd_dir_sized: Optional[bool] = None

    def read(self) -> Usage:
        return Usage(time.process_time(), self.rss_bytes(), self.open_fds())

    def rss_bytes(self) -> int:
        try:
            if self._statm is None:
                self._statm = os.open(f"{self.procfs}/self/statm", os.O_RDONLY | os.O_CLOEXEC)
            return int(os.pread(self._statm, 128, 0).split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            self.close()
            return 0

    def open_fds(self) -> int:
        directory = f"{self.procfs}/self/fd"
        try:
            if self._fd_dir_sized is not False:
                size = os.stat(directory).st_size
                if size > 0:
                    self._fd_dir_sized = True
                    return size
                self._fd_dir_sized = False
            # listing opens the directory itself: that descriptor is not counted
            return len(os.listdir(directory)) - 1
        except OSError:
            return 0

    def close(self) -> None:
        if self._statm is not None:
            fd, self._statm = self._statm, None
            try:
                os.close(fd)
            except OSError:
                pass


_OWN = OwnUsage()


def own_usage() -> Usage:
    """This process's usage now (a process-wide reader: one statm descriptor at most)."""
    return _OWN.read()
