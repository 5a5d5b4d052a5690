"""owca-profile (docs/profile.md): profiles from frames, on Dask, from and to Kafka; and
owca-detect with a profile as its prior (docs/detection.md, "Fleet profiles").

Real parts throughout: the tools as processes, a Dask scheduler and workers as separate
processes on loopback, the Kafka-protocol test broker (tests/kafka_broker.py), owca-ship
to it.  What is not covered here: a cluster across machines (the same protocol on other
addresses), TLS or SASL to Kafka (owca-profile reads a plaintext listener).
"""
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, tool_command, tool_env, wait_for
from kafka_broker import ShipProcess, broker, free_port  # noqa: F401  (a fixture)
from owca.core import frames
from owca.profile import compute, profile as prof
from owca.profile.records import Options, from_exposition

CORPUS = os.path.join(ROOT, "workloads", "corpus")


def node_frames(host: str, cycles: int = 30, sli=0.01, flagged=(), noise=0.0,
                task_prefix="") -> list:
    """A node's stream: an HP task of workload `web`, a BE task of workload `batch`; the
    HP named as contended by `batch` in the cycles `flagged`."""
    out = []
    hp, be = f"{task_prefix}/web-1", f"{task_prefix}/batch-1"
    for seq in range(1, cycles + 1):
        ts = 1700000000.0 + 2 * seq
        value = sli * (4.0 if seq in flagged else 1.0) * (1 + noise * math.sin(seq))
        tasks = {
            hp: {"name": "web", "cgroup_path": hp, "resources": {},
                 "labels": {"workload": "web", "priority": "hp"},
                 "metrics": {"task_last_seen": ts, "apm_sli": value,
                             "apm_report_timestamp_seconds": ts,
                             "task_cpu_usage_seconds": 0.1 * seq,
                             "task_run_queue_delay_seconds": 0.01 * seq}},
            be: {"name": "batch", "cgroup_path": be, "resources": {},
                 "labels": {"workload": "batch"},
                 "metrics": {"task_last_seen": ts, "task_cpu_usage_seconds": 0.5 * seq}}}
        out.append(frames.measurements_frame(seq, {}, tasks, ts=ts, host=host))
        found = [{"type": "contention", "resource": "cpu", "contended_task_id": hp,
                  "contending_task_ids": [be], "uuid": f"{host}-episode",
                  "metrics": [frames.sample("contention_confidence", 0.5,
                                            {"contended_task_id": hp})]}] \
            if seq in flagged else []
        out.append(frames.anomalies_frame(seq, found, ts=ts, host=host))
    return out


def write_lines(path, frames_) -> str:
    with open(path, "wb") as f:
        for frame in frames_:
            f.write(frames.encode(frame))
    return str(path)


def run_profile(*args, timeout=180, env=None):
    return subprocess.run(tool_command("profile", *args), capture_output=True, check=False,
                          env=env or tool_env(), cwd=ROOT, timeout=timeout)


def built(tmp_path, name, *args) -> dict:
    out = tmp_path / name
    done = run_profile(*args, "-o", str(out))
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(out.read_text())


# -- the arithmetic --------------------------------------------------------------------------

def test_summary_is_the_median_the_scaled_mad_and_interpolated_quantiles():
    s = compute.summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["count"] == 5 and s["centre"] == 3.0
    assert s["spread"] == pytest.approx(1.4826 * 1.0)
    assert s["quantiles"]["p25"] == 2.0 and s["quantiles"]["p95"] == pytest.approx(4.8)


def test_wilson_bound_ranks_many_observations_above_few():
    assert compute.wilson_lower(300, 300) > compute.wilson_lower(3, 3) > 0
    assert compute.wilson_lower(0, 10) == 0.0 and compute.wilson_lower(1, 0) == 0.0


def test_a_profile_holds_the_normal_cycles_only_and_the_pairs(tmp_path):
    flagged = set(range(20, 26))
    a = write_lines(tmp_path / "a.jsonl", node_frames("node-a", flagged=flagged))
    b = write_lines(tmp_path / "b.jsonl", node_frames("node-b", sli=0.02))
    doc = built(tmp_path, "p.json", "build", a, b)
    assert doc["format"] == "owca-profile" and doc["version"] == 1
    assert doc["totals"]["hosts"] == 2
    assert doc["totals"]["excluded_task_cycles"] == len(flagged)
    sli = doc["workloads"]["web"]["unknown"]["all"]["sli"]
    # node-a's 24 normal cycles at 10 ms, node-b's 30 at 20 ms: the median is node-b's.
    assert sli["count"] == 30 - len(flagged) + 30
    assert sli["centre"] == pytest.approx(math.log(0.02))
    assert sli["quantiles"]["p05"] == pytest.approx(math.log(0.01))
    # Rates need a previous cycle: the first of each stream has none.
    assert doc["workloads"]["web"]["unknown"]["all"]["run_queue"]["count"] == \
        29 - len(flagged) + 29
    [pair] = doc["bad_neighbours"]
    assert (pair["victim_workload"], pair["antagonist_workload"]) == ("web", "batch")
    assert pair["count"] == 1 and pair["cycles"] == len(flagged) and pair["share"] == 1.0
    assert 0 < pair["confidence"] < 1 and pair["detector_confidence"] == 0.5


