"""Preflight: every check that can refuse a command line runs here, before Hydra creates any
directory or the first job of a multirun starts. A multirun is expanded as Hydra's basic sweeper
does (the ``hydra.sweeper.params`` of ``+experiment=NAME`` included) and every point is checked."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from pagedlab.config import ConfigError
from pagedlab.overrides import check_overrides

MAX_LISTED = 20  # bad points shown in full; the rest are counted


def cli_overrides(argv: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, multirun) of a command line, or None when it is not ours to check (another primary
    config, help). A ``--config-dir``/``-cd`` (the user's own group files, docs/extending.md) becomes a
    ``hydra.searchpath`` override, so the checks see the same groups as the run."""
    import os

    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.config_path or args.config_name or args.shell_completion or args.help or args.hydra_help or args.info:
        return None
    overrides = list(args.overrides)
    if args.config_dir and not any(o.startswith("hydra.searchpath=") for o in overrides):
        overrides.append(f"hydra.searchpath=[file://{os.path.abspath(args.config_dir)}]")
    return overrides, bool(args.multirun)


def sweep_points(base: DictConfig, overrides: Sequence[str]) -> list[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper makes them: ``hydra.sweeper.params`` then the
    command line, cartesian product of the discrete sweeps. Open ranges (``interval``, for optimizing
    sweepers) cannot be listed and are left out (their keys keep the config's value)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    parsed = [p for p in parser.parse_overrides(args) if not p.is_sweep_override() or p.is_discrete_sweep()]
    return BasicSweeper.split_arguments(parsed, None)[0]


def check_points(raw: Callable[[Sequence[str]], DictConfig], points: list[list[str]]) -> list[str]:
    """One entry per point that fails composition or its checks: ``job N (varying overrides):`` + problems."""
    from pagedlab.app.api import compose_point

    values: dict[str, set[str]] = {}
    for point in points:
        for o in point:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {k for k, v in values.items() if len(v) > 1}
    bad = []
    for num, point in enumerate(points):
        try:
            compose_point(raw, point)
        except Exception as exc:  # noqa: BLE001 - Hydra's composition errors too: a job would fail on them
            problems = exc.problems if isinstance(exc, ConfigError) else [f"{type(exc).__name__}: {exc}"]
            shown = " ".join(o for o in point if o.split("=", 1)[0] in varying) or " ".join(point)
            bad.append(f"job {num} ({shown}):\n    " + "\n    ".join(problems))
    return bad


def preflight(overrides: list[str], multirun: bool) -> str | None:
    """Why these overrides cannot run (a multirun: every point composed and checked with
    :func:`pagedlab.app.checks.check_plan`), or None. Problems composing the fixed part are left to Hydra,
    which reports them before creating any directory."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pagedlab.app.api import composer, finish

    errors = check_overrides(overrides)
    if errors:
        return "invalid config, nothing was run:\n  " + "\n  ".join(errors)
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o for o, p in zip(overrides, parsed) if not p.is_sweep_override()]
    with composer() as raw:
        try:
            base = raw(fixed)
        except Exception:  # noqa: BLE001 - composition errors: Hydra reports them with its own context
            return None
        if not multirun:
            try:
                finish(base)
            except ConfigError as exc:
                return "invalid config, nothing was run:\n  " + "\n  ".join(exc.problems)
            return None
        try:
            points = sweep_points(base, overrides)
        except Exception:  # noqa: BLE001 - a sweep Hydra cannot expand: it says why before any directory
            return None
        bad = check_points(raw, points)
    if not bad:
        return None
    more = f"\n  ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return (f"invalid sweep, nothing was run: {len(bad)} of {len(points)} jobs fail their checks:\n  "
            + "\n  ".join(bad[:MAX_LISTED]) + more)
