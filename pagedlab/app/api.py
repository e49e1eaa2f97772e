"""Notebook API: compose a config like the CLI does, run it, sweep a grid in-process.

    cfg = compose("executor=sim", "model=llama_13b", "workload=sharegpt_like")
    result = run_experiment(cfg)
    df = sweep(cfg, {"allocator": ["paged", "contiguous_max"], "block_size": [8, 16, 32]})
    compare(df, by=["allocator", "block_size"], metrics=["memory_waste"])
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pagedlab.app.checks import check_plan
from pagedlab.app.results import make_row
from pagedlab.config import (
    GROUP_SCHEMAS,
    GROUPS,
    VERSION_BASE,
    ConfigError,
    config_dir,
)
from pagedlab.experiment import run_experiment
from pagedlab.overrides import check_overrides


def _flat_overrides(overrides: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for o in overrides:
        out.extend([o] if isinstance(o, str) else list(o))
    return out


@contextmanager
def composer(config_name: str = "config") -> Iterator[Callable[[Sequence[str]], DictConfig]]:
    """One Hydra initialization for many compositions: yields ``raw(overrides)``, the composed config
    with its ``hydra`` node, unchecked. Works inside a running Hydra app (restored afterwards)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base=VERSION_BASE, job_name="pagedlab"):
            yield lambda overrides: hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        restore_gh_from_backup(backup)


def finish(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """Drop the ``hydra`` node of a raw composition, run every check (:func:`check_plan`); (cfg, choices)."""
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if not k.startswith("hydra") and v is not None}
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    check_plan(cfg)
    return cfg, choices


def compose_point(raw: Callable[[Sequence[str]], DictConfig], overrides: Sequence[str]) -> tuple[DictConfig, dict]:
    """Check the overrides, compose them with ``raw`` (see :func:`composer`) and check the result."""
    _refuse_bad(overrides)
    return finish(raw(overrides))


def _refuse_bad(overrides: Sequence[str]) -> None:
    errors = check_overrides(list(overrides))
    if errors:
        raise ConfigError("Invalid overrides:\n  " + "\n  ".join(errors), errors)


def compose_with_choices(overrides: Sequence[str] = (), config_name: str = "config") -> tuple[DictConfig, dict]:
    """Compose and check like the CLI; also return the group choices (``{"allocator": "paged", ...}``)."""
    with composer(config_name) as raw:
        return compose_point(raw, list(overrides))


def compose(*overrides: str | Sequence[str], config_name: str = "config") -> DictConfig:
    """The composed, validated config for CLI-style overrides (``"block_size=8"``, ``"executor=sim"``)."""
    return compose_with_choices(_flat_overrides(overrides), config_name)[0]


def format_override(key: str, value: Any) -> str:
    """``key=value`` in Hydra's override syntax (bools/None/lists spelled, odd strings quoted)."""
    return f"{key}={_fmt(value)}"


def _fmt(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    s = str(v)
    return s if re.fullmatch(r"[\w./:+\-]+", s) else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _apply(cfg: DictConfig, point: Mapping[str, Any]) -> tuple[DictConfig, dict[str, Any]]:
    """A copy of cfg with point applied: group keys load ``conf/<group>/<choice>.yaml``."""
    _refuse_bad([format_override(k, v) for k, v in point.items()])
    cfg = cfg.copy()
    choices: dict[str, Any] = {}
    for key, value in point.items():
        if key in GROUPS:
            path = config_dir() / key / f"{value}.yaml"
            if not path.is_file():
                raise ConfigError(f"{key}={value} is not allowed: no {path}")
            node = yaml.safe_load(path.read_text()) or {}
            schema = GROUP_SCHEMAS.get(key)  # typed groups only; a part group's class checks its own arguments
            with open_dict(cfg):
                cfg[key] = OmegaConf.merge(OmegaConf.structured(schema), node) if schema else OmegaConf.create(node)
            choices[key] = value
        else:
            OmegaConf.update(cfg, key, value, merge=False)
    check_plan(cfg)
    return cfg, choices


def sweep(cfg_or_overrides: DictConfig | Sequence[str] | str, grid: Mapping[str, Sequence[Any]], *,
          progress: bool = True) -> pd.DataFrame:
    """Run every point of ``grid`` (key -> values; keys are groups or dotted keys) in-process.

    The base is a list of overrides (each point is re-composed with them) or a composed config
    (group keys reload that group's yaml). Every point is composed and checked (:func:`check_plan`)
    before the first runs; any bad point raises ConfigError naming each, and nothing runs. A point that
    fails while running does not stop the others: returns one row per point, as
    :func:`pagedlab.load_results` does for CLI sweeps, with ``status`` ("finished" or "failed") and
    ``error`` (the exception's type and message, None when finished), and warns once naming the failures.
    """
    from tqdm.auto import tqdm

    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(list(grid[k]) for k in keys))]
    if isinstance(cfg_or_overrides, str):
        cfg_or_overrides = [cfg_or_overrides]
    jobs, bad = [], []
    with nullcontext() if isinstance(cfg_or_overrides, DictConfig) else composer() as raw:
        for num, point in enumerate(points):
            overrides = [format_override(k, v) for k, v in point.items()]
            try:
                if isinstance(cfg_or_overrides, DictConfig):
                    cfg, choices = _apply(cfg_or_overrides, point)
                else:
                    cfg, choices = compose_point(raw, [*cfg_or_overrides, *overrides])
            except Exception as exc:  # noqa: BLE001 - every point's problem is reported before any runs
                problems = exc.problems if isinstance(exc, ConfigError) else [f"{type(exc).__name__}: {exc}"]
                bad.append(f"point {num} ({' '.join(overrides)}):\n    " + "\n    ".join(problems))
            else:
                jobs.append((cfg, choices, overrides))
    if bad:
        raise ConfigError(f"Invalid sweep, nothing was run: {len(bad)} of {len(points)} points fail their checks:\n  "
                          + "\n  ".join(bad), bad)
    rows, failed = [], []
    for num, (cfg, choices, overrides) in enumerate(tqdm(jobs, desc="sweep", unit="run", disable=not progress)):
        summary: dict[str, Any] = {"status": "finished", "error": None}
        try:
            summary = {**run_experiment(cfg, progress=False).summary, **summary}
        except Exception as exc:  # noqa: BLE001 - one failed point does not stop the others
            summary = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            failed.append(f"point {num} ({' '.join(overrides)}): {summary['error']}")
        rows.append(make_row(summary, OmegaConf.to_container(cfg, resolve=True), choices=choices,
                             overrides=overrides, job=num))
    if failed:
        warnings.warn(f"pagedlab.sweep: {len(failed)} of {len(jobs)} points failed (rows with status='failed'):\n  "
                      + "\n  ".join(failed), RuntimeWarning, stacklevel=2)
    return pd.DataFrame(rows)


__all__ = ["compose", "compose_point", "compose_with_choices", "composer", "finish", "format_override",
           "run_experiment", "sweep"]
