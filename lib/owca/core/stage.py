"""What the five tools share: options, logging, the loops, the bad-frame policy.

A tool in bin/ holds its docopt usage and calls `main()` here with its Stage.
The bad-frame policy, stated once: a line that is not a valid frame is reported
on stderr in one line (`owca-detect: error: line 17: invalid JSON: ...`),
counted in `owca_bad_frames_total`, and skipped; the stream goes on.  With
`--strict` it is fatal (exit 1), for debugging a producer.

Exit codes: 0 on EOF, SIGTERM, SIGINT, SIGHUP or a closed stdout; 1 on a runtime or
data error (a bad frame under --strict, an unusable input or output); 2 on a usage
or configuration error.
"""
import logging
import re
import sys
import time
from typing import Optional, Set, Tuple

from docopt import DocoptExit, docopt

from owca.core import config, frames, startup
from owca.core.ownusage import own_usage
from owca.core.stream import (BAD, EOF, LINE, STOP, FrameWriter, Interrupted, LineReader,
                              OutputClosed, OutputStalled, Signals, give_back_output,
                              raised_by_signal, stop_requested, take_output, write_all)

log = logging.getLogger("owca")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# --interval, as a configured duration (owca.core.config.SECONDS): select() refuses a
# timeout beyond what the C library can hold, and a year between cycles is a typo.
MAX_INTERVAL = config.MAX_SECONDS

# Until two frames have shown the upstream's pace, silence is suspect only after
# this long (or three of our own intervals, whichever is longer): a discovery
# every 10 s is normal under a stage measuring every second.
UNKNOWN_PACE_SILENCE = 60.0

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BOM = b"\xef\xbb\xbf"


def one_line(text: str) -> str:
    """Control characters (a newline, an escape sequence from a bad task id) escaped:
    what a tool writes on stderr is one line, and no input can drive the terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class _OneLineFormatter(logging.Formatter):
    def formatMessage(self, record):
        return one_line(super().formatMessage(record))


class _StderrHandler(logging.StreamHandler):
    """After a stop signal, a line for a stderr that stalled (`2>&1 | stuck`) gets the
    same grace as a frame, then is dropped: nothing keeps a stopping tool alive."""

    def emit(self, record):
        if not stop_requested():
            return super().emit(record)
        try:
            self.flush()
            write_all(self.stream.fileno(), (self.format(record) + "\n").encode("utf-8",
                                                                                "replace"))
        except (OutputClosed, OSError, ValueError, AttributeError):
            pass  # no fd (a test's capture), or stalled: the line is lost, not the stop


class UsageError(Exception):
    """Bad arguments or configuration: one line, exit 2."""


class DataError(Exception):
    """A fatal runtime or data error: one line, exit 1."""


class Stats:
    """A stage's own counters, shipped as `owca_*{stage=...}` samples."""

    def __init__(self, stage: str):
        self.stage = stage
        self.frames_read = 0
        self.bad_frames = 0
        self.skipped_frames = 0
        self.names = frames.NameCheck()  # metric and label names of the frames read
        self.cycle_duration = 0.0
        self.writer: Optional[FrameWriter] = None
        # Off for byte-identical replays of a recorded stream (--no-timing).
        self.timing = True

    def samples(self) -> list:
        labels = {"stage": self.stage}
        written = self.writer.frames_written if self.writer else 0
        out = [
            frames.sample("owca_frames_read_total", self.frames_read, labels, "counter"),
            frames.sample("owca_frames_written_total", written, labels, "counter"),
            frames.sample("owca_bad_frames_total", self.bad_frames, labels, "counter"),
        ]
        if self.timing:
            out.append(frames.sample("owca_cycle_duration_seconds",
                                     round(self.cycle_duration, 6), labels))
            # the stage's own cost; varies from run to run like the duration, so
            # left out of byte-identical replays too
            usage = own_usage()
            out += [frames.sample("owca_cpu_seconds_total", round(usage.cpu_seconds, 6),
                                  labels, "counter"),
                    frames.sample("owca_resident_memory_bytes", usage.rss_bytes, labels),
                    frames.sample("owca_open_descriptors", usage.open_fds, labels)]
        if self.skipped_frames:
            out.append(frames.sample("owca_skipped_frames_total", self.skipped_frames, labels,
                                     "counter"))
        if self.names.bad:
            out.append(frames.sample("owca_bad_metric_names_total", self.names.bad, labels,
                                     "counter"))
        return out


