"""`kernel=torch_gather` (:class:`TorchGatherKernel`): paged attention in plain PyTorch (any device,
any dtype).

New keys/values are written into their slots with one `index_copy_`. Attention then gathers each
sequence's blocks through its block table into contiguous K/V and calls
`scaled_dot_product_attention`; the new tokens are causal among themselves and see the whole
cached prefix, so prefill, decode, prefix-cache hits and recompute are one code path.

Decode (one new token per sequence): a sequence whose visible tokens sit in one run of consecutive
slots (blocks allocated together, as a prompt's are) of at least VIEW_MIN_TOKENS attends, on the CPU only
(VIEW_DEVICES), to a strided view of the pool with its own SDPA call, so nothing is copied. The others
are batched: sorted by context length and cut into chunks whose gathered K/V fit a reusable workspace
(cache-sized on the CPU, large on CUDA); each chunk is one `index_select` of whole blocks plus one SDPA
call with a padding mask. The query heads of a KV group are packed into SDPA's query-length axis
([B, kv_heads, group, D]), so no K/V head is repeated. The plan is made on the host from the metadata's
lists (nothing is read back from the device) and its index tensors go up in one copy per step. Prefill
sequences loop; one without cached prefix attends to its own new K/V directly.

Prefill on CUDA (see `_prefill_plan`): SDPA's flash and memory-efficient backends do not take
`enable_gqa` with every dtype and mask, and its math fallback materialises an fp32 [H, q, ctx] score
matrix (32 GiB at 8k x 32k). So on CUDA the K/V heads of a GQA prefill are repeated to the query
heads (no `enable_gqa`), and a masked prefill (cached prefix, sliding window) runs in query chunks
whose mask and worst-case score matrix stay under PREFILL_SCORE_BYTES. The CPU keeps `enable_gqa`
and one call per sequence (its SDPA handles both without a score-matrix blow-up and is faster so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from pagedlab.kernels.metadata import PagedMetadata, to_device

if TYPE_CHECKING:
    from pagedlab.models.presets import ModelSpec

CHUNK_BYTES = {"cpu": 16 << 20, "cuda": 1 << 30}  # gathered K+V per decode chunk
PREFILL_SCORE_BYTES = 256 << 20  # CUDA: fp32 scores [H, q_chunk, ctx] of one masked prefill call, at most
# a decode chunk is cut where the tokens of padding its shorter sequences would gather and attend to reach
# this many: the fixed cost of one more chunk (a few ops per layer) in tokens' worth of gather + attention,
# measured on a 2-core CPU (about 25 us vs 20 ns a token per layer; 1024 ran 6 % faster than one chunk on the
# e2e bench at 1 thread). On CUDA a few launches cost many more tokens: a guess, not yet measured on a GPU
CUT_TOKENS = {"cpu": 1024, "cuda": 1 << 16}
VIEW_MIN_TOKENS = 256  # a run of consecutive slots this long is read in place, not gathered
# where per-sequence views win: the CPU, whose SDPA reads a strided view as fast as a gathered copy and
# has no launch cost. On CUDA one SDPA launch per sequence per layer loses to the batched gather.
VIEW_DEVICES = ("cpu",)
_workspace: dict[tuple[torch.device, torch.dtype, bool], torch.Tensor] = {}


def write_kv(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: PagedMetadata) -> None:
    """Store new keys/values [T, kv_heads, D] into `kv` [2, blocks, block_size, kv_heads, D]."""
    flat = kv.view(2, -1, *kv.shape[3:])
    flat[0].index_copy_(0, meta.slot_mapping, key.to(kv.dtype))
    flat[1].index_copy_(0, meta.slot_mapping, value.to(kv.dtype))


def _buffer(numel: int, like: torch.Tensor) -> torch.Tensor:
    """The shared gather workspace, grown as needed. One made under `torch.inference_mode` cannot be
    written outside it (and the other way round), so each mode keeps its own."""
    key = (like.device, like.dtype, torch.is_inference_mode_enabled())
    buf = _workspace.get(key)
    if buf is None or buf.numel() < numel:
        buf = _workspace[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


def _gather(kv: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """K and V of `blocks` (flat block ids) -> [2, n * block_size, kv_heads, D] in the workspace."""
    rows = kv.view(2, kv.shape[1], -1)
    out = _buffer(2 * blocks.numel() * rows.shape[2], kv).view(2, blocks.numel(), rows.shape[2])
    torch.index_select(rows[0], 0, blocks, out=out[0])
    torch.index_select(rows[1], 0, blocks, out=out[1])
    return out.view(2, -1, *kv.shape[3:])


def _single_runs(meta: PagedMetadata, seqs: list[int], window: int | None) -> tuple[list[bool], list[int]]:
    """For each sequence of `seqs`: are its visible tokens one run of consecutive physical slots (its
    blocks consecutive in the pool), and the slot of the first visible token. Vectorised over the batch,
    on the host copy of the block tables (nothing is read back from the device)."""
    bs, clens = meta.block_size, meta.context_lens_list
    width = max(-(-clens[s] // bs) for s in seqs)
    table = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        n = -(-clens[s] // bs)
        table[i, :n] = meta.host_tables[s][:n]
    ctx = np.asarray([clens[s] for s in seqs], dtype=np.int64)
    lo = np.maximum(ctx - window, 0) if window is not None else np.zeros_like(ctx)
    first, last = lo // bs, (ctx - 1) // bs
    j = np.arange(table.shape[1] - 1)
    inside = (j >= first[:, None]) & (j < last[:, None])  # pairs of neighbouring visible blocks
    single = ((table[:, 1:] - table[:, :-1] == 1) | ~inside).all(1)
    first_slot = np.take_along_axis(table, first[:, None], 1)[:, 0] * bs + lo % bs
    return single.tolist(), first_slot.tolist()


def _gather_chunks(meta: PagedMetadata, seqs: list[int], kv: torch.Tensor, window: int | None) -> list[tuple]:
    """Chunks of sequences to gather: (token rows, flat block ids, padded length, mask or None). Planned
    on the host from the metadata's lists; the index tensors of every chunk go up in one copy, and the
    block ids are taken from the block tables on the device."""
    bs, clens, dev = meta.block_size, meta.context_lens_list, kv.device
    order = sorted(seqs, key=lambda s: -clens[s])
    token_bytes = 2 * kv[0, 0, 0].numel() * kv.element_size()
    budget = CHUNK_BYTES.get(dev.type, CHUNK_BYTES["cuda"])
    padded_lens = [-(-clens[s] // bs) * bs for s in order]
    cut_tokens = CUT_TOKENS.get(dev.type, CUT_TOKENS["cuda"])
    plan, packed, i = [], [], 0
    while i < len(order):
        padded = padded_lens[i]  # longest first: sets the chunk's width
        n = max(1, min(len(order) - i, budget // (padded * token_bytes)))
        for j in range(i + 1, i + n):  # cut where the padding the rest would carry outweighs a chunk's cost
            if (len(order) - j) * (padded - padded_lens[j]) >= cut_tokens:
                n = j - i
                break
        chunk = order[i : i + n]
        lens = [clens[s] for s in chunk]
        masked = min(lens) < padded or (window is not None and padded > window)
        at = len(packed)
        packed += chunk
        packed += [meta.query_start_list[s] for s in chunk]
        if masked:
            packed += lens
        plan.append((at, len(chunk), padded, masked))
        i += n
    if not plan:
        return []
    ids = to_device(packed, torch.long, dev)
    chunks = []
    for at, n, padded, masked in plan:
        rows = ids[at + n : at + 2 * n]
        blocks = meta.block_tables[:, : padded // bs].index_select(0, ids[at : at + n]).reshape(-1).long()
        mask = None
        if masked:
            pos = torch.arange(padded, device=dev)
            ctx = ids[at + 2 * n : at + 3 * n].view(-1, 1, 1, 1)
            mask = pos < ctx
            if window is not None:
                mask &= pos >= ctx - window
        chunks.append((rows, blocks, padded, mask))
    return chunks


def _decode_plan(meta: PagedMetadata, kv: torch.Tensor, window: int | None) -> tuple[list, list]:
    """Decode work of the step, computed once and shared by all layers.

    Returns (views, chunks). `views` holds (token row, first slot, length) for sequences whose
    visible tokens are one run of at least VIEW_MIN_TOKENS consecutive slots: they attend to a view
    of the pool, with no copy. `chunks` batches the other sequences for gathering.
    """
    key = ("gather_decode", window, kv.dtype)
    if key in meta.plans:
        return meta.plans[key]
    clens, seqs = meta.context_lens_list, meta.decode_seqs
    views: list[tuple[int, int, int]] = []
    gathered = list(seqs)
    if seqs and kv.device.type in VIEW_DEVICES:
        gathered = []
        single, first_slot = _single_runs(meta, seqs, window)
        for s, one, slot in zip(seqs, single, first_slot):
            n = clens[s] if window is None else min(clens[s], window)
            if one and n >= VIEW_MIN_TOKENS:
                views.append((meta.query_start_list[s], slot, n))
            else:
                gathered.append(s)
    plan = views, _gather_chunks(meta, gathered, kv, window)
    meta.plans[key] = plan
    return plan


def _prefill_mask(qlen: int, ctx: int, window: int | None, device: torch.device,
                  start: int = 0, stop: int | None = None) -> torch.Tensor:
    """[stop - start, ctx] bool (rows start..stop of the [qlen, ctx] mask): query i (position
    ctx - qlen + i) sees keys j <= its position."""
    stop = qlen if stop is None else stop
    qpos = torch.arange(ctx - qlen + start, ctx - qlen + stop, device=device).view(-1, 1)
    kpos = torch.arange(ctx, device=device)
    mask = kpos <= qpos
    if window is not None:
        mask &= kpos > qpos - window
    return mask


def _prefill_plan(device: torch.device, heads: int, group: int, qlen: int, ctx: int,
                  masked: bool) -> tuple[bool, int]:
    """(repeat K/V heads instead of `enable_gqa`, query rows per SDPA call) for one prefill sequence.

    CPU: (False, qlen), one packed-GQA call. CUDA: repeat the heads of a GQA group (the flash and
    memory-efficient backends then apply), and with a mask cut the query so that the fp32 scores a
    math fallback would hold, [heads, rows, ctx], stay under PREFILL_SCORE_BYTES.
    """
    if device.type != "cuda":
        return False, qlen
    rows = qlen if not masked else max(1, min(qlen, PREFILL_SCORE_BYTES // (4 * heads * ctx)))
    return group > 1, rows


def attend_decodes(query: torch.Tensor, kv: torch.Tensor, meta: PagedMetadata, scale: float,
                   sliding_window: int | None, out: torch.Tensor) -> None:
    """Fill the rows of `out` of the sequences with one new token (views and gathered chunks)."""
    _, heads, dim = query.shape
    kv_heads = kv.shape[3]
    group = heads // kv_heads
    views, chunks = _decode_plan(meta, kv, sliding_window)
    if views:
        flat = kv.view(2, -1, kv_heads, dim)
        for row, slot, n in views:  # strided views [1, kv_heads, n, D] of the pool: no copy
            k, v = flat[:, slot : slot + n].to(query.dtype).transpose(1, 2).unsqueeze(1).unbind(0)
            q = query[row].view(1, kv_heads, group, dim)
            out[row] = F.scaled_dot_product_attention(q, k, v, scale=scale).view(heads, dim)
    for rows, blocks, padded, mask in chunks:
        k, v = _gather(kv, blocks).view(2, rows.numel(), padded, kv_heads, dim).to(query.dtype).unbind(0)
        q = query.index_select(0, rows).view(-1, kv_heads, group, dim)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
        out.index_copy_(0, rows, o.reshape(-1, heads, dim))


def attend_prefills(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv: torch.Tensor,
                    meta: PagedMetadata, scale: float, sliding_window: int | None, out: torch.Tensor) -> None:
    """Fill the rows of `out` of the sequences with more than one new token, one SDPA call (or query chunk)
    each; a sequence without cached prefix attends to its own new K/V directly."""
    heads, group, bs = query.shape[1], query.shape[1] // kv.shape[3], meta.block_size
    for s in meta.prefill_seqs:
        r0, r1 = meta.query_start_list[s], meta.query_start_list[s + 1]
        qlen, ctx = r1 - r0, meta.context_lens_list[s]
        q = query[r0:r1].transpose(0, 1).unsqueeze(0)
        masked = not (ctx == qlen and (sliding_window is None or ctx <= sliding_window))
        if not masked:
            k, v = key[r0:r1], value[r0:r1]
        else:
            blocks = meta.block_tables[s, : -(-ctx // bs)].long()
            k, v = _gather(kv, blocks)[:, :ctx].to(query.dtype).unbind(0)
        repeat, rows = _prefill_plan(query.device, heads, group, qlen, ctx, masked)
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        if repeat:  # [1, heads, ctx, D]: query head h reads K/V head h // group, as enable_gqa would
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        for a in range(0, qlen, rows):
            b = min(qlen, a + rows)
            mask = _prefill_mask(qlen, ctx, sliding_window, query.device, a, b) if masked else None
            o = F.scaled_dot_product_attention(
                q[:, :, a:b], k, v, attn_mask=mask, is_causal=not masked, scale=scale,
                enable_gqa=group > 1 and not repeat,
            )
            out[r0 + a : r0 + b] = o[0].transpose(0, 1)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv: torch.Tensor,
    meta: PagedMetadata,
    scale: float,
    sliding_window: int | None = None,
    decodes: Callable[..., None] = attend_decodes,
) -> torch.Tensor:
    """Write the step's K/V, then attend. query [T, H, D], key/value [T, kv_heads, D] -> [T, H, D].
    `decodes` fills the rows of one-token sequences (kernel=cpu passes its C one); prefills are SDPA's."""
    write_kv(kv, key, value, meta)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    decodes(query, kv, meta, scale, sliding_window, out)
    attend_prefills(query, key, value, kv, meta, scale, sliding_window, out)
    return out


