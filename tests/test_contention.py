"""!ContentionDetector on synthetic streams: what it must flag, and what it must not.

The streams are made here, cycle by cycle, from a small model of an HP service (its p99
latency and run-queue delay grow with its load and with contention) and of best-effort
tasks (their CPU, memory and cache-miss counters), with seeded noise: what a detector
sees from owca-measure, without a host's own noise.  The lab's recordings (docs/
detection.md) score it on real contention; these tests pin its logic.  Time is counted in
cycles (intervals), never on the wall clock.
"""
import json
import math
import random
import subprocess

import pytest

from conftest import FIXTURES, ROOT, tool_command, tool_env
from owca.core import frames
from owca.core.config import ConfigError, load_section
from owca.detect.detectors.contention import ContentionDetector
from owca.detect.stage import DetectConfig
from owca.plugin import anomaly_dicts, plugin_inputs
from owca.core.priority import PriorityRule

DT = 2.0
HP, HOG, DECOY, NOISY = "/lab/hp", "/lab/hog", "/lab/decoy", "/lab/noisy"


class Stream:
    """Cumulative counters for a node of an HP task and best-effort tasks."""

    def __init__(self, seed=1, noise=0.1, apm=True, run_queue=True, psi=False, pmu=False,
                 rdt=False):
        self.rng = random.Random(seed)
        self.noise, self.apm, self.run_queue, self.psi, self.pmu = noise, apm, run_queue, psi, pmu
        self.rdt = rdt
        self.seq = 0
        self.counters = {}

    def _add(self, tid, name, amount):
        self.counters[(tid, name)] = self.counters.get((tid, name), 0.0) + amount
        return self.counters[(tid, name)]

    def _jitter(self, scale=1.0):
        return math.exp(self.rng.gauss(0.0, self.noise * scale))

    def frame(self, load=1000.0, slow=1.0, queue=0.0, cost=1.0, misses=1.0, be=None,
              hp_labels=None, scaling=1.0, sli=True, hidden=0.0):
        """One measurements frame.  slow: latency factor of contention; queue: extra
        threads waiting; cost: CPU per request factor; misses: the HP's MPKI factor;
        be: {task_id: {"cpu": cores, "mem": bytes, "misses": per second}}; hidden: requests
        per second the wrapper does not see (other clients)."""
        self.seq += 1
        ts = 1800000000.0 + self.seq * DT
        seen, load = load, load + hidden
        cpu = 0.0004 * load * cost * self._jitter(0.3)
        hp = {"task_cpu_usage_seconds": self._add(HP, "cpu", cpu * DT),
              "task_mem_usage_bytes": 200e6, "task_up": 1, "task_last_seen": ts,
              "task_mem_page_faults": self._add(HP, "faults", 10 * DT)}
        if self.apm:
            hp["apm_load_target_rate_per_second"] = seen
            hp["apm_throughput_per_second"] = seen
            hp["apm_report_timestamp_seconds"] = ts - 0.5
            if sli:
                p99 = 0.002 * (1 + (load / 1000.0) ** 2) * slow * self._jitter()
                hp["apm_latency_p99_seconds"] = hp["apm_sli"] = p99
        if self.run_queue:
            wait = (0.02 * load / 1000.0 + queue) * self._jitter()
            hp["task_run_queue_delay_seconds"] = self._add(HP, "rq", wait * DT)
        if self.psi:
            stall = (0.01 * load / 1000.0 + queue / 2) * self._jitter()
            hp["task_pressure_stall_seconds"] = {
                "cpu": {"some": self._add(HP, "psi_cpu", stall * DT)},
                "memory": {"some": self._add(HP, "psi_mem", 0.001 * DT)},
                "io": {"some": self._add(HP, "psi_io", 0.0)}}
        if self.pmu:
            instructions = 2e9 * cpu * DT
            hp["task_instructions"] = self._add(HP, "ins", instructions)
            hp["task_cycles"] = self._add(HP, "cyc", instructions * 0.8 * cost *
                                          self._jitter(0.3))
            hp["task_cache_misses"] = self._add(HP, "miss", instructions * 0.002 * misses *
                                                self._jitter(0.3))
            hp["task_scaling_factor_max"] = scaling
        if self.rdt:  # the victim's L3 share shrinks as its misses grow
            hp["task_llc_occupancy_bytes"] = 8e6 / misses * self._jitter(0.2)
        tasks = {HP: {"name": "hp", "labels": hp_labels or {"priority": "hp"},
                      "metrics": hp}}
        for tid, use in sorted((be or {}).items()):
            m = {"task_cpu_usage_seconds": self._add(tid, "cpu", use.get("cpu", 0.0) * DT),
                 "task_mem_usage_bytes": use.get("mem", 50e6), "task_up": 1,
                 "task_last_seen": ts,
                 "task_mem_page_faults": self._add(tid, "faults", 5 * DT)}
            if self.pmu:
                m["task_cache_misses"] = self._add(tid, "miss", use.get("misses", 1e5) * DT)
            if self.rdt:
                m["task_llc_occupancy_bytes"] = use.get("llc", 1e5)
            tasks[tid] = {"name": tid.rsplit("/", 1)[-1], "labels": {"priority": "be"},
                          "metrics": m}
        return frames.measurements_frame(self.seq, {"platform_topology_cpus": 4}, tasks,
                                         ts=ts, host="n1")


