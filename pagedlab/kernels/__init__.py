"""Paged attention over a block pool: KV cache storage, per-step metadata and three kernels.

A kernel is an object of a class that ``kernel._target_`` names (``conf/kernel/*.yaml``), built with the
group's other keys as keyword arguments; :class:`AttentionKernel` is its contract. The built-in ones are
:class:`~pagedlab.kernels.torch_gather.TorchGatherKernel`,
:class:`~pagedlab.kernels.triton_backend.TritonKernel` and :class:`~pagedlab.kernels.cpu_kernel.CpuKernel`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol

from pagedlab.kernels.kv_cache import KVCache
from pagedlab.kernels.metadata import PagedMetadata, build_metadata

if TYPE_CHECKING:
    import torch

    from pagedlab.models.presets import ModelSpec


class AttentionKernel(Protocol):
    """Paged attention for the torch executor: what ``kernel._target_`` names.

    Shapes: ``kv`` is one layer's pool ``[2, num_blocks, block_size, kv_heads, D]`` (K then V),
    ``query``/``out`` are ``[T, H, D]`` and ``key``/``value`` ``[T, kv_heads, D]``: the step's new tokens,
    all sequences flattened in ``meta``'s order (``H`` a multiple of ``kv_heads``: GQA).

    - ``name``: the label in messages (``kernel=<name>``).
    - ``write_kv(kv, key, value, meta)``: store the new keys/values in their slots
      (``meta.slot_mapping``), converted to the pool's dtype.
    - ``attention(query, key, value, kv, meta, scale, sliding_window=None) -> out``: write the step's K/V
      (as ``write_kv``), then attend: each new token sees its sequence's cached prefix and the new tokens up
      to itself (causal), within the last ``sliding_window`` positions when set; ``out`` has the query's
      dtype. Called once per layer per step: keep it thin, and cache per-step work in ``meta.plans``.
    - ``workspace_bytes(spec, max_num_seqs, max_model_len)``: device memory it allocates outside the KV pool
      at most (workspaces, split buffers) for a model of ``spec``'s shapes; the CUDA KV budget reserves it.
    - ``device_warning(device)``: a warning to give (once per process) before running on ``device``, e.g.
      that it is slow there; None when there is nothing to say.
    - ``problem(device, dtype=None, spec=None)``: why it cannot run on ``device`` (with ``dtype``: in that
      compute dtype; with ``spec`` too: for a model of those shapes), or None. Each argument given adds its
      checks to those before, so a caller can tell which one is at fault by asking with fewer. The text
      completes ``kernel=<name> is not allowed ...: `` and says what would be allowed.

    A constructor takes the kernel's own options as keyword arguments (no positional ones) and refuses one
    it does not allow with :class:`pagedlab.errors.BadArgument`; it must be cheap (the preflight builds
    the kernel to ask it the above): import heavy packages on first launch, not before.
    """

    name: str

    def write_kv(self, kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: PagedMetadata) -> None: ...

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv: torch.Tensor,
                  meta: PagedMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor: ...

    def workspace_bytes(self, spec: ModelSpec, max_num_seqs: int, max_model_len: int) -> int: ...

    def device_warning(self, device: torch.device) -> str | None: ...

    def problem(self, device: torch.device, dtype: torch.dtype | None = None,
                spec: ModelSpec | None = None) -> str | None: ...


KERNELS = {  # config label -> class (conf/kernel/<label>.yaml names the same class)
    "torch_gather": "pagedlab.kernels.torch_gather.TorchGatherKernel",
    "triton": "pagedlab.kernels.triton_backend.TritonKernel",
    "cpu": "pagedlab.kernels.cpu_kernel.CpuKernel",
}


def get_kernel(name: str, **options: Any) -> AttentionKernel:
    """A built-in kernel by its label, with its constructor ``options`` (benches and tests; the engine
    builds the one the config's ``kernel._target_`` names)."""
    if name not in KERNELS:
        raise ValueError(f"kernel {name!r} is not one of {', '.join(KERNELS)}")
    module, _, cls = KERNELS[name].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**options)


__all__ = ["KERNELS", "AttentionKernel", "KVCache", "PagedMetadata", "build_metadata", "get_kernel"]
