"""owca-wrap: run a workload or load generator and turn its output into APM metrics.

Usage:
  owca-wrap --task-id ID [options] [--parser NAME]... [--regex REGEX]...
            [--label NAME=VALUE]... [--] COMMAND [ARG...]
  owca-wrap (-h | --help | --version)

Options:
  --task-id ID               The task the metrics belong to, as owca-discover reports it
                             (its cgroup path with the cgroup source).
  --task-name NAME           The task's name in --frames output (default: the task id).
  -p NAME, --parser NAME     How to read the output: regex, wrk, redis-benchmark, sysbench,
                             memaslap, specjbb, owca-sine, or module:factory (a callable
                             returning an object with feed(line)); repeatable, every line
                             goes to each.  Default: regex.
  -e REGEX, --regex REGEX    A regular expression with named groups `name` and `value`
                             (and optionally `unit`: ns us ms s m h give seconds, k M G
                             scale); repeatable.  Names become `apm_<name>`.
  -l NAME=VALUE, --label NAME=VALUE
                             A label of the measurement; repeatable.
  --stream WHICH             Which output to parse: stdout, stderr or both [default: stdout].
                             What is not parsed goes to owca-wrap's stderr.
  --slo VALUE                The objective for the SLI metric: adds apm_sli, apm_slo and
                             apm_sli_normalized (1 is the objective, below 1 violates it).
  --sli-metric NAME          The SLI metric [default: apm_latency_p99_seconds].
  --higher-is-better         The SLI metric is better when higher (a throughput); by
                             default lower is better (a latency).
  --apm-dir DIR              Where the task's APM file is kept for owca-measure
                             [default: /run/owca/apm].
  --no-apm-file              Keep no APM file (with --frames, for standalone use).
  --frames                   Write a `measurements` frame for the task on stdout every
                             interval (`owca-wrap --frames ... | owca-ship`).
  --interval SECONDS         Seconds between publications [default: 1].
  --max-value-age SECONDS    A value that no output line refreshed for SECONDS is no
                             longer published [default: 30].
  --restart WHEN             Restart the command when it ends: never, on-failure or always
                             [default: never].
  --restart-delay SECONDS    Seconds between an exit and the restart [default: 1].
  --max-restarts N           Give up (exit 1) after N restarts (default: no limit).
  --stop-timeout SECONDS     On SIGTERM, seconds the command's process group gets before
                             SIGKILL [default: 5].
  --shell                    COMMAND is one shell command line, run with /bin/sh -c.
                             Without it no shell is involved.
  --echo                     Copy the command's parsed output to stderr.
  --log-level LEVEL          debug, info, warning or error [default: info].
  --debug                    Print a traceback with an unexpected error.
  -h, --help                 Show this help.
  --version                  Show the version.

Input:
  None; the command's stdin is /dev/null.  Options come before COMMAND (or `--`).

Output:
  The task's APM file in --apm-dir, replaced atomically every interval and removed
  at exit: {"task_id", "ts", "labels", "metrics"} (lib/owca/measure/sources/apm.py); owca-measure
  with `apm_dir` merges its metrics into the task's.  With --frames, one
  `measurements` frame per interval on stdout.  Logs on stderr.

Exit status:
  0 when stopped by SIGTERM or SIGINT, or when the command succeeded and is not
  restarted; 1 when it failed and is not restarted, or --max-restarts ran out;
  2 on a usage error.

Examples:
  # needs: a web server on 127.0.0.1:8080 (nginx, say)
  owca-wrap --task-id /owca/nginx --parser wrk --slo 0.002 --restart always \\
      -- wrk -t1 -c8 -d5s --latency http://127.0.0.1:8080/
  owca-wrap --task-id /owca/app --frames --no-apm-file --regex \\
      'p99=(?P<value>[0-9.]+)(?P<unit>ms) (?P<name>latency_p99_seconds)' \\
      -- echo 'p99=3.2ms latency_p99_seconds' | owca-ship
"""
import sys


from owca.core.stage import UsageError
from owca.core.stream import Signals

from owca_workloads import cli
from owca_workloads.parsers import ParserSet, make
from owca_workloads.wrap import RESTART_POLICIES, ServiceLevel, WrapConfig, Wrapper

TOOL = "owca-wrap"


def config_from_args(args) -> tuple:
    """(WrapConfig, ParserSet) from the parsed command line; UsageError when bad."""
    command = [args["COMMAND"], *args["ARG"]]
    if args["--shell"]:
        if len(command) != 1:
            raise UsageError("--shell: give the command line as one argument")
        command = ["/bin/sh", "-c", command[0]]
    stream = args["--stream"]
    streams = {"stdout": ("stdout",), "stderr": ("stderr",), "both": ("stdout", "stderr")}
    if stream not in streams:
        raise UsageError(f"--stream: expected stdout, stderr or both, got {stream!r}")
    if args["--restart"] not in RESTART_POLICIES:
        raise UsageError(f"--restart: expected {', '.join(RESTART_POLICIES)}, "
                         f"got {args['--restart']!r}")
    if args["--no-apm-file"] and not args["--frames"]:
        raise UsageError("--no-apm-file without --frames would publish nothing")
    from owca.core import frames
    try:
        frames.check_task_id(args["--task-id"], "--task-id")
    except frames.FrameError as e:
        raise UsageError(str(e)) from None
    names = args["--parser"] or ["regex"]
    if args["--regex"] and "regex" not in names:
        names.append("regex")
    try:
        parsers = ParserSet([make(name, args["--regex"]) for name in names])
    except ValueError as e:
        raise UsageError(str(e)) from None
    if "regex" in names and not args["--regex"]:
        raise UsageError("the regex parser needs at least one --regex")
    slo = cli.number_option(args, "--slo", positive=True)
    service_level = None
    if slo is not None:
        service_level = ServiceLevel(slo, args["--sli-metric"], bool(args["--higher-is-better"]))
    cfg = WrapConfig(
        command=command, task_id=args["--task-id"], task_name=args["--task-name"],
        labels=cli.labels_option(args["--label"]), streams=streams[stream],
        apm_dir=None if args["--no-apm-file"] else args["--apm-dir"],
        frames=bool(args["--frames"]),
        interval=cli.number_option(args, "--interval", positive=True),
        max_value_age=cli.number_option(args, "--max-value-age", positive=True),
        service_level=service_level, restart=args["--restart"],
        restart_delay=cli.number_option(args, "--restart-delay", minimum=0),
        max_restarts=cli.number_option(args, "--max-restarts", minimum=0, integer=True),
        stop_timeout=cli.number_option(args, "--stop-timeout", positive=True),
        echo=bool(args["--echo"]))
    return cfg, parsers


def _body(args) -> int:
    cfg, parsers = config_from_args(args)
    signals = Signals()
    try:
        return Wrapper(cfg, parsers, signals).run()
    finally:
        signals.close()


def main(argv=None) -> int:
    return cli.run(TOOL, __doc__, argv, _body, options_first=True)


if __name__ == "__main__":
    sys.exit(main())
