"""An attention kernel pagedlab does not ship (``kernel._target_``): a float32 reference.

The contract is :class:`pagedlab.kernels.AttentionKernel`: ``write_kv(kv, key, value, meta)`` stores the
step's new keys/values in their slots, ``attention(query, key, value, kv, meta, scale, sliding_window=None)``
writes them and attends (``kv``: one layer's pool ``[2, num_blocks, block_size, kv_heads, D]``;
``query``/``out``: ``[T, H, D]``; ``key``/``value``: ``[T, kv_heads, D]``, all sequences flattened in
``meta``'s order), plus ``workspace_bytes``, ``device_warning`` and ``problem``. Subclassing pagedlab's
``TorchGatherKernel`` inherits all but ``attention`` (its ``write_kv`` is one ``index_copy_``).

``conf/kernel/reference.yaml``::

    name: reference
    _target_: pagedlab_plugins.kernels.ReferenceKernel
    compute_dtype: float32
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagedlab.errors import one_of
from pagedlab.kernels.metadata import PagedMetadata
from pagedlab.kernels.torch_gather import TorchGatherKernel

if TYPE_CHECKING:
    from pagedlab.models.presets import ModelSpec

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def causal_mask(qlen: int, ctx: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """[qlen, ctx] bool: the i-th new token (position ``ctx - qlen + i``) sees key positions ``j <= its
    position``, and with a window only the last ``sliding_window`` of them (``j > position - window``)."""
    qpos = torch.arange(ctx - qlen, ctx, device=device)[:, None]
    kpos = torch.arange(ctx, device=device)[None, :]
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    return mask


class ReferenceKernel(TorchGatherKernel):
    """Paged attention spelled out: for each sequence, gather its K/V through its block table, then
    ``softmax(q k^T * scale + mask) v`` with an explicit matmul and an explicit, max-subtracted softmax,
    in ``compute_dtype`` (float32, or float64 to tell a kernel's rounding from a real bug).

    One sequence at a time and no workspace reuse: slow, but every step is visible, which is the point
    when a fast kernel disagrees with Hugging Face (``kernel=reference`` vs ``kernel=torch_gather`` on
    the same prompts). ``write_kv``, ``device_warning`` and ``problem`` are the gather kernel's.
    """

    name = "reference"

    def __init__(self, *, compute_dtype: str = "float32") -> None:
        self.compute_dtype_name = one_of("compute_dtype", compute_dtype, tuple(COMPUTE_DTYPES))
        self.compute_dtype = COMPUTE_DTYPES[compute_dtype]

    def workspace_bytes(self, spec: ModelSpec, max_num_seqs: int, max_model_len: int) -> int:
        """At most, for the largest call (one prefill of max_model_len tokens): the [H, q, ctx] scores, its
        masked copy, exp and weights, and the query, K and V with K/V heads repeated, all in compute_dtype."""
        b, ctx, heads = self.compute_dtype.itemsize, max_model_len, spec.num_heads
        return 4 * heads * ctx * ctx * b + 3 * ctx * heads * spec.head_dim * b

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv: torch.Tensor,
                  meta: PagedMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor:
        """Write the step's K/V, then attend. query [T, H, D], key/value [T, kv_heads, D] -> [T, H, D]."""
        self.write_kv(kv, key, value, meta)
        heads, dim = query.shape[1], query.shape[2]
        kv_heads, bs, dt = kv.shape[3], meta.block_size, self.compute_dtype
        group = heads // kv_heads  # query heads per K/V head (GQA)
        out = torch.empty_like(query)
        for s in range(meta.num_seqs):
            r0, r1 = meta.query_start_list[s], meta.query_start_list[s + 1]
            qlen, ctx = r1 - r0, meta.context_lens_list[s]
            blocks = meta.block_tables[s, : -(-ctx // bs)].long()  # the blocks holding its ctx tokens
            k = kv[0, blocks].reshape(-1, kv_heads, dim)[:ctx].to(dt)  # [ctx, kv_heads, D], in token order
            v = kv[1, blocks].reshape(-1, kv_heads, dim)[:ctx].to(dt)
            k = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]: head h reads h//group
            v = v.repeat_interleave(group, dim=1).transpose(0, 1)
            q = query[r0:r1].to(dt).transpose(0, 1)  # [H, qlen, D]
            scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, qlen, ctx]
            scores = scores.masked_fill(~causal_mask(qlen, ctx, sliding_window, query.device), float("-inf"))
            weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
            weights = weights / weights.sum(dim=-1, keepdim=True)
            out[r0:r1] = torch.matmul(weights, v).transpose(0, 1).to(query.dtype)  # [qlen, H, D]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(compute_dtype={self.compute_dtype_name!r})"


__all__ = ["ReferenceKernel", "causal_mask"]
