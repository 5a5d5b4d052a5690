"""A fleet profile as the detector's prior (docs/detection.md, "Fleet profiles").

The profile (docs/protocol.md, "Profiles"; built by owca-profile) holds, per workload x
CPU model x load bucket x signal, the fleet's robust centre and spread of the detector's
own signals.  The detector asks it two things: the fleet's normal for a task whose own
history is too short yet, and how far the task's own normal may drift from the fleet's.
The file is read again when it changes (its mtime, size or inode); a profile that became
unreadable leaves the last good one in use, and says so once per change.
"""
import json
import logging
import os
from typing import List, Optional, Tuple

log = logging.getLogger("owca.detect")

FORMAT = "owca-profile"
VERSION = 1


class ProfileError(ValueError):
    """A profile that cannot be used (one line)."""


def check(doc, where: str) -> dict:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProfileError(f"{where}: not an owca profile (no \"format\": \"{FORMAT}\")")
    if doc.get("version") != VERSION:
        raise ProfileError(f"{where}: profile version {doc.get('version')!r}, this OWCA "
                           f"reads version {VERSION}")
    for name, kind in (("options", dict), ("workloads", dict), ("bad_neighbours", list)):
        if not isinstance(doc.get(name), kind):
            raise ProfileError(f"{where}: field {name!r} missing or not a "
                               f"{kind.__name__}")
    return doc


def load(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except OSError as e:
        raise ProfileError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ProfileError(f"{path}: invalid JSON: {e}") from None
    return check(doc, path)


class FleetPrior:
    """The profile at `path`, re-read when it changes."""

    def __init__(self, path: str, load_bucket_ratio: float, min_count: int):
        self.path = path
        self.ratio = load_bucket_ratio
        self.min_count = min_count
        self.loads = 0
        self.errors = 0
        self._stamp: Optional[tuple] = None
        self.doc = self._read()    # a bad profile at the start is a configuration error

    def _read(self) -> dict:
        doc = load(self.path)
        st = os.stat(self.path)
        ratio = doc["options"].get("load_bucket_ratio")
        if ratio != self.ratio:
            raise ProfileError(f"{self.path}: built with load_bucket_ratio {ratio}, the "
                               f"detector's is {self.ratio}: its buckets are not these")
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        self.loads += 1
        return doc

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            return  # being replaced, or gone: the last one read stays in use
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return
        try:
            self.doc = self._read()
            log.info("profile %s read again: %d workloads", self.path,
                     len(self.doc["workloads"]))
        except (OSError, ProfileError) as e:
            self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            self.errors += 1
            log.error("profile not read again, the previous one stays in use: %s", e)

    def normal(self, workload: Optional[str], model: str, bucket,
               signal: str) -> Optional[Tuple[float, float]]:
        """(centre, spread) of the fleet for this workload, CPU model, load bucket and
        signal; the neighbouring bucket with more values when this one has too few;
        None when the fleet knows too little."""
        if workload is None:
            return None
        by_model = self.doc["workloads"].get(workload, {})
        buckets = by_model.get(model) or by_model.get("unknown") or {}
        def usable(key):
            entry = buckets.get(key, {}).get(signal)
            ok = isinstance(entry, dict) and entry.get("count", 0) >= self.min_count
            return entry if ok else None

        best = usable(str(bucket))
        if best is None and isinstance(bucket, int):
            near = [e for e in (usable(str(bucket - 1)), usable(str(bucket + 1))) if e]
            best = max(near, key=lambda e: e["count"]) if near else None
        if best is None:
            return None
        return float(best["centre"]), float(best["spread"])

    def bad_neighbours(self, limit: int) -> List[dict]:
        return [p for p in self.doc["bad_neighbours"][:limit] if isinstance(p, dict)]
