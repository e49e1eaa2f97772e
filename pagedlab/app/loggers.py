"""Run loggers: ``logger=wandb`` (offline by default, never touches the network unless asked) and
``logger=none``. Local results are the record; W&B is a mirror, so a logger that cannot start (or
whose ``wandb.init`` takes longer than ``PAGEDLAB_WANDB_INIT_TIMEOUT`` seconds, default 60) or fails
mid-run warns and steps aside. The W&B summary equals summary.json: per-step metrics write no summary
(``define_metric("*", summary="none")``) and the summary is set last. ``logger.log_every=N`` logs every
Nth engine step to W&B; the files keep every step.

    logger = make_logger(cfg, run_dir, group="sweep-x", name="block_size=8")
    try:
        result = run_experiment(cfg, on_step=logger.log_step)
        logger.log_result(result)
    finally:
        logger.finish()
"""

from __future__ import annotations

import math
import netrc
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from pagedlab.config import COMPONENTS


class RunLogger(Protocol):
    def log_step(self, row: dict[str, Any]) -> None: ...
    def log_result(self, result: Any) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...


class NullLogger:
    """``logger=none``: local results only (takes and ignores the logger arguments)."""

    def __init__(self, **_: Any) -> None:
        pass

    def log_step(self, row: dict[str, Any]) -> None:
        pass

    def log_result(self, result: Any) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _warn(msg: str) -> None:
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def has_api_key() -> bool:
    """A W&B API key in the environment or ~/.netrc (checked without the network)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not (isinstance(v, float) and math.isnan(v)):
            out[k] = v
    return out


def request_table_frame(requests: pd.DataFrame) -> pd.DataFrame:
    """Per-request stats for a W&B table: token-id lists become their lengths."""
    df = requests.copy()
    for col in df.columns:
        if df[col].map(lambda v: hasattr(v, "__len__") and not isinstance(v, str)).any():
            df[f"{col.removesuffix('_ids')}_count" if col.endswith("_ids") else f"{col}_len"] = df[col].map(
                lambda v: len(v) if hasattr(v, "__len__") else 0)
            df = df.drop(columns=col)
    return df


INIT_TIMEOUT_ENV = "PAGEDLAB_WANDB_INIT_TIMEOUT"


def init_timeout() -> float:
    """Seconds ``wandb.init`` may take: ``$PAGEDLAB_WANDB_INIT_TIMEOUT``, default 60."""
    try:
        return float(os.environ.get(INIT_TIMEOUT_ENV, "60"))
    except ValueError:
        return 60.0


def call_with_timeout(fn: Any, timeout: float, **kwargs: Any) -> Any:
    """fn(**kwargs) in a daemon thread; TimeoutError if it has not returned after timeout seconds (the
    thread is abandoned and cannot block exit). The hand-off is decided under a lock, so a result is
    either returned to the caller or, if it comes late, finished by the thread: never both, never neither."""
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def target() -> None:
        try:
            value, error = fn(**kwargs), None
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            value, error = None, exc
        with lock:
            box.update(done=True, value=value, error=error)
            late = box.get("abandoned", False)
        if late and hasattr(value, "finish"):
            try:
                value.finish(exit_code=1)
            except Exception:  # noqa: BLE001, S110 - nobody is left to tell
                pass

    thread = threading.Thread(target=target, name="pagedlab-wandb-init", daemon=True)
    thread.start()
    thread.join(timeout)
    with lock:
        if not box.get("done"):
            box["abandoned"] = True
            raise TimeoutError(f"wandb.init did not return within {timeout:g} s (${INIT_TIMEOUT_ENV})")
    if box["error"] is not None:
        raise box["error"]
    return box["value"]


class WandbLogger:
    """One W&B run per job; per-step metrics with step = engine step; summary; request table. With
    ``hold_steps`` (wall-clock runs) the step rows are sent when the run ends, not during it."""

    def __init__(self, *, run_config: dict[str, Any], run_dir: Path, group: str, name: str, mode: str = "offline",
                 project: str = "pagedlab", entity: str | None = None, tags: list[str] | tuple[str, ...] = (),
                 log_every: int = 10) -> None:
        import wandb

        self._wandb = wandb
        self.mode = mode
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode != "online":
            os.environ["WANDB_MODE"] = mode  # belt and braces: child processes stay offline too
        wb_dir = Path(run_dir)
        wb_dir.mkdir(parents=True, exist_ok=True)
        choices = {c: str((run_config.get(c) or {}).get("name", c)) for c in COMPONENTS}
        tags = [f"{c}={v}" for c, v in choices.items()] + [str(t) for t in tags]
        self.run = call_with_timeout(
            wandb.init, init_timeout(), project=project, entity=entity, group=group[:128], name=name[:128],
            job_type=f"{choices['executor']}-{choices['allocator']}"[:64], tags=[t[:64] for t in tags],
            config=run_config, dir=str(wb_dir), mode=mode, reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True,
                                    save_code=False),
        )
        self.log_every = max(1, int(log_every or 1))
        self.hold_steps = False  # True: keep step rows until the run ends (make_logger sets it for wall-clock runs)
        self._held: list[tuple[dict[str, Any], int | None]] = []
        self._broken = False
        self._safely("define_metric", self.run.define_metric, "*", summary="none")  # steps write no summary

    def _safely(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self._broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - W&B is a mirror: never fail the run for it
            self._broken = True
            _warn(f"W&B {what} failed ({type(exc).__name__}: {exc}); W&B logging stops, local results are kept")

    def log_step(self, row: dict[str, Any]) -> None:
        step = _numeric({"step": row.get("step")}).get("step")  # a skipped step converts only its step number
        step = int(step) if step is not None else None
        if step is not None and step % self.log_every:
            return
        data = _numeric(row)
        data.pop("step", None)
        if self.hold_steps:
            self._held.append((data, step))
            return
        self._safely("log", self.run.log, data, step=step)

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for data, step in held:
            self._safely("log", self.run.log, data, step=step)

    def log_result(self, result: Any) -> None:
        """The held step rows, the request table (committing the last step), then the summary:
        summary.json's values."""
        self._flush_held()
        if len(result.requests):
            table = self._wandb.Table(dataframe=request_table_frame(result.requests))
            self._safely("log", self.run.log, {"requests": table})
        self._safely("summary", self.run.summary.update, dict(result.summary))

    def finish(self, exit_code: int = 0) -> None:
        self._flush_held()  # a run that failed still shows the steps it made
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as exc:  # noqa: BLE001
            _warn(f"W&B finish failed ({type(exc).__name__}: {exc}); local results are kept")


