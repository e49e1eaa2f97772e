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


def compare(df: pd.DataFrame, by: str | Sequence[str], metrics: str | Sequence[str] | None = None,
            columns: str | None = None, agg: str = "mean") -> pd.DataFrame:
    """Metrics grouped by the ``by`` columns (choices such as ``allocator`` or config keys such as
    ``block_size``), aggregated with ``agg`` over repeats; ``columns`` pivots one key into columns."""
    by = [by] if isinstance(by, str) else list(by)
    metrics = [metrics] if isinstance(metrics, str) else list(metrics or headline_columns(df))
    missing = [c for c in [*by, *metrics, *([columns] if columns else [])] if c not in df.columns]
    if missing:
        raise KeyError(f"compare: no column {missing}; available: {', '.join(map(str, df.columns))}")
    numeric = [m for m in metrics if pd.api.types.is_numeric_dtype(df[m])]
    if columns:
        return df.pivot_table(index=by, columns=columns, values=numeric, aggfunc=agg, sort=True)
    table = df.groupby(by, sort=True, dropna=False)[numeric].agg(agg)
    for m in metrics:  # non-numeric metrics (time_source): the group's distinct values
        if m not in numeric:
            table[m] = df.groupby(by, sort=True, dropna=False)[m].agg(lambda s: ",".join(sorted(set(map(str, s)))))
    return table


def format_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A plain-text table of the given columns (those present), floats to 4 significant digits."""
    cols = [c for c in dict.fromkeys(columns) if c in df.columns]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")
