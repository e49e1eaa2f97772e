"""A run over time, from its step table: where the KV slots go, and the batch and queues.

Top panel, stacked, summing to the pool: token states (T), reserved slots (filled later by their
owner), internal fragmentation (never filled), external fragmentation (free slots a contiguous
allocator could not use), prefix-cached blocks (unreferenced, evictable) and free space; in
blocks or in % of the pool. Bottom panel: batch size and running sequences, waiting and swapped
requests. Steps with a preemption are marked on both. Column definitions: docs/metrics.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pagedlab.viz._context import table_and_context, titled

STACK = [  # key, label, colour
    ("token", "token states", "#4c72b0"),
    ("reserved", "reserved (filled later)", "#dd8452"),
    ("internal", "internal fragmentation", "#c44e52"),
    ("external", "external fragmentation", "#8c8c8c"),
    ("cached", "cached (prefix LRU, evictable)", "#8fcf9f"),
    ("free", "free", "#e8e8e8"),
]


def _pool(steps: pd.DataFrame, ctx: dict[str, Any]) -> tuple[int, int]:
    """(num_blocks, block_size) from the context, else from the step table itself."""
    nb, bs = ctx.get("num_blocks"), ctx.get("block_size")
    if nb is None:
        nb = int((steps["free_blocks"] + steps["used_blocks"]).max())
    if bs is None:
        used = steps[steps["used_blocks"] > 0]
        if used.empty:
            raise ValueError("block_size is unknown: pass context={'block_size': ...} (no step holds a block)")
        bs = round(float((used["allocated_slots"] / used["used_blocks"]).iloc[0]))
    return int(nb), int(bs)


def memory_stack(steps: pd.DataFrame, num_blocks: int, block_size: int) -> pd.DataFrame:
    """Per step, the slots of each part of :data:`STACK` (they add up to the pool's capacity)."""
    t = steps["token_slots"].to_numpy(float)
    a = steps["allocated_slots"].to_numpy(float)
    if "reserved_slots" in steps and "internal_frag" in steps:
        res, internal = steps["reserved_slots"].to_numpy(float), steps["internal_frag"].to_numpy(float)
    else:  # a step table without the split: all of A - T counted as internal fragmentation
        res, internal = np.zeros_like(t), a - t
    free = steps["free_blocks"].to_numpy(float) * block_size
    cached = steps["cached_blocks"].to_numpy(float) * block_size if "cached_blocks" in steps else np.zeros_like(t)
    ext = np.minimum(steps["external_frag"].to_numpy(float), np.maximum(free - cached, 0))
    rest = np.maximum(free - cached - ext, 0)
    return pd.DataFrame({"token": t, "reserved": res, "internal": internal, "external": ext, "cached": cached,
                         "free": rest}, index=steps.index)


def plot_timeseries(source: Any, *, unit: str = "blocks", x: str = "step", context: Any = None,
                    axes: Any = None, title: str | None = None) -> Any:
    """Stacked KV memory and batch / queue counts of a run over its steps; returns the two Axes.

    ``source``: a ``RunResult``, a run directory, or a step table (``RunResult.steps``, a
    ``steps.parquet``); ``context`` (a mapping, RunResult or run dir) supplies the title's model,
    hardware, budget and workload when ``source`` is a bare table. ``unit``: ``"blocks"`` or
    ``"percent"`` (of the pool); ``x``: ``"step"`` (engine step) or ``"time"`` (s, the run's clock)."""
    import matplotlib.pyplot as plt

    if unit not in ("blocks", "percent"):
        raise ValueError(f"unit={unit!r}: expected 'blocks' or 'percent'")
    if x not in ("step", "time"):
        raise ValueError(f"x={x!r}: expected 'step' or 'time'")
    steps, ctx = table_and_context(source, "steps", context)
    if steps.empty:
        raise ValueError("the step table is empty: the run did no step")
    nb, bs = _pool(steps, ctx)
    ctx = {"num_blocks": nb, "block_size": bs, **ctx}
    stack = memory_stack(steps, nb, bs)
    scale = 1 / bs if unit == "blocks" else 100 / (nb * bs)
    # each row holds over its step: from its start to the next row (x="time": the clock before the step)
    if x == "step":
        starts = steps["step"].to_numpy(float)
        xs = np.r_[starts, starts[-1] + 1]
    else:
        ends = steps["time"].to_numpy(float)
        starts = ends - steps["step_time"].to_numpy(float)
        xs = np.r_[starts, ends[-1]]

    def held(values: Any) -> np.ndarray:
        v = np.asarray(values, float)
        return np.r_[v, v[-1]]

    if axes is None:
        _, axes = plt.subplots(2, 1, sharex=True, figsize=(10, 6.5), height_ratios=(3, 2))
    top, bottom = axes
    top.stackplot(xs, *[held(stack[k].to_numpy() * scale) for k, _, _ in STACK], labels=[lab for _, lab, _ in STACK],
                  colors=[c for _, _, c in STACK], step="post", linewidth=0)
    top.set_ylim(0, nb if unit == "blocks" else 100)
    top.set_ylabel("KV cache (blocks)" if unit == "blocks" else "KV cache (% of pool)")
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    counts = [("batch_size", "batch size (sequences)", "#1f77b4"), ("num_running", "running (sequences)", "#17becf"),
              ("num_waiting", "waiting (requests)", "#ff7f0e"), ("num_swapped", "swapped (requests)", "#9467bd")]
    for col, label, colour in counts:
        if col in steps:
            bottom.plot(xs, held(steps[col].to_numpy()), drawstyle="steps-post", label=label, color=colour, linewidth=1.3)
    bottom.set_ylabel("count (sequences / requests)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("engine step" if x == "step" else "time on the run's clock (s)")
    bottom.set_xlim(xs[0], xs[-1])

    pre = starts[steps["num_preempted"].to_numpy() > 0] if "num_preempted" in steps else np.array([])
    if len(pre):
        n_events = int(steps["num_preempted"].sum())
        for ax in (top, bottom):
            ax.vlines(pre, 0, 1, transform=ax.get_xaxis_transform(), colors="#d62728", linewidth=1.0, alpha=0.7,
                      linestyles="--", label=f"preemption ({n_events} in {len(pre)} steps)" if ax is bottom else None)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    what = title or f"KV cache and batch over {len(steps)} engine steps"
    top.set_title(titled(what, ctx), fontsize=10)
    top.figure.tight_layout()
    return axes


__all__ = ["STACK", "memory_stack", "plot_timeseries"]
