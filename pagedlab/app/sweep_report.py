"""What a CLI sweep shows when it ends: the comparison table its study names, and its figures.

The table (:func:`sweep_table`): the metrics of ``report.metrics`` (``conf/experiment/*.yaml``; default
the headline set) grouped by ``report.by`` (default the swept keys that vary) through
:func:`pagedlab.app.results.compare`, so no key that varies is averaged over: one that varies within
``report.by``'s groups is grouped by too, and the table says so. Timed metrics of runs with
``repeats`` > 1 read ``mean ± std (min–max)``.

The figures (:func:`sweep_figures`, with ``logger=wandb`` only): each numeric report metric against
the first ``by`` key, one line per other varying key (:func:`pagedlab.viz.metric_vs_key`), saved as
``<sweep dir>/figures/<metric>.png`` and logged by :func:`log_sweep_to_wandb` as images of one
sweep-level W&B run (``<sweep dir>/figures/wandb/``, in the jobs' group, ``job_type="sweep"``), with the
table and each job's per-step KV utilization and batch size as W&B line plots. Offline by default: the
logger's ``mode`` applies, so nothing leaves the machine unless ``logger.mode=online``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pagedlab.app.results import (
    _hashable,
    also_varying,
    compare,
    format_compare,
    headline_columns,
    swept_keys,
)

log = logging.getLogger(__name__)
FIGURES = "figures"
MAX_SERIES_JOBS = 24  # per-step line plots: at most this many jobs, each at most MAX_SERIES_POINTS points
MAX_SERIES_POINTS = 400


def report_spec(report: Mapping[str, Any] | None, df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(metrics, by) of a sweep's table: ``report``'s (those present in ``df``), else the headline metrics
    and the swept keys that vary."""
    report = dict(report or {})
    metrics = [m for m in (report.get("metrics") or headline_columns(df)) if m in df.columns]
    by = [k for k in (report.get("by") or []) if k in df.columns]
    if not by:
        swept = swept_keys(df)
        by = [k for k in swept if _hashable(df[k]).nunique(dropna=False) > 1] or swept
    return metrics, by


