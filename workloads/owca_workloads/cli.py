"""What the workloads/ tools share: argument parsing, logging, exit codes.

Exit codes as the pipeline's tools: 0 ok (also on SIGTERM, SIGINT), 1 a runtime
error (one line on stderr; a traceback with --debug), 2 a usage error.
"""
import os
import signal

from owca.core.stage import (EXIT_ERROR, EXIT_OK, EXIT_USAGE, DataError, UsageError, parse_args,
                             run_guarded, setup_logging)

WORKLOADS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A runtime error the tool reports in one line (exit 1): the pipeline's own.
ToolError = DataError


def run(tool: str, doc: str, argv, body, options_first: bool = False) -> int:
    """Parse `argv` against `doc`, set up logging, call body(args) -> exit code."""
    args, code = parse_args(tool, doc, argv, options_first)
    if args is None:
        return code

    def guarded() -> int:
        setup_logging(tool, args.get("--log-level") or "info")
        return body(args)
    return run_guarded(tool, bool(args.get("--debug")), guarded)


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
    from owca.core import frames
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