def run(detector, stream_frames):
    """[(anomalies as dicts, extra metrics)] per cycle."""
    out = []
    for f in stream_frames:
        anomalies, extra = detector.detect(*plugin_inputs(f))
        out.append((anomaly_dicts(anomalies), extra))
    return out


def flagged(results):
    """Cycles in which the HP task was flagged: an anomaly, or a degradation that no task
    explains (reported as a metric, not as contention)."""
    return [i for i, (anomalies, extra) in enumerate(results)
            if any(a["contended_task_id"] == HP for a in anomalies)
            or sample_values(extra, "contention_unexplained", task_id=HP)]


def sample_values(extra, name, **labels):
    return [s["value"] for s in extra if s["name"] == name
            and all(s["labels"].get(k) == v for k, v in labels.items())]


def quiet_be(i):
    """A hog idling and a decoy working steadily (benign), as in the lab."""
    return {HOG: {"cpu": 0.01}, DECOY: {"cpu": 0.6 + 0.05 * math.sin(i)}}


def cpu_episode(s, n=60, start=30, stop=45, load=lambda i: 1000.0):
    out = []
    for i in range(n):
        on = start <= i < stop
        be = quiet_be(i)
        if on:
            be[HOG] = {"cpu": 1.8}
        out.append(s.frame(load=load(i), slow=4.0 if on else 1.0, queue=0.5 if on else 0.0,
                           be=be))
    return out


def test_a_cpu_step_is_flagged_named_cpu_and_blamed_on_the_hog_not_the_decoy():
    results = run(ContentionDetector(), cpu_episode(Stream()))
    hits = flagged(results)
    assert hits and hits[0] in (30, 31)  # persistence: corroborated at once, else two
    assert set(range(31, 45)) <= set(hits)
    assert max(hits) <= 46  # cleared with hysteresis once it stops
    assert all(i >= 30 for i in hits)  # nothing before the step
    a = results[35][0][0]
    assert a["resource"] == "cpu"  # the run-queue delay moved with the latency
    assert a["contending_task_ids"] == [HOG]
    confidence = [s["value"] for s in a["metrics"] if s["name"] == "contention_confidence"]
    assert confidence[0] > 0.5


def test_the_anomaly_keeps_its_uuid_through_the_episode():
    results = run(ContentionDetector(), cpu_episode(Stream()))
    uuids = {a["uuid"] for i in range(33, 45) for a in results[i][0]}
    assert len(uuids) == 1


def test_a_ramp_of_contention_is_flagged_before_it_is_learnt_as_normal():
    s = Stream(seed=2)
    frames_ = []
    for i in range(70):
        grow = max(0.0, min(1.0, (i - 30) / 20.0))  # 1x to 4x over 20 cycles
        be = quiet_be(i)
        be[HOG] = {"cpu": 0.01 + 1.8 * grow}
        frames_.append(s.frame(slow=1 + 3 * grow, queue=0.5 * grow, be=be))
    results = run(ContentionDetector(), frames_)
    hits = flagged(results)
    assert hits and 30 < hits[0] < 50
    assert set(range(50, 70)) <= set(hits)  # once flagged it is not learnt away
    assert results[60][0][0]["contending_task_ids"] == [HOG]