class Stage:
    """A pipeline stage.  Filters override `consumes` and `process`; sources `produce`."""

    name = "stage"
    consumes: Tuple[str, ...] = ()  # kinds this stage parses; every other frame is forwarded
    forward_consumed = True  # write the consumed frame on before what process() adds
    forwards_unknown = True    # pass on what it does not understand (a sink counts it)
    # Kinds it makes itself: one from upstream (a replayed recording's) is dropped.
    replaces: Tuple[str, ...] = ()

    def __init__(self, cfg, options: dict):
        self.cfg = cfg
        self.options = options
        # --interval, else the configuration's `interval`, else None
        self.interval = parse_interval(options.get("--interval")) \
            or getattr(cfg, "interval", None)
        self.stats = Stats(self.name)
        self.stats.timing = not options.get("--no-timing")

    @property
    def paced_by_interval(self) -> bool:
        """Whether cycles come from idle() on the clock, not from input (a stage
        may decide it from its configuration)."""
        return False

    @classmethod
    def writes_stdout(cls, cfg) -> bool:
        """Whether a stage so configured writes to stdout (a sink's storages may not)."""
        return True

    # filters
    def process(self, frame: dict) -> list:
        """Frames (dicts or encoded lines) to write after the input frame."""
        return []

    def idle(self) -> list:
        """Called when `--interval` passes with no input; frames to write."""
        return []

    # sources
    def produce(self) -> list:
        raise NotImplementedError

    def close(self) -> list:
        """At the end of the stream: frames to write, resources to release."""
        return []


def setup_logging(tool: str, level: str) -> None:
    numeric = logging.getLevelName(level.upper()) if level else logging.INFO
    if not isinstance(numeric, int):
        raise UsageError(f"--log-level: unknown level {level!r} (debug, info, warning, error)")
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter(f"{tool}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")
    logging.addLevelName(logging.INFO, "info")
    logging.addLevelName(logging.DEBUG, "debug")


def parse_interval(value) -> Optional[float]:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"--interval: expected seconds, got {value!r}") from None
    if not 0 < seconds <= MAX_INTERVAL:  # NaN too
        raise UsageError(f"--interval: expected a positive number of seconds, at most "
                         f"{MAX_INTERVAL:.0f}, got {value!r}")
    return seconds


def run_filter(stage: Stage, reader: LineReader, writer: FrameWriter, once: bool,
               strict: bool, interval: Optional[float] = None) -> int:
    """Read frames, hand the consumed kinds to the stage, forward the rest.

    With an interval, stage.idle() runs every `interval` seconds whether or not
    input arrives (owca-measure measures on that clock), and a stage warns when
    no input came for three times the longer of its interval and the upstream's
    pace (the spacing of the consumed frames' `ts`).  With `once`, the loop ends
    after the first cycle: the first consumed frame, or for a stage paced by its
    interval, the first idle() that wrote a frame.

    A frame forwarded unparsed on the strength of its prefix is still checked to
    be a JSON object (benchmarks/forward_check.py: a few microseconds for the
    small frames forwarded in a pipeline).
    """
    stats = stage.stats
    stats.writer = writer
    names = stats.names
    consumes = set(stage.consumes)
    warned: Set[tuple] = set()  # (version, kind) of frames forwarded unknown
    last_input = time.monotonic()
    next_tick = None if not interval else last_input + interval
    pace = Pace()
    try:
        while True:
            timeout = None if next_tick is None else max(0.0, next_tick - time.monotonic())
            event, line = reader.read(timeout=timeout)
            wrote = False
            if event == LINE:
                if line.isspace():
                    continue  # an empty line is no frame (docs/protocol.md, Transport)
                if reader.lineno == 1 and line.startswith(_BOM):
                    line = line[3:]  # a recording saved by an editor; not forwarded
                stats.frames_read += 1
                last_input = time.monotonic()
                sniffed = frames.sniff(line)
                try:
                    if sniffed is not None and (sniffed[1] not in consumes
                                                or not frames.is_known(*sniffed)
                                                or sniffed[1] in stage.replaces):
                        frames.parse(line)  # a JSON object, whatever its prefix says
                        if sniffed[1] in stage.replaces:
                            stats.skipped_frames += 1
                        else:
                            _pass_on(stage, writer, line, sniffed, warned)
                        continue
                    frame = frames.decode(line)
                    known = frames.is_known(frame["v"], frame["kind"])
                    if not known or frame["kind"] not in consumes:
                        _pass_on(stage, writer, line, (frame["v"], frame["kind"]), warned)
                        continue
                    names.lineno = reader.lineno
                    frames.validate(names.frame(frame))
                except frames.FrameError as e:
                    _bad_line(stats, reader.lineno, str(e), strict)
                    continue
                pace.saw(frame["ts"])
                started = time.monotonic()
                if stage.forward_consumed:
                    writer.write(line)
                for out in stage.process(frame):
                    if type(out) is dict:  # a plug-in's extra metrics enter here
                        names.samples_of(out)
                    writer.write(out)
                wrote = not stage.paced_by_interval
                stats.cycle_duration = time.monotonic() - started
            elif event == BAD:
                stats.frames_read += 1
                _bad_line(stats, reader.lineno, line, strict)
            elif event in (EOF, STOP):
                break
            if next_tick is not None and time.monotonic() >= next_tick:
                assert interval  # next_tick is set only with an interval
                for out in stage.idle():
                    writer.write(out)
                    wrote = stage.paced_by_interval
                now = time.monotonic()
                next_tick = max(next_tick + interval, now)
                expected = pace.expected(interval)
                if now - last_input >= 3 * expected:
                    log.warning("no input for %.0f s (3 times the %s of %.0f s): is the stage "
                                "upstream running?", now - last_input,
                                "upstream's pace" if pace.known else "expected pace",
                                expected)
                    last_input = now
            if once and wrote:
                break
    finally:
        finish(stage, writer)
    return EXIT_OK


