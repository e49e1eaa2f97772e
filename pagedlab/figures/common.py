"""What every figure command shares: the paper's batching style, composing and running simulated points,
and writing a figure's CSV, PNG and side-by-side table.

Every point is a composed config (``pagedlab.compose`` with ``executor=sim``) run in-process by
``pagedlab.run_experiment``; a figure module lists its points as CLI-style overrides, so any point can be
rerun alone with ``python -m pagedlab.run <the same overrides>``.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pagedlab.figures.paper import HARDWARE_LABELS, MODEL_LABELS, WORKLOAD_LABELS

# The paper's batching style. vLLM as the paper measured it (2023) ran each step either on new prompts only
# or on decodes only, prompts first; today's engines mix prompt chunks into decode steps. The paper figures
# run in the paper's style whenever the scheduler offers a choice (the config has a top-level `batching`
# key); a scheduler without the key has one style only (mixed steps) and the figures run with it, which
# every footnote then says. `--today` runs keep the scheduler's default (today's style).
PAPER_BATCHING = {"batching": "prefill_first"}
# The paper's engine's host time per step: vLLM's 2023 step loop ran scheduling, input preparation, sampling and
# output processing (incremental detokenization of every sequence) on the CPU between GPU steps, so a step's host
# time grew with its batch (`vllm_2023`: 2 ms + 0.171 ms a sequence, from Vidur's profile; docs/cost_model.md).
# The Orca baselines ran in the same engine and pay the same. `--today` runs keep the preset's fixed 2 ms.
PAPER_HOST_OVERHEAD = {"executor.host_overhead": "vllm_2023"}

DPI = 100
FOOTNOTE_SIZE = 7


@functools.lru_cache(maxsize=1)
def scheduler_has_batching_key() -> bool:
    """Whether the composed config has a top-level ``batching`` key (the scheduler offers a batching style)."""
    from pagedlab.app.api import compose

    return "batching" in compose("executor=sim", "logger=none")


def style_overrides(today: bool = False) -> list[str]:
    """``batching=...`` for the paper's style when the scheduler offers it, and the paper's engine's host
    overhead (``executor.host_overhead``); neither for ``--today``."""
    from pagedlab.app.api import format_override

    if today:
        return []
    host = [format_override(k, v) for k, v in PAPER_HOST_OVERHEAD.items()]
    if not scheduler_has_batching_key():
        return host
    return [format_override(k, v) for k, v in PAPER_BATCHING.items()] + host


def batching_note(today: bool = False) -> str:
    """One line for the footnote: which batching style (and host overhead per step) the runs used."""
    if today:
        return ("batching: the scheduler's default (mixed prompt and decode steps, as engines run today); "
                "host overhead: the preset's 2 ms a step")
    host = ("; host overhead: executor.host_overhead=vllm_2023 (2 ms + 0.171 ms a sequence per step, "
            "Vidur's profile of a 2023 vLLM engine)")
    if scheduler_has_batching_key():
        style = ", ".join(f"{k}={v}" for k, v in PAPER_BATCHING.items())
        return f"batching: {style} (prompt-only and decode-only steps, as the paper's vLLM ran)" + host
    return ("batching: mixed prompt and decode steps, the only style this scheduler has "
            "(the paper's vLLM ran prompt-only steps first)" + host)


def base_overrides(model: str, hardware: str, workload: str, *extra: str, today: bool = False) -> list[str]:
    """The overrides of one simulated point: model on hardware, the workload, no logger, the batching style."""
    return ["executor=sim", "logger=none", f"model={model}", f"hardware={hardware}", f"workload={workload}",
            *style_overrides(today), *extra]


def table1_budget(model: str) -> list[str]:
    """``kv_cache.budget_gib`` holding the paper's KV slots for ``model`` (Table 1); none for other models."""
    from pagedlab.figures.paper import TABLE1_KV_SLOTS
    from pagedlab.models.presets import GIB, model_spec

    if model not in TABLE1_KV_SLOTS:
        return []
    return [f"kv_cache.budget_gib={TABLE1_KV_SLOTS[model] * model_spec(model).kv_bytes_per_token / GIB:.4f}"]


