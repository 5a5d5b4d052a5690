"""The controller's scores (workloads/owca_workloads/control_score.py) on a made-up run:
a recording and a ground truth written here, so that every figure is known."""
import json
import os
import sys

import pytest

from conftest import ROOT
from owca.core.kernel import parse_cpu_list

sys.path.insert(0, os.path.join(ROOT, "workloads"))
from owca_workloads import control_score  # noqa: E402

T0 = 1000.0
HP = "/run/web"
BE = "/run/batch"


def write_run(d, pressures, be_cpu, quotas, alone=1.0, refaults=None):
    """One cycle a second from T0: HP pressure, BE CPU seconds (cumulative), BE quota."""
    os.makedirs(d)
    truth = {"version": 1, "kind": "control", "scenario": "s", "config": "controller",
             "interval": 1, "started_ts": T0, "ended_ts": T0 + len(pressures) - 1,
             "hps": [{"task_id": HP, "name": "web", "slo": 0.002,
                      "sli_metric": "apm_latency_p99_seconds"}],
             "antagonists": [{"name": "batch", "task_id": BE, "start_ts": T0 + 10}],
             "surges": [], "be_alone": {"batch": alone},
             "host_load": [{"ts": T0, "other_cores": 0.5, "loadavg1": 1.0},
                           {"ts": T0 + 1, "other_cores": 0.7, "loadavg1": 1.2}]}
    with open(os.path.join(d, "ground_truth.json"), "w") as f:
        json.dump(truth, f)
    with open(os.path.join(d, "recording.jsonl"), "w") as f:
        for i, (p, cpu, q) in enumerate(zip(pressures, be_cpu, quotas)):
            ts = T0 + i
            tasks = {HP: {"labels": {"role": "hp"}, "metrics": {
                         "apm_sli_normalized": 1 / p, "apm_sli": 0.002 * p,
                         "apm_latency_p99_seconds": 0.002 * p,
                         "apm_throughput_per_second": 100 + i}},
                     BE: {"labels": {"role": "be"},
                          "metrics": {"task_cpu_usage_seconds": cpu}}}
            if refaults is not None:
                tasks[HP]["metrics"]["task_mem_workingset_refaults"] = refaults(i)
            f.write(json.dumps({"v": 1, "kind": "measurements", "ts": ts, "seq": i,
                                "platform": {"platform_topology_cpus": 2},
                                "tasks": tasks}) + "\n")
            f.write(json.dumps({"v": 1, "kind": "allocations", "ts": ts, "seq": i,
                                "allocations": {BE: {"cpu_quota": q}} if i and
                                q != quotas[i - 1] else {},
                                "metrics": [{"name": "allocation_cpu_quota", "value": q,
                                             "labels": {"task_id": BE}},
                                            {"name": "slo_controller_rollbacks_total",
                                             "value": 1 if i > 30 else 0}]}) + "\n")


def test_the_scores_of_a_known_run(tmp_path):
    d = str(tmp_path / "run")
    # 60 s: within the SLO but for 3 reports after the BE start at t=10; BE uses half a
    # CPU all along (alone it uses one); its quota steps up twice and down once.
    pressures = [0.5] * 60
    pressures[11:14] = [1.5, 1.3, 1.1]
    quotas = [0.1] * 20 + [0.2] * 20 + [0.3] * 10 + [0.2] * 10
    write_run(d, pressures, [0.5 * i for i in range(60)], quotas)
    s = control_score.score_dir(d)
    assert s["intervals"] == 60
    assert s["within_slo"] == pytest.approx(57 / 60, abs=1e-4)
    assert s["worst_p99_seconds"] == pytest.approx(0.003)
    assert s["recovery_intervals"] == {"batch": 4.0}    # broken at t=11, back at t=14
    assert s["be_work_vs_alone"] == pytest.approx(0.5, abs=0.01)
    assert s["changes"] == 3 and s["rollbacks"] == 1
    # Steady stretches only (t=10..30, the 20 s after the BE start, left out: 9 s + 28 s
    # remain): up at 40, down at 50, one change of sign.
    assert s["sign_changes_per_minute"] == pytest.approx(1 / (37 / 60), abs=0.01)
    assert s["host_other_cores_mean"] == pytest.approx(0.6)


def test_hp_refaults_are_counted_over_the_run_and_absent_where_not_measured(tmp_path):
    write_run(str(tmp_path / "a"), [0.5] * 10, [0.0] * 10, [0.1] * 10,
              refaults=lambda i: {"anon": 2 * i, "file": 100 + 10 * i})
    assert control_score.score_dir(str(tmp_path / "a"))["hp_refault_pages"] == 9 * 12
    write_run(str(tmp_path / "b"), [0.5] * 10, [0.0] * 10, [0.1] * 10)
    assert control_score.score_dir(str(tmp_path / "b"))["hp_refault_pages"] is None


def test_oom_kills_are_the_host_samples_sum_and_absent_where_not_recorded(tmp_path):
    d = str(tmp_path / "run")
    write_run(d, [0.5] * 5, [0.0] * 5, [0.1] * 5)
    assert control_score.score_dir(d)["oom_kills"] is None     # host samples without it
    path = os.path.join(d, "ground_truth.json")
    with open(path) as f:
        truth = json.load(f)
    truth["host_load"][0]["oom_kills"] = 0
    truth["host_load"][1]["oom_kills"] = 2
    with open(path, "w") as f:
        json.dump(truth, f)
    assert control_score.score_dir(d)["oom_kills"] == 2


