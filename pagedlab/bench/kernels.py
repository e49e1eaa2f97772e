"""CPU decode attention: paged `torch_gather` vs SDPA on contiguous K/V, side by side in one run.

    python -m pagedlab.bench.kernels [--batch 32] [--context 1024] [--block-size 16]
                                     [--heads 32] [--kv-heads 8] [--head-dim 128] [--iters 10]
                                     [--threads N]

The paged pool holds every sequence's blocks in shuffled order; the contiguous baseline holds the
same K/V as [B, kv_heads, ctx, D]. The paged time includes writing the step's new K/V into their
slots. Two baselines: SDPA with `enable_gqa=True` (the usual call) and SDPA with the query heads of
a KV group packed into the query axis (no K/V repeat; the fastest contiguous form found here).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedlab.kernels import build_metadata, get_kernel


def timeit(fns: dict[str, Callable[[], object]], iters: int) -> dict[str, float]:
    """Median wall time in ms of each function; calls are interleaved round by round so that load
    from other processes hits every method alike."""
    for fn in fns.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def setup(batch: int, ctx: int, bs: int, heads: int, kv_heads: int, dim: int, dtype=torch.float32,
          device: str = "cpu", seed: int = 0):
    """A shuffled paged pool, its metadata, and the same K/V laid out contiguously."""
    gen = torch.Generator(device).manual_seed(seed)
    per_seq = -(-ctx // bs)
    ids = list(range(batch * per_seq))
    random.Random(seed).shuffle(ids)
    tables = [ids[i * per_seq : (i + 1) * per_seq] for i in range(batch)]
    kv = torch.randn(2, batch * per_seq, bs, kv_heads, dim, generator=gen, device=device, dtype=dtype)
    slots = [t[(ctx - 1) // bs] * bs + (ctx - 1) % bs for t in tables]
    meta = build_metadata([1] * batch, [ctx] * batch, tables, slots, bs, device)
    index = torch.tensor(tables, device=device)
    k_contig, v_contig = (kv[i][index].reshape(batch, per_seq * bs, kv_heads, dim)[:, :ctx].transpose(1, 2)
                          .contiguous() for i in (0, 1))
    q = torch.randn(batch, heads, dim, generator=gen, device=device, dtype=dtype)
    new_k, new_v = k_contig[:, :, -1].clone(), v_contig[:, :, -1].clone()
    return kv, meta, q, new_k, new_v, k_contig, v_contig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("batch", 32), ("context", 1024), ("block-size", 16), ("heads", 32),
                          ("kv-heads", 8), ("head-dim", 128), ("iters", 10), ("threads", 0)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    kv, meta, q, nk, nv, kc, vc = setup(a.batch, a.context, a.block_size, a.heads, a.kv_heads, a.head_dim)
    group, scale = a.heads // a.kv_heads, a.head_dim**-0.5
    gather = get_kernel("torch_gather")
    q4 = q.unsqueeze(2)
    qp = q.view(a.batch, a.kv_heads, group, a.head_dim)
    out = gather.attention(q, nk, nv, kv, meta, scale)
    ref = F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True).squeeze(2)
    err = (out - ref).abs().max().item()
    kv_mib = 2 * kc.numel() * kc.element_size() / 2**20
    print(f"decode attention, CPU fp32, {torch.get_num_threads()} threads: batch {a.batch}, context {a.context}, "
          f"block {a.block_size}, {a.heads} q heads / {a.kv_heads} kv heads, head_dim {a.head_dim} "
          f"({kv_mib:.0f} MiB of K/V read per call); max |paged - contiguous| = {err:.1e}")
    t = timeit({
        "gqa": lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True),
        "packed": lambda: F.scaled_dot_product_attention(qp, kc, vc),
        "paged": lambda: gather.attention(q, nk, nv, kv, meta, scale),
    }, a.iters)
    t_gqa, t_packed, t_paged = t["gqa"], t["packed"], t["paged"]
    print(f"{'contiguous SDPA (enable_gqa)':34s} {t_gqa:8.2f} ms  1.00x")
    print(f"{'contiguous SDPA (packed GQA)':34s} {t_packed:8.2f} ms  {t_packed / t_gqa:.2f}x")
    print(f"{'paged torch_gather (write + attn)':34s} {t_paged:8.2f} ms  {t_paged / t_gqa:.2f}x "
          f"(vs packed: {t_paged / t_packed:.2f}x)")


if __name__ == "__main__":
    main()
