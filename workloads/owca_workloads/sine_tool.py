"""owca-sine: drive a load generator at a rate that follows a sine.

Usage:
  owca-sine --base RATE --amplitude RATE --period SECONDS [options] [--] COMMAND [ARG...]
  owca-sine (-h | --help | --version)

Options:
  --base RATE            Mean request rate, per second.
  --amplitude RATE       Amplitude of the rate's sine, per second.
  --period SECONDS       Period of the sine.
  --phase SECONDS        Start at this point of the period [default: 0].
  --step SECONDS         Seconds each run of the generator lasts, at one rate; an
                         integer for generators that take whole seconds [default: 2].
  --duration SECONDS     Stop after SECONDS (default: at SIGTERM or SIGINT).
  --min-rate RATE        Never ask for less than RATE per second [default: 1].
  --connections N        The generator's connections: {connections}, and the divisor
                         of {delay_ms} [default: 1].
  --parser NAME          Read the generator's achieved rate (apm_throughput_per_second)
                         with this owca-wrap parser (wrk, ...) and correct the rate asked
                         for in the next steps by target / achieved.
  --log-level LEVEL      debug, info, warning or error [default: info].
  --debug                Print a traceback with an unexpected error.
  -h, --help             Show this help.
  --version              Show the version.

Placeholders, replaced in COMMAND and each ARG for every step:
  {rate}         the rate asked of the generator for the step, per second
  {rate_int}     the same, rounded to an integer (at least 1)
  {duration}     the step's seconds
  {requests}     rate * duration, rounded: for generators that take a count and
                 finish early (the driver waits for the step's end)
  {connections}  --connections
  {delay_ms}     connections * 1000 / rate: the pause before each request of each
                 connection that gives the rate (workloads/scripts/pace.lua for wrk)
  {workloads}    the workloads/ directory

Input:
  None.

Output:
  For every step, before the generator runs:
    owca-sine: step=N start elapsed_seconds=T target_rate_per_second=R asked_rate_per_second=A
  then the generator's stdout, then:
    owca-sine: step=N end target_rate_per_second=R [achieved_rate_per_second=X
               error_ratio=E correction=C]   (the achieved rate when --parser read it)
  owca-wrap's owca-sine parser turns the end line into apm_load_target_rate_per_second.
  The target of a step is the sine's mean over the step.  Logs on stderr.

Exit status:
  0 at the end of --duration, or on SIGTERM or SIGINT; 1 when the generator cannot
  be started; 2 on a usage error.

Examples:
  owca-sine --base 10 --amplitude 5 --period 8 --step 1 --duration 4 -- echo rate={rate}
  # needs: a web server on 127.0.0.1:8080 (nginx, say)
  owca-sine --base 800 --amplitude 400 --period 60 --connections 8 --parser wrk \\
      wrk -t1 -c{connections} -d{duration}s --latency -s {workloads}/scripts/pace.lua \\
      http://127.0.0.1:8080/ -- {delay_ms}
  # needs: a web server on 127.0.0.1:8080; owca-wrap publishes the latency and the target
  owca-wrap --task-id /owca/nginx --parser wrk --parser owca-sine -- \\
      owca-sine --base 800 --amplitude 400 --period 60 --connections 8 --parser wrk \\
      wrk -t1 -c{connections} -d{duration}s --latency -s {workloads}/scripts/pace.lua \\
      http://127.0.0.1:8080/ -- {delay_ms}
"""
import sys


from owca.core.stage import UsageError
from owca.core.stream import Signals

from owca_workloads import cli
from owca_workloads.parsers import ParserSet, make
from owca_workloads.sine import Driver, Sine

TOOL = "owca-sine"


def driver_from_args(args, signals=None) -> Driver:
    for required in ("--base", "--amplitude", "--period"):
        if args[required] is None:
            raise UsageError(f"{required} is required")
    try:
        sine = Sine(cli.number_option(args, "--base", minimum=0),
                    cli.number_option(args, "--amplitude", minimum=0),
                    cli.number_option(args, "--period", positive=True),
                    cli.number_option(args, "--min-rate", positive=True))
    except ValueError as e:
        raise UsageError(str(e)) from None
    parsers = None
    if args["--parser"]:
        try:
            parsers = ParserSet([make(args["--parser"])])
        except ValueError as e:
            raise UsageError(str(e)) from None
    return Driver(sine, [args["COMMAND"], *args["ARG"]],
                  step=cli.number_option(args, "--step", positive=True),
                  connections=cli.number_option(args, "--connections", minimum=1, integer=True),
                  duration=cli.number_option(args, "--duration", positive=True),
                  phase=cli.number_option(args, "--phase"),
                  parsers=parsers, signals=signals)


def _body(args) -> int:
    signals = Signals()
    try:
        return driver_from_args(args, signals).run()
    finally:
        signals.close()


def main(argv=None) -> int:
    return cli.run(TOOL, __doc__, argv, _body, options_first=True)


if __name__ == "__main__":
    sys.exit(main())
