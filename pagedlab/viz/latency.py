"""Latency distributions of a run, and a sweep's metric against a swept key.

:func:`plot_latency`: TTFT, TPOT and normalized latency of the finished requests as ECDFs or
histograms, one panel each, one line per run when given several.

:func:`metric_vs_key`: a sweep table (``pagedlab.sweep`` or ``pagedlab.load_results``) as a
metric against one swept key. Every other key that varies gets its own line: the points of a line
differ only in ``x``, so nothing is averaged over a key that varies unless asked
(``average_over``); with an explicit ``hue`` that leaves another key varying it raises, naming it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pagedlab.viz._context import describe, label_with_unit, load_run, table_and_context, titled

LATENCY = {  # column -> (axis label, unit per second-scaled value)
    "ttft": ("time to first token", ""),
    "tpot": ("time per output token", "/token"),
    "normalized_latency": ("normalized latency = latency / output tokens", "/token"),
    "latency": ("end-to-end latency", ""),
}
PANEL = {"ttft": "TTFT", "tpot": "TPOT", "normalized_latency": "normalized latency", "latency": "latency"}
META = ("run_dir", "job", "overrides", "status", "error")


def _sources(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping) and not isinstance(source, pd.DataFrame):
        return {str(k): v for k, v in source.items()}
    return {"": source}


def _common_context(contexts: list[dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
    """Keys with one value across the runs, and the keys that differ."""
    if not contexts:
        return {}, set()
    first = contexts[0]
    same = {k: v for k, v in first.items() if all(_eq(c.get(k), v) for c in contexts[1:])}
    return same, set().union(*contexts) - set(same)


def _eq(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    except (ValueError, TypeError):
        return False


def latency_values(requests: pd.DataFrame, metric: str, rows: str = "request") -> np.ndarray:
    """The metric's values over finished rows: ``rows="request"`` takes each request's first row (as the
    summary's percentiles do; TTFT is always per request), ``"sequence"`` every finished sequence."""
    if metric not in requests:
        raise KeyError(f"the requests table has no column {metric!r}; columns: {', '.join(requests.columns)}")
    df = requests[requests["status"] == "finished"] if "status" in requests else requests
    if (rows == "request" or metric == "ttft") and "seq_index" in df:
        df = df[df["seq_index"] == 0]
    elif rows not in ("request", "sequence"):
        raise ValueError(f"rows={rows!r}: expected 'request' or 'sequence'")
    v = pd.to_numeric(df[metric], errors="coerce").to_numpy(float)
    return v[~np.isnan(v)]


def plot_latency(source: Any, metrics: Sequence[str] = ("ttft", "tpot", "normalized_latency"), *,
                 kind: str = "ecdf", rows: str = "request", unit: str = "ms", context: Any = None,
                 axes: Any = None, bins: int = 30, title: str | None = None) -> Any:
    """Latency distributions, one panel per metric; returns the Axes.

    ``source``: a ``RunResult``, a run directory or a requests table, or a mapping label -> any of
    those to compare runs (one line each). ``kind``: ``"ecdf"`` or ``"hist"``; ``unit``: ``"ms"`` or
    ``"s"``; ``rows``: see :func:`latency_values`."""
    import matplotlib.pyplot as plt

    if kind not in ("ecdf", "hist"):
        raise ValueError(f"kind={kind!r}: expected 'ecdf' or 'hist'")
    if unit not in ("ms", "s"):
        raise ValueError(f"unit={unit!r}: expected 'ms' or 's'")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    unknown = [m for m in metrics if m not in LATENCY]
    if unknown:
        raise ValueError(f"metrics {unknown} are not latency columns; allowed: {', '.join(LATENCY)}")
    runs = {label: table_and_context(src, "requests", context) for label, src in _sources(source).items()}
    ctx, differ = _common_context([c for _, c in runs.values()])
    scale = 1000.0 if unit == "ms" else 1.0
    if axes is None:
        _, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics) + 0.8, 4.0), squeeze=False)
        axes = axes[0]
    axes = list(np.atleast_1d(axes))
    counts = []
    for ax, metric in zip(axes, metrics):
        name, per = LATENCY[metric]
        for label, (requests, _) in runs.items():
            v = np.sort(latency_values(requests, metric, rows)) * scale
            counts.append(len(v))
            if not len(v):
                continue
            stats = f"p50 {np.percentile(v, 50):.3g}, p99 {np.percentile(v, 99):.3g} {unit}{per}"
            line_label = f"{label}: {stats}" if label else stats
            if kind == "ecdf":
                ax.step(np.r_[v[0], v], np.arange(len(v) + 1) / len(v), where="post", label=line_label)
            else:
                ax.hist(v, bins=bins, histtype="step", linewidth=1.4, label=line_label)
        ax.set_xlabel(f"{name} ({unit}{per})")
        ax.set_ylabel("fraction of requests ≤ x" if kind == "ecdf" else "requests")
        if kind == "ecdf":
            ax.set_ylim(0, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right" if kind == "ecdf" else "upper right")
        ax.set_title(PANEL.get(metric, metric), fontsize=9)
    sources = {str(c.get("time_source")) for _, c in runs.values() if c.get("time_source")}
    names = {"wall": "wall-clock time", "modelled": "modelled time"}
    clock = "mixed time sources" if len(sources) > 1 else "".join(names.get(s, f"{s} time") for s in sources)
    what = title or (f"Latency distributions of finished {'requests' if rows == 'request' else 'sequences'}"
                     f" ({', '.join(f'{c}' for c in sorted(set(counts)))} per run"
                     f"{', ' + clock if clock else ''})" if counts else "Latency")
    axes[0].figure.suptitle(titled(what, ctx, skip=differ), fontsize=10)
    axes[0].figure.tight_layout()
    return axes


# -- a sweep's metric against a swept key ---------------------------------------------------------------
def _metric_columns() -> set[str]:
    from pagedlab.experiment import summary_keys

    return summary_keys() - {"block_size"}  # block_size is a config key too


def _hashable(s: pd.Series) -> pd.Series:
    if s.map(lambda v: isinstance(v, (list, dict, set, np.ndarray))).any():
        return s.map(lambda v: str(list(v)) if isinstance(v, (np.ndarray, set)) else str(v))
    return s


def varying_keys(df: pd.DataFrame, by: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """The ``candidates`` that take more than one value within some group of rows equal in ``by``."""
    from pagedlab.app.results import varying_within

    return varying_within(df, by, candidates)


def _preference(col: str, overridden: Sequence[str]) -> tuple[int, int, str]:
    """Which varying key names a line: override keys in their order, then group choices, then the shortest."""
    if col in overridden:
        return (0, overridden.index(col), col)
    return (1 if "." not in col else 2, len(col), col)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def metric_vs_key(df: Any, metric: str, x: str, hue: str | Sequence[str] | None = None, *,
                  average_over: Sequence[str] = (), keys: Sequence[str] | None = None, agg: str = "mean",
                  ax: Any = None, title: str | None = None) -> Any:
    """``metric`` against the swept key ``x``, one line per value of the other varying keys; returns the Axes.

    ``df``: one row per run (``pagedlab.sweep``, ``pagedlab.load_results``), or what ``load_results``
    reads (a sweep dir, a glob, run dirs); failed runs are left out.
    ``hue``: the key(s) that tell the lines apart. None: every key other than ``x`` that varies
    (the override keys first; a config key that only varies with them, such as ``sampling.n`` with
    ``sampling``, adds no line). Given, and another key still varies within a line: ValueError naming
    it. ``average_over``: keys to average over on purpose (the title says so). Repeated runs of one
    point (same keys) are aggregated with ``agg`` and the title says how many. ``keys``: the columns
    that identify a point (default: every column that is not a summary metric or run bookkeeping)."""
    import matplotlib.pyplot as plt

    if not isinstance(df, pd.DataFrame):  # a sweep dir, a glob or a list of run dirs
        from pagedlab.app.results import load_results

        df = load_results(df)
    for col in (metric, x):
        if col not in df.columns:
            raise KeyError(f"metric_vs_key: no column {col!r}; available: {', '.join(map(str, df.columns))}")
    if not pd.api.types.is_numeric_dtype(df[metric]):
        raise TypeError(f"metric_vs_key: {metric!r} is not numeric (dtype {df[metric].dtype})")
    hue_keys = [hue] if isinstance(hue, str) else list(hue or [])
    average_over = [average_over] if isinstance(average_over, str) else list(average_over)
    missing = [k for k in [*hue_keys, *average_over] if k not in df.columns]
    if missing:
        raise KeyError(f"metric_vs_key: no column {missing}; available: {', '.join(map(str, df.columns))}")
    data = df
    notes = []
    if "status" in data:
        failed = int((data["status"] != "finished").sum())
        data = data[data["status"] == "finished"]
        if failed:
            notes.append(f"{failed} failed run{'s' * (failed != 1)} left out")
            warnings.warn(f"metric_vs_key: {failed} failed runs left out", RuntimeWarning, stacklevel=2)
    metrics = _metric_columns() | {metric}
    cands = list(keys) if keys is not None else [c for c in data.columns if c not in META and c not in metrics]
    cands = [c for c in cands if c != x and c not in hue_keys and c not in average_over and c in data.columns]
    kf = pd.DataFrame({c: _hashable(data[c]) for c in dict.fromkeys([x, *hue_keys, *cands])}, index=data.index)
    from pagedlab.app.results import swept_keys

    overridden = swept_keys(data)  # the keys the runs' overrides set, in order
    if hue is None:
        while True:
            vary = varying_keys(kf, [x, *hue_keys], [c for c in cands if c not in hue_keys])
            if not vary:
                break
            hue_keys.append(min(vary, key=lambda c: _preference(c, overridden)))
    else:
        vary = varying_keys(kf, [x, *hue_keys], cands)
        if vary:
            raise ValueError(
                f"metric_vs_key: {', '.join(vary)} also vary within the lines of hue={hue_keys} (x={x!r}); "
                f"each point would average over them. Pass them in hue=[...] for one line per value, or "
                f"average_over=[...] to average over them on purpose.")
    plot = kf[[x, *hue_keys]].assign(_y=data[metric].to_numpy())
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.8))
    numeric_x = pd.api.types.is_numeric_dtype(data[x])
    groups = plot.groupby(hue_keys, dropna=False, sort=True) if hue_keys else [((), plot)]
    most = 1
    for name, sub in groups:
        name = name if isinstance(name, tuple) else (name,)
        pts = sub.groupby(x, dropna=False, sort=True)["_y"].agg([agg, "count"])
        most = max(most, int(pts["count"].max()))
        label = ", ".join(f"{k}={_fmt(v)}" for k, v in zip(hue_keys, name)) or None
        xs = pts.index.to_numpy() if numeric_x else pts.index.astype(str)
        ax.plot(xs, pts[agg].to_numpy(), marker="o", label=label)
    if average_over:
        notes.append(f"{agg} over {', '.join(average_over)}")
    if most > 1:
        notes.append(f"{agg} of up to {most} runs per point")
    ax.set_xlabel(label_with_unit(x))
    ax.set_ylabel(label_with_unit(metric))
    if hue_keys:
        ax.legend(title=", ".join(hue_keys), fontsize=8, title_fontsize=8)
    constant = {} if data.empty else {c: data[c].iloc[0] for c in data.columns
                                       if c not in META and _hashable(data[c]).nunique(dropna=False) == 1}
    what = title or f"{metric} against {x}" + (f" ({'; '.join(notes)})" if notes else "")
    ax.set_title(titled(what, constant, skip=[x, *hue_keys, *average_over]), fontsize=10)
    ax.figure.tight_layout()
    return ax


def run_label(source: Any) -> str:
    """A short label for a run (its description), for legends."""
    return describe(load_run(source).context)


__all__ = ["LATENCY", "latency_values", "metric_vs_key", "plot_latency", "run_label", "varying_keys"]
