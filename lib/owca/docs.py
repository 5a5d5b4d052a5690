"""`python -m owca.docs > docs/metrics.md`: the metric reference, from the registry."""
from owca.metrics import render_markdown

HEADER = """# OWCA metrics

Generated from `lib/owca/metrics.py` by `make docs`; a test fails when this file and the
registry disagree. This reference is normative: a metric's name, type, unit and levels
change only with a new entry here.

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


def main():
    print(HEADER + render_markdown(), end="")


if __name__ == "__main__":
    main()
