"""Runs as pandas rows: load run dirs / sweep dirs / globs, flatten configs, compare groups.

One row per run: ``run_dir``, ``job``, ``overrides`` (the command-line overrides), ``status`` and
``error``, one column per config group choice (``allocator``, ``model``, ...; ``experiment`` if used),
the summary metrics (``memory_waste``, ...) and the flattened config (``block_size``, ``allocator.name``,
...). Only finished runs count: a dir with ``finished.json`` whose files match it (see
:func:`pagedlab.engine.result.check_run`); anything else is skipped with a warning.
"""

from __future__ import annotations

import glob
import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from pagedlab.engine.metrics import HEADLINE
from pagedlab.engine.result import MARKER, check_run, stored_config


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> dotted keys; lists become JSON text so every column stays scalar."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = _scalar(value)
    return out


def _scalar(value: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return value


def override_key(override: str) -> str:
    """``+experiment=x`` -> ``experiment``; ``~a.b`` -> ``a.b``."""
    return override.split("=", 1)[0].lstrip("+~")


def make_row(summary: Mapping[str, Any], config: Mapping[str, Any], *, choices: Mapping[str, Any] | None = None,
             overrides: Sequence[str] = (), run_dir: str | None = None, job: int | None = None) -> dict[str, Any]:
    """One results row: run info, override columns, choices, summary metrics, flattened config."""
    flat = flatten(config)
    choices = {k: v for k, v in (choices or {}).items() if not k.startswith("hydra")}
    row: dict[str, Any] = {"run_dir": run_dir, "job": job, "overrides": " ".join(overrides)}
    for ov in overrides:
        key = override_key(ov)
        if not key.startswith("hydra"):
            row[key] = choices.get(key, flat.get(key, ov.split("=", 1)[-1]))
    row.update(choices)
    row.update({k: _scalar(v) for k, v in summary.items() if k not in flat})
    row.update({k: v for k, v in flat.items() if k not in row})
    return row


def read_hydra(run_dir: str | Path) -> tuple[dict[str, Any], list[str], int | None]:
    """(choices, overrides, job number) from a run dir's ``.hydra/hydra.yaml`` (empty if absent)."""
    path = Path(run_dir) / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return {}, [], None
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    choices = hydra.get("runtime", {}).get("choices", {}) or {}
    overrides = list(hydra.get("overrides", {}).get("task", []) or [])
    num = hydra.get("job", {}).get("num")
    return choices, overrides, num if isinstance(num, int) else None


def with_status(row: dict[str, Any], status: str, error: str | None = None) -> dict[str, Any]:
    """row with ``status`` ("finished"/"failed") and ``error`` placed after ``overrides``."""
    head = {k: row[k] for k in ("run_dir", "job", "overrides") if k in row}
    return {**head, "status": status, "error": error, **{k: v for k, v in row.items() if k not in head}}


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The row of one run dir (summary.json + .hydra/config.yaml or config.json + Hydra choices)."""
    d = Path(run_dir)
    summary = json.loads((d / "summary.json").read_text())
    config = (stored_config(d) or ("", {}))[1]
    choices, overrides, job = read_hydra(d)
    row = make_row(summary, config, choices=choices, overrides=overrides, run_dir=str(d), job=job)
    return with_status(row, "finished")


def find_runs(path: str | Path | Iterable[str | Path], warn: bool = True, stacklevel: int = 2) -> list[Path]:
    """Finished run dirs under a run dir, a sweep dir, a glob, or a list of those. A dir with results
    but no valid ``finished.json`` (unfinished, interrupted, failed, rewritten) is skipped, with a
    warning naming it and why unless ``warn=False``; ``stacklevel`` is the warning's, as for
    :func:`warnings.warn` (2: the caller of find_runs)."""
    if not isinstance(path, (str, Path)):
        found: set[Path] = set()
        for p in path:  # a loop, not a comprehension: the stacklevel counts frames
            found.update(find_runs(p, warn, stacklevel + 1))
        return sorted(found, key=_run_order)
    hits = [Path(h) for h in glob.glob(str(path), recursive=True)] if any(c in str(path) for c in "*?[") \
        else [Path(path)]
    candidates: set[Path] = set()
    for h in hits:
        if h.is_file() and h.name in (MARKER, "summary.json"):
            candidates.add(h.parent)
        elif h.is_dir():
            candidates.update(s.parent for name in (MARKER, "summary.json") for s in h.rglob(name)
                              if ".hydra" not in s.parts)
    runs = []
    for d in sorted(candidates, key=_run_order):
        problem = check_run(d)
        if problem is None:
            runs.append(d)
        elif warn:
            warnings.warn(f"pagedlab: skipping {d}: {problem}", RuntimeWarning, stacklevel=stacklevel)
    return sorted(runs, key=_run_order)


def _run_order(p: Path) -> tuple:
    return tuple((0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts)


def load_results(path: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One DataFrame of runs from a run dir, a sweep dir, a glob (``results/multirun/**``) or a list."""
    runs = find_runs(path, stacklevel=3)  # warnings point at the caller of load_results
    if not runs:
        raise FileNotFoundError(f"no finished runs ({MARKER}) found under {path!s}")
    return pd.DataFrame([read_run(r) for r in runs])


def headline_columns(df: pd.DataFrame) -> list[str]:
    return [m for m in HEADLINE if m in df.columns]


def results_dir(start: str | Path | None = None) -> Path:
    """The ``results/`` dir that CLI runs started from the project write to, wherever a notebook or script
    is started: ``$PAGEDLAB_RESULTS`` if set, else the nearest ``results/`` in ``start`` (default: the current
    dir) or one of its parents, else the source checkout's ``results/`` (next to its ``conf/``), else
    ``./results`` (which may not exist yet)."""
    import os

    env = os.environ.get("PAGEDLAB_RESULTS")
    if env:
        return Path(env).expanduser()
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "results").is_dir():
            return d / "results"
    from pagedlab.config import config_dir

    checkout = config_dir().parent
    if (checkout / "pyproject.toml").is_file():  # an editable install: the repo next to the package
        return checkout / "results"
    return here / "results"


