"""Paged attention over a block pool: KV cache storage, per-step metadata and two kernels.

A kernel is a module with
  `write_kv(kv, key, value, meta)` and
  `attention(query, key, value, kv, meta, scale, sliding_window=None) -> out`
where `kv` is one layer's pool [2, num_blocks, block_size, kv_heads, D], query/out [T, H, D] and
key/value [T, kv_heads, D] hold the step's new tokens (all sequences flattened).
"""

from __future__ import annotations

from types import ModuleType

from pagedlab.kernels.kv_cache import KVCache
from pagedlab.kernels.metadata import PagedMetadata, build_metadata

KERNELS = ("torch_gather", "triton")


def get_kernel(name: str) -> ModuleType:
    """The kernel module for `kernel.name` (the Triton one imports Triton only when first launched)."""
    if name == "torch_gather":
        from pagedlab.kernels import torch_gather

        return torch_gather
    if name == "triton":
        from pagedlab.kernels import triton_backend

        return triton_backend
    raise ValueError(f"kernel.name={name!r} is not one of {KERNELS}")


__all__ = ["KERNELS", "KVCache", "PagedMetadata", "build_metadata", "get_kernel"]
