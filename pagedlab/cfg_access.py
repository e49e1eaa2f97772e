"""Reading a composed config (DictConfig, dict or object) by dotted key, with a default."""

from __future__ import annotations

from typing import Any


def cfg_get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """`cfg_get(cfg, "kv_cache.num_blocks")`; missing keys and nulls give `default`."""
    node = cfg
    for part in dotted.split("."):
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        if node is None:
            return default
    return node
