"""APM files (lib/owca/measure/sources/apm.py) and their merge into owca-measure's task metrics."""
import json
import os
import subprocess

import pytest

from conftest import tool_command, tool_env
from owca.measure.sources import apm
from owca.core import frames
from owca.measure.sources.apm import ApmError, ApmReader, ApmRecord


def record(task_id="/owca/nginx", ts=1000.0, **metrics):
    return ApmRecord(task_id, ts, {"workload": "nginx"},
                     metrics or {"apm_latency_p99_seconds": 0.0012})


# -- parse, the pure part ----------------------------------------------------------------

def test_parse_a_wrapper_file():
    r = apm.parse('{"task_id": "/owca/nginx", "ts": 1700000000.5, "labels": {"a": "b"}, '
                  '"metrics": {"apm_latency_p99_seconds": 0.00031, "apm_sli_normalized": 6}}')
    assert r == ApmRecord("/owca/nginx", 1700000000.5, {"a": "b"},
                          {"apm_latency_p99_seconds": 0.00031, "apm_sli_normalized": 6})


@pytest.mark.parametrize("text, reason", [
    ("{", "invalid JSON"),
    ("[1]", "expected a JSON object"),
    ('{"ts": 1, "metrics": {}}', "task_id"),
    ('{"task_id": "t", "ts": "now", "metrics": {}}', "field 'ts'"),
    ('{"task_id": "t", "ts": -1, "metrics": {}}', "field 'ts'"),
    ('{"task_id": "t", "ts": 1}', "field 'metrics'"),
    ('{"task_id": "t", "ts": 1, "metrics": {"task_cpu_usage_seconds": 1}}', "starting with 'apm_'"),
    ('{"task_id": "t", "ts": 1, "metrics": {"apm_x y": 1}}', "not a metric name"),
    ('{"task_id": "t", "ts": 1, "metrics": {"apm_x": "1"}}', "finite number"),
    ('{"task_id": "t", "ts": 1, "metrics": {"apm_x": true}}', "finite number"),
    ('{"task_id": "t", "ts": 1, "metrics": {"apm_x": NaN}}', "NaN"),
    ('{"task_id": "t", "ts": 1, "metrics": {"apm_x": Infinity}}', "Infinity"),
    ('{"task_id": "t", "ts": 1, "labels": {"bad-name": "x"}, "metrics": {}}', "label name"),
])
def test_parse_refuses_what_is_not_an_apm_file(text, reason):
    with pytest.raises(ApmError, match=reason):
        apm.parse(text)


def test_file_names_are_safe_and_unique_per_task():
    a, b = apm.file_name("/owca/nginx"), apm.file_name("/owca_nginx")
    assert a != b and "/" not in a and a.endswith(".json") and not a.startswith(".")
    long_id = "x" * 256
    assert len(apm.file_name(long_id)) < 100


# -- write and read: real files ------------------------------------------------------------

def test_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = apm.write(str(tmp_path), record())
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert apm.parse(open(path).read()) == record()
    apm.write(str(tmp_path), record(apm_latency_p99_seconds=0.5))
    assert apm.parse(open(path).read()).metrics == {"apm_latency_p99_seconds": 0.5}
    apm.remove(str(tmp_path), "/owca/nginx")
    apm.remove(str(tmp_path), "/owca/nginx")  # gone already: not an error
    assert os.listdir(tmp_path) == []


def test_reader_merges_fresh_files_ignores_and_counts_stale_ones(tmp_path):
    apm.write(str(tmp_path), record("/a", ts=995.0, apm_throughput_per_second=10.0))
    apm.write(str(tmp_path), record("/b", ts=900.0, apm_throughput_per_second=20.0))
    reader = ApmReader(str(tmp_path), max_age_seconds=30, clock=lambda: 1000.0)
    assert reader.read() == {"/a": {"apm_throughput_per_second": 10.0,
                                    "apm_report_timestamp_seconds": 995.0}}
    assert (reader.files, reader.stale_files, reader.malformed_total) == (1, 1, 0)


def test_reader_reports_a_malformed_file_once_per_version_and_goes_on(tmp_path, caplog):
    apm.write(str(tmp_path), record("/a", ts=999.0))
    bad = tmp_path / "broken.json"
    bad.write_text('{"task_id": "/x", "ts": 999, "metrics": {"cpu": 1}}')
    (tmp_path / ".half-written.json.1.tmp").write_text("{")  # a writer's temporary: skipped
    (tmp_path / "README").write_text("not ours")
    reader = ApmReader(str(tmp_path), clock=lambda: 1000.0)
    for _ in range(3):
        assert list(reader.read()) == ["/a"]
    assert reader.malformed_total == 1
    assert sum("broken.json" in r.message for r in caplog.records) == 1
    bad.write_text("{")  # a new version of the file: reported and counted again
    os.utime(bad, ns=(1, 1))
    reader.read()
    assert reader.malformed_total == 2


