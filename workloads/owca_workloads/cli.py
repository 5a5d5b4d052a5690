"""What the workloads/ tools share: argument parsing, logging, exit codes.

Exit codes as the pipeline's tools: 0 ok (also on SIGTERM, SIGINT), 1 a runtime
error (one line on stderr; a traceback with --debug), 2 a usage error.
"""
import os
import signal
import sys
import traceback

from docopt import DocoptExit, docopt

from owca.stage import UsageError, setup_logging
from owca.stream import FrameWriter

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

WORKLOADS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ToolError(Exception):
    """A runtime error the tool reports in one line (exit 1)."""


def parse_args(tool: str, doc: str, argv, options_first: bool = False):
    """(args, None) or (None, exit code) when docopt printed help or refused the line."""
    try:
        return docopt(doc, argv=argv, version=_version(), options_first=options_first), None
    except DocoptExit as e:
        reason = str(e).splitlines()[0] if str(e).strip() else "bad arguments"
        if reason.startswith("Usage:"):
            reason = "bad arguments"
        print(f"{tool}: usage error: {reason}; see '{tool} --help'", file=sys.stderr)
        return None, EXIT_USAGE
    except SystemExit as e:  # --help and --version print and exit 0
        return None, e.code if isinstance(e.code, int) else EXIT_OK
    except BrokenPipeError:  # `--help | head -1`
        FrameWriter(1).silence()
        return None, EXIT_OK


def run(tool: str, doc: str, argv, body, options_first: bool = False) -> int:
    """Parse `argv` against `doc`, set up logging, call body(args) -> exit code."""
    args, code = parse_args(tool, doc, argv, options_first)
    if args is None:
        return code
    try:
        setup_logging(tool, args.get("--log-level") or "info")
        return body(args)
    except UsageError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ToolError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:  # the last line of defence: one line, unless --debug
        if args.get("--debug"):
            traceback.print_exc()
        print(f"{tool}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


def number_option(args, name: str, minimum: float = None, integer: bool = False,
                  positive: bool = False):
    """The option's value as a number, or None when absent; UsageError when bad."""
    raw = args.get(name)
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise UsageError(f"{name}: expected a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UsageError(f"{name}: expected a finite number, got {raw!r}")
    if positive and not value > 0:
        raise UsageError(f"{name}: expected a positive number, got {raw!r}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name}: expected at least {minimum}, got {raw!r}")
    return value


def labels_option(values) -> dict:
    """NAME=VALUE options as a label dict, names checked as the frames require."""
    from owca import frames
    labels = {}
    for item in values or []:
        name, sep, value = item.partition("=")
        if not sep or not frames.LABEL_NAME.match(name):
            raise UsageError(f"--label {item!r}: expected NAME=VALUE, NAME as "
                             f"[a-zA-Z_][a-zA-Z0-9_]*")
        labels[name] = value
    return labels


def describe_exit(returncode: int) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by signal {-returncode} ({signal.Signals(-returncode).name})"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _version() -> str:
    from owca import __version__
    return __version__

