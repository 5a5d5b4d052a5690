"""The frame protocol: encoding, sniffing, and every validation error."""
import json

import pytest

from owca import frames
from owca.frames import FrameError


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