# -- comparing runs ---------------------------------------------------------------------------------------
META = ("run_dir", "job", "overrides", "status", "error")


def metric_names() -> set[str]:
    """Every summary key (what a run measured, not how it was configured); ``block_size`` and ``repeats`` are
    config keys too (a row holds their config value)."""
    from pagedlab.experiment import summary_keys

    return summary_keys() - {"block_size", "repeats"}


def timed_metrics() -> tuple[str, ...]:
    from pagedlab.experiment import TIMED_KEYS

    return TIMED_KEYS


def _hashable(s: pd.Series) -> pd.Series:
    if s.map(lambda v: isinstance(v, (list, dict, set, tuple)) or hasattr(v, "__array__")).any():
        return s.map(lambda v: json.dumps(list(v) if hasattr(v, "__array__") or isinstance(v, (set, tuple)) else v,
                                          default=str))
    return s


def key_columns(df: pd.DataFrame) -> list[str]:
    """The columns that say which point a run is (group choices, swept and config keys): every column that
    is neither a summary metric nor run bookkeeping (``run_dir``, ``job``, ``overrides``, ``status``, ``error``)."""
    metrics = metric_names()
    return [c for c in df.columns if c not in META and c not in metrics]


def swept_keys(df: pd.DataFrame) -> list[str]:
    """The keys the runs' overrides set, in the order they first appear (``hydra.*`` left out)."""
    if "overrides" not in df:
        return []
    keys: dict[str, None] = {}
    for text in df["overrides"].dropna():
        for ov in str(text).split():
            if "=" in ov and not override_key(ov).startswith("hydra"):
                keys[override_key(ov)] = None
    return [k for k in keys if k in df.columns]


def varying_within(df: pd.DataFrame, by: Sequence[str], candidates: Sequence[str]) -> list[str]:
    """The ``candidates`` that take more than one value within some group of rows equal in ``by``."""
    if df.empty:
        return []
    if not by:
        return [c for c in candidates if df[c].nunique(dropna=False) > 1]
    g = df.groupby(list(by), dropna=False, sort=False)
    return [c for c in candidates if (g[c].nunique(dropna=False) > 1).any()]


