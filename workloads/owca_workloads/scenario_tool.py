"""owca-scenario: record an interference scenario through the real pipeline, with its ground truth; score detectors on recordings.

Usage:
  owca-scenario run [options] [-c FILE] [-r MODULE:CLASS]... SCENARIO
  owca-scenario score [-c FILE] [-r MODULE:CLASS]... [--recorded] [--plot DIR] [--json] DIR...
  owca-scenario summarize [--metric NAME] [--json] DIR
  owca-scenario stop DIR
  owca-scenario (-h | --help | --version)

Commands:
  run        Start the scenario's HP workloads and every BE task, calibrate the HPs' SLOs
             on this host, start the pipeline (owca-discover | owca-measure | owca-detect
             [| owca-allocate] | tee | owca-ship) and the load, play the BE tasks' phases
             and the load surges at their times, and leave in the output directory
             recording.jsonl (the stream after owca-detect/owca-allocate),
             ground_truth.json, scenario.yaml, metrics.prom, logs/ and a summary.
  score      Replay each recording (DIR: a recording directory, or a directory of them)
             through owca-detect with -c and -r (or, with the option --recorded, take
             its own anomalies), and print per episode and overall: recall, precision, time to
             detect, resource and antagonist named, false alarms per hour in quiet and
             surge intervals, the share of SLI reports within the SLO and the BE work;
             for a recording with allocations frames (owca-allocate in its pipeline),
             also the controller's figures (docs/control.md).
  summarize  The HP task's SLI with no antagonist, under each aggressive phase and each
             surge, from DIR's recording and ground truth.
  stop       Stop what a run that did not end cleanly left in DIR (by the pids and
             cgroup paths recorded in DIR/launcher-state.json) and remove its cgroups.

Options:
  -o DIR, --out DIR        Output directory [default: ./scenario-out]; with --repeat N
                           above 1, DIR/run-1 ... DIR/run-N.
  -c FILE, --config FILE   A pipeline configuration: its `detect:` and `allocate:` sections
                           go to owca-detect and owca-allocate (an `allocate:` section adds
                           owca-allocate to the run's pipeline, over the scenario's own),
                           its `measure:` section is merged into the run's measure section.
  --detect-config FILE     The same as --config (the earlier name).
  -r MODULE:CLASS, --register MODULE:CLASS
                           A plug-in class for owca-detect and owca-allocate (repeatable).
  --repeat N               Run the scenario N times [default: 1].
  --recorded               Score the anomalies in the recording instead of replaying it.
  --plot DIR               Write DIR/<recording>.png for each scored recording (matplotlib).
  --metric NAME            The metric to summarize (default: the ground truth's SLI metric).
  --json                   Print the summary or the scores as JSON.
  --log-level LEVEL        debug, info, warning or error [default: info].
  --debug                  Print a traceback with an unexpected error.
  -h, --help               Show this help.
  --version                Show the version.

Input:
  SCENARIO: a YAML file (docs/workloads.md, workloads/scenarios/):
    name: nginx-mix
    duration: 180            # seconds, after a warm-up of `warmup` (4) seconds
    interval: 2              # seconds between pipeline cycles
    cpus: "0"                # the cores the HP task and the BE tasks share
    hp: {workload: nginx, load: {base: 800, amplitude: 400, period: 60},
         calibrate: 20, slo_factor: 3}
    be:
      - {name: cpu, workload: stress-cpu,
         phases: [{start: 30, stop: 60}, {start: 100, stop: 130, mode: benign}]}
    surges: [{start: 140, stop: 160}]
    allocate: {allocator: !NOPAllocator {}}   # optional: owca-allocate in the pipeline
  Several HP tasks (a list under hp), BE cores of their own, BE tasks that arrive
  with their first phase, paced surges: docs/workloads.md.
  DIR (score, summarize): a recording: ground_truth.json and recording.jsonl or
  recording.jsonl.gz.

Output:
  run: the files above, the summary table on stdout; score: the tables on stdout (or
  JSON), the pictures in --plot DIR; logs on stderr.

Exit status:
  0 when the scenario ran to its end (or score/summarize/stop succeeded); 1 on a runtime
  error, when a pipeline stage died or when a signal cut the run short; 2 on a usage
  error, a bad scenario or a bad configuration.

Examples:
  # needs: two minutes of this machine, as root (a live scenario)
  owca-scenario run -o /tmp/scn workloads/scenarios/nginx-cpu-membw.yaml
  owca-scenario score --plot plots workloads/corpus
  owca-scenario score -c configs/examples/threshold-baseline.yaml -r \\
      configs/examples/threshold_detector.py:ThresholdDetector workloads/corpus
"""
import json
import os
import sys

