"""What the SLO controller and the headroom both read of an HP task: its SLI's
pressure, and whether a task's labels make it one of a kind."""
import math
from typing import Dict, Optional, TypeGuard

SLI_NORMALIZED = "apm_sli_normalized"


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