def also_varying(df: pd.DataFrame, by: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The keys besides ``by`` that vary within its groups, fewest first: one at a time, the swept keys (in
    their order) before group choices before dotted config keys, until no other key varies. A key that only
    varies with one already taken (``sampling.n`` with ``sampling``) is not added."""
    swept = swept_keys(df)
    cands = [c for c in key_columns(df) if c not in by and c not in exclude]
    kf = pd.DataFrame({c: _hashable(df[c]) for c in dict.fromkeys([*by, *cands])}, index=df.index)
    extra: list[str] = []
    while True:
        vary = varying_within(kf, [*by, *extra], [c for c in cands if c not in extra])
        if not vary:
            return extra
        extra.append(min(vary, key=lambda c: (0, swept.index(c), c) if c in swept
                         else (1 if "." not in c else 2, len(c), c)))


def _pooled(group: pd.DataFrame, m: str) -> tuple[float, float, float]:
    """(std, min, max) of every repeat of a group's runs: the sample standard deviation pooled from each
    run's mean and standard deviation over its ``repeats``, and the smallest and largest value."""
    import math

    r = pd.to_numeric(group.get("repeats", pd.Series(1, index=group.index)), errors="coerce").fillna(1)
    mean, std = group[m].astype(float), group[f"{m}_std"].astype(float).fillna(0.0)
    n = float(r.sum())
    lo = group[f"{m}_min"].astype(float).min() if f"{m}_min" in group else mean.min()
    hi = group[f"{m}_max"].astype(float).max() if f"{m}_max" in group else mean.max()
    if n <= 1:
        return float("nan"), lo, hi
    grand = float((r * mean).sum() / n)
    ss = float(((r - 1) * std**2).sum() + (r * (mean - grand) ** 2).sum())
    return math.sqrt(ss / (n - 1)), lo, hi


def has_spread(df: pd.DataFrame, metric: str) -> bool:
    """Whether the runs measured a spread of ``metric``: a timed metric of some run with ``repeats`` > 1."""
    if metric not in timed_metrics() or f"{metric}_std" not in df or "repeats" not in df:
        return False
    return bool((pd.to_numeric(df["repeats"], errors="coerce").fillna(1) > 1).any())


def compare(df: pd.DataFrame, by: str | Sequence[str], metrics: str | Sequence[str] | None = None,
            columns: str | None = None, agg: str = "mean", average_over: str | Sequence[str] = (),
            warn: bool = True) -> pd.DataFrame:
    """Metrics of the runs grouped by the ``by`` columns (choices such as ``allocator``, config keys such
    as ``block_size``); ``columns`` pivots one more key into columns. Failed runs are left out.

    Never averages silently over a key that varies: any other key (group choice or config key) that
    takes several values within a group is grouped by too, with a warning naming it (``warn=False``:
    no warning), unless it is in ``average_over``: then the group's runs are averaged with ``agg`` on
    purpose and the ``averaged_over`` column says over which values. Runs of the same point are
    aggregated with ``agg``; a ``runs`` column counts them when a group holds more than one. Timed
    metrics of runs with ``repeats`` > 1 come with ``<metric>_std``, ``_min`` and ``_max`` over every
    repeat of the group (the standard deviation pooled from the runs' means and spreads);
    :func:`format_compare` shows them as ``mean ± std (min–max)``."""
    by = [by] if isinstance(by, str) else list(by)
    average_over = [average_over] if isinstance(average_over, str) else list(average_over)
    metrics = list(dict.fromkeys([metrics] if isinstance(metrics, str) else list(metrics or headline_columns(df))))
    missing = [c for c in [*by, *metrics, *average_over, *([columns] if columns else [])] if c not in df.columns]
    if missing:
        raise KeyError(f"compare: no column {missing}; available: {', '.join(map(str, df.columns))}")
    data = df.reset_index(drop=True)  # one label per run (a concatenation of tables repeats labels)
    if "status" in data:
        failed = int((data["status"] != "finished").sum())
        data = data[data["status"] == "finished"]
        if failed and warn:
            warnings.warn(f"compare: {failed} failed run{'s' * (failed != 1)} left out", RuntimeWarning, stacklevel=2)
    pivot = [columns] if columns else []
    extra = also_varying(data, [*by, *pivot], exclude=average_over)
    if extra and warn:
        warnings.warn(f"compare: {', '.join(extra)} also var{'y' if len(extra) > 1 else 'ies'} within the groups "
                      f"of by={by}: grouped by "
                      f"{'them' if len(extra) > 1 else 'it'} too (average_over={extra} averages over "
                      f"{'them' if len(extra) > 1 else 'it'} on purpose)", RuntimeWarning, stacklevel=2)
    keys = [*by, *extra, *pivot]
    work = pd.DataFrame({c: _hashable(data[c]) for c in dict.fromkeys([*keys, *average_over])}, index=data.index)
    numeric = [m for m in metrics if pd.api.types.is_numeric_dtype(data[m])]
    spread = [m for m in numeric if has_spread(data, m)]
    values = list(dict.fromkeys([*numeric, *(f"{m}{s}" for m in spread for s in ("_std", "_min", "_max")
                                             if f"{m}{s}" in data), *(["repeats"] if spread else [])]))
    work = work.join(data[[c for c in values if c not in work]])
    g = work.groupby(keys, sort=True, dropna=False)
    table = g[numeric].agg(agg)
    groups = list(g)  # (key, rows) in the table's order
    for m in spread:
        stats = [_pooled(rows, m) for _, rows in groups]
        for i, s in enumerate(("std", "min", "max")):
            table[f"{m}_{s}"] = [st[i] for st in stats]
    for m in metrics:  # non-numeric metrics (time_source): the group's distinct values
        if m not in numeric:
            table[m] = [",".join(sorted(set(map(str, data.loc[rows.index, m])))) for _, rows in groups]
    table = table[[c for m in metrics for c in (m, *(f"{m}_{s}" for s in ("std", "min", "max") if m in spread))]]
    counts = g.size()
    if (counts > 1).any():
        table["runs"] = counts
    if average_over:
        table["averaged_over"] = ["; ".join(f"{k}: {', '.join(map(format_value, sorted(set(rows[k]), key=_order)))}"
                                            for k in average_over) for _, rows in groups]
    if columns:
        table = table.unstack(columns)
    return table


def _order(v: Any) -> tuple:
    return (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0, str(v))


def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def spread_text(mean: Any, std: Any, lo: Any = None, hi: Any = None) -> str:
    """``1975 ± 40 (1930–2010)``: a timed figure with its spread over repeats (range left out if unknown)."""
    import math

    text = format_value(mean)
    if isinstance(std, (int, float)) and not math.isnan(std):
        text += f" ± {_two_digits(std)}"
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and not (math.isnan(lo) or math.isnan(hi)):
            text += f" ({lo:.4g}–{hi:.4g})"
    return text


def _two_digits(v: float) -> str:
    """Two significant digits, without an exponent for the sizes a spread has: 150, 1.5, 0.013."""
    import math

    if v == 0 or not math.isfinite(v) or abs(v) < 1e-4:
        return f"{v:.2g}"
    digits = 1 - math.floor(math.log10(abs(v)))
    return f"{round(v, digits):.{max(digits, 0)}f}"


def with_spread_text(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (from :func:`compare`, not pivoted) with each metric that has ``_std``/``_min``/``_max``
    columns shown as one text column ``mean ± std (min–max)`` and the spread columns dropped."""
    out = table.copy()
    for col in [c for c in table.columns if isinstance(c, str) and f"{c}_std" in table.columns]:
        lo, hi = table.get(f"{col}_min"), table.get(f"{col}_max")
        out[col] = [spread_text(m, s, lo.iloc[i] if lo is not None else None, hi.iloc[i] if hi is not None else None)
                    for i, (m, s) in enumerate(zip(table[col], table[f"{col}_std"]))]
        out = out.drop(columns=[c for c in (f"{col}_std", f"{col}_min", f"{col}_max") if c in out])
    return out


def format_compare(table: pd.DataFrame) -> str:
    """:func:`compare`'s table as plain text: the group keys as columns, floats to 4 significant digits,
    timed metrics with a spread as ``mean ± std (min–max)``."""
    flat = with_spread_text(table).reset_index()
    return flat.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def format_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A plain-text table of the given columns (those present), floats to 4 significant digits."""
    cols = [c for c in dict.fromkeys(columns) if c in df.columns]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
