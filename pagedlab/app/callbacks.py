"""Hydra callback: at the end of a multirun, gather every job's summary.json + flattened config
into ``summary.parquet`` at the sweep root and print a comparison table. Registered in
``conf/config.yaml`` under ``hydra.callbacks``; works with any launcher whose jobs write into the
sweep dir (basic, joblib, submitit on a shared file system).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pagedlab.app.results import format_table, headline_columns, load_results, override_key

log = logging.getLogger(__name__)


def summarize_sweep(sweep_dir: str | Path, quiet: bool = False) -> Path | None:
    """Write ``summary.parquet`` for the runs under sweep_dir; return its path (None if no runs)."""
    sweep_dir = Path(sweep_dir)
    try:
        df = load_results(sweep_dir)
    except FileNotFoundError:
        log.warning("pagedlab: no finished jobs under %s, no summary.parquet written", sweep_dir)
        return None
    if "job" in df.columns and df["job"].notna().all():
        df = df.sort_values("job", kind="stable").reset_index(drop=True)
    out = sweep_dir / "summary.parquet"
    df.to_parquet(out, index=False)
    if not quiet:
        swept = list(dict.fromkeys(override_key(o) for ovs in df["overrides"] for o in ovs.split() if o))
        swept = [k for k in swept if not k.startswith("hydra") and k in df.columns]
        varying = [k for k in swept if df[k].astype(str).nunique() > 1]
        swept = varying or swept
        print(f"\n{len(df)} runs -> {out}")
        print(format_table(df, ["job", *swept, *headline_columns(df)]))
    return out


class SweepSummary(Callback):
    """Writes summary.parquet (one row per job) at the sweep root when a multirun ends."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)  # resolve ${now:...} once, as the sweeper does

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summarize_sweep(self.sweep_dir or Path(config.hydra.sweep.dir))
