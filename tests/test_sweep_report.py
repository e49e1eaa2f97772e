"""What a CLI sweep shows: the comparison table its study names (``report`` in conf/experiment/*.yaml), a
progress bar over its jobs, spreads of timed metrics, and with logger=wandb its figures in a sweep-level W&B run."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pagedlab import compose
from pagedlab.app.callbacks import SweepSummary
from pagedlab.app.sweep_report import print_sweep_table, report_spec
from pagedlab.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["workload.num_requests=6", "hydra/launcher=basic"]


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               WANDB_CONFIG_DIR=str(tmp / ".wandb_config"), WANDB_CACHE_DIR=str(tmp / ".wandb_cache"),
               WANDB_DATA_DIR=str(tmp / ".wandb_data"))
    proc = subprocess.run([sys.executable, "-m", "pagedlab.run", "-m", *args], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def table_of(stdout: str) -> list[str]:
    """The lines of the comparison table printed at the end of a sweep."""
    lines = stdout[stdout.rindex(" runs -> "):].splitlines()[1:]
    return [ln for ln in lines if ln.strip()]


def test_every_experiment_names_the_metrics_and_keys_of_its_table() -> None:
    """Each study's YAML has a report (its names are checked when test_config composes every experiment)."""
    reports = {p.stem: yaml.safe_load(p.read_text())["report"] for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    assert all(r["metrics"] and r["by"] for r in reports.values()), reports
    assert "prefix_hit_rate" in reports["shared_prefix"]["metrics"]
    assert {"recomputed_tokens", "normalized_latency_mean"} <= set(reports["preemption"]["metrics"])


def test_a_report_naming_unknown_keys_is_refused() -> None:
    with pytest.raises(ConfigError, match="report.metrics: prefix_hitrate is not allowed.*prefix_hit_rate"):
        compose("report.metrics=[prefix_hitrate]")
    with pytest.raises(ConfigError, match="report.by: no_such.key is not allowed"):
        compose("report.by=[no_such.key]")


def test_prefix_cache_sweep_prints_the_hit_rate_with_a_progress_bar(tmp_path: Path) -> None:
    proc = cli(tmp_path, "+experiment=shared_prefix", *SMALL, "logger=none", "workload.shared_prefix_len=80",
               f"hydra.sweep.dir={tmp_path / 'sweep'}")
    header, *rows = table_of(proc.stdout)
    assert header.split()[:3] == ["workload.shared_prefix_len", "prefix_cache", "jobs"]
    assert "prefix_hit_rate" in header and "num_preemptions" not in header  # the study's columns, not the headline
    assert len(rows) == 2
    assert "sweep: 100%" in proc.stderr and "2/2" in proc.stderr  # the progress bar over the jobs
    assert not (tmp_path / "sweep" / "figures").exists()  # logger=none: no figures, no W&B


def test_preemption_table_shows_recomputed_tokens_and_latency(capsys) -> None:
    cfg = compose("+experiment=preemption")
    df = pd.DataFrame([{"job": j, "status": "finished", "overrides": f"eviction={e} block_size=16", "eviction": e,
                        "eviction.victim": "newest", "block_size": 16, "num_preemptions": 3, "recomputed_tokens": r,
                        "swapped_out_blocks": s, "throughput_tok_s": 10.0, "normalized_latency_mean": 0.5,
                        "ttft_p99": 1.0, "memory_waste": 0.1}
                       for j, (e, r, s) in enumerate([("recompute", 100, 0), ("swap", 0, 40)])])
    report = {"metrics": list(cfg.report.metrics), "by": list(cfg.report.by)}
    assert report_spec(report, df) == (report["metrics"], ["eviction", "eviction.victim", "block_size"])
    print_sweep_table(df, Path("summary.parquet"), report)
    header = table_of(capsys.readouterr().out)[0]
    assert {"recomputed_tokens", "normalized_latency_mean", "ttft_p99"} <= set(header.split())
    assert "memory_waste" not in header


def test_timed_metrics_with_repeats_show_mean_and_spread(capsys) -> None:
    df = pd.DataFrame([{"job": j, "status": "finished", "overrides": f"allocator={a}", "allocator": a, "repeats": 3,
                        "throughput_tok_s": t, "throughput_tok_s_std": 40.0, "throughput_tok_s_min": t - 45,
                        "throughput_tok_s_max": t + 30, "memory_waste": 0.1, "time_source": "wall"}
                       for j, (a, t) in enumerate([("paged", 1975.0), ("contiguous_max", 900.0)])])
    print_sweep_table(df, Path("summary.parquet"), {"metrics": ["throughput_tok_s", "memory_waste", "time_source"]})
    out = capsys.readouterr().out
    assert "1975 ± 40 (1930–2005)" in out and "900 ± 40 (855–930)" in out and "_std" not in out


def test_failed_jobs_are_listed_under_the_table(capsys) -> None:
    df = pd.DataFrame([{"job": 0, "status": "finished", "overrides": "block_size=8", "block_size": 8,
                        "memory_waste": 0.1, "error": None},
                       {"job": 1, "status": "failed", "overrides": "block_size=0", "block_size": "0",
                        "memory_waste": None, "error": "ConfigError: block_size=0"}])
    print_sweep_table(df, Path("summary.parquet"), None)
    out = capsys.readouterr().out
    assert "2 runs (1 failed)" in out and "failed: job 1 (block_size=0): ConfigError: block_size=0" in out


def test_the_callback_pickles_without_its_progress_bar() -> None:
    from tqdm import tqdm

    cb = SweepSummary()
    cb.bar = tqdm(total=2, disable=True)
    copy = pickle.loads(pickle.dumps(cb))  # what joblib, submitit and ray do to the callbacks
    assert copy.bar is None and cb.bar is not None


@pytest.mark.slow
def test_wandb_sweep_logs_figures_and_step_series_to_a_sweep_run(tmp_path: Path) -> None:
    sweep = tmp_path / "sweeps" / "study"
    cli(tmp_path, "+experiment=preemption", *SMALL, "eviction=recompute", "eviction.victim=newest",
        "block_size=16,64", f"hydra.sweep.dir={sweep}")
    pngs = sorted(p.name for p in (sweep / "figures").glob("*.png"))
    assert pngs == sorted(f"{m}.png" for m in compose("+experiment=preemption").report.metrics)
    (run,) = (sweep / "figures" / "wandb").glob("offline-run-*")  # offline: nothing left the machine
    media = {p.relative_to(run / "files" / "media").as_posix() for p in (run / "files" / "media").rglob("*.*")}
    assert sum(m.startswith("images/sweep/") for m in media) == len(pngs)
    assert any(m.startswith("table/steps/kv_utilization") for m in media)  # per-step line plot of each job
    assert any(m.startswith("table/sweep/table") for m in media)
    data = next(run.glob("run-*.wandb")).read_bytes()
    assert b"study" in data and b"sweep" in data  # the jobs' group (the sweep dir), job_type sweep
    for job in ("0", "1"):  # the jobs' own runs are still there
        assert list((sweep / job / "wandb").glob("offline-run-*"))