def test_a_load_surge_alone_is_not_contention():
    """The latency and run-queue delay rise with the load, nobody else moves: a surge to a
    load already seen is judged against that load's normal; one to a load never seen is
    not judged until that load has a history (and says why meanwhile)."""
    s = Stream(seed=3)
    seen = [s.frame(load=1000.0 + 800.0 * (i % 10) / 9, be=quiet_be(i)) for i in range(80)]
    surge = [s.frame(load=1800.0, be=quiet_be(i)) for i in range(20)]
    unseen = [s.frame(load=4000.0, be=quiet_be(i)) for i in range(20)]
    det = ContentionDetector()
    results = run(det, seen + surge + unseen)
    assert flagged(results) == []
    undecided = [sample_values(extra, "contention_undecided", task_id=HP, reason="history")
                 for _, extra in results[100:]]
    assert undecided[:det.min_history] == [[1]] * det.min_history
    assert undecided[det.min_history:] == [[]] * (20 - det.min_history)


def test_without_load_conditioning_the_same_surge_would_be_flagged():
    """The previous test is not vacuous: with one bucket for every load (no load metric
    read), the surge's latency is far above normal."""
    s = Stream(seed=3)
    stream_ = [s.frame(load=1000.0, be=quiet_be(i)) for i in range(60)]
    stream_ += [s.frame(load=2500.0, be=quiet_be(i)) for i in range(20)]
    assert flagged(run(ContentionDetector(load_metric="none"), stream_))
    assert flagged(run(ContentionDetector(), stream_)) == []


def test_a_noisy_baseline_gives_no_alarm_but_a_real_episode_still_does():
    s = Stream(seed=4, noise=0.35)
    stream_ = [s.frame(load=1000.0 + 300 * math.sin(i / 7), be=quiet_be(i))
               for i in range(300)]
    results = run(ContentionDetector(), stream_)
    assert all(anomalies == [] for anomalies, _ in results)
    # Noise does cross the CUSUM now and then; no task's usage follows it, and it is
    # short-lived.
    assert len(flagged(results)) < 0.1 * len(results)
    s = Stream(seed=4, noise=0.35)
    results = run(ContentionDetector(), cpu_episode(s, n=80, start=60, stop=75))
    hits = flagged(results)
    assert hits and min(hits) >= 60 and len(set(range(60, 76)) & set(hits)) >= 10


def test_one_bad_interval_is_not_an_episode():
    s = Stream(seed=5)
    stream_ = [s.frame(slow=6.0 if i == 40 else 1.0, be=quiet_be(i)) for i in range(60)]
    assert flagged(run(ContentionDetector(), stream_)) == []
    # With less evidence needed the same interval is flagged: that is what held it back.
    s = Stream(seed=5)
    stream_ = [s.frame(slow=6.0 if i == 40 else 1.0, be=quiet_be(i)) for i in range(60)]
    hits = flagged(run(ContentionDetector(evidence=3), stream_))
    assert hits[0] == 40 and max(hits) <= 43  # then hysteresis clears it


def test_too_little_history_is_refused_and_counted():
    s = Stream(seed=6)
    stream_ = [s.frame(slow=5.0 if i < 6 else 1.0, be=quiet_be(i)) for i in range(6)]
    results = run(ContentionDetector(min_history=8), stream_)
    assert flagged(results) == []
    last = results[-1][1]
    assert sample_values(last, "contention_undecided", task_id=HP, reason="history") == [1]
    assert sample_values(last, "contention_undecided_total", reason="history") == [6]


def test_a_task_with_no_sli_is_judged_on_its_stalls():
    s = Stream(seed=7, apm=False, psi=True)
    results = run(ContentionDetector(), cpu_episode(s))
    hits = flagged(results)
    assert hits and min(hits) >= 30 and set(range(32, 45)) <= set(hits)
    assert results[40][0][0]["resource"] == "cpu"
    assert results[40][0][0]["contending_task_ids"] == [HOG]


def test_a_task_with_nothing_to_judge_by_is_never_flagged_and_says_so():
    s = Stream(seed=8, apm=False, run_queue=False)
    results = run(ContentionDetector(), cpu_episode(s))
    assert flagged(results) == []
    assert all(sample_values(extra, "contention_undecided", task_id=HP,
                             reason="no_signal") == [1] for _, extra in results)