class Pace:
    """How often the upstream writes, from the `ts` of the frames a stage consumes."""

    def __init__(self):
        self.frames = 0
        self.last_ts = None
        self.seconds = None  # the latest positive spacing

    @property
    def known(self) -> bool:
        return self.seconds is not None

    def saw(self, ts: float) -> None:
        self.frames += 1
        if self.last_ts is not None and ts > self.last_ts:
            self.seconds = ts - self.last_ts
        self.last_ts = ts

    def expected(self, interval: float) -> float:
        """The spacing of frames that is no reason to worry (silence of three times it is)."""
        if self.seconds is not None:
            return max(interval, self.seconds)
        if self.frames:  # one frame: the upstream started, its pace is not known yet
            return max(interval, UNKNOWN_PACE_SILENCE / 3)
        return interval


def _pass_on(stage, writer, line, version_kind, warned):
    """Forward a frame this stage does not consume; the sink counts it instead."""
    if not frames.is_known(*version_kind) and version_kind not in warned:
        warned.add(version_kind)
        log.warning("frames of kind %r, version %s are not understood here: %s",
                    version_kind[1], version_kind[0],
                    "forwarded unchanged" if stage.forwards_unknown else "skipped")
    if stage.forwards_unknown:
        writer.write(line)
    else:
        stage.stats.skipped_frames += 1


def _bad_line(stats: Stats, lineno: int, reason: str, strict: bool):
    stats.bad_frames += 1
    if strict:
        raise DataError(f"line {lineno}: {reason}")
    log.error("line %d: %s", lineno, reason)


def run_source(stage: Stage, writer: FrameWriter, signals: Signals, once: bool,
               interval: float) -> int:
    """Produce a cycle every `interval` seconds until stopped."""
    stage.stats.writer = writer
    try:
        while not signals.stop:
            started = time.monotonic()
            try:
                # A source may wait on an orchestrator: a stop must not.
                with signals.interruptible():
                    produced = stage.produce()
            except Interrupted:
                break
            for out in produced:
                writer.write(out)
            stage.stats.cycle_duration = time.monotonic() - started
            if once:
                break
            signals.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        finish(stage, writer)
    return EXIT_OK


def finish(stage: Stage, writer: FrameWriter) -> None:
    """stage.close() whatever ended the loop: a stage restores and releases there.

    Its last frames are written while the output is still open; a closed output
    or an error while closing must not hide what ended the loop.
    """
    try:
        for out in stage.close():
            writer.write(out)
    except OutputClosed:
        pass
    except Exception as e:  # noqa: BLE001 the error that ended the loop is the one to report
        log.error("while closing: %s: %s", type(e).__name__, e)


def parse_args(tool: str, doc: str, argv=None, options_first: bool = False):
    """(args, None), or (None, exit code) when docopt printed help or refused the line."""
    try:
        return docopt(doc, argv=argv, version=_version(), options_first=options_first), None
    except DocoptExit as e:
        reason = _usage_reason(str(e))
        print(one_line(f"{tool}: usage error: {reason}; see '{tool} --help'"), file=sys.stderr)
        return None, EXIT_USAGE
    except SystemExit as e:  # --help and --version print and exit 0
        code = e.code if isinstance(e.code, int) else EXIT_OK
    except OSError as e:
        return None, _help_not_written(tool, e)
    try:
        if sys.stdout is not None:
            sys.stdout.flush()   # a full stdout fails here, not in the exit's own flush
    except OSError as e:
        return None, _help_not_written(tool, e)
    return None, code


