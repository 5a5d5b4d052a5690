"""The frame protocol: encoding, sniffing, and every validation error."""
import json
import re

import pytest

from conftest import FakeClock
from owca.core import frames
from owca.core.frames import FrameError


def measurements(**over):
    f = frames.measurements_frame(7, {"platform_topology_cpus": 2},
                                  {"t1": {"labels": {"app": "x"}, "resources": {"cpus": 1},
                                          "metrics": {"task_up": 1}}}, ts=1.5, host="n1")
    f.update(over)
    return f


def test_encode_is_one_compact_line_with_version_and_kind_first():
    line = frames.encode(measurements())
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.startswith(b'{"v":1,"kind":"measurements",')
    assert frames.decode(line) == measurements()


def test_sniff_reads_version_and_kind_without_parsing():
    assert frames.sniff(frames.encode(measurements())) == (1, "measurements")
    assert frames.sniff(b'{"kind":"tasks","v":1}\n') is None  # other key order: parse in full
    assert frames.sniff(b'{"v":x,"kind":"tasks"}\n') is None
    assert frames.sniff(b"garbage\n") is None


def test_encode_refuses_nan():
    with pytest.raises(FrameError, match="cannot encode"):
        frames.encode(measurements(platform={"x": float("nan")}))


@pytest.mark.parametrize("line, message", [
    (b"not json\n", "invalid JSON"),
    (b"[1, 2]\n", "a frame is a JSON object"),
    (b'{"kind": "tasks"}\n', "field 'v'"),
    (b'{"v": 1}\n', "field 'kind'"),
    (b'{"v": 1, "kind": "tasks", "host": "h", "seq": 1}\n', "field 'ts'"),
    (b'{"v": 1, "kind": "tasks", "ts": 1, "seq": 1}\n', "field 'host'"),
    (b'{"v": 1, "kind": "tasks", "ts": 1, "host": "h", "seq": -1}\n', "field 'seq'"),
    (b'{"v": 1, "kind": "tasks", "ts": true, "host": "h", "seq": 1}\n', "field 'ts'"),
    (b'\xff\xfe\n', "not UTF-8|invalid JSON"),
])
def test_decode_errors_name_the_field(line, message):
    with pytest.raises(FrameError, match=message):
        frames.decode(line)


def test_newer_version_is_decoded_without_judging_its_body():
    frame = frames.decode(b'{"v": 2, "kind": "tasks", "whatever": []}\n')
    assert frame["v"] == 2 and not frames.is_known(2, "tasks")


def tasks(**task):
    base = {"id": "a", "cgroup_path": "/a", "labels": {}, "resources": {}}
    base.update(task)
    return frames.tasks_frame(1, [base], ts=1, host="h")


@pytest.mark.parametrize("frame, message", [
    (tasks(id=""), "tasks\\[0\\].id"),
    (tasks(id="x" * 300), "tasks\\[0\\].id"),
    (tasks(cgroup_path="relative"), "cgroup_path"),
    (tasks(cgroup_path="/a/../etc"), "cgroup_path"),
    (tasks(labels={"bad-name": "x"}), "label name"),
    (tasks(labels={"ok": 3}), "tasks\\[0\\].labels.ok"),
    (tasks(resources={"cpus": "many"}), "resources.cpus"),
    (measurements(platform=[]), "platform"),
    (measurements(tasks={"t": []}), "tasks.t"),
    (measurements(tasks={"t": {"metrics": []}}), "tasks.t.metrics"),
    (measurements(metrics=[{"name": "x y", "value": 1}]), "metrics\\[0\\].name"),
    (measurements(metrics=[{"name": "x", "value": "1"}]), "metrics\\[0\\].value"),
    (measurements(metrics=[{"name": "x", "value": 1, "type": "histogram"}]), "type"),
    (frames.anomalies_frame(1, [{"type": "contention", "resource": "cpu", "uuid": "u",
                                 "contended_task_id": "a", "contending_task_ids": "b"}],
                            ts=1, host="h"), "contending_task_ids"),
    (frames.anomalies_frame(1, [{"type": "", "resource": "cpu", "uuid": "u",
                                 "contended_task_id": "a", "contending_task_ids": []}],
                            ts=1, host="h"), "anomalies\\[0\\].type"),
    (frames.allocations_frame(1, {"a": 0.5}, ts=1, host="h"), "allocations.a"),
    (frames.new_frame("nonsense", 1, ts=1, host="h"), "unknown kind"),
])
def test_validate_errors_name_the_field(frame, message):
    with pytest.raises(FrameError, match=message):
        frames.validate(frames.decode(json.dumps(frame).encode()))


def test_duplicate_task_ids_are_refused():
    f = tasks()
    f["tasks"].append(dict(f["tasks"][0]))
    with pytest.raises(FrameError, match="duplicate"):
        frames.validate(f)


