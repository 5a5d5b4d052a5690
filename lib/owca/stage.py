"""What the five tools share: options, logging, the loops, the bad-frame policy.

A tool in bin/ holds its docopt usage and calls `main()` here with its Stage.
The bad-frame policy, stated once: a line that is not a valid frame is reported
on stderr in one line (`owca-detect: error: line 17: invalid JSON: ...`),
counted in `owca_bad_frames_total`, and skipped; the stream goes on.  With
`--strict` it is fatal (exit 1), for debugging a producer.

Exit codes: 0 on EOF, SIGTERM, SIGINT or a closed stdout; 1 on a runtime or data
error (a bad frame under --strict, an unusable input or output); 2 on a usage or
configuration error.
"""
import logging
import sys
import time

from docopt import DocoptExit, docopt

from owca import config, frames
from owca.stream import (BAD, EOF, LINE, STOP, FrameWriter, LineReader,
                         OutputClosed, Signals)

log = logging.getLogger("owca")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


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
        self.cycle_duration = 0.0
        self.writer = None
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
        if self.skipped_frames:
            out.append(frames.sample("owca_skipped_frames_total", self.skipped_frames, labels,
                                     "counter"))
        return out


class Stage:
    """A pipeline stage.  Filters override `consumes` and `process`; sources `produce`."""

    name = "stage"
    consumes = ()          # kinds this stage parses; every other frame is forwarded
    forward_consumed = True  # write the consumed frame on before what process() adds
    paced_by_interval = False  # cycles come from idle() on the clock, not from input
    forwards_unknown = True    # pass on what it does not understand (a sink counts it)
    replaces = ()  # kinds it makes itself: one from upstream (a replayed recording's) is dropped

    def __init__(self, cfg, options: dict):
        self.cfg = cfg
        self.options = options
        # --interval, else the configuration's `interval`, else None
        self.interval = parse_interval(options.get("--interval")) \
            or getattr(cfg, "interval", None)
        self.stats = Stats(self.name)
        self.stats.timing = not options.get("--no-timing")

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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{tool}: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.ERROR, "error")
    logging.addLevelName(logging.INFO, "info")
    logging.addLevelName(logging.DEBUG, "debug")


def parse_interval(value) -> float:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"--interval: expected seconds, got {value!r}") from None
    if not seconds > 0:
        raise UsageError(f"--interval: expected a positive number of seconds, got {value!r}")
    return seconds


def run_filter(stage: Stage, reader: LineReader, writer: FrameWriter, once: bool,
               strict: bool, interval: float = None) -> int:
    """Read frames, hand the consumed kinds to the stage, forward the rest.

    With an interval, stage.idle() runs every `interval` seconds whether or not
    input arrives (owca-measure measures on that clock), and a stage warns when
    three intervals pass with no input.  With `once`, the loop ends after the
    first cycle: the first consumed frame, or for a stage paced by its
    interval, the first idle() that wrote a frame.
    """
    stats = stage.stats
    stats.writer = writer
    consumes = set(stage.consumes)
    warned = set()
    last_input = time.monotonic()
    next_tick = None if not interval else last_input + interval
    try:
        while True:
            timeout = None if next_tick is None else max(0.0, next_tick - time.monotonic())
            event, line = reader.read(timeout=timeout)
            wrote = False
            if event == LINE:
                if line.isspace():
                    continue  # an empty line is no frame (docs/protocol.md, Transport)
                stats.frames_read += 1
                last_input = time.monotonic()
                sniffed = frames.sniff(line)
                if sniffed is not None and sniffed[1] in stage.replaces:
                    stats.skipped_frames += 1
                    continue
                if sniffed is not None and (sniffed[1] not in consumes
                                            or not frames.is_known(*sniffed)):
                    _pass_on(stage, writer, line, sniffed, warned)
                    continue
                try:
                    frame = frames.decode(line)
                    known = frames.is_known(frame["v"], frame["kind"])
                    if not known or frame["kind"] not in consumes:
                        _pass_on(stage, writer, line, (frame["v"], frame["kind"]), warned)
                        continue
                    frames.validate(frame)
                except frames.FrameError as e:
                    _bad_line(stats, reader.lineno, str(e), strict)
                    continue
                started = time.monotonic()
                if stage.forward_consumed:
                    writer.write(line)
                for out in stage.process(frame):
                    writer.write(out)
                wrote = not stage.paced_by_interval
                stats.cycle_duration = time.monotonic() - started
            elif event == BAD:
                stats.frames_read += 1
                _bad_line(stats, reader.lineno, line, strict)
            elif event in (EOF, STOP):
                break
            if next_tick is not None and time.monotonic() >= next_tick:
                for out in stage.idle():
                    writer.write(out)
                    wrote = stage.paced_by_interval
                now = time.monotonic()
                next_tick = max(next_tick + interval, now)
                if now - last_input >= 3 * interval:
                    log.warning("no input for %.0f s (3 intervals): is the stage upstream "
                                "running?", now - last_input)
                    last_input = now
            if once and wrote:
                break
    finally:
        finish(stage, writer)
    return EXIT_OK


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
            for out in stage.produce():
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
    except Exception as e:  # the error that ended the loop, if any, is the one to report
        log.error("while closing: %s: %s", type(e).__name__, e)


def parse_args(tool: str, doc: str, argv=None, options_first: bool = False):
    """(args, None), or (None, exit code) when docopt printed help or refused the line."""
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


def run_guarded(tool: str, debug: bool, body) -> int:
    """body() -> exit code, with every way out mapped to the exit-code table.

    An error is one line on stderr (a traceback too with --debug); a reader of
    stdout that went away (`| head`) is a normal end.
    """
    try:
        return body()
    except OutputClosed:
        FrameWriter(1).silence()
        return EXIT_OK
    except (UsageError, config.ConfigError) as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:  # the last line of defence: one line, unless --debug
        if debug:
            import traceback
            traceback.print_exc()
        print(f"{tool}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


def main(doc: str, stage_class, schema, argv=None, source: bool = False,
         default_interval: float = None) -> int:
    """The whole life of a tool; returns its exit code."""
    tool = "owca-" + stage_class.name
    args, code = parse_args(tool, doc, argv)
    if args is None:
        return code
    signals = None

    def body() -> int:
        nonlocal signals
        setup_logging(tool, args.get("--log-level") or "info")
        for spec in args.get("--register") or []:
            config.register_external(spec)
        parse_interval(args.get("--interval"))
        cfg = config.load_section(args.get("--config"), stage_class.name, schema)
        stage = stage_class(cfg, args)
        signals = Signals()
        writer = FrameWriter(1)
        if source:
            return run_source(stage, writer, signals, bool(args.get("--once")),
                              stage.interval or default_interval)
        reader = LineReader(0, signals)
        return run_filter(stage, reader, writer, bool(args.get("--once")),
                          bool(args.get("--strict")), stage.interval)

    try:
        return run_guarded(tool, bool(args.get("--debug")), body)
    finally:
        if signals is not None:
            signals.close()


def _version() -> str:
    from owca import __version__
    return __version__


def run_tool(doc: str, stage_class, schema, **kwargs):
    """Entry point for bin/ scripts: exit with main()'s code."""
    sys.exit(main(doc, stage_class, schema, **kwargs))
