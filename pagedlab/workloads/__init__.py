"""Workloads: synthetic length distributions and request traces."""

from pagedlab.workloads.synthetic import LENGTH_MODELS, synthetic_requests
from pagedlab.workloads.trace import TraceError, trace_requests

WORKLOADS = ("sharegpt_like", "alpaca_like", "uniform", "fixed", "trace")

__all__ = ["LENGTH_MODELS", "WORKLOADS", "TraceError", "synthetic_requests", "trace_requests"]
