"""The command line: ``python -m pagedlab.run [overrides]`` (or ``pagedlab [overrides]``).

    python -m pagedlab.run block_size=32 executor=sim model=llama_13b workload=sharegpt_like
    python -m pagedlab.run -m block_size=8,16,32 allocator=paged,contiguous_max
    python -m pagedlab.run -m +experiment=memory_waste_breakdown hydra/launcher=joblib

Each run validates its config, runs the experiment with a progress bar, writes summary.json,
steps.parquet and requests.parquet into its Hydra run dir (``results/<date>/<time>``; multirun:
``results/multirun/<date>/<time>/<job>``), mirrors to the logger and prints a summary. With
``+objective=METRIC`` the job returns that summary value (for optimizing sweepers such as Optuna).

A run holds its dir with a lock file for its whole duration and refuses a dir that already holds
results unless ``overwrite=true``; ``finished.json``, written last, marks its results complete.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pagedlab.app.checks import check_plan
from pagedlab.app.loggers import make_logger
from pagedlab.app.preflight import cli_overrides, preflight
from pagedlab.app.rundir import RunDirError, claim_run_dir, cli_dir_lock
from pagedlab.config import GROUPS, VERSION_BASE, ConfigError, config_dir
from pagedlab.engine.metrics import METRICS
from pagedlab.engine.result import MARKER

log = logging.getLogger("pagedlab")


def dir_label(path: str | Path) -> str:
    """A readable name for a run/sweep dir: ``2026-01-02_10-11-12`` for Hydra's date/time dirs."""
    p = Path(path)
    return f"{p.parent.name}_{p.name}" if re.fullmatch(r"[\d\-_:.]+", p.name) and p.parent.name else p.name


def format_summary(summary: dict[str, Any]) -> str:
    """The summary's main keys, one per line; each timed key shows its spread over repeats and where
    its time came from, e.g. ``throughput_tok_s  1975 ± 40 (wall, 3 repeats, warm-up 0.4 s excluded)``."""
    from pagedlab.experiment import TIMED_KEYS

    keys = [k for k in METRICS if k in summary] + [k for k in ("num_blocks", "block_size") if k in summary]
    width = max(map(len, keys), default=0)
    note = time_note(summary)

    def value(k: str) -> str:
        v = summary[k]
        if not isinstance(v, float):
            return str(v)
        text = f"{v:.4g}"
        if k in TIMED_KEYS:
            std = summary.get(f"{k}_std")
            if int(summary.get("repeats", 1)) > 1 and isinstance(std, float):
                text += f" ± {std:.2g}"
            text += f" ({note})"
        return text

    return "\n".join(f"  {k:<{width}}  {value(k)}" for k in keys)


def time_note(summary: dict[str, Any]) -> str:
    """Where a timed figure comes from: ``wall, 3 repeats, warm-up 0.4 s excluded`` or ``modelled``."""
    source, repeats = summary.get("time_source", "?"), int(summary.get("repeats", 1))
    parts = [str(source)]
    if repeats > 1:
        parts.append(f"{repeats} repeats")
    if source == "wall":
        if repeats == 1:
            parts.append("1 run")
        if summary.get("cpu_threads"):
            parts.append(f"{summary['cpu_threads']} CPU threads")
        warm = summary.get("warmup_s")
        parts.append(f"warm-up {warm:.2g} s excluded" if isinstance(warm, float) and warm > 0 else "no warm-up")
    return ", ".join(parts)


def _run_name(hc: Any) -> str:
    name = hc.job.override_dirname or "defaults"
    return f"{hc.job.num}:{name}" if hc.mode == RunMode.MULTIRUN else name


