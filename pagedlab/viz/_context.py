"""Where a figure's data and its title come from: a RunResult, a run directory, or DataFrames.

:func:`load_run` reads any of them into a :class:`RunData`; :func:`describe` turns a run's flattened
config and summary into the line every figure title carries (model, hardware or device, KV
budget and block size, workload and its size).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

GIB = 1024**3

# units of the summary keys and step columns a figure may put on an axis (docs/metrics.md)
UNITS = {
    "memory_waste": "fraction", "token_states_share": "fraction", "reserved_share": "fraction",
    "internal_frag_share": "fraction", "external_frag_share": "fraction", "kv_utilization_mean": "fraction",
    "kv_utilization_max": "fraction", "kv_utilization": "fraction", "sharing_saving": "fraction",
    "prefix_hit_rate": "fraction", "batch_size_mean": "sequences", "batch_size_max": "sequences",
    "batch_size": "sequences", "throughput_tok_s": "tokens/s", "requests_per_s": "requests/s",
    "ttft_p50": "s", "ttft_p99": "s", "tpot_p50": "s/token", "normalized_latency_mean": "s/token",
    "makespan_s": "s", "warmup_s": "s", "num_preemptions": "events", "recomputed_tokens": "tokens",
    "chunked_prefill_tokens": "tokens", "swapped_out_blocks": "blocks", "swapped_in_blocks": "blocks",
    "swap_fallbacks": "groups", "cow_copies": "blocks", "fork_copies": "blocks", "prefix_hit_tokens": "tokens",
    "num_requests": "requests", "num_finished": "requests", "num_rejected": "requests",
    "num_finished_seqs": "sequences", "num_rejected_seqs": "sequences", "generated_tokens": "tokens",
    "num_steps": "steps", "num_blocks": "blocks", "num_swap_blocks": "blocks", "block_size": "tokens",
    "kv_bytes_per_token": "bytes", "ttft": "s", "tpot": "s/token", "latency": "s",
    "normalized_latency": "s/token", "request_rate": "requests/s", "workload.request_rate": "requests/s",
    "kv_cache.budget_gib": "GiB", "kv_cache.swap_gib": "GiB", "kv_cache.num_blocks": "blocks",
    "max_num_seqs": "sequences", "max_num_batched_tokens": "tokens", "max_model_len": "tokens",
}
for _suffix in ("_std", "_min", "_max"):
    for _key in ("throughput_tok_s", "requests_per_s", "ttft_p50", "ttft_p99", "tpot_p50",
                 "normalized_latency_mean", "makespan_s"):
        UNITS[_key + _suffix] = UNITS[_key]


def label_with_unit(key: str) -> str:
    """``throughput_tok_s`` -> ``throughput_tok_s (tokens/s)``; the key alone when its unit is unknown."""
    unit = UNITS.get(key) or UNITS.get(key.rsplit(".", 1)[-1])
    return f"{key} ({unit})" if unit else key


@dataclass
class RunData:
    """One run's tables and metadata, whatever it was read from."""

    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    steps: pd.DataFrame | None = None
    requests: pd.DataFrame | None = None
    name: str | None = None  # the run dir, when read from one

    @property
    def context(self) -> dict[str, Any]:
        """Flattened config with the summary on top: what :func:`describe` reads."""
        from pagedlab.app.results import flatten

        return {**flatten(self.config), **self.summary}


def load_run(source: Any) -> RunData:
    """A :class:`RunData` from a ``RunResult``, a run directory (``summary.json``, ``steps.parquet``,
    ``requests.parquet``, ``config.json`` or ``.hydra/config.yaml``) or a ``RunData``."""
    from pagedlab.engine.result import RunResult, stored_config

    if isinstance(source, RunData):
        return source
    if isinstance(source, RunResult):
        return RunData(dict(source.summary), dict(source.config), source.steps, source.requests)
    if isinstance(source, (str, Path)):
        d = Path(source)
        if not d.is_dir():
            raise FileNotFoundError(f"{d} is not a run directory")
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").is_file() else {}
        config = (stored_config(d) or ("", {}))[1]
        steps = pd.read_parquet(d / "steps.parquet") if (d / "steps.parquet").is_file() else None
        requests = pd.read_parquet(d / "requests.parquet") if (d / "requests.parquet").is_file() else None
        if not summary and steps is None and requests is None:
            raise FileNotFoundError(f"{d} holds no run results (summary.json, steps.parquet, requests.parquet)")
        return RunData(summary, config, steps, requests, name=str(d))
    raise TypeError(f"expected a RunResult, a run directory or a DataFrame, got {type(source).__name__}")


