"""A BE task's own progress in a phase, from its output: the work it got done.

- stress-ng with `--metrics-brief` prints, when it ends (also on SIGTERM), a line
  per stressor: `stress-ng: metrc: [PID] cpu  3474  3.05  2.29  0.01  1140.88  1509.87`
  (bogo ops, real seconds, user, system, ops per real second, per CPU second);
- sysbench with `--report-interval=1` prints `[ 1s ] thds: 1 eps: 1873.18 ...`
  every second (events per second).
"""
import re
from typing import List, Optional

_STRESS = re.compile(r"stress-ng: metrc: \[\d+\]\s+([a-z0-9-]+)\s+(\d+)\s+([0-9.]+)\s")
_SYSBENCH = re.compile(r"^\[ *(\d+)s \] thds: \d+ eps: ([0-9.]+)")


def with_progress(argv: List[str]) -> List[str]:
    """The command, told to report its progress (stress-ng, sysbench); others as they are."""
    if not argv:
        return argv
    if argv[0] == "stress-ng" and "--metrics-brief" not in argv:
        return argv + ["--metrics-brief"]
    if argv[0] == "sysbench" and "run" in argv and not any(
            a.startswith("--report-interval") for a in argv):
        i = argv.index("run")
        return argv[:i] + ["--report-interval=1"] + argv[i:]
    return argv


def parse_progress(text: str) -> Optional[dict]:
    """{"ops", "seconds", "ops_per_second", "unit"} from a phase's output, or None."""
    ops = seconds = 0.0
    found = None
    for line in text.splitlines():
        m = _STRESS.search(line)
        if m:
            ops += int(m.group(2))
            seconds = max(seconds, float(m.group(3)))
            found = "bogo-ops"
            continue
        m = _SYSBENCH.match(line.strip())
        if m:
            ops += float(m.group(2))  # one second's events
            seconds = max(seconds, float(m.group(1)))
            found = "events"
    if found is None:
        return None
    return {"ops": round(ops, 2), "seconds": round(seconds, 2),
            "ops_per_second": round(ops / seconds, 3) if seconds > 0 else 0.0, "unit": found}
