"""Notebook API: compose a config like the CLI does, run it, sweep a grid in-process.

    cfg = compose("executor=sim", "model=llama_13b", "workload=sharegpt_like")
    result = run_experiment(cfg)
    df = sweep(cfg, {"allocator": ["paged", "contiguous_max"], "block_size": [8, 16, 32]})
    compare(df, by=["allocator", "block_size"], metrics=["memory_waste"])
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from pagedlab.app.results import make_row
from pagedlab.config import (
    GROUP_SCHEMAS,
    GROUPS,
    VERSION_BASE,
    ConfigError,
    check_overrides,
    config_dir,
    validate,
)
from pagedlab.experiment import run_experiment


def _flat_overrides(overrides: Sequence[Any]) -> list[str]:
    out: list[str] = []
    for o in overrides:
        out.extend([o] if isinstance(o, str) else list(o))
    return out


def compose_with_choices(overrides: Sequence[str] = (), config_name: str = "config") -> tuple[DictConfig, dict]:
    """Compose and validate like the CLI; also return the group choices (``{"allocator": "paged", ...}``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    overrides = list(overrides)
    errors = check_overrides(overrides)
    if errors:
        raise ConfigError("Invalid overrides:\n  " + "\n  ".join(errors))
    backup = get_gh_backup()  # compose inside a running Hydra app (or twice) without clobbering it
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(config_dir()), version_base=VERSION_BASE, job_name="pagedlab"):
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
    finally:
        restore_gh_from_backup(backup)
    choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
               if not k.startswith("hydra") and v is not None}
    with read_write(cfg), open_dict(cfg):
        del cfg["hydra"]
    validate(cfg)
    return cfg, choices


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
    cfg = cfg.copy()
    choices: dict[str, Any] = {}
    for key, value in point.items():
        if key in GROUPS:
            path = config_dir() / key / f"{value}.yaml"
            if not path.is_file():
                raise ConfigError(f"{key}={value} is not allowed: no {path}")
            cfg[key] = OmegaConf.merge(OmegaConf.structured(GROUP_SCHEMAS[key]), yaml.safe_load(path.read_text()) or {})
            choices[key] = value
        else:
            OmegaConf.update(cfg, key, value, merge=False)
    validate(cfg)
    return cfg, choices


def sweep(cfg_or_overrides: DictConfig | Sequence[str] | str, grid: Mapping[str, Sequence[Any]], *,
          progress: bool = True) -> pd.DataFrame:
    """Run every point of ``grid`` (key -> values; keys are groups or dotted keys) in-process.

    The base is a list of overrides (each point is re-composed with them) or a composed config
    (group keys reload that group's yaml). All points are composed and validated before the first
    runs. Returns one row per point, as :func:`pagedlab.load_results` does for CLI sweeps.
    """
    from tqdm.auto import tqdm

    keys = list(grid)
    points = [dict(zip(keys, vals)) for vals in itertools.product(*(list(grid[k]) for k in keys))]
    if isinstance(cfg_or_overrides, str):
        cfg_or_overrides = [cfg_or_overrides]
    jobs = []
    for point in points:
        overrides = [format_override(k, v) for k, v in point.items()]
        if isinstance(cfg_or_overrides, DictConfig):
            cfg, choices = _apply(cfg_or_overrides, point)
        else:
            cfg, choices = compose_with_choices([*cfg_or_overrides, *overrides])
        jobs.append((cfg, choices, overrides))
    rows = []
    for num, (cfg, choices, overrides) in enumerate(tqdm(jobs, desc="sweep", unit="run", disable=not progress)):
        result = run_experiment(cfg, progress=False)
        rows.append(make_row(result.summary, OmegaConf.to_container(cfg, resolve=True), choices=choices,
                             overrides=overrides, job=num))
    return pd.DataFrame(rows)


__all__ = ["compose", "compose_with_choices", "format_override", "run_experiment", "sweep"]