from owca.core.stage import UsageError
from owca.core.stream import Signals

from owca_workloads import cli
from owca_workloads.launch import Launcher
from owca_workloads.plot import plot_runs
from owca_workloads.scenario import (Runner, ScenarioError, format_summary, load_scenario,
                                     summarize)
from owca_workloads.score import (ScoreError, print_scores, read_recording, read_truth,
                                  score_dirs)

TOOL = "owca-scenario"


def _summary(out_dir: str, metric=None) -> dict:
    try:
        truth = read_truth(out_dir)
        return summarize(read_recording(out_dir), truth, metric)
    except (ScoreError, KeyError) as e:
        raise cli.ToolError(f"{out_dir}: no usable recording and ground truth: {e}") from None


def _run(args) -> int:
    try:
        scenario = load_scenario(args["SCENARIO"])
    except ScenarioError as e:
        raise UsageError(str(e)) from None
    repeat = cli.number_option(args, "--repeat", integer=True, minimum=1)
    config = args["--config"] or args["--detect-config"]
    if config and not os.path.isfile(config):
        raise UsageError(f"--config {config}: no such file")
    with open(args["SCENARIO"]) as f:
        scenario_text = f.read()
    signals = Signals()
    completed = True
    try:
        for run in range(1, repeat + 1):
            out = args["--out"] if repeat == 1 else os.path.join(args["--out"], f"run-{run}")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "scenario.yaml"), "w") as f:
                f.write(scenario_text)
            try:
                truth = Runner(scenario, out, config, signals, plugins=args["--register"],
                               run=run).run()
            except ScenarioError as e:
                raise UsageError(str(e)) from None
            summary = _summary(out)
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
            print(format_summary(summary))
            noisy = truth.get("noisy") or {}
            if noisy.get("flag"):
                print(f"noisy run: {'; '.join(noisy['reasons'])}")
            completed = completed and truth["completed"]
            if not truth["completed"]:
                break
    finally:
        signals.close()
    return cli.EXIT_OK if completed else cli.EXIT_ERROR


def _body(args) -> int:
    if args["run"]:
        return _run(args)
    if args["score"]:
        try:
            results = score_dirs(args["DIR"], args["--config"], args["--register"],
                                 args["--recorded"])
        except ScoreError as e:
            raise cli.ToolError(str(e)) from None
        if args["--plot"]:
            plot_runs(args["--plot"], results)
        print_scores(results, args["--json"])
        return cli.EXIT_OK
    if args["summarize"]:
        summary = _summary(args["DIR"][0], args["--metric"])
        print(json.dumps(summary, indent=1) if args["--json"] else format_summary(summary))
        return cli.EXIT_OK
    state = os.path.join(args["DIR"][0], "launcher-state.json")
    if not os.path.exists(state):
        raise UsageError(f"{state}: no launcher state")
    Launcher.from_state(state).stop_all()
    return cli.EXIT_OK


def main(argv=None) -> int:
    return cli.run(TOOL, __doc__, argv, _body)


if __name__ == "__main__":
    sys.exit(main())
