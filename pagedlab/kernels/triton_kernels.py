"""Triton kernels for paged attention (the @triton.jit module; import through `triton_backend`).

All kernels read the KV pool of one layer, `[2, num_blocks, block_size, kv_heads, D]`, through the
block table: token n of a sequence lives in slot `table[n // block_size] * block_size +
n % block_size`. Addresses are computed per token, so any block size works (tiles of BLOCK_N tokens
may span several blocks, or part of one) and context lengths need not be multiples of anything.
Softmax is online (running max and sum, base 2); the running max starts at a large finite negative
so that rows whose keys are all masked in a tile produce zeros, not NaNs.

`decode_kernel`: one program per (sequence, KV head, context split). The G query heads of the KV
group are the rows of one tile, so each K/V tile is loaded once for the whole group (GQA reuse is
where decode's memory traffic is won) and scores are a `tl.dot` of [G, D] x [D, BLOCK_N]. With
splits > 1 (few sequences, long contexts: too few programs to fill the GPU) each split writes its
partial max/sum/accumulator and `reduce_kernel` merges them (flash-decoding).

`prefill_kernel`: one program per (tile of BLOCK_M new tokens of one sequence, query head); keys run
from the cached prefix through the tile's last position with a causal mask, so prefix-cache hits and
recompute need nothing special.

K/V tiles are converted to the query's dtype as they are loaded (a no-op when they match), so the
scores and the weighted sum are computed in the query's dtype, as `torch_gather` does (it converts the
gathered K/V to the query's dtype); `PREC` is chosen for that dtype.
"""

import triton
import triton.language as tl

NEG = tl.constexpr(-1.0e30)
# Integer arguments that change from step to step (the block table's row stride is its width, the most
# blocks any sequence of the step holds; the split plan follows the longest context). Triton would
# specialise them (divisible by 16, equal to 1) and compile a new variant inside a timed step whenever
# that changes; these are passed as plain ints instead.
STEP_INTS = {
    "decode_kernel": ["stride_table", "part_len", "num_parts"],
    "reduce_kernel": ["num_parts"],
    "prefill_kernel": ["stride_table"],
}


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _sum_combine(a, b):
    return a + b


# Combine functions of the reductions (`tl.reduce(x, axis, _MAX)`), chosen for the mode this module was
# loaded in (`triton_backend.kernels` sets TRITON_INTERPRET around the load, and the decorators above
# follow it). Compiled: our own @jit helpers, which are JITFunctions whatever TRITON_INTERPRET was when
# Triton itself was imported. `tl.max` / `tl.sum` and `tl.standard`'s combine functions are bound once,
# when Triton is imported: with TRITON_INTERPRET=1 in the environment at start-up they are
# InterpretedFunctions and a CUDA compile refuses them ("Unsupported function referenced"); with it
# unset they are JITFunctions, which the interpreter cannot call. Interpreted: `tl.standard`'s own
# combine functions, which the interpreter recognises and reduces with NumPy in one call (it would call
# any other combine function once per element pair).
_INTERPRETED = not isinstance(_max_combine, triton.runtime.JITFunction)
_MAX = tl.standard._elementwise_max if _INTERPRETED else _max_combine
_SUM = tl.standard._sum_combine if _INTERPRETED else _sum_combine


