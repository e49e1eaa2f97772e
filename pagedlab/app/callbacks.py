"""Hydra callback: keep ``summary.parquet`` at the sweep root current while a multirun runs.

A progress bar over the sweep's jobs (tqdm, on stderr) advances as each job ends, when the jobs run
in this process (the basic launcher; other launchers run them elsewhere and show none).
After every job (``on_job_end``, which runs in the job's process: the main one for the basic launcher,
a worker for joblib) the job's row is merged into summary.parquet, rewritten atomically under a lock
file; a failed job is a row with ``status="failed"`` and its ``error`` (and leaves ``failed.json`` in its
dir). When the multirun ends the table is rebuilt from the job dirs and printed. Registered in
``conf/config.yaml`` under ``hydra.callbacks``; works with any launcher whose jobs write into the sweep
dir (basic, joblib, submitit on a shared file system).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pagedlab.app.results import (
    find_runs,
    make_row,
    read_hydra,
    read_run,
    with_status,
)
from pagedlab.app.rundir import FileLock
from pagedlab.engine.result import atomic_write, check_run, stored_config

log = logging.getLogger(__name__)
FAILED = "failed.json"
SUMMARY = "summary.parquet"


def error_text(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def failed_row(job_dir: Path, error: str | None = None) -> dict[str, Any]:
    """The row of a failed job: what Hydra recorded in its dir, status "failed" and the error."""
    if error is None:
        error = json.loads((job_dir / FAILED).read_text()).get("error")
    try:
        config = (stored_config(job_dir) or ("", {}))[1]
        choices, overrides, job = read_hydra(job_dir)
    except (OSError, ValueError):
        config, choices, overrides, job = {}, {}, [], None
    row = make_row({}, config, choices=choices, overrides=overrides, run_dir=str(job_dir), job=job)
    return with_status(row, "failed", error)


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rows of every finished and failed job under sweep_dir, in job order."""
    rows = [read_run(d) for d in find_runs(sweep_dir, warn=False)]
    finished = {r["run_dir"] for r in rows}
    rows += [failed_row(p.parent) for p in sweep_dir.rglob(FAILED)
             if ".hydra" not in p.parts and str(p.parent) not in finished and check_run(p.parent) is not None]
    return sorted(rows, key=_job_key)


def _job_key(row: dict[str, Any]) -> tuple:
    job = row.get("job")
    return (0, job, "") if isinstance(job, int) else (1, 0, str(row.get("run_dir")))


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], merge: bool = False) -> Path:
    """Write rows to sweep_dir/summary.parquet atomically, under a lock file; with merge, rows replace
    the existing rows of the same run dirs and the others are kept."""
    out = sweep_dir / SUMMARY
    with FileLock(sweep_dir / f".{SUMMARY}.lock").acquire(timeout=60):
        if merge and out.is_file():
            old = pd.read_parquet(out)
            keep = [r for r in old.to_dict("records") if r.get("run_dir") not in {x["run_dir"] for x in rows}]
            rows = sorted([*({k: v for k, v in r.items() if not _missing(v)} for r in keep), *rows], key=_job_key)
        df = parquet_safe(pd.DataFrame(rows))
        atomic_write(out, lambda p: df.to_parquet(p, index=False))
    return out


def parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """df with every object column of mixed value types (a failed job's ``"0"`` next to ``16``) as text."""
    df = df.copy()
    for col in df.columns[df.dtypes == object]:
        values = df[col].dropna()
        if values.map(type).nunique() > 1:
            df[col] = df[col].map(lambda v: v if _missing(v) else str(v))
    return df


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def summarize_sweep(sweep_dir: str | Path, quiet: bool = False, report: Mapping[str, Any] | None = None,
                    logger: Mapping[str, Any] | None = None) -> Path | None:
    """Rebuild ``summary.parquet`` from the job dirs under sweep_dir and print the comparison table
    (``report``: the study's ``metrics`` and ``by``; default the headline metrics by the swept keys); with a
    W&B ``logger`` node, save and log the sweep's figures. Returns its path (None if there is no finished or
    failed job)."""
    from pagedlab.app.sweep_report import print_sweep_table, report_sweep

    sweep_dir = Path(sweep_dir)
    rows = sweep_rows(sweep_dir)
    if not rows:
        log.warning("pagedlab: no finished jobs under %s, no summary.parquet written", sweep_dir)
        return None
    out = write_summary(sweep_dir, rows)
    df = pd.DataFrame(rows)
    if not quiet:
        try:
            print_sweep_table(df, out, report)
        except Exception as exc:  # noqa: BLE001 - the parquet file is written; the table is a convenience
            log.warning("pagedlab: could not print the sweep table (%s)", error_text(exc))
    if logger is not None:
        report_sweep(sweep_dir, df, report, logger)
    return out


BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def count_jobs(config: DictConfig) -> int | None:
    """How many jobs a multirun launches: the basic sweeper's grid (``hydra.sweeper.params`` with the
    command line's sweeps over them), an optimizing sweeper's ``n_trials``; None if unknown."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pagedlab.overrides import _values

    sweeper = config.hydra.sweeper
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        n = sweeper.get("n_trials")
        return int(n) if isinstance(n, int) else None
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    sizes = {ov.key_or_group: len(_values(ov)) for ov in parsed}
    for ov in OverridesParser.create().parse_overrides(list(config.hydra.overrides.task)):
        sizes[ov.key_or_group] = len(_values(ov)) if ov.is_sweep_override() else 1
    total = 1
    for n in sizes.values():
        if n == 0:
            return None  # an open sweep (glob, interval)
        total *= n
    return total


class SweepSummary(Callback):
    """Keeps summary.parquet (one row per finished or failed job) at the sweep root current; shows a
    progress bar over the jobs with the basic launcher; prints the study's table when the sweep ends."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.bar: Any = None
        self.common: set[str] = set()  # the command line's overrides that every job has

    def __getstate__(self) -> dict[str, Any]:  # launchers pickle the callbacks to their workers: not the bar
        return {**self.__dict__, "bar": None}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)  # resolve ${now:...} once, as the sweeper does
        self.common = set(config.hydra.overrides.task)
        if str(config.hydra.launcher.get("_target_", "")) == BASIC_LAUNCHER:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=count_jobs(config), desc="sweep", unit="job", file=sys.stderr,
                                dynamic_ncols=True)
            except Exception as exc:  # noqa: BLE001 - a progress bar never stops a sweep
                log.debug("no sweep progress bar (%s)", error_text(exc))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None and config.hydra.mode == RunMode.MULTIRUN:
            point = " ".join(o for o in config.hydra.overrides.task if o not in self.common)
            self.bar.set_postfix_str(f"job {config.hydra.job.num}: {point}"[:70], refresh=False)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            job_dir = Path(config.hydra.runtime.output_dir)
            if job_return.status == JobStatus.COMPLETED and check_run(job_dir) is None:
                row = read_run(job_dir)
            else:
                exc = job_return._return_value
                error = error_text(exc) if isinstance(exc, BaseException) else f"job status {job_return.status}"
                atomic_write(job_dir / FAILED, lambda p: p.write_text(json.dumps({"error": error}) + "\n"))
                row = failed_row(job_dir, error)
            write_summary(self.sweep_dir or Path(config.hydra.sweep.dir), [row], merge=True)
        except Exception as exc:  # noqa: BLE001 - the table is a convenience; never fail a job for it
            log.warning("pagedlab: could not update summary.parquet (%s)", error_text(exc))
        finally:
            if self.bar is not None:
                self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        report = config.get("report")
        logger = config.get("logger")
        summarize_sweep(self.sweep_dir or Path(config.hydra.sweep.dir),
                        report=OmegaConf.to_container(report, resolve=True) if report is not None else None,
                        logger=OmegaConf.to_container(logger, resolve=True) if logger is not None else None)
