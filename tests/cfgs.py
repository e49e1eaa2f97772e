"""Test configs as plain dicts, with each part group (allocator, eviction, ...) filled in from
``conf/<group>/<name>.yaml`` (its ``_target_`` and defaults) and the dict's own keys on top."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from pagedlab.config import PART_GROUPS, config_dir

DEFAULT_CHOICE = {"allocator": "paged", "eviction": "recompute", "kernel": "torch_gather", "executor": "sim",
                  "workload": "uniform", "logger": "none"}


def part(group: str, choice: str, **over: Any) -> dict[str, Any]:
    """``conf/<group>/<choice>.yaml`` as a dict, with ``over`` on top."""
    node = yaml.safe_load((config_dir() / group / f"{choice}.yaml").read_text()) or {}
    return {**node, **over}


def with_parts(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with every part group that has no ``_target_`` replaced by its YAML (chosen by the node's
    ``name``; eviction by its ``mode``) updated with the node's keys that the YAML has (so one base dict
    serves every choice: ``workload.num_requests`` is dropped for ``workload=trace``)."""
    out = copy.deepcopy(raw)
    for group in PART_GROUPS:
        node = dict(out.get(group) or {})
        if "_target_" in node:
            continue
        choice = node.get("mode") if group == "eviction" else node.get("name")
        base = part(group, choice or DEFAULT_CHOICE[group])
        base.update({k: v for k, v in node.items() if k in base})
        out[group] = base
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    if last == "name" and len(parents) == 1 and parents[0] in PART_GROUPS:  # a new choice: drop the old part
        node.pop("_target_", None)
    node[last] = value


def make(base: dict[str, Any], **dotted: Any) -> DictConfig:
    """``base`` with dotted overrides (``allocator.name="contiguous_max"`` picks that YAML), as a DictConfig."""
    raw = copy.deepcopy(base)
    for key, value in dotted.items():
        set_dotted(raw, key, value)
    return OmegaConf.create(with_parts(raw))