def sweep_table(df: pd.DataFrame, metrics: Sequence[str], by: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """The finished runs' ``metrics`` grouped by ``by`` and any other key that varies (see :func:`compare`),
    with a ``jobs`` column naming the job numbers of each row; returns (table, the keys added to ``by``)."""
    finished = df[df["status"] == "finished"] if "status" in df else df
    by = list(by) or (["job"] if "job" in finished else [])
    extra = also_varying(finished, by)
    table = compare(finished, by=by, metrics=list(metrics), warn=False)
    if "job" in finished and "job" not in by:
        keys = [*by, *extra]
        kf = pd.DataFrame({k: _hashable(finished[k]) for k in keys}, index=finished.index)
        jobs = finished["job"].groupby([kf[k] for k in keys], sort=True, dropna=False).agg(
            lambda s: ",".join(str(int(j)) for j in sorted(s.dropna())))
        table.insert(0, "jobs", jobs.to_numpy())  # the same groups, in the same (sorted) order
    return table, extra


def print_sweep_table(df: pd.DataFrame, out: Path, report: Mapping[str, Any] | None = None) -> None:
    """Print ``N runs -> summary.parquet``, the comparison table and one line per failed job."""
    metrics, by = report_spec(report, df)
    failed = df[df["status"] == "failed"] if "status" in df else df.iloc[:0]
    print(f"\n{len(df)} runs ({len(failed)} failed) -> {out}" if len(failed) else f"\n{len(df)} runs -> {out}")
    if len(failed) < len(df):
        table, extra = sweep_table(df, metrics, by)
        if extra:
            print(f"(grouped by {', '.join(extra)} too: {'they vary' if len(extra) > 1 else 'it varies'} within "
                  f"the groups of {', '.join(by)})")
        print(format_compare(table))
    for _, row in failed.iterrows():
        print(f"failed: job {row.get('job')} ({row.get('overrides') or 'no overrides'}): {row.get('error')}")


# -- figures and W&B -----------------------------------------------------------------------------------------
def wants_wandb(logger: Mapping[str, Any] | None) -> bool:
    """Whether the sweep's logger is pagedlab's W&B logger and not disabled."""
    if not logger:
        return False
    target = str(logger.get("_target_", ""))
    return target.endswith("loggers.wandb_logger") and logger.get("mode", "offline") != "disabled"


def sweep_figures(df: pd.DataFrame, metrics: Sequence[str], by: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """One PNG per numeric metric (against ``by[0]``, one line per other varying key) in ``out_dir``;
    returns metric -> path. Drawn without pyplot (no window, no global figure state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pagedlab.viz import metric_vs_key

    finished = df[df["status"] == "finished"] if "status" in df else df
    if finished.empty or not by:
        return {}
    x = by[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for m in metrics:
        if m not in finished or not pd.api.types.is_numeric_dtype(finished[m]) or finished[m].isna().all():
            continue
        fig = Figure(figsize=(8, 4.8))
        FigureCanvasAgg(fig)
        try:
            metric_vs_key(finished, m, x, ax=fig.add_subplot())
            fig.savefig(out_dir / f"{m}.png", dpi=100)
            paths[m] = out_dir / f"{m}.png"
        except Exception as exc:  # noqa: BLE001 - one figure that cannot be drawn does not stop the others
            log.warning("pagedlab: no figure of %s (%s: %s)", m, type(exc).__name__, exc)
    return paths


def step_series(df: pd.DataFrame, column: str) -> tuple[list[list[float]], list[list[float]], list[str]]:
    """Per finished job (at most :data:`MAX_SERIES_JOBS`): engine steps, ``column`` values (at most
    :data:`MAX_SERIES_POINTS`, evenly spaced) and the job's label, from its ``steps.parquet``."""
    xs, ys, keys = [], [], []
    finished = df[df["status"] == "finished"] if "status" in df else df
    for _, row in finished.head(MAX_SERIES_JOBS).iterrows():
        path = Path(str(row["run_dir"])) / "steps.parquet"
        if not path.is_file():
            continue
        steps = pd.read_parquet(path, columns=["step", column])
        if len(steps) > MAX_SERIES_POINTS:
            steps = steps.iloc[:: -(-len(steps) // MAX_SERIES_POINTS)]
        xs.append(steps["step"].astype(float).tolist())
        ys.append(steps[column].astype(float).tolist())
        keys.append(f"{row.get('job')}: {row.get('overrides') or 'defaults'}"[:80])
    return xs, ys, keys


def log_sweep_to_wandb(sweep_dir: Path, df: pd.DataFrame, table: pd.DataFrame, figures: Mapping[str, Path],
                       logger: Mapping[str, Any], report: Mapping[str, Any]) -> Path | None:
    """One sweep-level W&B run in the jobs' group: the figures as images, the table, and per-step line plots
    of each job's KV utilization and batch size. Returns its dir, or None if W&B could not start (warned)."""
    import wandb

    from pagedlab.app.loggers import call_with_timeout, has_api_key, init_timeout
    from pagedlab.app.results import with_spread_text
    from pagedlab.run import dir_label

    mode = str(logger.get("mode", "offline"))
    if mode == "online" and not has_api_key():
        mode = "offline"
    if mode != "online":
        os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    wb_dir = sweep_dir / FIGURES
    wb_dir.mkdir(parents=True, exist_ok=True)
    tags = ["sweep", *map(str, logger.get("tags") or [])]
    run = call_with_timeout(
        wandb.init, init_timeout(), project=logger.get("project") or "pagedlab", entity=logger.get("entity"),
        group=dir_label(sweep_dir)[:128], name="sweep", job_type="sweep", tags=[t[:64] for t in tags],
        config={"sweep_dir": str(sweep_dir), "report": dict(report), "jobs": len(df)}, dir=str(wb_dir), mode=mode,
        reinit="create_new", settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                                     disable_git=True, save_code=False))
    try:
        data: dict[str, Any] = {f"sweep/{m}": wandb.Image(str(p), caption=m) for m, p in figures.items()}
        flat = with_spread_text(table).reset_index()
        data["sweep/table"] = wandb.Table(dataframe=flat.astype({c: str for c in flat.columns if flat[c].dtype == object}))
        for column, label in (("kv_utilization", "KV utilization (fraction of slots)"),
                              ("batch_size", "batch size (sequences)")):
            xs, ys, keys = step_series(df, column)
            if xs:
                data[f"steps/{column}"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=f"{label} per engine step, one line per job", xname="engine step")
        run.log(data)
        run.finish()
    except BaseException:
        run.finish(exit_code=1)
        raise
    return wb_dir


def report_sweep(sweep_dir: Path, df: pd.DataFrame, report: Mapping[str, Any] | None,
                 logger: Mapping[str, Any] | None) -> None:
    """With ``logger=wandb`` (not disabled): the sweep's figures into ``<sweep dir>/figures/`` and one
    sweep-level W&B run with them. Never fails the sweep: a problem is a warning."""
    if not wants_wandb(logger):
        return
    try:
        metrics, by = report_spec(report, df)
        figures = sweep_figures(df, metrics, by, sweep_dir / FIGURES)
        table, _ = sweep_table(df, metrics, by)
        log_sweep_to_wandb(sweep_dir, df, table, figures, dict(logger or {}), dict(report or {}))
    except Exception as exc:  # noqa: BLE001 - figures are a convenience; the parquet files are the record
        log.warning("pagedlab: sweep figures not logged to W&B (%s: %s)", type(exc).__name__, exc)


__all__ = ["log_sweep_to_wandb", "print_sweep_table", "report_spec", "report_sweep", "step_series",
           "sweep_figures", "sweep_table", "wants_wandb"]
