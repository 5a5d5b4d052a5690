"""owca-launch: start reference workloads, each in its own cgroup, and stop them cleanly.

Usage:
  owca-launch run [options] WORKLOAD...
  owca-launch stop STATE_FILE
  owca-launch list
  owca-launch (-h | --help | --version)

Commands:
  run    Start each WORKLOAD (a name of workloads/catalog.yaml, or NAME=WORKLOAD to
         name the instance) in its own cgroup under --parent, in the cpu, cpuacct,
         memory and cpuset hierarchies; with --load, measure each HP workload with
         its load generator under owca-sine and owca-wrap.  Runs until SIGTERM or
         SIGINT (or --duration), then stops everything and removes the cgroups.
  stop   Stop what a `run` that did not end cleanly recorded in STATE_FILE, by the
         recorded process groups and cgroup paths, and remove its cgroups.
  list   The catalog's workloads.

Options:
  --parent PATH          The cgroup under which each workload gets its own
                         (default: /owca-workloads-PID).
  --cpus LIST            The workloads' cores (cpuset.cpus), e.g. 0 or 0-1 (default: all).
  --run-dir DIR          Where the workloads' files, logs and the state file go
                         [default: ./owca-run].
  --tasks-file FILE      Keep a StaticDiscovery tasks file of the running workloads.
  --load                 Start each HP workload's load generator, measured.
  --apm-dir DIR          The APM directory of the load wrappers [default: /run/owca/apm].
  --base RATE            The load's mean rate, per second [default: 800].
  --amplitude RATE       The load's sine amplitude, per second [default: 400].
  --period SECONDS       The load's sine period [default: 60].
  --loadgen-cpus LIST    The load generators' cores (default: all).
  --duration SECONDS     Stop after SECONDS (default: at SIGTERM or SIGINT).
  --log-level LEVEL      debug, info, warning or error [default: info].
  --debug                Print a traceback with an unexpected error.
  -h, --help             Show this help.
  --version              Show the version.

Input:
  None.

Output:
  `list`: one workload a line (name, role, resource, description).  `run`: the
  workloads' task ids (cgroup paths) on stdout once started; logs on stderr and in
  --run-dir/logs.  The state file is --run-dir/launcher-state.json.

Exit status:
  0 when stopped by SIGTERM, SIGINT or --duration; 1 when a workload could not be
  started (what was started is stopped); 2 on a usage error.

Examples:
  owca-launch run --cpus 0 --load --tasks-file tasks.yaml nginx stress-cpu  # Ctrl-C stops it
  owca-launch run --duration 5 hp=redis be1=sysbench-cpu be2=stress-membw
  owca-launch stop ./owca-run/launcher-state.json
"""
import os
import sys
import time


import yaml

from owca.core.stage import UsageError
from owca.core.stream import Signals

from owca_workloads import cli
from owca_workloads.catalog import load_catalog, start, unavailable, wrapped_load
from owca_workloads.launch import Launcher

TOOL = "owca-launch"


def instances(specs, catalog) -> list:
    """[(instance name, Workload)] from WORKLOAD or NAME=WORKLOAD arguments."""
    out, names = [], set()
    for spec in specs:
        name, sep, workload = spec.partition("=")
        if not sep:
            name, workload = spec, spec
        if workload not in catalog:
            raise UsageError(f"{spec}: no workload {workload!r} in the catalog "
                             f"(owca-launch list)")
        if name in names or name == "loadgen" or "/" in name:
            raise UsageError(f"{spec}: instance name {name!r} is taken or not a cgroup name")
        names.add(name)
        out.append((name, catalog[workload]))
    return out


def write_tasks(path: str, launcher: Launcher) -> None:
    tasks = [{"id": w.cgroup_path, "name": w.name, "cgroup_path": w.cgroup_path,
              "labels": {"role": w.role, "workload": w.workload}}
             for w in launcher.launched.values() if w.role in ("hp", "be") and not w.stopped_ts]
    with open(f"{path}.tmp", "w") as f:
        yaml.safe_dump(tasks, f, sort_keys=False)
    os.replace(f"{path}.tmp", path)


def run(args) -> int:
    catalog = load_catalog()
    todo = instances(args["WORKLOAD"], catalog)
    reason = unavailable([w for _, w in todo])
    if reason:
        raise cli.ToolError(reason)
    run_dir = os.path.abspath(args["--run-dir"])
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    duration = cli.number_option(args, "--duration", positive=True)
    load = {k: cli.number_option(args, f"--{k}", minimum=0)
            for k in ("base", "amplitude", "period")}
    if not load["period"] > 0:
        raise UsageError("--period: expected a positive number of seconds")
    launcher = Launcher(args["--parent"] or f"/owca-workloads-{os.getpid()}",
                        state_file=os.path.join(run_dir, "launcher-state.json"))
    signals = Signals()
    logs = []

    def log_file(name):
        logs.append(open(os.path.join(run_dir, "logs", f"{name}.log"), "ab"))
        return logs[-1]
    try:
        for name, workload in todo:
            launched, port = start(launcher, workload, name, os.path.join(run_dir, name),
                                   args["--cpus"], log_file(name))
            print(launched.cgroup_path, flush=True)
            if args["--load"] and workload.role == "hp":
                argv = wrapped_load(workload, launched.cgroup_path, os.path.join(run_dir, name),
                                    port, args["--apm-dir"], load["base"], load["amplitude"],
                                    load["period"])
                launcher.start(f"loadgen-{name}", argv, cpus=args["--loadgen-cpus"],
                               stdout=log_file(f"loadgen-{name}"),
                               stderr=logs[-1], role="loadgen", workload=workload.load.parser)
            if args["--tasks-file"]:
                write_tasks(args["--tasks-file"], launcher)
        deadline = None if duration is None else time.monotonic() + duration
        while not signals.stop and (deadline is None or time.monotonic() < deadline):
            signals.sleep(60.0 if deadline is None else deadline - time.monotonic())
        return cli.EXIT_OK
    finally:
        launcher.stop_all()
        if args["--tasks-file"]:
            write_tasks(args["--tasks-file"], launcher)
        signals.close()
        for f in logs:
            f.close()


def _body(args) -> int:
    if args["list"]:
        for name, w in load_catalog().items():
            print(f"{name:<16} {w.role:<3} {w.resource or '-':<17} {w.description}")
        return cli.EXIT_OK
    if args["stop"]:
        if not os.path.exists(args["STATE_FILE"]):
            raise UsageError(f"{args['STATE_FILE']}: no such state file")
        Launcher.from_state(args["STATE_FILE"]).stop_all()
        return cli.EXIT_OK
    return run(args)


def main(argv=None) -> int:
    return cli.run(TOOL, __doc__, argv, _body)


if __name__ == "__main__":
    sys.exit(main())
