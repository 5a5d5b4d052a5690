"""OWCA, the Orchestration-aware Workload Collocation Agent."""

__version__ = "0.1.0"
