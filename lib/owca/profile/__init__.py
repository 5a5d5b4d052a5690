"""owca-profile: fleet profiles, what "normal" looks like for a workload.

- `records`: frames (JSON lines, or the Prometheus text owca-ship sends to Kafka) turned
  into compact per-host cycles: the few labels and metrics a profile needs.
- `compute`: per host, the detector's own signals of each task (the same code as
  `!ContentionDetector`), kept where the task was not flagged; per workload x CPU model x
  load bucket x signal, count, robust centre and spread, quantiles; the bad-neighbour
  pairs from the anomalies.
- `engine`: the computation on Dask distributed (a LocalCluster by default, a scheduler's
  address otherwise).
- `kafka`: reading topics between offsets or times; publishing to and fetching from a
  compacted topic keyed by workload.
- `profile`: the versioned profile document (docs/protocol.md, "Profiles").
"""
