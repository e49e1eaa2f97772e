"""Preflight: every check that can refuse a command line runs here, before Hydra creates any
directory or the first job of a multirun starts."""

from __future__ import annotations

from pagedlab.config import ConfigError, check_overrides


def cli_overrides(argv: list[str]) -> tuple[list[str], bool] | None:
    """(overrides, multirun) of a command line, or None when it is not ours to check (custom config, help)."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    if args.config_path or args.config_name or args.config_dir or args.shell_completion or args.help \
            or args.hydra_help or args.info:
        return None
    return list(args.overrides), bool(args.multirun)


def preflight(overrides: list[str], multirun: bool) -> str | None:
    """Why these overrides cannot run (every sweep value checked; the fixed part composed and
    validated), or None. Problems only Hydra can explain are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pagedlab.app.api import compose_with_choices

    errors = check_overrides(overrides)
    if errors:
        return "invalid config, nothing was run:\n  " + "\n  ".join(errors)
    try:
        fixed = overrides
        if multirun:
            parsed = OverridesParser.create().parse_overrides(overrides)
            fixed = [o for o, p in zip(overrides, parsed) if not p.is_sweep_override()]
        compose_with_choices(fixed)
    except ConfigError as exc:
        return f"{exc}\nnothing was run"
    except Exception:  # noqa: BLE001 - composition errors: Hydra reports them with its own context
        return None
    return None
