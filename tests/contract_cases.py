"""The tools' contract with their callers, as data: one row per case of bad input or signal.

tests/test_contract_table.py runs every row on every tool it names, as real processes.
A row:

- id: the case's name (the issue item it comes from, where one did);
- tools: which tools it applies to (ALL, FILTERS, or a tuple of names);
- args: the command line (or {tool: command line}, "*" for the others); `{config}` is
  the row's configuration file, `{plugin}` its plug-in file, `{dir}` an empty directory;
- config: the configuration file's text (`{section}` is the tool's section), or None;
- plugin: a plug-in file's text, or None;
- files: {path: text} written before the tool starts (`{dir}`, `{now}`: the time);
- stdin: a list of byte strings and the tokens GOOD and GOOD2 (a frame the tool consumes);
- upstream: None, or the command lines of tools whose pipeline feeds the tool's stdin
  (the row then runs for at least PIPELINE_SECONDS, and until stdout holds what
  `contains` names, and ends with SIGTERM to every stage);
- close: descriptors closed at the start (`<&-`), a tuple of "stdin", "stdout", "stderr";
- signal: None; ("SIGTERM" or "SIGINT", "starting"): sent as soon as the tool has run its
  first instruction (its handler is installed), at a random instant of its start,
  REPEATS times; ("SIGTERM" or "SIGINT", "importing"): sent while the plug-in's import
  is sleeping (it has created `{dir}/importing`); ("SIGTERM" or "SIGINT", "stalled"):
  sent while the tool is blocked
  writing to a reader that never reads (a third item, "stderr too": stderr is a pipe
  that is full and never read either, and is not checked); ("SIGTERM" or "SIGINT", "running"): sent once
  the tool has written its first line;
- rc: the expected exit status;
- stderr: a pattern the first line of stderr must match (`{tool}`, `{config}`,
  `{plugin}` filled in), or None for an empty stderr; no traceback in any case;
- stream: the expected effect on the output, a dict of
  `cycles`: how many cycles stdout holds (frames of the tool's own kind; owca-ship:
  metrics blocks),
  `contains` / `absent`: byte strings that must / must not be in stdout,
  `counters`: the tool's own counters in its last frame ({name: value}),
  `exposition`: True when owca-ship's stdout must parse as Prometheus text.
"""
ALL = ("discover", "measure", "detect", "allocate", "ship")
FILTERS = ("measure", "detect", "allocate", "ship")
GOOD, GOOD2 = "GOOD", "GOOD2"
REPEATS = 12
PIPELINE_SECONDS = 6

STALL = b'{"v":1,"kind":"tasks", broken\n'     # begins like a frame, is not JSON
BAD_NAMES = (b'{"v":1,"kind":"measurements","ts":1,"host":"n1","seq":1,'
             b'"platform":{"platform_topology_cpus":2,"bad name":1},'
             b'"tasks":{"t1":{"name":"t1","metrics":{"app latency.p99":1,"task_up":1}}},'
             b'"metrics":[{"name":"a b","value":1}]}\n')
CONTROL_ID = (b'{"v":1,"kind":"measurements","ts":1,"host":"n1","seq":1,"platform":{},'
              b'"tasks":{"t\\u001b[2J":{"metrics":{}}},"metrics":[]}\n')
TASKS_CONTROL_ID = (b'{"v":1,"kind":"tasks","ts":1,"host":"n1","seq":1,'
                    b'"tasks":[{"id":"t\\u001b[2J","cgroup_path":"/"}],"metrics":[]}\n')
HOST_NEWLINE = (b'{"v":1,"kind":"measurements","ts":1,"host":"n1\\nowca_injected 1",'
                b'"seq":1,"platform":{"platform_topology_cpus":2},"tasks":{},"metrics":[]}\n')
BAD_SAMPLE = (b'{"v":1,"kind":"%s","ts":1,"host":"n1","seq":1,%s,'
              b'"metrics":[{"name":"app latency.p99","value":1},{"name":"ok_one","value":2}]}\n')
BOM = b"\xef\xbb\xbf"
ALLOCATIONS = b'{"v":1,"kind":"allocations","ts":1,"host":"n1","seq":1,"allocations":{}}\n'
SLOW_PLUGIN = ("import time\n"
               "open('{dir}/importing', 'w').close()\n"
               "time.sleep(600)\n")