@triton.jit
def write_kv_kernel(key_ptr, value_ptr, cache_ptr, slot_ptr, stride_k, stride_v, v_offset,
                    N: tl.constexpr, BLOCK: tl.constexpr):
    """Copy token t's K and V ([kv_heads * D] each) into its slot."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < N
    k = tl.load(key_ptr + t * stride_k + offs, mask=m)
    v = tl.load(value_ptr + t * stride_v + offs, mask=m)
    tl.store(cache_ptr + slot * N + offs, k, mask=m)
    tl.store(cache_ptr + v_offset + slot * N + offs, v, mask=m)


@triton.jit
def _kv_offsets(table_ptr, s, stride_table, offs_n, ok, h, offs_d,
                KV_HEADS: tl.constexpr, D: tl.constexpr, BS: tl.constexpr):
    """Pool offsets [BLOCK_N, BLOCK_D] of the keys at positions `offs_n` of sequence s, KV head h."""
    blk = tl.load(table_ptr + s * stride_table + offs_n // BS, mask=ok, other=0).to(tl.int64)
    return (blk * BS + offs_n % BS)[:, None] * (KV_HEADS * D) + h * D + offs_d[None, :]


@triton.jit
def _online_softmax_step(q, k, v, ok, m_i, l_i, acc, scale_log2, PREC: tl.constexpr):
    """Fold one tile of keys/values into the running max, sum and accumulator of the rows of q."""
    sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    sc = tl.where(ok, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(sc, 1, _MAX))
    alpha = tl.exp2(m_i - m_new)
    pr = tl.exp2(sc - m_new[:, None])
    l_i = l_i * alpha + tl.reduce(pr, 1, _SUM)
    acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=STEP_INTS["decode_kernel"])
def decode_kernel(q_ptr, cache_ptr, out_ptr, table_ptr, ctx_ptr, rows_ptr, seqs_ptr,
                  part_m_ptr, part_l_ptr, part_acc_ptr,
                  scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_table, v_offset,
                  window, part_len, num_parts,
                  KV_HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2)
    row = tl.load(rows_ptr + i).to(tl.int64)
    s = tl.load(seqs_ptr + i).to(tl.int64)
    ctx = tl.load(ctx_ptr + s)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    start = p * part_len
    end = tl.minimum(start + part_len, ctx)
    start = tl.maximum(start, (lo // BLOCK_N) * BLOCK_N)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < G
    d_ok = offs_d < D
    heads = h * G + offs_g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], NEG, dtype=tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_G, BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = (offs_n < end) & (offs_n >= lo)
        off = _kv_offsets(table_ptr, s, stride_table, offs_n, ok, h, offs_d, KV_HEADS, D, BS)
        kv_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(cache_ptr + off, mask=kv_ok, other=0.0).to(q.dtype)
        v = tl.load(cache_ptr + v_offset + off, mask=kv_ok, other=0.0).to(q.dtype)
        m_i, l_i, acc = _online_softmax_step(q, k, v, ok[None, :], m_i, l_i, acc, scale_log2, PREC)
    if SPLIT:
        base = (i * KV_HEADS * G + heads) * num_parts + p
        tl.store(part_m_ptr + base, m_i, mask=g_ok)
        tl.store(part_l_ptr + base, l_i, mask=g_ok)
        tl.store(part_acc_ptr + base[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])
    else:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=STEP_INTS["reduce_kernel"])
def reduce_kernel(out_ptr, rows_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, stride_ot, stride_oh,
                  num_parts, HEADS: tl.constexpr, D: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the splits of (decode sequence i, query head h)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(rows_ptr + i).to(tl.int64)
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    p_ok = offs_p < num_parts
    base = (i * HEADS + h) * num_parts + offs_p
    m = tl.load(part_m_ptr + base, mask=p_ok, other=NEG)
    l = tl.load(part_l_ptr + base, mask=p_ok, other=0.0)
    w = tl.exp2(m - tl.reduce(m, 0, _MAX))
    acc = tl.load(part_acc_ptr + base[:, None] * D + offs_d[None, :],
                  mask=p_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    o = tl.reduce(acc * w[:, None], 0, _SUM) / tl.reduce(l * w, 0, _SUM)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)


@triton.jit(do_not_specialize=STEP_INTS["prefill_kernel"])
def prefill_kernel(q_ptr, cache_ptr, out_ptr, table_ptr, ctx_ptr, qstart_ptr, tile_seq_ptr, tile_m_ptr,
                   scale_log2, stride_qt, stride_qh, stride_ot, stride_oh, stride_table, v_offset, window,
                   KV_HEADS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    t = tl.program_id(0)
    hq = tl.program_id(1)
    h = hq // G
    s = tl.load(tile_seq_ptr + t).to(tl.int64)
    m0 = tl.load(tile_m_ptr + t)
    q0 = tl.load(qstart_ptr + s)
    qlen = tl.load(qstart_ptr + s + 1) - q0
    ctx = tl.load(ctx_ptr + s)
    prefix = ctx - qlen

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < qlen
    d_ok = offs_d < D
    rows = (q0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + hq * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    qpos = prefix + offs_m
    end = tl.minimum(prefix + m0 + BLOCK_M, ctx)
    start = tl.where(window > 0, (tl.maximum(prefix + m0 - window + 1, 0) // BLOCK_N) * BLOCK_N, 0)
    m_i = tl.full([BLOCK_M], NEG, dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        off = _kv_offsets(table_ptr, s, stride_table, offs_n, n_ok, h, offs_d, KV_HEADS, D, BS)
        kv_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(cache_ptr + off, mask=kv_ok, other=0.0).to(q.dtype)
        v = tl.load(cache_ptr + v_offset + off, mask=kv_ok, other=0.0).to(q.dtype)
        ok = n_ok[None, :] & (offs_n[None, :] <= qpos[:, None])
        ok = ok & ((window <= 0) | (offs_n[None, :] > qpos[:, None] - window))
        m_i, l_i, acc = _online_softmax_step(q, k, v, ok, m_i, l_i, acc, scale_log2, PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + hq * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
