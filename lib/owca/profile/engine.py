"""Running the profile's computation on Dask distributed.

Dask, not a home-made pool: its scheduler keeps each task's lineage and, when a worker
dies, runs the tasks it held again elsewhere (`distributed.scheduler.allowed-failures`
workers may die under one task before it is given up).  For that the inputs travel inside
the tasks themselves, never `scatter`ed: data scattered to a worker that dies is lost,
data in a task's arguments is kept by the scheduler.

The graph: one `split` per input chunk, dealing its cycles into P partitions by host; one
`partition_part` per partition (its host's signals and pair counts); the values gathered
by key into chunks, one `summarise` per chunk.
"""
import logging
import time
import warnings
from typing import List, Optional

from owca.profile import compute
from owca.profile.profile import document
from owca.profile.records import Options

log = logging.getLogger("owca.profile")

SUMMARY_CHUNK = 64  # keys per summarise task


class EngineError(RuntimeError):
    """The engine could not be reached or gave up (one line)."""


def client_for(scheduler: Optional[str], workers: int):
    """(client, cluster or None): a client of the scheduler at `scheduler`, or of a
    LocalCluster of `workers` processes on this machine, its dashboard off."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise EngineError("Dask distributed is not installed: pip install "
                          "'owca[profile]' (or dask[distributed])") from None
    if log.getEffectiveLevel() > logging.DEBUG:   # Dask logs each worker's life at info
        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] in ("distributed", "dask"):
                logging.getLogger(name).setLevel(logging.WARNING)
    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as e:
            raise EngineError(f"scheduler {scheduler}: {e}") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, host="127.0.0.1")
    return Client(cluster), cluster


def build(chunks: List[tuple], opts: Options, source: dict, client,
          partitions: Optional[int] = None, engine: str = "dask") -> dict:
    """The profile document of the chunks, computed on `client`'s cluster."""
    started = time.monotonic()
    # The chunks go in the graph on purpose (see above): Dask's advice to load them on the
    # workers instead is the scatter this design avoids.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    p = partitions or max(1, 2 * workers)
    splits = client.map(compute.split, chunks, opts=opts, partitions=p, pure=False)
    parts = [client.submit(compute.partition_part, opts,
                           *[client.submit(compute.pick, s, i, pure=False) for s in splits],
                           pure=False)
             for i in range(p)]
    bad = sum(client.gather(client.map(compute.bad_of, splits, pure=False)))
    merged = compute.merge_parts(client.gather(parts))
    items = sorted(merged["values"].items())
    batches = [items[i:i + SUMMARY_CHUNK] for i in range(0, len(items), SUMMARY_CHUNK)]
    summaries = {}
    for done in client.gather(client.map(compute.summarise, batches, pure=False)):
        summaries.update(done)
    built = {"engine": engine, "workers": workers, "partitions": p, "chunks": len(chunks),
             "seconds": round(time.monotonic() - started, 3)}
    return document(merged, summaries, opts, source, built, bad)
