"""CPU decode attention: paged `torch_gather` and `cpu` vs SDPA on contiguous K/V, side by side in one run.

    python -m pagedlab.bench.kernels [--batch 32] [--context 1024] [--block-size 16]
                                     [--heads 32] [--kv-heads 8] [--head-dim 128] [--iters 10]
                                     [--threads N] [--kernels torch_gather,cpu]

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
from pagedlab.kernels.cpu_kernel import CpuKernel
from pagedlab.kv.block_manager import BlockManager


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


LAYOUTS = ("prefill", "grown", "shuffled")


def block_tables(layout: str, batch: int, ctx: int, bs: int, seed: int = 0) -> tuple[list[list[int]], int]:
    """Block tables of `batch` sequences of `ctx` tokens, and the pool size they need.

    prefill: a fresh paged `BlockManager` admits each sequence with a prompt of ctx - 1 tokens, then
    one decode step appends the last token (each table is one run of consecutive blocks).
    grown: prompts of ctx // 2 tokens, then all sequences decode in lockstep up to ctx (each table is
    one run plus one run per decode block, interleaved across sequences).
    shuffled: every block of the pool in random order (worst case: no two consecutive blocks).
    """
    per_seq = -(-ctx // bs)
    if layout == "shuffled":
        ids = list(range(batch * per_seq))
        random.Random(seed).shuffle(ids)
        return [ids[i * per_seq : (i + 1) * per_seq] for i in range(batch)], batch * per_seq
    num_blocks = batch * (per_seq + 1)
    bm = BlockManager(num_blocks, bs)
    prompt = ctx - 1 if layout == "prefill" else ctx // 2
    for s in range(batch):
        bm.allocate(s, [0] * prompt, ctx)
    for _ in range(ctx - prompt):
        bm.append_slots(list(range(batch)), [0] * batch)
    return [bm.block_table(s) for s in range(batch)], num_blocks


def setup_layouts(batch: int, ctx: int, bs: int, heads: int, kv_heads: int, dim: int, layouts: tuple[str, ...],
                  dtype=torch.float32, device: str = "cpu", seed: int = 0):
    """Contiguous K/V [B, kv_heads, ctx, D], the step's query and new K/V, and for each layout a
    paged pool holding the same K/V (garbage in unused slots) with its metadata."""
    gen = torch.Generator(device).manual_seed(seed)
    k_contig, v_contig = (torch.randn(batch, kv_heads, ctx, dim, generator=gen, device=device, dtype=dtype)
                          for _ in range(2))
    q = torch.randn(batch, heads, dim, generator=gen, device=device, dtype=dtype)
    new_k, new_v = k_contig[:, :, -1].clone(), v_contig[:, :, -1].clone()
    pools = {}
    for layout in layouts:
        tables, num_blocks = block_tables(layout, batch, ctx, bs, seed)
        kv = torch.randn(2, num_blocks, bs, kv_heads, dim, generator=gen, device=device, dtype=dtype)
        slots = torch.tensor([[t[p // bs] * bs + p % bs for p in range(ctx)] for t in tables], device=device)
        flat = kv.view(2, -1, kv_heads, dim)
        flat[0, slots.view(-1)] = k_contig.transpose(1, 2).reshape(-1, kv_heads, dim)
        flat[1, slots.view(-1)] = v_contig.transpose(1, 2).reshape(-1, kv_heads, dim)
        meta = build_metadata([1] * batch, [ctx] * batch, tables, slots[:, -1].tolist(), bs, device)
        pools[layout] = kv, meta
    return q, new_k, new_v, k_contig, v_contig, pools


def setup(batch: int, ctx: int, bs: int, heads: int, kv_heads: int, dim: int, dtype=torch.float32,
          device: str = "cpu", seed: int = 0, layout: str = "shuffled"):
    """One layout's pool: (kv, meta, q, new_k, new_v, k_contig, v_contig) (used by bench.gpu)."""
    q, nk, nv, kc, vc, pools = setup_layouts(batch, ctx, bs, heads, kv_heads, dim, (layout,), dtype, device, seed)
    return (*pools[layout], q, nk, nv, kc, vc)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("batch", 32), ("context", 1024), ("block-size", 16), ("heads", 32),
                          ("kv-heads", 8), ("head-dim", 128), ("iters", 10), ("threads", 0)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {LAYOUTS}")
    p.add_argument("--kernels", default=None, help="default: torch_gather,cpu (cpu when it can be built here)")
    a = p.parse_args(argv)
    names = (a.kernels or ("torch_gather,cpu" if CpuKernel.problem(torch.device("cpu")) is None
                           else "torch_gather")).split(",")
    if a.threads:
        torch.set_num_threads(a.threads)
    layouts = tuple(a.layouts.split(","))
    q, nk, nv, kc, vc, pools = setup_layouts(a.batch, a.context, a.block_size, a.heads, a.kv_heads, a.head_dim, layouts)
    group, scale = a.heads // a.kv_heads, a.head_dim**-0.5
    kernels = {name: get_kernel(name) for name in names}
    q4 = q.unsqueeze(2)
    qp = q.view(a.batch, a.kv_heads, group, a.head_dim)
    ref = F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True).squeeze(2)
    err = max((k.attention(q, nk, nv, kv, meta, scale) - ref).abs().max().item()
              for k in kernels.values() for kv, meta in pools.values())
    kv_mib = 2 * kc.numel() * kc.element_size() / 2**20
    print(f"decode attention, CPU fp32, {torch.get_num_threads()} threads: batch {a.batch}, context {a.context}, "
          f"block {a.block_size}, {a.heads} q heads / {a.kv_heads} kv heads, head_dim {a.head_dim} "
          f"({kv_mib:.0f} MiB of K/V read per call); max |paged - contiguous| = {err:.1e}")
    fns: dict[str, Callable[[], object]] = {
        "contiguous SDPA (enable_gqa)": lambda: F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True),
        "contiguous SDPA (packed GQA)": lambda: F.scaled_dot_product_attention(qp, kc, vc),
    }
    for name, kernel in kernels.items():
        for layout, (kv, meta) in pools.items():
            fns[f"{name}, {layout} table"] = lambda k=kernel, kv=kv, meta=meta: k.attention(q, nk, nv, kv, meta, scale)
    t = timeit(fns, a.iters)
    t_gqa, t_packed = t["contiguous SDPA (enable_gqa)"], t["contiguous SDPA (packed GQA)"]
    print(f"{'':34s} {'median':>8s}     vs gqa  vs packed   (paged = write + attention)")
    for name, ms in t.items():
        print(f"{name:34s} {ms:8.2f} ms  {ms / t_gqa:5.2f}x  {ms / t_packed:5.2f}x")


if __name__ == "__main__":
    main()
