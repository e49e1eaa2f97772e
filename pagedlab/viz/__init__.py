"""pagedlab.viz: pictures of the KV cache and of runs (matplotlib).

The mechanism, step by step (recording is opt-in: a run without a recorder pays nothing):

* :class:`BlockTableRecorder` (an ``Engine.run`` ``on_step`` callback) or :func:`record_run` (from a
  config) keep a :class:`BlockSnapshot` per step: block tables, reference counts, free / cached /
  used blocks, copy-on-write and fork copies, swapped sequences.
* :func:`draw_block_tables` draws one snapshot: the block pool as a grid and each sequence's logical
  blocks mapped to physical blocks, shared blocks and CoW copies marked, unfilled tails shaded.
* :func:`animate_block_tables` animates the snapshots; :func:`to_html` plays it in a notebook,
  :func:`save_gif` writes a GIF.

A run and a sweep:

* :func:`plot_timeseries`: KV memory stacked (token states, reserved, internal and external
  fragmentation, cached, free) and batch / waiting / swapped counts over the steps, preemptions marked.
* :func:`plot_latency`: TTFT, TPOT and normalized latency distributions (ECDF or histogram).
* :func:`metric_vs_key`: a sweep's metric against a swept key, one line per other varying key
  (never averaging silently over a key that varies).
* :func:`memory_breakdown`: the paper's Figure-2 bars (from :mod:`pagedlab.app.plots`).

Every figure is titled with what it shows and the run it comes from (model, hardware or device,
KV blocks and block size, workload and its size) and takes a ``RunResult``, a run directory or a
DataFrame. ``python -m pagedlab.viz.demo OUT_DIR`` draws the README's pictures.
"""

from __future__ import annotations

from pagedlab.app.plots import memory_breakdown
from pagedlab.viz._context import RunData, describe, load_run
from pagedlab.viz.animate import animate_block_tables, save_gif, to_html
from pagedlab.viz.blocks import Layout, draw_block_tables, draw_step
from pagedlab.viz.latency import latency_values, metric_vs_key, plot_latency, varying_keys
from pagedlab.viz.snapshot import BlockSnapshot, BlockTableRecorder, SeqSnapshot, record_run, take_snapshot
from pagedlab.viz.timeseries import memory_stack, plot_timeseries

__all__ = [
    "BlockSnapshot", "BlockTableRecorder", "Layout", "RunData", "SeqSnapshot", "animate_block_tables", "describe",
    "draw_block_tables", "draw_step", "latency_values", "load_run", "memory_breakdown", "memory_stack",
    "metric_vs_key", "plot_latency", "plot_timeseries", "record_run", "save_gif", "take_snapshot", "to_html",
    "varying_keys",
]
