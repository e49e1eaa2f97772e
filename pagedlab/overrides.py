"""Command-line overrides checked before Hydra composes anything or creates a directory: group
choices against ``conf/<group>/*.yaml``, dotted keys against the schema (``+key`` too, except the
extra keys the schema allows), and values against their type and the rules of
:mod:`pagedlab.config`. Keys of the part groups (free-form, see pagedlab/parts.py) are left to Hydra
(unknown keys) and to the preflight, which builds the light parts (bad values). Every message names the field, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pagedlab.config import (
    EXTRA_KEYS,
    GROUPS,
    PART_GROUPS,
    PagedLabConfig,
    check_value,
    config_dir,
    not_allowed,
    show_value,
)


def _schema_field(key: str) -> tuple[type | None, str | None, list[str]]:
    """(owning dataclass, field name, allowed names) for a dotted key; field None if unknown."""
    owner: type = PagedLabConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(owner)
        if part not in hints:
            return owner, None, list(hints)
        tp = hints[part]
        if i == len(parts) - 1:
            return owner, part, list(hints)
        if not is_dataclass(tp):
            return owner, None, []
        owner = tp
    return owner, None, []


@cache
def _group_choices(group: str, extra_dirs: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The choices of a group: ``conf/<group>/*.yaml``, plus those in the user's config dirs."""
    dirs = [config_dir(), *map(Path, extra_dirs)]
    return tuple(sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")}))


def search_dirs(parsed: list[Any]) -> tuple[str, ...]:
    """The local dirs a ``hydra.searchpath=[...]`` override adds (``file://DIR`` or ``DIR``)."""
    out: list[str] = []
    for ov in parsed:
        if ov.key_or_group == "hydra.searchpath" and not ov.is_sweep_override():
            value = ov.value()
            for item in value if isinstance(value, list) else [value]:
                text = str(item)
                if "://" not in text or text.startswith("file://"):
                    out.append(text.removeprefix("file://"))
    return tuple(out)


def _suggest(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _values(override: Any) -> list[Any]:
    """The concrete values of an override (one, or each of a choice/range sweep); [] if open."""
    if not override.is_sweep_override():
        return [override.value()]
    if override.value_type is not None and override.value_type.name in (
            "CHOICE_SWEEP", "SIMPLE_CHOICE_SWEEP", "RANGE_SWEEP"):
        return list(override.sweep_iterator())
    return []


def check_overrides(overrides: list[str]) -> list[str]:
    """Messages for command-line overrides that cannot work, without composing anything.

    Checks group choices against ``conf/<group>/*.yaml``, dotted keys against the schema, and
    values against their type and :data:`RULES`. Hydra's own keys and ``+key`` for :data:`EXTRA_KEYS`
    pass; any other ``+key`` must be a schema key.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        return [str(exc)]
    errors: list[str] = []
    extra_dirs = search_dirs(parsed)
    for ov in parsed:
        key = ov.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or ov.is_delete() or ov.package is not None:
            continue
        values = _values(ov)
        if key == "experiment" and not (ov.is_add() or ov.is_force_add()):
            errors.append(f"experiment={show_value(values[0]) if values else '...'} is not allowed: a study is added, "
                          f"not chosen; expected +experiment={show_value(values[0]) if values else 'NAME'}")
            continue
        if key in GROUPS or key == "experiment":
            choices = _group_choices(key, extra_dirs)
            for v in values:
                if not isinstance(v, str) or v not in choices:
                    errors.append(f"{key}={show_value(v)} is not allowed: expected one of "
                                  f"{', '.join(choices)}{_suggest(str(v), choices)}")
            continue
        if (ov.is_add() or ov.is_force_add()) and key in EXTRA_KEYS:
            continue
        if key.split(".")[0] in PART_GROUPS:  # free-form: Hydra refuses unknown keys, the part's class bad values
            errors.extend(m for m in (check_value(key, v) for v in values) if m)
            continue
        owner, name, allowed = _schema_field(key)
        if name is None:
            where = key.rsplit(".", 1)[0] + "." if "." in key else ""
            keys = f": expected one of {where}{{{', '.join(allowed)}}}" if allowed else ""
            errors.append(f"{key}={show_value(values[0]) if values else '...'} is not allowed: '{key}' is not a "
                          f"config key{keys}{_suggest(key.split('.')[-1], allowed)}")
            continue
        for v in values:
            msg = _typed_check(owner, name, key, v)
            if msg:
                errors.append(msg)
    return errors


def _typed_check(owner: type, name: str, key: str, value: Any) -> str | None:
    if isinstance(value, str) and "${" in value:
        return None  # an interpolation: checked by validate() once composed
    node = OmegaConf.structured(owner)
    try:
        node[name] = value
    except Exception:  # noqa: BLE001 - OmegaConf raises several validation types
        tp = typing.get_type_hints(owner)[name]
        return not_allowed(key, value, _describe(tp))
    return check_value(key, node[name])


def _describe(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return _describe(next(a for a in args if a is not type(None))) + " or null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if typing.get_origin(tp) is list:
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s"
    return getattr(tp, "__name__", str(tp))