def wandb_logger(*, mode: str = "offline", **kwargs: Any) -> RunLogger:
    """``logger=wandb`` (its ``_target_``): a :class:`WandbLogger`, or, when W&B is disabled or cannot start
    (not installed, init fails or times out), a warning and a :class:`NullLogger`. ``online`` without an
    API key logs offline."""
    if mode == "disabled":
        return NullLogger()
    if mode == "online" and not has_api_key():
        _warn("logger.mode=online but no W&B API key (WANDB_API_KEY or `wandb login`): logging offline; "
              "upload later with `wandb sync`")
        mode = "offline"
    try:
        return WandbLogger(mode=mode, **kwargs)
    except ImportError:
        _warn("logger=wandb but wandb is not installed (pip install wandb); continuing with local results only")
    except Exception as exc:  # noqa: BLE001
        _warn(f"W&B could not start ({type(exc).__name__}: {exc}); continuing with local results only")
    return NullLogger()


def make_logger(cfg: DictConfig, run_dir: str | Path, *, group: str, name: str) -> RunLogger:
    """The logger ``logger._target_`` names, given the run's config, its dir, its W&B group and name."""
    from pagedlab.experiment import simulated
    from pagedlab.parts import instantiate_part

    logger = instantiate_part(cfg.logger, "logger", run_config=OmegaConf.to_container(cfg, resolve=True),
                              run_dir=Path(run_dir), group=group, name=name)
    if hasattr(logger, "hold_steps"):  # W&B's own work stays out of a measured (wall-clock) window
        logger.hold_steps = not simulated(cfg)
    return logger
