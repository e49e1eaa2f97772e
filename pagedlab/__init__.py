"""pagedlab: a laboratory for KV-cache memory management in LLM inference.

Notebook API (imported lazily, so `import pagedlab.kv` stays free of torch and Hydra):
`compose(*overrides)`, `run_experiment(cfg)`, `sweep(cfg, grid)`, `load_results(path)`,
`compare(df, by, metrics)`, `memory_breakdown(df)` (a Figure-2 style plot), `results_dir()` (the project's
`results/`, found wherever a notebook starts); pictures in `pagedlab.viz`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "run_experiment": "pagedlab.experiment",
    "RunResult": "pagedlab.engine.result",
    "compose": "pagedlab.app.api",
    "sweep": "pagedlab.app.api",
    "load_results": "pagedlab.app.results",
    "compare": "pagedlab.app.results",
    "results_dir": "pagedlab.app.results",
    "memory_breakdown": "pagedlab.app.plots",
}

__all__ = ["RunResult", "compare", "compose", "load_results", "memory_breakdown", "results_dir", "run_experiment",
           "sweep"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pagedlab' has no attribute {name!r}")
