"""The library of workloads/ tools: owca-wrap, owca-sine, owca-launch, owca-scenario."""
