"""Where owca-discover gets its tasks: one module per kind of source.

BUILTINS is the one list of the built-in sources; owca-discover declares it to the
configuration loader, which imports a source's module only when a configuration
names its tag (the Kubernetes and Mesos clients are not loaded for a cgroup scan).
"""
BUILTINS = {
    "CgroupDiscovery": "owca.discover.sources.cgroup:CgroupDiscovery",
    "StaticDiscovery": "owca.discover.sources.static:StaticDiscovery",
    "KubernetesDiscovery": "owca.discover.sources.kubernetes:KubernetesDiscovery",
    "MesosDiscovery": "owca.discover.sources.mesos:MesosDiscovery",
}