def task(cfg: DictConfig) -> Any:
    """One Hydra job: validate, run, save, log, print; returns the summary (or ``+objective``). A user's
    problem (bad config, unusable run dir, disk full) ends a single run with one line and exit code 2;
    in a multirun it fails the job, which the sweep summary lists."""
    hc = HydraConfig.get()
    try:
        return _task(cfg, hc)
    except (ConfigError, RunDirError) as exc:
        if hc.mode == RunMode.MULTIRUN:
            raise
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _task(cfg: DictConfig, hc: Any) -> Any:
    check_plan(cfg)  # again: launchers and job processes may run configs the preflight did not see
    run_dir = Path(hc.runtime.output_dir)
    choices = {k: hc.runtime.choices[k] for k in (*GROUPS, "experiment") if k in hc.runtime.choices}
    log.info("%s | %s | block_size=%s cow=%s prefix_cache=%s", run_dir, " ".join(
        f"{k}={v}" for k, v in choices.items()), cfg.block_size, cfg.cow, cfg.prefix_cache)
    group = dir_label(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else run_dir)
    lock = claim_run_dir(run_dir, bool(cfg.get("overwrite", False)))
    try:
        result = _run_and_save(cfg, run_dir, group, _run_name(hc), list(hc.overrides.task), cpu_share(hc))
    finally:
        lock.release()
    print(f"pagedlab: results in {run_dir} (time: {result.summary.get('time_source', '?')})\n"
          + format_summary(result.summary), flush=True)
    objective = cfg.get("objective")
    if objective:
        if objective not in result.summary:
            raise ConfigError(f"objective={objective} is not allowed: expected a summary key, one of "
                              f"{', '.join(sorted(result.summary))}")
        return float(result.summary[objective])
    return result.summary


def parallel_jobs(hc: Any) -> int:
    """How many jobs of this sweep run at once on this machine: joblib's ``n_jobs`` (negative: cores + 1 +
    n_jobs, as joblib counts), capped at the cores; 1 for any other launcher or a single run."""
    cores = os.cpu_count() or 1
    launcher = hc.get("launcher") or {}
    n_jobs = launcher.get("n_jobs")
    if hc.mode != RunMode.MULTIRUN or "joblib" not in str(launcher.get("_target_", "")) or not isinstance(n_jobs, int):
        return 1
    return max(1, min(cores, n_jobs if n_jobs > 0 else cores + 1 + n_jobs))


def cpu_share(hc: Any) -> int | None:
    """In a parallel joblib sweep, each job's share of the cores (jobs x all cores would oversubscribe
    them, and torch's parallel ops stall on a busy core): the torch threads of a job whose
    ``executor.threads`` is null; its summary's ``cpu_threads`` says what it ran with. None otherwise."""
    jobs = parallel_jobs(hc)
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def _run_and_save(cfg: DictConfig, run_dir: Path, group: str, name: str, overrides: list[str],
                  cpu_threads: int | None = None) -> Any:
    """Run, save atomically (marker last), then mirror to the logger, which never fails the run."""
    from pagedlab.experiment import run_experiment

    logger = make_logger(cfg, run_dir, group=group, name=name)
    exit_code = 1
    try:
        result = run_experiment(cfg, progress=True, on_step=logger.log_step, cpu_threads=cpu_threads)
        try:
            result.save(run_dir, overrides=overrides)
        except OSError as exc:
            raise RunDirError(f"pagedlab: could not write the results to {run_dir} ({exc.strerror or exc}); "
                              f"the run is not recorded as finished (no {MARKER})") from exc
        logger.log_result(result)
        exit_code = 0
    finally:
        logger.finish(exit_code=exit_code)
    return result


_hydra_task = hydra.main(config_path=str(config_dir()), config_name="config", version_base=VERSION_BASE)(task)


def main() -> None:
    """Console entry point: reject bad configs before Hydra creates any directory, then run."""
    cli = cli_overrides(sys.argv[1:])
    problem = preflight(*cli) if cli is not None else None
    if problem:
        print(f"pagedlab: {problem}\n(see `python -m pagedlab.run --help` and conf/ for groups and keys)",
              file=sys.stderr)
        sys.exit(2)
    lock = None
    try:
        lock = cli_dir_lock(*cli) if cli is not None else None
    except RunDirError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    run_dir = lock.path.parent if lock is not None else None
    fresh = run_dir is not None and [p.name for p in run_dir.iterdir()] == [lock.path.name]
    try:
        _hydra_task()
    except KeyboardInterrupt:
        print("pagedlab: interrupted; only runs with finished.json hold complete results", file=sys.stderr)
        sys.exit(130)
    finally:
        if lock is not None:
            lock.release()
        if fresh and not any(run_dir.iterdir()):  # Hydra stopped before writing anything: leave no dir
            run_dir.rmdir()


if __name__ == "__main__":
    main()
