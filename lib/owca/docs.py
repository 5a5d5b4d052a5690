"""`python -m owca.docs > docs/metrics.md`: the metric reference, from the registry."""
from owca.core.metrics import render_markdown

HEADER = """# OWCA metrics

Generated from `lib/owca/core/metrics.py` by `make docs`; a test fails when this file and the
registry disagree. This reference is normative: a metric's name, type, unit and levels
change only with a new entry here.

- **name (Prometheus)**: what a Prometheus server scrapes (and what the files and Kafka
  messages carry); **name in frames**: the name in the JSON frames between the stages
  (docs/protocol.md), with the frame's unit where it is not the exposition's ("same":
  the names agree). Why they differ, and the deprecated names of release 0.1: the end of
  this page.
- **unit**: the exposition's; Prometheus wants base units (seconds, bytes, 0-1 ratios).
- **type**: `counter` only ever grows (until the task or the agent restarts); `gauge` may go
  either way.
- **levels**: a nested metric's dimensions, outermost first. In frames the metric is an
  object per level (`{"0": 12, "1": 7}`); exported to Prometheus each level is a label of
  that name.
- Every exported sample has the label `host`; task metrics also `task_id`, `task_name`
  and the task's labels (among them `priority`: `hp` or `be`); a stage's own metrics have
  `stage`.
- A metric whose source is missing on a node is absent, never zero.

"""


RDT_MONITORING = """
## About RDT monitoring

`measure: {rdt_monitoring: true}` (and `--resctrlfs DIR`, default `/sys/fs/resctrl`) gives
each task a resctrl monitoring group, `owca-mon-<digest of the task id>`, in `mon_groups/`
of the control group that holds the task's threads (the default group, or the `owca-*`
group of an rdt allocation; when the task moves, so does its group). Every cycle the
task's threads that are not in it yet are moved in, one id per write; threads that end
leave it by themselves. The group is removed when the task goes and when owca-measure
stops; groups of a run that was killed are removed at the next start. Nothing else is
written: not a control group's `tasks`, not another monitoring group. resctrl not mounted
or without `info/L3_MON` fails at start (exit 2).

- The RMID budget: the default group, every control group and every monitoring group hold
  one of `info/L3_MON/num_rmids`. Tasks that already have a group keep it; the others get
  one in task id order while RMIDs are left. A task without one (the budget spent, or the
  kernel's ENOSPC for RMIDs still in limbo) is counted in `owca_rdt_unmonitored_tasks` and
  logged once, and gets no RDT figures.
- Rates: a bandwidth counter's change since the last cycle over the time between the two
  reads. A value of `Unavailable` (or `Error`) costs that cycle's rate and the next (a
  rate needs two values in a row); a counter that went back (wrapped, or a new RMID)
  costs one. The `task_mem_bandwidth*_bytes` counters add only the changes that were
  rates, so they never go back.
- Platform figures sum every control group's `mon_data` per cache id; a control group
  made since the last cycle has no rate yet, and the platform's rate waits for it.

Tested (tests/test_rdt_monitor.py) on a hand-written resctrl tree
(tests/fixtures/resctrl_mon) driven by tests/fake_node.py, which does what
Documentation/arch/x86/resctrl.rst says the kernel does for monitoring groups. What those
tests cannot cover: anything the hardware measures (the counters are set by the tests),
how long RMIDs stay in limbo, when a real counter reads `Unavailable`, sub-NUMA
clustering (`mon_sub_L3_*`), AMD's assignable counters, and real processes' threads.
"""


def markdown() -> str:
    return HEADER + render_markdown() + RDT_MONITORING


def main():
    print(markdown(), end="")


if __name__ == "__main__":
    main()
