"""What owca-measure reads: one module per data source (cgroups, the platform, perf
counters, application metrics, RDT monitoring)."""
