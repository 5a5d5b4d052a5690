"""The first instructions of every tool, before anything else is imported.

- SIGTERM, SIGINT and SIGHUP (the stop signals) end a tool that is still starting
  at once, with exit status 0 and no message: nothing has been read, written or
  changed yet.  Each launcher in bin/ installs the same handler as its very first
  instruction, before it imports this package (tens of milliseconds of imports);
  what comes before that, the interpreter's own start, no Python code can cover
  (README.md, Exit status).  The stage loop replaces these handlers with its own
  (owca.core.stream.Signals), which let the frame in hand finish and the stage
  restore what it changed; once the stage has ended, stop signals are ignored
  (ignore_stops): the tool exits with the status it has, and the interpreter,
  which resets a handler written in Python to the default one while it exits,
  cannot be killed by a signal that came a few milliseconds after the first.
- Descriptors 0, 1 and 2 closed by the caller (`<&-`) would be taken by the
  first files the tool opens (its signal wake-up pipe read as its input, a
  cgroup file written as its output): each closed one is opened on /dev/null
  and remembered, and the stage refuses to run on a closed input or output
  (owca.core.stage.main).
"""
import os
import signal

STDIN, STDOUT, STDERR = 0, 1, 2

# Each ends a tool cleanly: systemd's stop (SIGTERM), Ctrl-C (SIGINT), a closed
# terminal or a hang-up sent by hand (SIGHUP).  A SIGHUP that the tool's parent ignores
# (`nohup owca-discover ...`) stays ignored: that is what nohup asks for.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# The descriptors among 0-2 that were closed when the tool started.
closed: set[int] = set()

# Whether this process is a tool started by begin() (not main() called in a test).
began = False


def _stop_while_starting(_signum, _frame):
    os._exit(0)


def begin() -> None:
    global began
    began = True
    for signum in STOP_SIGNALS:
        if signum != signal.SIGHUP or signal.getsignal(signum) != signal.SIG_IGN:
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


def ignore_stops() -> None:
    """In a tool started by begin(), from now on a stop signal changes nothing: the
    stage has ended and the exit status is decided."""
    if began:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