class TorchGatherKernel:
    """``kernel=torch_gather`` (see the module docstring): runs wherever PyTorch does, in any dtype. No
    options. Its `write_kv` and `attention` are this module's functions, bound on the instance (the
    per-layer call costs what a module function's does: no wrapper, no descriptor)."""

    name = "torch_gather"
    write_kv = staticmethod(write_kv)
    attention = staticmethod(attention)

    def __init__(self) -> None:
        self.write_kv, self.attention = write_kv, attention

    @staticmethod
    def workspace_bytes(spec: ModelSpec, max_num_seqs: int, max_model_len: int) -> int:
        """On CUDA, at most: the gather workspace (decode chunks up to CHUNK_BYTES, or one whole
        max_model_len sequence for a prefill over a cached prefix; it only grows), the K/V of such a
        prefill with its heads repeated, and one masked prefill call's scores and mask."""
        b, ctx = spec.dtype_bytes, max_model_len
        token_kv = 2 * spec.num_kv_heads * spec.head_dim * b  # one layer
        workspace = max(min(CHUNK_BYTES["cuda"], max_num_seqs * ctx * token_kv), ctx * token_kv)
        repeated = 2 * ctx * spec.num_heads * spec.head_dim * b
        return workspace + repeated + 2 * PREFILL_SCORE_BYTES

    @staticmethod
    def device_warning(device: torch.device) -> str | None:
        return None

    @staticmethod
    def problem(device: torch.device, dtype: torch.dtype | None = None, spec: ModelSpec | None = None) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