def test_reader_two_files_of_one_task_the_newer_wins(tmp_path):
    (tmp_path / "one.json").write_text(apm.encode(record("/a", 990.0, apm_x=1.0)).decode())
    (tmp_path / "two.json").write_text(apm.encode(record("/a", 995.0, apm_x=2.0)).decode())
    assert ApmReader(str(tmp_path), clock=lambda: 1000.0).read() == {
        "/a": {"apm_x": 2.0, "apm_report_timestamp_seconds": 995.0}}


def test_reader_without_directory_or_with_huge_file(tmp_path):
    reader = ApmReader(str(tmp_path / "none"), clock=lambda: 1000.0)
    assert reader.read() == {} and reader.read_errors_total == 0
    (tmp_path / "big.json").write_bytes(b" " * (apm.MAX_FILE_BYTES + 1))
    reader = ApmReader(str(tmp_path), clock=lambda: 1000.0)
    assert reader.read() == {} and reader.malformed_total == 1


def test_reader_refuses_a_nonpositive_max_age(tmp_path):
    with pytest.raises(ValueError):
        ApmReader(str(tmp_path), 0)


def test_reader_samples_are_registered_metrics(tmp_path):
    from owca.core.metrics import REGISTRY
    for s in ApmReader(str(tmp_path)).samples({"stage": "measure"}):
        frames.check_sample(s, "sample")
        assert s["name"] in REGISTRY


# -- owca-measure merges them (a real process, a real cgroup) -----------------------------------

@pytest.mark.integration
def test_measure_merges_apm_metrics_into_the_matching_task(tmp_path):
    """The root cgroup stands in for a task: every host has it."""
    import time
    apm_dir = tmp_path / "apm"
    now = time.time()
    apm.write(str(apm_dir), ApmRecord("hp", now, {}, {"apm_latency_p99_seconds": 0.004,
                                                     "apm_throughput_per_second": 750.0}))
    apm.write(str(apm_dir), ApmRecord("gone-task", now, {}, {"apm_x": 1.0}))
    apm.write(str(apm_dir), ApmRecord("be", now - 3600, {}, {"apm_x": 2.0}))  # stale
    (apm_dir / "bad.json").write_text("{")
    config = tmp_path / "owca.yaml"
    config.write_text(f"measure:\n  apm_dir: {json.dumps(str(apm_dir))}\n  apm_max_age: 60\n")
    tasks = frames.tasks_frame(1, [{"id": "hp", "name": "hp", "cgroup_path": "/", "labels": {}},
                                   {"id": "be", "name": "be", "cgroup_path": "/", "labels": {}}])
    out = subprocess.run(tool_command("measure", "-c", str(config)),
                         input=frames.encode(tasks), capture_output=True, env=tool_env(),
                         timeout=60)
    assert out.returncode == 0, out.stderr
    frame = frames.validate(frames.decode(out.stdout.splitlines()[0]))
    hp = frame["tasks"]["hp"]["metrics"]
    assert hp["apm_latency_p99_seconds"] == 0.004
    assert hp["apm_throughput_per_second"] == 750.0
    assert "task_cpu_usage_seconds" in hp  # the cgroup's own metrics are still there
    assert not any(k.startswith("apm_") for k in frame["tasks"]["be"]["metrics"])
    own = {s["name"]: s["value"] for s in frame["metrics"] if s["labels"].get("stage") == "measure"}
    assert own["owca_apm_files"] == 2  # hp and gone-task are fresh; gone-task matches no task
    assert own["owca_apm_stale_files"] == 1
    assert own["owca_apm_malformed_files_total"] == 1
    assert b"bad.json" in out.stderr


@pytest.mark.integration
def test_measure_without_apm_dir_reads_no_apm(tmp_path):
    tasks = frames.tasks_frame(1, [{"id": "hp", "name": "hp", "cgroup_path": "/", "labels": {}}])
    out = subprocess.run(tool_command("measure"), input=frames.encode(tasks),
                         capture_output=True, env=tool_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    frame = frames.decode(out.stdout.splitlines()[0])
    assert not any(s["name"].startswith("owca_apm") for s in frame["metrics"])


def test_a_file_without_a_report_time_is_given_its_ts_and_a_wrappers_own_is_kept(tmp_path):
    # The readers that tell a new report from an old one (controller, detector) need the
    # report's time; a file written by hand has only `ts`.
    apm.write(str(tmp_path), record("/hand", ts=995.5, apm_sli=0.01))
    apm.write(str(tmp_path), record("/wrapped", ts=996.0, apm_sli=0.01,
                                    apm_report_timestamp_seconds=990.0))
    read = ApmReader(str(tmp_path), clock=lambda: 1000.0).read()
    assert read["/hand"]["apm_report_timestamp_seconds"] == 995.5
    assert read["/wrapped"]["apm_report_timestamp_seconds"] == 990.0