def test_valid_frames_of_every_kind_pass():
    frames.validate(tasks(subcgroup_paths=["/a/b"]))
    frames.validate(measurements())
    frames.validate(frames.anomalies_frame(1, [], ts=1, host="h"))
    frames.validate(frames.allocations_frame(1, {"a": {"cpu_quota": 0.5}}, ts=1, host="h"))


def test_pace_is_learnt_from_the_frames_ts():
    from owca.core.stage import UNKNOWN_PACE_SILENCE, Pace
    pace = Pace()
    assert pace.expected(1.0) == 1.0                      # nothing read yet: our interval
    pace.saw(100.0)
    assert pace.expected(1.0) == UNKNOWN_PACE_SILENCE / 3  # upstream started, pace unknown
    pace.saw(100.0)                                       # a frame of the same cycle
    assert not pace.known
    pace.saw(110.0)
    assert pace.known and pace.expected(1.0) == 10.0      # discovery every 10 s
    assert pace.expected(30.0) == 30.0                    # never less than our interval


class _ScriptedInput:
    """A LineReader on a fake clock: `line` arrives at each of `arrivals`, the input
    ends at `end`, and a read with nothing due lets its whole timeout pass."""

    def __init__(self, clock, arrivals, end, line):
        self.clock, self.arrivals, self.end, self.line = clock, list(arrivals), end, line
        self.lineno = 0

    def read(self, timeout=None):
        from owca.core.stream import EOF, LINE, TIMEOUT
        due = min([self.end] + self.arrivals[:1])
        if timeout is not None and self.clock.now + timeout < due:
            self.clock.now += timeout
            return TIMEOUT, None
        self.clock.now = due
        if self.arrivals and due == self.arrivals[0]:
            self.arrivals.pop(0)
            self.lineno += 1
            return LINE, self.line
        return EOF, None


class _Written(list):
    frames_written = 0

    def write(self, data):
        self.append(data)


def test_an_interval_paces_the_cycles_and_input_adds_none(monkeypatch):
    """run_filter on a fake clock: idle() every `interval`, however often input comes."""
    from owca.core import stage as stage_loop
    clock = FakeClock()
    monkeypatch.setattr(stage_loop, "time", clock)

    class Ticker(stage_loop.Stage):
        name = "ticker"
        paced_by_interval = True

        def __init__(self):
            super().__init__(None, {"--interval": "0.2"})
            self.cycles = []

        def idle(self):
            self.cycles.append(clock.now)
            return []

    ticker = Ticker()
    line = frames.encode(frames.tasks_frame(1, [], ts=1.0, host="h"))  # not consumed here
    arrivals = [0.01 + 0.05 * i for i in range(18)]  # four lines an interval, to 0.86
    written = _Written()
    stage_loop.run_filter(ticker, _ScriptedInput(clock, arrivals, 0.9, line), written,
                          once=False, strict=False, interval=ticker.interval)
    assert written == [line] * len(arrivals)  # every line forwarded
    assert len(ticker.cycles) == 4            # 0.2, 0.4, 0.6, 0.8: the clock's, not the input's
    gaps = [b - a for a, b in zip(ticker.cycles, ticker.cycles[1:])]
    assert ticker.cycles[0] >= 0.2 and min(gaps) >= 0.2 - 1e-9, ticker.cycles


def test_names_left_out_are_counted_and_the_frame_kept():
    check = frames.NameCheck()
    frame = {"v": 1, "kind": "measurements", "ts": 1, "host": "h", "seq": 1,
             "platform": {"platform_x": 1, "bad name": 2},
             "tasks": {"t": {"metrics": {"task_up": 1, "app latency.p99": 3}}},
             "metrics": [{"name": "ok", "value": 1},
                         {"name": "ok", "value": 1, "labels": {"bad-label": "x"}}]}
    frames.validate(check.frame(frame))
    assert frame["platform"] == {"platform_x": 1}
    assert frame["tasks"]["t"]["metrics"] == {"task_up": 1}
    assert frame["metrics"] == [{"name": "ok", "value": 1}]
    assert check.bad == 3
    check.frame({"kind": "measurements", "platform": {"bad name": 2}})
    assert check.bad == 4


@pytest.mark.parametrize("line, reason", [
    (b'\x00{"v":1}\n', "NUL byte at byte 0"),
    (b'{"v":1,"kind":"x\x00"}\n', "NUL byte at byte 16"),
    (b'\xef\xbb\xbf{"v":1}\n', "a byte order mark (U+FEFF) begins the line"),
    (b'{"v":1,"kind":"tasks", broken\n', "invalid JSON"),
    (b'\xff\n', "not UTF-8"),
])
def test_parse_names_what_a_reader_cannot_see(line, reason):
    with pytest.raises(frames.FrameError, match=re.escape(reason)):
        frames.parse(line)
