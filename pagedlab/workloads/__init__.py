"""Workloads: synthetic length distributions and request traces (``workload._target_``)."""

from __future__ import annotations

from typing import Protocol

from pagedlab.engine.request import Request, SamplingParams
from pagedlab.workloads.synthetic import LENGTH_MODELS, LENGTHS, SyntheticWorkload, synthetic_requests
from pagedlab.workloads.trace import TraceError, TraceWorkload, trace_requests


class Workload(Protocol):
    """Makes the run's requests. ``defaults`` are the sampling group's settings (a request may override
    them), ``seed`` the run's seed; lengths must respect ``max_model_len`` and tokens ``vocab_size``
    (the engine rejects a request that can never fit, with its reason). Deterministic for a seed."""

    def requests(self, *, vocab_size: int, max_model_len: int, defaults: SamplingParams,
                 seed: int) -> list[Request]: ...


__all__ = ["LENGTHS", "LENGTH_MODELS", "SyntheticWorkload", "TraceError", "TraceWorkload", "Workload",
           "synthetic_requests", "trace_requests"]