def test_an_anomaly_of_a_tasks_first_cycle_counts_its_pair():
    """The cycle's measurements name the workloads before its anomalies are counted."""
    cycles, bad = compute.records.from_lines(
        [frames.encode(f) for f in node_frames("n", cycles=3, flagged={1})], Options())
    for c in cycles:
        c["stream"] = c["host"]
    part = compute.partition_part(Options(), cycles)
    assert bad == 0 and part["pairs"] == {("web", "batch"): [1, 1, 0.5, 1]}
    assert part["victims"] == {"web": 1} and part["excluded"] == 1


def test_bad_input_lines_are_counted_and_the_build_goes_on(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"not json\n" + b"".join(frames.encode(x) for x in node_frames("n")))
    doc = built(tmp_path, "p.json", "build", str(path))
    assert doc["totals"]["bad_inputs"] == 1
    assert doc["workloads"]["web"]["unknown"]["all"]["sli"]["count"] == 30


@pytest.mark.parametrize("args, message", [
    (["build", "--workers", "0", "x"], "--workers: expected a positive integer"),
    (["build", "--load-bucket-ratio", "1", "x"], "--load-bucket-ratio"),
    (["build", "--kafka", "127.0.0.1:1", "--start", "soon"], "--start: expected"),
    (["build", "--bogus"], "usage error"),
])
def test_usage_errors_exit_2_with_one_line(args, message):
    done = run_profile(*args)
    assert done.returncode == 2
    err = done.stderr.decode()
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_missing_file_exits_1_with_one_line(tmp_path):
    done = run_profile("build", str(tmp_path / "nope.jsonl"))
    assert done.returncode == 1
    assert "nope.jsonl" in done.stderr.decode()


def test_a_broker_that_cannot_be_reached_is_one_error_line_and_exit_1(tmp_path):
    done = run_profile("fetch", "--kafka", f"127.0.0.1:{free_port()}", "-o",
                       str(tmp_path / "p.json"))
    assert done.returncode == 1
    err = done.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("owca-profile: error: 127.0.0.1:")
    assert not (tmp_path / "p.json").exists()


# -- a real Dask cluster on loopback ---------------------------------------------------------

class Cluster:
    """`dask scheduler` and `dask worker`s as processes of their own, stopped by pid."""

    def __init__(self, tmp_path, workers=2):
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "dask.log", "ab")
        dask = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
        self.scheduler = subprocess.Popen(
            dask + ["--host", "127.0.0.1", "--port", str(self.port), "--no-dashboard"],
            stdout=self.log, stderr=self.log, env=tool_env(), cwd=ROOT)
        self.workers = [self._worker() for _ in range(workers)]
        from dask.distributed import Client
        self.client = Client(self.address, timeout="60s")
        self.client.wait_for_workers(workers, timeout=60)

    def _worker(self):
        return subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", self.address,
             "--nthreads", "1", "--nworkers", "1", "--no-dashboard", "--no-nanny",
             "--host", "127.0.0.1"],
            stdout=self.log, stderr=self.log, env=tool_env(), cwd=ROOT)

    def worker_address(self, proc) -> str:
        """The address of the worker process `proc` (by its pid)."""
        for address, pid in self.client.run(os.getpid).items():
            if pid == proc.pid:
                return address
        raise AssertionError(f"worker pid {proc.pid} is not registered")

    def close(self):
        self.client.close()
        for proc in self.workers + [self.scheduler]:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.log.close()


@pytest.fixture
def cluster(tmp_path):
    pytest.importorskip("distributed")
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.close()


def fleet_files(tmp_path, copies: int) -> list:
    """The corpus's recordings, `copies` streams each (as many nodes)."""
    paths = []
    for name in sorted(os.listdir(CORPUS)):
        src = os.path.join(CORPUS, name, "recording.jsonl.gz")
        paths += [src] * copies
    return paths + [write_lines(tmp_path / "flagged.jsonl",
                                node_frames("node-f", flagged=set(range(10, 15))))]


