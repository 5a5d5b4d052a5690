"""What owca-measure reads: one module per data source (cgroups, the platform, perf
counters, application metrics, the services' own service levels, RDT monitoring),
each behind the Source interface of `base`: the module's reader, and at its end the
`*Source` class that owca-measure calls (what counts there as the source failing as a
whole is in its docstring).

BUILTINS is the one list of the sources, by the name their `source` label carries, in
the order owca-measure reads them and merges what they read.  SWITCHES names the
MeasureConfig setting that turns a source on; the others are always on.  owca-measure
imports a source's module only when it is on: a default configuration loads no perf,
APM or RDT code.
"""
BUILTINS = {
    "cgroup": "owca.measure.sources.cgroup:CgroupSource",
    "platform": "owca.measure.sources.platform:PlatformSource",
    "perf": "owca.measure.sources.perf:PerfSource",
    "apm": "owca.measure.sources.apm:ApmSource",
    "sli": "owca.measure.sources.sli:SliSource",
    "rdt": "owca.measure.sources.rdt:RdtSource",
}
SWITCHES = {"perf": "perf_events", "apm": "apm_dir", "sli": "sli", "rdt": "rdt_monitoring"}