def table_and_context(source: Any, table: str, context: Any = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The ``steps`` or ``requests`` table of ``source`` (a DataFrame is taken as that table) and the
    context for its title (from ``source``, or from ``context``: a mapping, RunResult or run dir)."""
    if isinstance(source, pd.DataFrame):
        df, ctx = source, {}
    else:
        run = load_run(source)
        df = getattr(run, table)
        if df is None:
            raise FileNotFoundError(f"{run.name or 'the run'} has no {table} table")
        ctx = run.context
    if context is not None:
        ctx = {**ctx, **(dict(context) if isinstance(context, Mapping) else load_run(context).context)}
    return df, ctx


def _get(ctx: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        v = ctx.get(k)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return v
    return None


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def describe(ctx: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """One line saying what a run is: model, hardware or device, KV budget and block size,
    allocator and sharing when not the defaults, workload and its size. Keys in ``skip`` (and
    their dotted forms) are left out: a sweep's varying keys, which the axes or legend show."""
    skipped = set(skip)

    def keep(*names: str) -> bool:
        return not any(n in skipped or n.split(".", 1)[0] in skipped for n in names)

    parts: list[str] = []
    model = _get(ctx, "model.name", "model")
    if model == "hf":
        model = _get(ctx, "model.name_or_path") or model
    if model is not None and keep("model", "model.name"):
        parts.append(str(model))
    executor = _get(ctx, "executor.name", "executor")
    hardware = _get(ctx, "hardware.name", "hardware")
    if executor == "torch":
        device = _get(ctx, "device_name", "device")
        if keep("device", "executor"):
            parts.append(f"torch on {device or 'auto'}")
    elif hardware is not None and keep("hardware", "hardware.name", "executor"):
        parts.append(f"{hardware}" + (" (simulated)" if executor in (None, "sim") else ""))
    nb, bs, kvb = _get(ctx, "num_blocks"), _get(ctx, "block_size"), _get(ctx, "kv_bytes_per_token")
    budget = _get(ctx, "kv_cache.budget_gib")
    mem = []
    if nb is not None and keep("num_blocks", "kv_cache.num_blocks", "kv_cache.budget_gib"):
        mem.append(f"{int(nb)} blocks")
    if bs is not None and keep("block_size"):
        mem.append(f"{int(bs)} tokens/block" if not mem else f"× {int(bs)} tokens")
    if nb is not None and bs is not None and kvb is not None and keep("kv_cache.budget_gib", "num_blocks"):
        mem.append(f"({int(nb) * int(bs) * int(kvb) / GIB:.3g} GiB KV)")
    elif budget is not None and keep("kv_cache.budget_gib"):
        mem.append(f"(budget {_num(budget)} GiB)")
    if mem:
        parts.append(" ".join(mem))
    alloc = _get(ctx, "allocator.name", "allocator")
    extras = []
    if alloc is not None and alloc != "paged" and keep("allocator", "allocator.name"):
        extras.append(str(alloc))
    if _get(ctx, "cow") is False and keep("cow"):
        extras.append("no CoW")
    if _get(ctx, "prefix_cache") is True and keep("prefix_cache"):
        extras.append("prefix cache")
    evict = _get(ctx, "eviction.mode", "eviction")
    if evict is not None and evict != "recompute" and keep("eviction", "eviction.mode"):
        extras.append(f"evict by {evict}")
    if extras:
        parts.append(", ".join(extras))
    wl = []
    name = _get(ctx, "workload.name", "workload")
    if name is not None and keep("workload", "workload.name"):
        wl.append(f"{name} workload")
    nreq = _get(ctx, "num_requests", "workload.num_requests")
    if nreq is not None and keep("workload.num_requests", "num_requests"):
        wl.append(f"{int(nreq)} requests")
    rate = _get(ctx, "workload.request_rate")
    if rate is not None and keep("workload.request_rate"):
        wl.append(f"{_num(rate)} req/s")
    n = _get(ctx, "workload.n", "sampling.n")
    beam = _get(ctx, "workload.beam_width", "sampling.beam_width")
    if beam is not None and int(beam) > 1 and keep("sampling", "sampling.beam_width", "workload.beam_width"):
        wl.append(f"beam width {int(beam)}")
    elif n is not None and int(n) > 1 and keep("sampling", "sampling.n", "workload.n"):
        wl.append(f"n={int(n)} samples")
    if wl:
        parts.append(", ".join(wl))
    return " · ".join(parts)


def titled(what: str, ctx: Mapping[str, Any], skip: Iterable[str] = ()) -> str:
    """``what`` on the first line, :func:`describe` of the run on the second (if it knows anything)."""
    line = describe(ctx, skip)
    return f"{what}\n{line}" if line else what