def _help_not_written(tool: str, e: OSError) -> int:
    """The exit code when --help or --version could not be written to stdout."""
    FrameWriter().silence()   # what print() still holds is not written again at exit
    if isinstance(e, BrokenPipeError):   # `--help | head -1`
        return EXIT_OK
    print(one_line(f"{tool}: error: standard output: {e.strerror or e}"),  # `> /dev/full`
          file=sys.stderr)
    return EXIT_ERROR


_UNMATCHED = re.compile(r"(Option|Argument)\((?:None|'([^']*)'), (?:None|'([^']*)')")


def _usage_reason(message: str) -> str:
    """docopt's refusal in the user's words, not its internals
    (`found unmatched (duplicate?) arguments [Option(None, '--x', 0, True)]`)."""
    first = message.strip().splitlines()[0] if message.strip() else ""
    if "unmatched" in first:
        found = _UNMATCHED.search(first)
        if found:
            kind, short, long_or_value = found.groups()
            if kind == "Option":
                return f"unknown option {long_or_value or short}"
            return f"unexpected argument {long_or_value!r}"
    if not first or first.startswith("Usage:"):
        return "bad arguments"
    return first


def run_guarded(tool: str, debug: bool, body) -> int:
    """body() -> exit code, with every way out mapped to the exit-code table.

    An error is one line on stderr (a traceback too with --debug); a reader of
    stdout that went away (`| head`) is a normal end.
    """
    try:
        return body()
    except OutputStalled as e:
        log.warning("stopped: %s", e)
        FrameWriter().silence()
        return EXIT_OK
    except OutputClosed:
        FrameWriter().silence()
        return EXIT_OK
    except (UsageError, config.ConfigError) as e:
        print(one_line(f"{tool}: error: {e}"), file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        print(one_line(f"{tool}: error: {e}"), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        if raised_by_signal(e):
            return EXIT_OK
        # The tool's own handlers turn SIGINT into a clean stop: this one was raised by
        # code it runs (a plug-in), and ended the stream early.
        print(one_line(f"{tool}: error: KeyboardInterrupt raised by the code it ran, "
                       f"not by a signal"), file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 the last line of defence: one line, unless --debug
        if debug:
            import traceback
            traceback.print_exc()
        print(one_line(f"{tool}: error: {type(e).__name__}: {e}"), file=sys.stderr)
        return EXIT_ERROR


def main(doc: str, stage_class, schema, argv=None, source: bool = False,
         default_interval: Optional[float] = None) -> int:
    """The whole life of a tool; returns its exit code."""
    tool = "owca-" + stage_class.name
    args, code = parse_args(tool, doc, argv)
    if args is None:
        return code
    signals = None

    def body() -> int:
        nonlocal signals
        setup_logging(tool, args.get("--log-level") or "info")
        take_output()   # before a plug-in is imported: what it prints goes to stderr
        for spec in args.get("--register") or []:
            config.register_external(spec)
        parse_interval(args.get("--interval"))
        cfg = config.load_section(args.get("--config"), stage_class.name, schema)
        if args.get("--check-config"):  # what a rollout runs before installing a file
            return EXIT_OK
        if startup.STDIN in startup.closed and not source:
            raise DataError("standard input is closed: nothing to read frames from")
        if startup.STDOUT in startup.closed and stage_class.writes_stdout(cfg):
            raise DataError("standard output is closed: nowhere to write frames")
        # From here a signal lets the stage finish the frame in hand and restore.
        signals = Signals()
        stage = stage_class(cfg, args)
        writer = FrameWriter()
        if source:
            interval = stage.interval or default_interval
            assert interval, "a source is given a default_interval"
            return run_source(stage, writer, signals, bool(args.get("--once")), interval)
        reader = LineReader(0, signals)
        return run_filter(stage, reader, writer, bool(args.get("--once")),
                          bool(args.get("--strict")), stage.interval)

    try:
        return run_guarded(tool, bool(args.get("--debug")), body)
    finally:
        if signals is not None:
            signals.close(ignore_stops=startup.began)
        give_back_output()


def _version() -> str:
    from owca import __version__
    return __version__


def run_tool(doc: str, stage_class, schema, **kwargs):
    """Entry point for bin/ scripts: exit with main()'s code."""
    code = main(doc, stage_class, schema, **kwargs)
    startup.ignore_stops()   # the status is decided: a signal now must not change it
    sys.exit(code)