def test_a_run_that_never_recovers_and_the_table(tmp_path):
    pressures = [0.5] * 12 + [2.0] * 18
    write_run(str(tmp_path / "a"), pressures, [0.0] * 30, [0.1] * 30)
    write_run(str(tmp_path / "b"), [0.5] * 30, [0.25 * i for i in range(30)], [0.1] * 30)
    runs = control_score.find_runs([str(tmp_path)])
    scores = [control_score.score_dir(d) for d in runs]
    assert scores[0]["recovery_intervals"] == {"batch": None}
    assert scores[0]["worst_recovery_intervals"] is None
    table = control_score.format_table(scores)
    row = table.splitlines()[2]
    assert row.startswith("| s | controller | 2 |") and "(1 never)" in row


def test_the_labs_ground_truth_scores_be_work_in_ops(tmp_path):
    d = str(tmp_path / "run")
    write_run(d, [0.5] * 20, [0.1 * i for i in range(20)], [0.1] * 20)
    path = os.path.join(d, "ground_truth.json")
    with open(path) as f:
        truth = json.load(f)
    truth.pop("antagonists")
    truth["phases"] = [
        {"task": "batch", "kind": "aggressive", "start_ts": T0 + 5, "stop_ts": T0 + 15,
         "progress": {"ops": 300, "seconds": 10.0}},
        {"task": "batch", "kind": "benign", "start_ts": T0 + 15, "stop_ts": T0 + 19,
         "progress": {"ops": 100, "seconds": 4.0}},
        {"task": "web", "kind": "surge", "start_ts": T0 + 16, "stop_ts": T0 + 18}]
    truth["be_alone_ops_per_second"] = {"batch": 50.0}
    with open(path, "w") as f:
        json.dump(truth, f)
    s = control_score.score_dir(d)
    assert s["be_ops"] == 400
    assert s["be_work_vs_alone"] == pytest.approx(400 / (50.0 * 14), abs=1e-4)
    assert set(s["recovery_intervals"]) == {"batch", "surge"}


def test_the_plot_has_the_sli_the_be_allocation_and_the_be_work(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (plots only)")
    d = str(tmp_path / "run")
    write_run(d, [0.5] * 20, [0.1 * i for i in range(20)], [0.1] * 10 + [0.2] * 10)
    control_score.score_dir(d, plot_dir=str(tmp_path / "plots"))
    with open(tmp_path / "plots" / f"{tmp_path.name}-run.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(3, 1)
    control_score.panels(axes, control_score.load_run(d))
    assert [ax.get_ylabel() for ax in axes] == ["SLI / SLO", "BE CPUs allowed",
                                                "BE CPU used (cores)"]
    assert max(axes[1].lines[0].get_ydata()) == pytest.approx(0.4)   # 0.2 of 2 CPUs
    plt.close(fig)


def test_the_be_allocation_is_bounded_by_the_be_cpusets_together():
    def cpuset(task, cpus):
        return {"name": "allocation_cpuset_cpus", "value": len(parse_cpu_list(cpus)),
                "labels": {"task_id": task, "cpus": cpus}}

    def quota(task, q):
        return {"name": "allocation_cpu_quota", "value": q, "labels": {"task_id": task}}

    both_on_one = [cpuset("a", "1"), cpuset("b", "1"), quota("a", 1.0), quota("b", 1.0)]
    assert control_score._be_allocation(both_on_one, {"a", "b"}, 4, {}) == 1.0
    capped = [cpuset("a", "0-3"), cpuset("b", "2-3"), quota("a", 0.1), quota("b", 0.1)]
    assert control_score._be_allocation(capped, {"a", "b"}, 4, {}) == pytest.approx(0.8)
    assert control_score._be_allocation([], {"a"}, 2, {"be_cpus": "1"}) == 1.0
    assert control_score._be_allocation(both_on_one, set(), 2, {}) == 0.0


def as_lab_recording(d):
    """The made-up run with the fields the lab's runner also writes (one `hp`, phases
    that end), so that owca-scenario score reads it as a lab recording."""
    path = os.path.join(d, "ground_truth.json")
    with open(path) as f:
        truth = json.load(f)
    truth["hp"] = dict(truth["hps"][0], workload="web")
    truth["antagonists"][0].update(stop_ts=T0 + 30, resource="cpu")
    with open(path, "w") as f:
        json.dump(truth, f)


def test_owca_scenario_score_adds_the_controllers_figures_to_a_run_with_allocations(tmp_path):
    from owca_workloads import score
    d = str(tmp_path / "run")
    pressures = [0.5] * 60
    pressures[11:14] = [1.5, 1.3, 1.1]
    write_run(d, pressures, [0.5 * i for i in range(60)],
              [0.1] * 20 + [0.2] * 20 + [0.3] * 10 + [0.2] * 10)
    as_lab_recording(d)
    (name, s, *_), = score.score_dirs([d], recorded=True)
    assert s["control"] == control_score.score_dir(d)
    assert s["control"]["within_slo"] == pytest.approx(57 / 60, abs=1e-4)
    assert s["control"]["changes"] == 3
    text = score.format_recording(name, s)
    assert "control: within SLO 95%" in text and "changes 3, rollbacks" in text


def test_a_recording_without_allocations_has_no_controller_figures(tmp_path):
    from owca_workloads import score
    d = str(tmp_path / "run")
    write_run(d, [0.5] * 20, [0.1 * i for i in range(20)], [0.1] * 20)
    as_lab_recording(d)
    path = os.path.join(d, "recording.jsonl")
    with open(path) as f:
        kept = [line for line in f if '"kind": "allocations"' not in line]
    with open(path, "w") as f:
        f.writelines(kept)
    (name, s, *_), = score.score_dirs([d], recorded=True)
    assert "control" not in s and "control:" not in score.format_recording(name, s)