def test_an_sli_that_goes_missing_is_not_replaced_by_side_signals():
    """A task whose SLI stops coming (wrapper down) is undecided, not judged on its
    run-queue delay alone, and a flag is not kept up on old evidence."""
    s = Stream(seed=9)
    stream_ = [s.frame(be=quiet_be(i)) for i in range(30)]
    stream_ += [s.frame(slow=4.0, queue=0.5, be=quiet_be(i), sli=False) for i in range(10)]
    results = run(ContentionDetector(), stream_)
    assert flagged(results) == []
    assert sample_values(results[-1][1], "contention_undecided", task_id=HP,
                         reason="missing") == [1]


def test_a_stale_apm_report_is_not_new_evidence():
    s = Stream(seed=10)
    stream_ = [s.frame(be=quiet_be(i)) for i in range(30)]
    f = s.frame(be=quiet_be(30))
    stale = json.loads(json.dumps(f))
    stale["seq"] += 1
    m = stale["tasks"][HP]["metrics"]
    m["task_last_seen"] += DT
    results = run(ContentionDetector(), stream_ + [f, stale])
    assert sample_values(results[-1][1], "contention_undecided", task_id=HP,
                         reason="stale") == [1]


def test_multiplexed_perf_counters_are_not_used_and_say_so():
    s = Stream(seed=11, pmu=True)
    stream_ = [s.frame(load=3000.0, scaling=3.0, be=quiet_be(i)) for i in range(30)]
    results = run(ContentionDetector(), stream_)
    refused = [s_["labels"]["signal"] for s_ in results[-1][1]
               if s_["name"] == "contention_signal_refused"
               and s_["labels"]["reason"] == "multiplexed"]
    assert sorted(refused) == ["cpi", "mpki"]


def llc_episode(s, scaling=1.0, misses=3.0):
    out = []
    for i in range(60):
        on = 40 <= i < 55
        be = quiet_be(i)
        be[HOG] = {"cpu": 0.9 if on else 0.01, "misses": 5e7 if on else 1e4}
        # The victim's own misses rise (its lines evicted) and so does its CPI; it does not
        # wait longer for a CPU.
        out.append(s.frame(load=3000.0, slow=3.0 if on else 1.0, cost=1.6 if on else 1.0,
                           misses=misses if on else 1.0, be=be, scaling=scaling))
    return out


def test_with_a_pmu_more_misses_per_instruction_name_the_llc():
    results = run(ContentionDetector(), llc_episode(Stream(seed=12, pmu=True)))
    hits = flagged(results)
    assert hits and min(hits) >= 40
    a = results[50][0][0]
    assert a["resource"] == "llc" and a["contending_task_ids"] == [HOG]


def test_without_a_pmu_a_slower_memory_hierarchy_is_unknown_not_a_guess():
    """The cost per request rose (a CPU-time proxy of CPI), nothing says whether the cache
    or the bandwidth was taken: `unknown`, the hog still named."""
    results = run(ContentionDetector(), llc_episode(Stream(seed=12, pmu=False)))
    a = results[50][0][0]
    assert a["resource"] == "unknown" and a["contending_task_ids"] == [HOG]
    # Counted but multiplexed beyond the limit, the counters do not name it either.
    results = run(ContentionDetector(), llc_episode(Stream(seed=12, pmu=True), scaling=4.0))
    assert results[50][0][0]["resource"] == "unknown"


def test_a_contender_that_appears_mid_run_is_named_and_state_is_bounded():
    s = Stream(seed=13)
    stream_ = []
    for i in range(200):
        be = {DECOY: {"cpu": 0.6}}
        # Short-lived batch tasks come and go, one new id every cycle.
        be[f"/lab/batch-{i}"] = {"cpu": 0.2}
        on = 120 <= i < 135
        if on:
            be[HOG] = {"cpu": 1.9}  # did not exist before
        stream_.append(s.frame(slow=4.0 if on else 1.0, queue=0.5 if on else 0.0, be=be))
    det = ContentionDetector(forget_after=10)
    results = run(det, stream_)
    hits = flagged(results)
    assert hits and min(hits) >= 120
    assert results[128][0][0]["contending_task_ids"][0] == HOG
    tracked = [sample_values(extra, "contention_tracked_tasks")[0] for _, extra in results]
    # The HP, the decoy, the hog and the last forget_after batch tasks at most.
    assert max(tracked) <= 3 + 10
    # After the hog vanished, it is forgotten too.
    assert tracked[-1] <= 2 + 10