def run_point(overrides: Sequence[str]) -> dict[str, Any]:
    """Compose ``overrides`` (checked like the CLI) and run it; the run's summary."""
    from pagedlab.app.api import compose
    from pagedlab.experiment import run_experiment

    return dict(run_experiment(compose(*overrides), progress=False).summary)


def requests_for(rate: float, duration_s: float, minimum: int) -> int:
    """Requests of a Poisson trace of ``duration_s`` seconds at ``rate`` requests/s (at least ``minimum``)."""
    return max(minimum, math.ceil(rate * duration_s))


def label(model: str, hardware: str | None = None, workload: str | None = None) -> str:
    """``OPT-13B, 1x A100-40GB, ShareGPT``."""
    parts = [MODEL_LABELS.get(model, model)]
    if hardware:
        parts.append(HARDWARE_LABELS.get(hardware, hardware))
    if workload:
        parts.append(WORKLOAD_LABELS.get(workload, workload))
    return ", ".join(parts)


@dataclass
class FigureOutput:
    """A figure's result: ``data`` (the CSV), ``compare`` (the printed side-by-side table: one row per paper
    result, columns ``result``, ``paper``, ``pagedlab``), the matplotlib figure and the footnote lines."""

    name: str
    title: str
    data: pd.DataFrame
    compare: pd.DataFrame
    figure: Any
    notes: list[str] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6, **kw: Any) -> tuple[Any, Any]:
    """A matplotlib figure on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)


def add_footnote(fig: Any, notes: Sequence[str]) -> None:
    """The settings under the plot, wrapped to the figure's width; the axes are moved up to make room."""
    width = int(fig.get_figwidth() * 72 / (0.62 * FOOTNOTE_SIZE)) - 8  # monospace: 0.6 em per character
    lines: list[str] = []
    for note in notes:
        lines += textwrap.wrap(note, width=width, subsequent_indent="   ")
    text_in = (len(lines) + 0.8) * FOOTNOTE_SIZE * 1.35 / 72
    height_in = fig.get_figheight() + text_in  # the footnote adds to the figure; the axes keep their size
    fig.set_figheight(height_in)
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=FOOTNOTE_SIZE, va="bottom", ha="left", family="monospace",
             color="#333333")
    top = 1 - 0.3 / height_in if fig._suptitle is not None else 1  # room for the figure's title
    fig.tight_layout(rect=(0, text_in / height_in, 1, top))


def log_axis(ax: Any, axis: str = "y") -> None:
    """A log scale with plain numbers as tick labels (2, 3, 5 rather than 2 x 10^0)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    target.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def format_table(df: pd.DataFrame) -> str:
    """A plain-text table (floats to 3 significant digits)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3g}"
        return str(v)

    cols = [str(c) for c in df.columns]
    rows = [[fmt(v) for v in row] for row in df.itertuples(index=False)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def save(output: FigureOutput, out_dir: Path, quiet: bool = False) -> FigureOutput:
    """Write ``<name>.csv`` and ``<name>.png`` under ``out_dir`` and print the side-by-side table."""
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    csv, png = out_dir / f"{output.name}.csv", out_dir / f"{output.name}.png"
    output.data.to_csv(csv, index=False, float_format="%.6g")
    add_footnote(output.figure, output.notes)
    output.figure.savefig(png, dpi=DPI)
    plt.close(output.figure)
    output.paths = {"csv": csv, "png": png}
    if not quiet:
        print(f"\n{output.title}")
        print(format_table(output.compare))
        for note in output.notes:
            print(f"  {note}")
        print(f"wrote {csv} and {png}")
    return output