RDT_CONFIG = ("allocate:\n  allocator: !StaticAllocator\n    rules:\n"
              "      - labels: {priority: be}\n"
              "        allocations: {rdt: {name: owca-be, l3: f}}\n")


def config_error(id, tools, line, message, config):
    """A configuration refused at start: exit 2, `file:line: reason` (a pattern)."""
    return row(id, tools, 2, r"{tool}: error: {config}:" + str(line) + ": " + message,
               args=["-c", "{config}"], config=config)


def row(id, tools, rc, stderr, args=(), config=None, plugin=None, stdin=(), close=(),
        signal=None, stream=None, upstream=None, files=None):
    return dict(id=id, tools=tools, args=args if isinstance(args, dict) else list(args),
                config=config, plugin=plugin, stdin=list(stdin), close=tuple(close),
                signal=signal, rc=rc, stderr=stderr, stream=stream or {}, upstream=upstream,
                files=files or {})


CASES = [
    # --- covered before issue 21: the contract as it stood ---------------------------
    row("end of input", FILTERS, 0, None, stdin=[GOOD, GOOD2], stream={"cycles": 2}),
    row("discover once", ("discover",), 0, None, args=["--once", "--cgroupfs", "{dir}"],
        stream={"cycles": 1}),
    row("invalid JSON line", FILTERS, 0, r"{tool}: error: line 1: invalid JSON",
        stdin=[b"this is not json\n", GOOD],
        stream={"cycles": 1, "counters": {"owca_bad_frames_total": 1}}),
    row("not an object", FILTERS, 0, r"{tool}: error: line 1: a frame is a JSON object",
        stdin=[b"[]\n", GOOD], stream={"cycles": 1, "counters": {"owca_bad_frames_total": 1}}),
    row("missing field", ("detect", "allocate", "ship"), 0, r"{tool}: error: line 1: field 'ts'",
        stdin=[b'{"v":1,"kind":"measurements","host":"n","seq":1}\n', GOOD],
        stream={"cycles": 1}),
    row("missing field in a tasks frame", ("measure",), 0,
        r"{tool}: error: line 1: field 'ts'",
        stdin=[b'{"v":1,"kind":"tasks","host":"n","seq":1,"tasks":[]}\n', GOOD],
        stream={"cycles": 1}),
    row("invalid JSON, --strict", FILTERS, 1, r"{tool}: error: line 2: invalid JSON",
        args=["--strict"], stdin=[GOOD, b"{oops\n", GOOD2]),
    row("unknown kind", FILTERS, 0, r"{tool}: warning: frames of kind 'gossip', version 1",
        stdin=[b'{"v":1,"kind":"gossip","ts":1,"host":"n","seq":1}\n', GOOD]),
    row("unknown version", FILTERS, 0,
        r"{tool}: warning: frames of kind 'measurements', version 9",
        stdin=[b'{"v":9,"kind":"measurements","future":true}\n', GOOD]),
    row("truncated last line", FILTERS, 0,
        r"{tool}: error: line 2: truncated frame: input ended without a newline",
        stdin=[GOOD, b'{"v":1,"kind":"meas'], stream={"cycles": 1}),
    row("line over 16 MiB", ("detect", "ship"), 0,
        r"{tool}: error: line 1: frame exceeds the limit of 16777216 bytes",
        stdin=[b'{"v":1,"kind":"measurements","pad":"' + b"x" * (16 << 20) + b'"}\n', GOOD],
        stream={"cycles": 1}),
    row("unknown option", ALL, 2, r"{tool}: usage error: ", args=["--no-such-option"]),
    row("bad --interval", ALL, 2, r"{tool}: error: --interval: expected", args=["--interval", "x"]),
    row("--interval 0", ALL, 2, r"{tool}: error: --interval: expected a positive",
        args=["--interval", "0"]),
    row("bad --log-level", ALL, 2, r"{tool}: error: --log-level: unknown level",
        args=["--log-level", "loud"]),
    config_error("config: unknown field", ALL, 2, r".*nonsense",
                 "{section}:\n  nonsense: 1\n"),
    config_error("config: invalid YAML", ALL, r"\d+", r"invalid YAML",
                 "{section}: [\n"),
    config_error("config: unknown tag", ALL, 1, r".*unknown tag !Nope",
                 "{section}: {interval: !Nope {}}\n"),
    config_error("config: unknown section", ALL, 1, r"unknown section",
                 "nonsense: {}\n"),
    row("config: missing file", ALL, 2, r"{tool}: error: {dir}/none.yaml: cannot read",
        args=["-c", "{dir}/none.yaml"]),
    config_error("config: wrong type", ALL, 1, r".*interval: expected float",
                 "{section}: {interval: soon}\n"),
    row("plug-in that cannot be imported", ALL, 2, r"{tool}: error: .*-r nosuchmodule:X: "
        r"cannot import nosuchmodule", args=["-r", "nosuchmodule:X"]),
    row("SIGTERM while waiting for input", FILTERS, 0, None, stdin=[GOOD],
        signal=("SIGTERM", "running")),
    row("SIGINT while waiting for input", FILTERS, 0, None, stdin=[GOOD],
        signal=("SIGINT", "running")),

    # --- issue 21, item 1: numeric fields have ranges -----------------------------------
    config_error("config: negative interval", ALL, 2,
                 r"\w+Config.interval: expected a number > 0",
                 "{section}:\n  interval: -5\n"),
    config_error("config: zero interval", ALL, 2, r"\w+Config.interval: expected a number > 0",
                 "{section}:\n  interval: 0\n"),
    config_error("config: NaN interval", ALL, 2,
                 r"\w+Config.interval: expected a finite number",
                 "{section}:\n  interval: .nan\n"),
    config_error("config: infinite interval", ALL, 2,
                 r"\w+Config.interval: expected a finite number",
                 "{section}:\n  interval: .inf\n"),
    config_error("config: negative depth", ("discover",), 2,
                 r"CgroupDiscovery.max_depth: expected a number >= 0",
                 "discover:\n  source: !CgroupDiscovery {max_depth: -1}\n"),
    config_error("config: negative allocation limit", ("allocate",), 2,
                 r"AllocateConfig.max_changes_per_cycle: expected a number",
                 "allocate:\n  max_changes_per_cycle: -3\n"),
    row("--interval inf", ALL, 2, r"{tool}: error: --interval: expected a positive number",
        args=["--interval", "inf"]),

    # --- item 2: a stop is prompt whatever the reader of stdout does ---------------------
    row("SIGTERM while stdout stalls", ALL, 0,
        r"{tool}: warning: stopped: the reader of the output stalled",
        args={"discover": ["--interval", "0.001", "--cgroupfs", "{dir}"], "*": []},
        signal=("SIGTERM", "stalled")),
    row("SIGTERM while stdout and stderr stall", ALL, 0, None,
        args={"discover": ["--interval", "0.001", "--cgroupfs", "{dir}"], "*": []},
        signal=("SIGTERM", "stalled", "stderr too")),
    row("SIGINT while stdout stalls", ALL, 0,
        r"{tool}: warning: stopped: the reader of the output stalled",
        args={"discover": ["--interval", "0.001", "--cgroupfs", "{dir}"], "*": []},
        signal=("SIGINT", "stalled")),

    # --- item 3: metric and label names checked where they enter ------------------------
    row("bad metric names in a measurements frame", ("detect", "allocate"), 0,
        r"{tool}: error: line 1: metrics: metric name 'a b' is not a valid name: left out",
        stdin=[BAD_NAMES, GOOD],
        stream={"cycles": 2,  # the line is forwarded unchanged: the sink leaves them out
                "counters": {"owca_bad_metric_names_total": 3, "owca_bad_frames_total": 0}}),
    row("bad metric names into the exposition", ("ship",), 0,
        r"{tool}: error: line 1: metrics: metric name 'a b' is not a valid name: left out",
        stdin=[BAD_NAMES, GOOD],
        stream={"cycles": 2, "absent": [b"app latency", b"bad name", b"\na b"],
                "contains": [b'task_up{host="n1",task_id="t1"'],
                "counters": {"owca_bad_metric_names_total": 3, "owca_bad_frames_total": 0},
                "exposition": True}),
    row("bad metric name in an APM file", ("measure",), 0,
        r"{tool}: error: APM file {dir}/t1\.json: field 'metrics': name 'apm_x y' is not a "
        r"metric name", args=["-c", "{config}"], config="measure: {apm_dir: {dir}}\n",
        files={"{dir}/t1.json": '{"task_id": "t1", "ts": {now}, '
                                '"metrics": {"apm_x y": 1, "apm_ok": 2}}'},
        stdin=[b'{"v":1,"kind":"tasks","ts":1,"host":"n1","seq":1,'
               b'"tasks":[{"id":"t1","cgroup_path":"/"}],"metrics":[]}\n'],
        stream={"cycles": 1, "absent": [b"apm_x y", b"apm_ok"],
                "counters": {"owca_apm_malformed_files_total": 1}}),
    row("bad sample name in a tasks frame", ("measure",), 0,
        r"{tool}: error: line 1: metrics: metric name 'app latency.p99' is not a valid",
        stdin=[BAD_SAMPLE % (b"tasks", b'"tasks":[]')],
        stream={"cycles": 1, "contains": [b'"ok_one"'], "absent": [b"app latency"],
                "counters": {"owca_bad_metric_names_total": 1}}),
    row("bad metric name from a detector plug-in", ("detect",), 0,
        r"{tool}: error: line 1: metrics: metric name 'my latency.p99' is not a valid name",
        args=["-r", "{plugin}:BadNames", "-c", "{config}"],
        config="detect: {detector: !BadNames {}}\n",
        plugin="from dataclasses import dataclass\n"
               "from owca import frames\nfrom owca.detect.stage import AnomalyDetector\n\n"
               "@dataclass\nclass BadNames(AnomalyDetector):\n"
               "    def detect(self, *args):\n"
               "        return [], [frames.sample('my latency.p99', 1), "
               "frames.sample('good_one', 2)]\n",
        stdin=[GOOD],
        stream={"cycles": 1, "contains": [b'"good_one"'], "absent": [b"my latency"],
                "counters": {"owca_bad_metric_names_total": 1,
                             "owca_detector_errors_total": 0}}),

    # --- item 4: a line that begins like a frame but is broken --------------------------
    row("broken line with a frame's prefix", FILTERS, 0,
        r"{tool}: error: line 1: invalid JSON", stdin=[STALL, GOOD],
        stream={"absent": [b"broken"], "counters": {"owca_bad_frames_total": 1}}),
    row("broken line with a frame's prefix, --strict", FILTERS, 1,
        r"{tool}: error: line 1: invalid JSON", args=["--strict"], stdin=[STALL, GOOD],
        stream={"cycles": 0, "absent": [b"broken"]}),
    row("broken unknown version with a frame's prefix", FILTERS, 0,
        r"{tool}: error: line 1: invalid JSON", stdin=[b'{"v":7,"kind":"x", nope\n', GOOD],
        stream={"absent": [b"nope"], "counters": {"owca_bad_frames_total": 1}}),

    # --- item 5: nothing raw into the exposition -----------------------------------------
    row("host name with a newline", ("ship",), 0, None, stdin=[HOST_NEWLINE],
        stream={"absent": [b"\nowca_injected"], "contains": [b"host=n1\\nowca_injected 1"],
                "exposition": True}),

    # --- item 6: signals from the first instruction -------------------------------------
    row("SIGTERM while starting", ALL, 0, None, signal=("SIGTERM", "starting")),
    row("SIGINT while starting", ALL, 0, None, signal=("SIGINT", "starting")),
    row("SIGTERM while a plug-in is imported", ALL, 0, None, args=["-r", "{plugin}:X"],
        plugin=SLOW_PLUGIN, signal=("SIGTERM", "importing")),
    row("SIGINT while a plug-in is imported", ALL, 0, None, args=["-r", "{plugin}:X"],
        plugin=SLOW_PLUGIN, signal=("SIGINT", "importing")),

    # --- item 7: descriptors 0-2 closed by the caller --------------------------------------
    row("stdin closed", FILTERS, 1, r"{tool}: error: standard input is closed", close=["stdin"]),
    row("stdout closed", ALL, 1, r"{tool}: error: standard output is closed",
        close=["stdout"], stdin=[GOOD]),
    row("stdin closed, a source", ("discover",), 0, None, close=["stdin"],
        args=["--once", "--cgroupfs", "{dir}"], stream={"cycles": 1}),
    row("stderr closed", FILTERS, 0, None, close=["stderr"], stdin=[b"junk\n", GOOD],
        stream={"cycles": 1}),

    # --- item 8: configuration errors outside the contract ---------------------------------
    config_error("config: not UTF-8", ALL, 2, r"not UTF-8",
                 b"{section}:\n  interval: \xff1\n"),
    config_error("config: a tag where a list is expected", ("ship",), 2,
                 r"ShipConfig.storages: expected a list",
                 "ship:\n  storages: !StdoutStorage {}\n"),
    config_error("config: a key given twice", ALL, 3,
                 r"key 'interval' given twice \(first on line 2\)",
                 "{section}:\n  interval: 1\n  interval: 2\n"),
    config_error("config: a field given twice in a tag", ("ship",), 4,
                 r"key 'path' given twice",
                 "ship:\n  storages:\n    - !FileStorage {path: /dev/null,\n"
               "                    path: /dev/full}\n"),
    row("plug-in calls sys.exit at import", ALL, 2,
        r"{tool}: error: {plugin}:2: -r .*called sys.exit\(3\)",
        args=["-r", "{plugin}:X"], plugin="import sys\nsys.exit(3)\n"),
    row("plug-in raises at import", ALL, 2,
        r"{tool}: error: {plugin}:3: -r .*ZeroDivisionError",
        args=["-r", "{plugin}:X"], plugin="# a plug-in\n\n1 / 0\n"),

    # --- item 9: "no input" only when the upstream is late by its own pace ----------------
    row("upstream slower than the interval", ("measure",), 0, None,
        args=["--interval", "0.5", "--cgroupfs", "{dir}"],
        upstream=[["discover", "--interval", "2.5", "--cgroupfs", "{dir}"]],
        stream={"contains": [b'"kind":"measurements"']}),
    row("upstream slower than the interval, two stages up", ("detect",), 0, None,
        args=["--interval", "0.5"],
        upstream=[["discover", "--interval", "2.5", "--cgroupfs", "{dir}"],
                  ["measure", "--cgroupfs", "{dir}"]],
        stream={"contains": [b'"kind":"anomalies"']}),

    # --- item 10: what every user sees ----------------------------------------------------------
    row("NUL bytes", FILTERS, 0, r"{tool}: error: line 1: NUL byte at byte 0",
        stdin=[b'\x00{"v":1}\n', GOOD], stream={"counters": {"owca_bad_frames_total": 1}}),
    row("byte order mark at the start", ("measure", "detect", "allocate"), 0, None,
        stdin=[BOM + ALLOCATIONS, GOOD],
        stream={"absent": [BOM], "contains": [ALLOCATIONS],
                "counters": {"owca_bad_frames_total": 0}}),
    row("byte order mark in mid-stream", FILTERS, 0,
        r"{tool}: error: line 2: a byte order mark \(U\+FEFF\) begins the line",
        stdin=[GOOD, BOM + b'{"v":1,"kind":"tasks","ts":1,"host":"n","seq":1,"tasks":[]}\n',
               GOOD2],
        stream={"absent": [BOM], "counters": {"owca_bad_frames_total": 1}}),
    row("unknown option in words", ALL, 2,
        r"{tool}: usage error: unknown option --no-such-option; see '{tool} --help'$",
        args=["--no-such-option"]),
    row("unexpected argument in words", ALL, 2,
        r"{tool}: usage error: unexpected argument 'extra'; see '{tool} --help'$",
        args=["extra"]),
    row("control characters of a bad task id", ("detect", "allocate", "ship"), 0,
        r"{tool}: error: line 1: field 'tasks\.t\\x1b\[2J'", stdin=[CONTROL_ID, GOOD]),
    row("control characters of a bad task id in a tasks frame", ("measure",), 0,
        r"{tool}: error: line 1: field 'tasks\[0\]\.id': .*'t\\x1b\[2J'",
        stdin=[TASKS_CONTROL_ID, GOOD]),
    row("rdt error without a doubled prefix", ("allocate",), 0,
        r"{tool}: error: cycle 1: task t0: rdt: resctrl is not mounted at",
        args=["-c", "{config}", "--resctrlfs", "{dir}"], config=RDT_CONFIG, stdin=[GOOD]),
]
