"""What the SLO controller and the headroom both read of an HP task: its SLI's
pressure, and whether a task's labels make it one of a kind."""
import math
from typing import Dict, Optional, TypeGuard

SLI_NORMALIZED = "apm_sli_normalized"
REPORT_TS = "apm_report_timestamp_seconds"


def finite(x) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def matches(labels: dict, wanted: Dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


def pressure(m: dict) -> Optional[float]:
    """SLI / SLO, lower is better: 1 at the objective, above 1 broken (either kind of SLI:
    the wrappers' apm_sli_normalized is 1 at the objective, below 1 broken)."""
    normalized = m.get(SLI_NORMALIZED)
    if finite(normalized) and normalized > 0:
        return 1.0 / normalized
    sli, slo = m.get("apm_sli"), m.get("apm_slo")
    if finite(sli) and finite(slo) and slo > 0 and sli >= 0:
        return sli / slo   # a lower-is-better SLI whose wrapper gave no normalised value
    return None


def report_identity(m: dict, load_metric: str = "apm_load_target_rate_per_second") -> tuple:
    """What tells one SLI report from the next.  The report's own time where the source
    gives it (`apm_report_timestamp_seconds`: owca-measure sets it from an APM file's
    `ts`): a service whose p99 holds steady (read from histogram buckets, or simply
    calm) keeps reporting the same values, and those are fresh reports all the same.
    Without it, the values themselves: a report that has not changed in any of them is
    taken for the same one."""
    ts = m.get(REPORT_TS)
    if finite(ts):
        return ("ts", ts)
    return (m.get("apm_sli"), m.get(SLI_NORMALIZED), m.get("apm_throughput_per_second"),
            m.get(load_metric))
