"""The PagedAttention paper (Kwon et al., SOSP 2023) figure by figure, on pagedlab's simulator.

    python -m pagedlab.figures fig2 [--small] [--today] [--out results/paper]
    python -m pagedlab.figures all

Each command runs its sweep in-process (``executor=sim``), writes ``<out>/figNN.csv`` and ``<out>/figNN.png``
(the paper's values drawn beside ours) and prints the side-by-side table. ``--small`` is a reduced size for
tests (seconds); ``--today`` runs the figure at today's scale (Llama 3 8B on an H100-80GB), labelled as ours,
into ``figNN_today.*``. The paper's reference values are in :mod:`pagedlab.figures.paper`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

FIGURES = {  # name -> (module, what it shows, whether --today is offered)
    "fig2": ("pagedlab.figures.fig2", "KV memory: token states, reservations and fragmentation (pool shares)", True),
    "fig12": ("pagedlab.figures.fig12", "normalized latency vs request rate; sustainable-rate ratios", True),
    "fig13": ("pagedlab.figures.fig13", "mean batched requests at a fixed request rate", True),
    "fig15": ("pagedlab.figures.fig15", "memory saved by sharing: parallel sampling and beam search", True),
    "fig18": ("pagedlab.figures.fig18", "normalized latency vs block size", True),
    "fig19": ("pagedlab.figures.fig19", "swap vs recompute per block size", True),
    "kernels": ("pagedlab.figures.kernels", "attention kernel latency, paged vs contiguous (Fig. 18a)", False),
}
DEFAULT_OUT = Path("results/paper")


def run_figure(name: str, small: bool = False, today: bool = False, out: Path = DEFAULT_OUT,
               quiet: bool = False) -> Any:
    """Run one figure and write its CSV and PNG under ``out``; returns its :class:`FigureOutput`."""
    from pagedlab.figures.common import save

    if name not in FIGURES:
        raise ValueError(f"figure={name!r} is not allowed; one of {', '.join(FIGURES)}")
    module, _, has_today = FIGURES[name]
    if today and not has_today:
        raise ValueError(f"{name} has no --today variant")
    output = importlib.import_module(module).run(small=small, today=today)
    return save(output, Path(out), quiet=quiet)


__all__ = ["DEFAULT_OUT", "FIGURES", "run_figure"]
