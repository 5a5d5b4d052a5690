"""What owca-measure reads: one module per data source (cgroups, the platform, perf
counters, application metrics, RDT monitoring), each behind the Source interface of
`base` through a `*_source` module.

BUILTINS is the one list of the sources, by the name their `source` label carries, in
the order owca-measure reads them and merges what they read.  SWITCHES names the
MeasureConfig setting that turns a source on; the others are always on.  owca-measure
imports a source's module only when it is on: a default configuration loads no perf,
APM or RDT code.
"""
BUILTINS = {
    "cgroup": "owca.measure.sources.cgroup_source:CgroupSource",
    "platform": "owca.measure.sources.platform_source:PlatformSource",
    "perf": "owca.measure.sources.perf_source:PerfSource",
    "apm": "owca.measure.sources.apm_source:ApmSource",
    "rdt": "owca.measure.sources.rdt_source:RdtSource",
}
SWITCHES = {"perf": "perf_events", "apm": "apm_dir", "rdt": "rdt_monitoring"}