def test_the_cluster_run_equals_the_local_run(tmp_path, cluster):
    files = fleet_files(tmp_path, 1)
    local = built(tmp_path, "local.json", "build", *files)
    remote = built(tmp_path, "remote.json", "build", "--scheduler", cluster.address, *files)
    assert remote["built"]["workers"] == 2 and remote["built"]["engine"].startswith("dask:tcp")
    assert prof.comparable(remote) == prof.comparable(local)
    assert local["workloads"]["nginx"] and local["bad_neighbours"]


def test_a_worker_killed_mid_job_is_survived_with_the_same_result(tmp_path, cluster):
    files = fleet_files(tmp_path, 4)
    local = built(tmp_path, "local.json", "build", *files)
    out = tmp_path / "remote.json"
    job = subprocess.Popen(tool_command("profile", "build", "-o", str(out), "--scheduler",
                                        cluster.address, "--partitions", "16", *files),
                           stderr=subprocess.PIPE, env=tool_env(), cwd=ROOT)
    victim = cluster.workers[0]
    address = cluster.worker_address(victim)
    killed = threading.Event()

    def busy():
        # The job's tasks are on the victim now: it dies in the middle of them.
        return bool(cluster.client.processing().get(address)) or job.poll() is not None

    wait_for(busy, 120, "a task of the job on the first worker", step=0.01)
    if job.poll() is None:
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed.set()
    err = job.communicate(timeout=300)[1].decode()
    assert killed.is_set(), "the job ended before the worker could be killed"
    assert job.returncode == 0, err
    assert address not in cluster.client.scheduler_info()["workers"]
    assert prof.comparable(json.loads(out.read_text())) == prof.comparable(local)


# -- Kafka: the nodes' cycles in, the profile out and back ----------------------------------

def ship_config(tmp_path, bootstrap) -> str:
    path = tmp_path / "ship.yaml"
    path.write_text("ship:\n  storages:\n    - !KafkaStorage\n"
                    f"      bootstrap_servers: [{bootstrap}]\n"
                    f"      spool_directory: {tmp_path / 'spool'}\n"
                    "      send_timeout_seconds: 5\n      retry_backoff_seconds: 0.1\n")
    return str(path)


def test_kafka_build_equals_the_file_build_and_fetch_gives_the_published_profile(
        tmp_path, broker):  # noqa: F811
    streams = [node_frames("node-a", flagged=set(range(12, 16)), noise=0.2),
               node_frames("node-b", sli=0.03, noise=0.1)]
    config = ship_config(tmp_path, broker.bootstrap)
    for i, stream in enumerate(streams):
        ship = ShipProcess(config, str(tmp_path / f"ship{i}.log"))
        try:
            ship.send(*stream)
            assert ship.finish() == 0, ship.log()
        finally:
            ship.close()
    files = [write_lines(tmp_path / f"n{i}.jsonl", s) for i, s in enumerate(streams)]
    from_files = built(tmp_path, "files.json", "build", *files)
    from_kafka = built(tmp_path, "kafka.json", "build", "--kafka", broker.bootstrap,
                       "--publish", "--profile-topic", "profiles_test")
    assert prof.comparable(from_kafka) == prof.comparable(from_files)
    topics = from_kafka["source"]["topics"]
    assert set(topics) == {"owca_metrics", "owca_anomalies"}
    assert sum(end - start for parts in topics.values() for start, end in parts.values()) \
        == sum(len(s) for s in streams)
    fetched = built(tmp_path, "fetched.json", "fetch", "--kafka", broker.bootstrap,
                    "--profile-topic", "profiles_test")
    assert prof.comparable(fetched) == prof.comparable(from_kafka)
    # A range: from the second message of each partition on, fewer cycles.
    later = built(tmp_path, "later.json", "build", "--kafka", broker.bootstrap,
                  "--start", "1")
    assert later["totals"]["task_cycles"] < from_kafka["totals"]["task_cycles"]


def test_the_exposition_gives_the_nested_metrics_back():
    from owca.ship.exposition import Formatter
    frame = node_frames("h", cycles=1)[0]
    frame["tasks"]["/web-1"]["metrics"]["task_pressure_stall_seconds"] = {
        "cpu": {"some": 1.5, "full": 0.5}}
    text = Formatter().format(frame).render()
    cycle = from_exposition(text, "h", 1, frame["ts"], "metrics", Options())
    assert cycle["tasks"]["/web-1"]["metrics"]["task_pressure_stall_seconds"] == {
        "cpu": {"some": 1.5, "full": 0.5}}
    assert cycle["tasks"]["/web-1"]["workload"] == "web"


# -- owca-detect with a profile ----------------------------------------------------------------

