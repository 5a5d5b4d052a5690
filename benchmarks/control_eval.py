#!/usr/bin/env python3
"""The SLO controller's live evaluation: scenarios x configurations x repeats.

Usage:
  control_eval.py run [--out DIR] SCENARIO CONFIG
  control_eval.py matrix [--out DIR] [--repeats N] [--configs LIST] SCENARIO...
  control_eval.py score [--json] [--plot DIR] DIR...
  control_eval.py (-h | --help)

Commands:
  run     One run of SCENARIO (benchmarks/control/*.yaml) under CONFIG (none, static,
          controller, controller-floor) into DIR.
  matrix  For each scenario, BE alone first (the reference of BE work), then every
          configuration, repeat after repeat (so that a host that grows busy later
          spoils every configuration alike), each run in DIR/<scenario>/<config>-<r>.
  score   Each run directory under the DIRs (and its own), scored; the table of the
          mean and spread (min..max) per scenario and configuration.

Options:
  --out DIR       Where runs go [default: ./control-runs].
  --repeats N     Runs per scenario and configuration [default: 3].
  --configs LIST  Comma-separated [default: none,static,controller,controller-floor].
  --json          Every run's scores as JSON lines.
  --plot DIR      One PNG per run (matplotlib): SLI, BE allocation, BE work.
  -h, --help      Show this help.

Each run is made by the lab's runner (owca-scenario's) with an `allocate:` section:
workloads/owca_workloads/control_matrix.py.  Runs as root (it makes cgroups).
docs/control.md has the figures and how to read them.
"""
import json
import logging
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "lib"), os.path.join(ROOT, "workloads")]

from docopt import docopt  # noqa: E402

from owca_workloads import control_matrix, control_score  # noqa: E402


def run_one(scenario, config: str, out: str, be_alone=None) -> None:
    if isinstance(scenario, str):
        scenario = control_matrix.load(scenario)
    os.makedirs(out, exist_ok=True)
    control_matrix.run(scenario, config, out, be_alone=be_alone)
    print(json.dumps(control_score.score_dir(out)), flush=True)


def matrix(scenarios, out: str, repeats: int, configs) -> None:
    alone, loaded = {}, {}
    for path in scenarios:
        s = control_matrix.load(path)
        d = os.path.join(out, s.name)
        slos = control_matrix.calibrate_slo(s, os.path.join(d, "quiet"))
        loaded[path] = control_matrix.with_slos(s, slos)
        alone[path] = control_matrix.calibrate_be_alone(s, os.path.join(d, "be-alone"))
        with open(os.path.join(d, "calibration.json"), "w") as f:
            json.dump({"slo": slos, "be_alone": alone[path]}, f)
        logging.info("%s: SLOs %s, BE alone %s", s.name, slos, alone[path])
    for r in range(1, repeats + 1):
        for path in scenarios:
            name = loaded[path].name
            for config in configs:
                d = os.path.join(out, name, f"{config}-{r}")
                logging.info("%s %s run %d -> %s", name, config, r, d)
                t0 = time.monotonic()
                try:
                    run_one(loaded[path], config, d, alone[path])
                except Exception as e:  # one broken run must not stop the matrix
                    logging.error("%s %s run %d failed: %s: %s", name, config, r,
                                  type(e).__name__, e)
                logging.info("took %.0f s", time.monotonic() - t0)


def main() -> int:
    args = docopt(__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args["run"]:
        run_one(args["SCENARIO"][0], args["CONFIG"], args["--out"])
    elif args["matrix"]:
        matrix(args["SCENARIO"], args["--out"], int(args["--repeats"]),
               args["--configs"].split(","))
    else:
        runs = control_score.find_runs(args["DIR"])
        scores = [control_score.score_dir(d, plot_dir=args["--plot"]) for d in runs]
        if args["--json"]:
            for s in scores:
                print(json.dumps(s))
        else:
            print(control_score.format_table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
