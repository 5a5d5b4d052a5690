"""The first instructions of every tool, before anything else is imported.

- SIGTERM and SIGINT end a tool that is still starting at once, with exit status
  0 and no message: nothing has been read, written or changed yet.  The stage
  loop replaces these handlers with its own (owca.core.stream.Signals), which let
  the frame in hand finish and the stage restore what it changed.
- Descriptors 0, 1 and 2 closed by the caller (`<&-`) would be taken by the
  first files the tool opens (its signal wake-up pipe read as its input, a
  cgroup file written as its output): each closed one is opened on /dev/null
  and remembered, and the stage refuses to run on a closed input or output
  (owca.core.stage.main).
"""
import os
import signal

STDIN, STDOUT, STDERR = 0, 1, 2

# The descriptors among 0-2 that were closed when the tool started.
closed: set[int] = set()


def _stop_while_starting(_signum, _frame):
    os._exit(0)


def begin() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_while_starting)
    for fd in (STDIN, STDOUT, STDERR):
        try:
            os.fstat(fd)
        except OSError:
            closed.add(fd)
            devnull = os.open(os.devnull, os.O_RDWR)
            if devnull != fd:  # the lowest free descriptor: fd itself, unless a lower one
                os.dup2(devnull, fd)  # was closed too and is now being filled
                os.close(devnull)