def test_tasks_without_priority_hp_are_not_protected_unless_a_rule_says_so():
    s = Stream(seed=14)
    stream_ = []
    for i in range(40):
        on = 30 <= i < 40
        be = quiet_be(i)
        if on:
            be[HOG] = {"cpu": 1.8}
        stream_.append(s.frame(slow=4.0 if on else 1.0, queue=0.5 if on else 0.0, be=be,
                               hp_labels={"role": "latency-critical"}))
    assert flagged(run(ContentionDetector(), stream_)) == []
    rule = PriorityRule(roles=["latency-critical"])
    assert flagged(run(ContentionDetector(priority=rule), stream_))


def test_load_buckets_are_bounded():
    s = Stream(seed=15)
    det = ContentionDetector(max_load_buckets=4)
    run(det, [s.frame(load=100.0 * 1.3 ** (i % 20), be=quiet_be(i)) for i in range(100)])
    assert len(det._tasks[HP].baseline.buckets) == 4


@pytest.mark.integration
def test_bad_parameters_fail_at_start_with_file_and_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("detect:\n  detector: !ContentionDetector\n"
                      "    threshold: 2\n    clear_threshold: 3\n")
    with pytest.raises(ConfigError) as e:
        load_section(str(config), "detect", DetectConfig)
    assert "c.yaml:4" in str(e.value) and "clear_threshold" in str(e.value)
    result = subprocess.run(tool_command("detect", "-c", str(config)), input=b"",
                            capture_output=True, env=tool_env(), cwd=ROOT, timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode().count("\n") == 1


def replay(config, stdin: bytes) -> bytes:
    result = subprocess.run(tool_command("detect", "--no-timing", "-c", str(config)),
                            input=stdin, capture_output=True, env=tool_env(), cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.integration
def test_replay_is_byte_identical(tmp_path):
    """The same configuration over the same stream gives the same anomalies frames: twice
    on a synthetic stream with an episode, and twice on the recorded scenario."""
    config = tmp_path / "c.yaml"
    config.write_text("detect:\n  detector: !ContentionDetector\n"
                      "    priority: !PriorityRule {roles: [hp]}\n")
    synthetic = b"".join(frames.encode(f) for f in cpu_episode(Stream()))
    with open(f"{FIXTURES}/scenario_nginx_cpu_membw/recording.jsonl", "rb") as f:
        recorded = b"".join(line for line in f if b'"kind":"anomalies"' not in line)
    for stream_ in (synthetic, recorded):
        first, second = replay(config, stream_), replay(config, stream_)
        assert first == second
        anomalies = [json.loads(line) for line in first.splitlines()
                     if b'"kind":"anomalies"' in line]
        assert any(f["anomalies"] for f in anomalies)  # something to compare


def test_every_metric_it_emits_is_registered():
    from owca.core.metrics import REGISTRY
    results = run(ContentionDetector(), cpu_episode(Stream()))
    names = {s["name"] for anomalies, extra in results for s in extra}
    names |= {s["name"] for anomalies, _ in results for a in anomalies for s in a["metrics"]}
    assert "contention_contender_score" in names and "contention_undecided" in names
    assert names - set(REGISTRY) == set()


def test_the_lab_configuration_loads():
    cfg = load_section(f"{ROOT}/configs/examples/contention-lab.yaml", "detect",
                       DetectConfig)
    assert isinstance(cfg.detector, ContentionDetector)
    assert cfg.detector._is_hp({"role": "hp"}) and not cfg.detector._is_hp({"role": "be"})


def test_a_degradation_nobody_explains_is_not_called_contention():
    """The service slows down (a noisy host, its own change) while every best-effort task
    keeps its usage: flagged, reported as unexplained, no contention anomaly unless the
    configuration asks for those too."""
    def stream_():
        s = Stream(seed=16)
        return [s.frame(slow=4.0 if 30 <= i < 40 else 1.0, be=quiet_be(i))
                for i in range(45)]
    results = run(ContentionDetector(), stream_())
    assert set(range(31, 40)) <= set(flagged(results))
    assert all(anomalies == [] for anomalies, _ in results)
    assert sample_values(results[35][1], "contention_unexplained", task_id=HP,
                         resource="unknown") == [1]
    results = run(ContentionDetector(report_unexplained=True), stream_())
    a = results[35][0][0]
    assert a["contending_task_ids"] == [] and a["resource"] == "unknown"


@pytest.mark.integration
def test_on_the_recorded_scenario_both_antagonists_are_found_and_nothing_else():
    """A real recording (nginx; a CPU hog, then a memory-bandwidth hog on its core). Its
    stream has only the latency and CPU time: the antagonists are named, the resource is
    `unknown` (no run-queue delay, PSI or PMU to say which), and no anomaly falls outside
    the antagonists' windows (plus the report's lag and the hysteresis)."""
    here = f"{FIXTURES}/scenario_nginx_cpu_membw"
    with open(f"{here}/ground_truth.json") as f:
        truth = json.load(f)
    with open(f"{here}/recording.jsonl", "rb") as f:
        recorded = b"".join(line for line in f if b'"kind":"anomalies"' not in line)
    out = replay(f"{ROOT}/configs/examples/contention-lab.yaml", recorded)
    found = [json.loads(line) for line in out.splitlines() if b'"kind":"anomalies"' in line]
    slack = 3 * truth["interval"]
    named = set()
    for frame in found:
        for a in frame["anomalies"]:
            windows = [x for x in truth["antagonists"]
                       if x["start_ts"] <= frame["ts"] <= x["stop_ts"] + slack]
            assert windows, f"an anomaly at {frame['ts']} outside every antagonist's window"
            assert a["resource"] == "unknown"
            assert a["contending_task_ids"][0] == windows[0]["task_id"]
            named.add(windows[0]["name"])
    assert named == {"cpu", "membw"}


def test_overlapping_antagonists_are_both_named_and_the_blame_follows_them():
    """A CPU hog, then a second task that makes each request costlier (a memory hog on
    another core) while the first still runs; the first stops, the second goes on; a
    decoy starts a benign phase with the first."""
    hog2 = "/lab/hog2"
    s = Stream(seed=20)
    stream_ = []
    for i in range(80):
        first, second = 30 <= i < 50, 40 <= i < 60
        be = quiet_be(i)
        be[hog2] = {"cpu": 0.9 if second else 0.02}
        if first:
            be[HOG] = {"cpu": 1.8}
        if 30 <= i < 70:
            be[DECOY] = {"cpu": 0.8 + 0.05 * math.sin(i)}
        stream_.append(s.frame(load=3000.0, slow=(4.0 if first else 1) * (2 if second else 1),
                               queue=0.5 if first else 0.0, cost=1.5 if second else 1.0,
                               be=be))
    results = run(ContentionDetector(), stream_)
    assert set(range(30, 60)) <= set(flagged(results))
    assert results[35][0][0]["contending_task_ids"] == [HOG]
    assert results[35][0][0]["resource"] == "cpu"
    assert results[47][0][0]["contending_task_ids"] == [HOG, hog2]
    later = results[57][0][0]
    assert later["contending_task_ids"] == [hog2]
    assert later["resource"] == "unknown"  # costlier requests, no PMU to say why
    assert all(DECOY not in a["contending_task_ids"] for r in results for a in r[0])


def test_a_surge_the_wrapper_does_not_see_is_the_task_s_own_doing():
    """Other clients double the service's load; its target rate does not show it, its
    latency and run-queue delay rise, and so does its own CPU use while no best-effort
    task's changes: not contention."""
    s = Stream(seed=21)
    stream_ = [s.frame(load=1000.0, hidden=1500.0 if 30 <= i < 45 else 0.0, be=quiet_be(i))
               for i in range(60)]
    results = run(ContentionDetector(), stream_)
    assert all(anomalies == [] for anomalies, _ in results)
    assert set(range(31, 45)) <= set(flagged(results))  # degraded it was, and says so
    assert sample_values(results[40][1], "contention_unexplained", task_id=HP,
                         cause="own_usage") == [1]


def test_odd_values_and_counter_resets_are_left_out_not_fatal():
    s = Stream(seed=22)
    stream_ = [s.frame(be=quiet_be(i)) for i in range(30)]
    odd = json.loads(json.dumps(s.frame(be=quiet_be(30))))
    m = odd["tasks"][HP]["metrics"]
    m["apm_sli"] = "slow"                         # not a number
    m["task_run_queue_delay_seconds"] = 0.0        # the counter restarted
    m["task_pressure_stall_seconds"] = {"cpu": 3}  # not nested as documented
    m["apm_load_target_rate_per_second"] = -5      # no bucket for that: one for all
    results = run(ContentionDetector(), stream_ + [odd, s.frame(be=quiet_be(31))])
    assert flagged(results) == []
    assert sample_values(results[30][1], "contention_undecided", task_id=HP,
                         reason="missing") == [1]


# -- the lab's corpus -------------------------------------------------------------------------

def documented_scores():
    """{recording or "overall": {column: text}}: the detector's rows of docs/detection.md."""
    with open(f"{ROOT}/docs/detection.md") as f:
        text = f.read()
    section = text[text.index("## Scores on the lab's corpus"):text.index("## Baselines")]
    rows, header = {}, None
    for line in section.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == "detector":
            header = cells
        elif header and cells[0] == "ContentionDetector":
            rows[cells[1]] = dict(zip(header[2:], cells[2:]))
    return rows


@pytest.mark.integration
def test_the_scores_on_the_corpus_are_the_documented_ones():
    """Replayed through the real owca-detect and scored by the lab's scorer: every figure
    of the detector's rows in docs/detection.md, to the digits printed there."""
    from test_corpus import CORPUS, formatted, scoring
    documented = documented_scores()
    results = scoring.score_dirs([CORPUS], f"{ROOT}/configs/examples/contention-lab.yaml")
    assert len(results) == len(documented) - 1 >= 8
    assert documented["overall"] == formatted(scoring.totals([s for _, s, *_ in results]))
    for name, s, *_ in results:
        assert documented[name] == formatted(scoring.totals([s])), name


@pytest.mark.integration
def test_replaying_a_corpus_recording_is_byte_identical():
    from test_corpus import CORPUS, scoring
    config = f"{ROOT}/configs/examples/contention-lab.yaml"
    for name in ("nginx-cpu-llc-memory", "memcached-io-cpu-membw"):
        stream_ = b"\n".join(scoring.read_recording(f"{CORPUS}/{name}")) + b"\n"
        first, second = replay(config, stream_), replay(config, stream_)
        assert first == second
        assert b'"contending_task_ids":["/' in first  # anomalies to compare


def test_a_task_under_the_cpu_floor_is_not_judged_on_its_cost_per_request():
    s = Stream(seed=23)
    stream_ = [s.frame(load=300.0, be=quiet_be(i)) for i in range(12)]  # 0.12 cores
    results = run(ContentionDetector(), stream_)
    refused = {(x["labels"]["signal"], x["labels"]["reason"]) for x in results[-1][1]
               if x["name"] == "contention_signal_refused"}
    assert ("cpu_per_request", "cpu_floor") in refused
    results = run(ContentionDetector(min_cpu=0.05), stream_[:])
    refused = {(x["labels"]["signal"], x["labels"]["reason"]) for x in results[-1][1]
               if x["name"] == "contention_signal_refused"}
    assert ("cpu_per_request", "cpu_floor") not in refused


def test_with_rdt_monitoring_a_lost_cache_share_names_the_llc():
    """No PMU, but resctrl monitoring: the victim holds a third of its usual L3 while
    the hog's occupancy grows, so `llc`, and the hog named on its occupancy."""
    def episode():
        s = Stream(seed=24, rdt=True)
        out = []
        for i in range(60):
            on = 40 <= i < 55
            be = quiet_be(i)
            be[HOG] = {"cpu": 0.9 if on else 0.01, "llc": 2e7 if on else 1e5}
            out.append(s.frame(load=3000.0, slow=3.0 if on else 1.0,
                               cost=1.6 if on else 1.0, misses=3.0 if on else 1.0, be=be))
        return out
    results = run(ContentionDetector(), episode())
    a = results[50][0][0]
    assert a["resource"] == "llc" and a["contending_task_ids"] == [HOG]