def profile_doc(centre: float, spread: float = 0.1, count: int = 100) -> dict:
    entry = {"count": count, "centre": centre, "spread": spread, "quantiles": {}}
    return {"format": "owca-profile", "version": 1,
            "options": {"load_bucket_ratio": 1.25, "workload_label": "workload"},
            "source": {}, "built": {}, "totals": {},
            "workloads": {"web": {"unknown": {"all": {"sli": entry}}}},
            "bad_neighbours": [{"victim_workload": "web", "antagonist_workload": "batch",
                                "count": 3, "cycles": 9, "share": 0.75,
                                "confidence": 0.3, "detector_confidence": 0.5}]}


def detect(tmp_path, frames_, profile=None, name="d.yaml"):
    config = tmp_path / name
    extra = f"    profile: {json.dumps(str(profile))}\n" if profile else ""
    config.write_text("detect:\n  detector: !ContentionDetector\n"
                      "    report_unexplained: true\n" + extra)
    data = b"".join(frames.encode(f) for f in frames_ if f["kind"] == "measurements")
    done = subprocess.run(tool_command("detect", "--no-timing", "-c", str(config)),
                          input=data, capture_output=True, env=tool_env(), cwd=ROOT,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return [json.loads(line) for line in done.stdout.splitlines()
            if b'"kind":"anomalies"' in line]


def degraded_young_task() -> list:
    """A task whose SLI is 5x the fleet's from its first cycle on: its own history
    holds nothing else."""
    return node_frames("node-y", cycles=12, sli=0.05)


def test_a_young_task_is_judged_against_the_fleet_and_flagged(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_doc(math.log(0.01))))
    alone = detect(tmp_path, degraded_young_task())
    assert not any(f["anomalies"] for f in alone)       # its own normal is the degradation
    fleet = detect(tmp_path, degraded_young_task(), path, "p.yaml")
    flagged = [f["seq"] for f in fleet if f["anomalies"]]
    assert flagged and flagged[0] <= 4
    samples = {(s["name"], tuple(sorted(s.get("labels", {}).items())))
               for s in fleet[2]["metrics"]}
    assert ("contention_fleet_prior", (("signal", "sli"), ("task_id", "/web-1"))) in samples
    assert ("fleet_bad_neighbour_share", (("antagonist_workload", "batch"),
                                          ("victim_workload", "web"))) in samples


def test_a_task_the_fleet_knows_as_normal_is_not_flagged(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_doc(math.log(0.05))))
    fleet = detect(tmp_path, degraded_young_task(), path, "p.yaml")
    assert not any(f["anomalies"] for f in fleet)


def test_without_a_workload_in_the_profile_the_output_is_as_without_a_profile(tmp_path):
    doc = profile_doc(math.log(0.01))
    doc["workloads"] = {"other": doc["workloads"]["web"]}
    doc["bad_neighbours"] = []
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(doc))
    stream = node_frames("n", cycles=40, flagged=set(range(20, 30)))
    alone, fleet = detect(tmp_path, stream), detect(tmp_path, stream, path, "p.yaml")

    def without_profile_samples(fs):
        return [{**f, "metrics": [s for s in f["metrics"]
                                  if not s["name"].startswith("contention_profile_")]}
                for f in fs]
    assert without_profile_samples(fleet) == without_profile_samples(alone)


def test_a_changed_profile_is_read_again_and_a_broken_one_keeps_the_last(tmp_path):
    from owca.detect.detectors.contention import ContentionDetector
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile_doc(math.log(0.01))))
    det = ContentionDetector(profile=str(path))
    assert det._prior.normal("web", "unknown", "all", "sli")[0] == pytest.approx(math.log(0.01))
    path.write_text(json.dumps(profile_doc(math.log(0.02), count=101)))
    det._prior.refresh()
    assert det._prior.normal("web", "unknown", "all", "sli")[0] == pytest.approx(math.log(0.02))
    path.write_text("{broken")
    det._prior.refresh()
    assert det._prior.errors == 1 and det._prior.loads == 2
    assert det._prior.normal("web", "unknown", "all", "sli")[0] == pytest.approx(math.log(0.02))


@pytest.mark.parametrize("content, message", [
    (None, "No such file"),
    ("{}", "not an owca profile"),
    (json.dumps({**profile_doc(0.0), "version": 9}), "profile version 9"),
    (json.dumps({**profile_doc(0.0), "options": {"load_bucket_ratio": 1.5}}),
     "load_bucket_ratio 1.5"),
])
def test_a_bad_profile_at_the_start_is_a_configuration_error(tmp_path, content, message):
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    config = tmp_path / "d.yaml"
    config.write_text(f"detect:\n  detector: !ContentionDetector\n    profile: {path}\n")
    done = subprocess.run(tool_command("detect", "--check-config", "-c", str(config)),
                          capture_output=True, env=tool_env(), cwd=ROOT, timeout=60,
                          check=False)
    assert done.returncode == 2
    assert message in done.stderr.decode() and "d.yaml:" in done.stderr.decode()
