"""GPU decode attention: Triton paged kernel vs torch_gather vs contiguous SDPA, bf16, block 16.

    python -m pagedlab.bench.gpu [--batches 1,8,32,64,128,256] [--contexts 512,1024,2048,4096,8192]
                                 [--heads 32] [--kv-heads 8] [--head-dim 128] [--block-size 16]

Measures a large device-to-device copy first (read + write bytes / time) as the bandwidth ceiling,
then for each (batch, context) prints each method's time, achieved GB/s (K/V bytes read / time) and
that rate's share of the copy bandwidth, plus the paged/contiguous time ratio and the paged kernels'
max error against contiguous SDPA. Runs only where CUDA is available.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagedlab.bench.kernels import setup
from pagedlab.kernels import get_kernel


def cuda_time(fn: Callable[[], object], iters: int = 20) -> float:
    """Median seconds per call, timed with CUDA events after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(gib: float = 4.0) -> float:
    """Device copy bandwidth in GB/s: (read + write bytes) / time of a large `copy_`."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 10)
    return 2 * gib * 2**30 / t / 1e9


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def bench_case(batch: int, ctx: int, a: argparse.Namespace) -> list[tuple[str, float, float, float, float]]:
    """(method, seconds, max error vs contiguous, time / contiguous time, K/V GB/s) for one shape."""
    kv, meta, q, nk, nv, kc, vc = setup(batch, ctx, a.block_size, a.heads, a.kv_heads, a.head_dim,
                                        torch.bfloat16, "cuda")
    scale = a.head_dim**-0.5
    kv_bytes = 2 * kc.numel() * kc.element_size()
    q4 = q.unsqueeze(2)

    def contiguous() -> torch.Tensor:
        return F.scaled_dot_product_attention(q4, kc, vc, enable_gqa=True, scale=scale)

    ref = contiguous().squeeze(2).float()
    timings = [("sdpa contig", cuda_time(contiguous), 0.0)]
    for name in ("triton", "torch_gather"):
        mod = get_kernel(name)

        def paged(mod=mod) -> torch.Tensor:
            return mod.attention(q, nk, nv, kv, meta, scale)

        timings.append((name, cuda_time(paged), (paged().float() - ref).abs().max().item()))
    t_ref = timings[0][1]
    return [(n, t, e, t / t_ref, kv_bytes / t / 1e9) for n, t, e in timings]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--contexts", type=ints, default=[512, 1024, 2048, 4096, 8192])
    for name, default in [("heads", 32), ("kv-heads", 8), ("head-dim", 128), ("block-size", 16)]:
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("pagedlab.bench.gpu needs a CUDA device; none is available here (see pagedlab.bench.kernels for the CPU)")
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {bw:.0f} GB/s (read + write)")
    print(f"decode, bf16, block {a.block_size}, {a.heads} q heads / {a.kv_heads} kv heads, head_dim {a.head_dim}")
    print(f"{'batch':>5} {'ctx':>5} | {'method':12} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'x sdpa':>7} {'max err':>8}")
    for batch in a.batches:
        for ctx in a.contexts:
            for name, t, err, ratio, gbs in bench_case(batch, ctx, a):
                print(f"{batch:5d} {ctx:5d} | {name:12} {t * 1e3:8.3f} {gbs:7.0f} {100 * gbs / bw:5.0f}% "
                      f"{ratio:6.2f}x {err:8.1e}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
