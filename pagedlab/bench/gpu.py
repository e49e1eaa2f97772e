"""GPU decode attention: Triton paged kernel vs torch_gather vs contiguous SDPA, bf16, block 16.

    python -m pagedlab.bench.gpu [--batches 1,8,32,64,128,256] [--contexts 512,1024,2048,4096,8192]
                                 [--heads 32] [--kv-heads 8] [--head-dim 128] [--block-size 16]

Measures a large device-to-device copy first (read + write bytes / time) as the bandwidth ceiling,
then for each (batch, context) prints each method's time, achieved GB/s (K/V bytes read / time) and
that rate's share of the copy bandwidth, plus the paged/contiguous time ratio and the paged kernels'
max error against contiguous SDPA. Runs only where CUDA is available.

    python -m pagedlab.bench.gpu --smoke

A first-GPU-run smoke test (a few minutes on an H200): the checks of SMOKE_CHECKS in order, one line
each (PASS/FAIL with numbers), exit status 1 on any failure; stops after the first check when there
is no CUDA device.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from functools import cache

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
        kernel = get_kernel(name)

        def paged(kernel=kernel) -> torch.Tensor:
            return kernel.attention(q, nk, nv, kv, meta, scale)

        timings.append((name, cuda_time(paged), (paged().float() - ref).abs().max().item()))
    t_ref = timings[0][1]
    return [(n, t, e, t / t_ref, kv_bytes / t / 1e9) for n, t, e in timings]


# -- the smoke test ---------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 4e-2}  # max |paged - fp32 contiguous SDPA|
SMOKE_KERNELS = {  # label -> constructor options that force the split-decode check's context splits
    "torch_gather": {},
    "triton": {"num_splits": 4},
}


def _batch(qlens, ctxs, bs, kv_heads, group, dim, dtype, device, seed=0, num_blocks=None, top=False):
    """A pool holding each sequence's cached prefix (blocks shuffled, or the pool's last blocks with
    `top`), the step's new q/k/v in `dtype`, and the fp32 contiguous K/V of each sequence."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-c // bs) for c in ctxs]
    num_blocks = num_blocks or sum(need) + 3
    ids = list(range(num_blocks))
    if top:
        ids = ids[::-1]
    else:
        random.Random(seed).shuffle(ids)
    it = iter(ids)
    tables = [[next(it) for _ in range(n)] for n in need]
    kv = torch.zeros(2, num_blocks, bs, kv_heads, dim, dtype=dtype, device=device)
    flat = kv.view(2, -1, kv_heads, dim)
    fulls, slots, queries = [], [], []
    for q, c, t in zip(qlens, ctxs, tables):
        k = torch.randn(2, c, kv_heads, dim, generator=gen).to(dtype)
        s = torch.tensor([t[p // bs] * bs + p % bs for p in range(c)], dtype=torch.long)
        flat[:, s[: c - q].to(device)] = k[:, : c - q].to(device)
        fulls.append(k.float())
        slots += s[c - q :].tolist()
        queries.append(torch.randn(q, kv_heads * group, dim, generator=gen).to(dtype))
    from pagedlab.kernels import build_metadata

    meta = build_metadata(qlens, ctxs, tables, slots, bs, device)
    new = torch.cat([f[:, c - q :] for f, q, c in zip(fulls, qlens, ctxs)], 1).to(dtype).to(device)
    return kv, meta, torch.cat(queries).to(device), new[0], new[1], fulls


def _reference(query, fulls, qlens, scale, window=None):
    """fp32 SDPA on contiguous K/V, per sequence."""
    outs, r = [], 0
    for f, q in zip(fulls, qlens):
        c = f.shape[1]
        qpos, kpos = torch.arange(c - q, c).view(-1, 1), torch.arange(c)
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        k, v = f.to(query.device).transpose(1, 2).unbind(0)
        outs.append(F.scaled_dot_product_attention(query[r : r + q].float().transpose(0, 1), k, v,
                                                   attn_mask=mask.to(query.device), scale=scale,
                                                   enable_gqa=True).transpose(0, 1))
        r += q
    return torch.cat(outs)


MIXED_Q, MIXED_C = [5, 1, 7, 40, 1, 3, 1], [5, 1000, 40, 100, 7, 16, 300]  # prefill, prefix hits, decode


def check_kernel_matrix(kernel: str, dtype: torch.dtype, bs: int, device: str = "cuda",
                        dims=(64, 128, 256), groups=(1, 4, 7), window: int | None = None,
                        qlens=MIXED_Q, ctxs=MIXED_C, **options) -> tuple[bool, str]:
    """Mixed batches (prefill, prefill over a cached prefix, decode) for every head dim and GQA group;
    `options`: the kernel's constructor options."""
    worst, where = 0.0, ""
    attention = get_kernel(kernel, **options).attention
    for dim in dims:
        for group in groups:
            kv, meta, q, k, v, fulls = _batch(qlens, ctxs, bs, 2, group, dim, dtype, device, seed=dim + group)
            out = attention(q, k, v, kv, meta, dim**-0.5, window)
            err = (out.float() - _reference(q, fulls, qlens, dim**-0.5, window)).abs().max().item()
            if not err <= worst:  # NaN counts as worst
                worst, where = err, f"dim {dim} group {group}"
    ok = worst <= TOLERANCE[dtype]
    return ok, (f"max err {worst:.2e} (tol {TOLERANCE[dtype]:.0e}, worst at {where or '-'}), "
                f"{len(dims) * len(groups)} shapes")


def check_split_decode(kernel: str, device: str = "cuda") -> tuple[bool, str]:
    """Batch 1, a long context: the Triton kernel splits it over the SMs (forced to 4 splits, see
    SMOKE_KERNELS)."""
    return check_kernel_matrix(kernel, torch.bfloat16, 16, device, dims=(128,), groups=(1, 4, 7),
                               qlens=[1], ctxs=[8000], **SMOKE_KERNELS.get(kernel, {}))


def check_large_pool(kernel: str, device: str = "cuda") -> tuple[bool, str]:
    """A pool of more than 2^31 elements per layer, the batch's blocks at its top."""
    bs, dim = 16, 128
    num_blocks = (1 << 31) // (2 * bs * dim) + 64
    qlens, ctxs = [1, 1, 20], [700, 33, 300]
    kv, meta, q, k, v, fulls = _batch(qlens, ctxs, bs, 1, 4, dim, torch.bfloat16, device, num_blocks=num_blocks,
                                      top=True)
    out = get_kernel(kernel).attention(q, k, v, kv, meta, dim**-0.5)
    err = (out.float() - _reference(q, fulls, qlens, dim**-0.5)).abs().max().item()
    del kv
    return err <= TOLERANCE[torch.bfloat16], f"{2 * num_blocks * bs * dim} elements, max err {err:.2e}"


def check_cuda(device: str = "cuda") -> tuple[bool, str]:
    if torch.version.cuda is None or not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "none is visible"
        return False, f"no CUDA device ({why}; torch {torch.__version__})"
    props = torch.cuda.get_device_properties(device)
    return True, (f"{props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
                  f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def check_triton_launch(device: str = "cuda") -> tuple[bool, str]:
    """One small Triton launch (the KV write kernel) against torch_gather's index_copy_."""
    import triton

    kv, meta, _, k, v, _ = _batch([3, 1], [3, 20], 16, 2, 1, 64, torch.float32, device)
    kv2 = kv.clone()
    start = time.perf_counter()
    get_kernel("triton").write_kv(kv, k, v, meta)
    torch.cuda.synchronize() if device == "cuda" else None
    took = time.perf_counter() - start
    get_kernel("torch_gather").write_kv(kv2, k, v, meta)
    return torch.equal(kv, kv2), f"triton {triton.__version__}, write_kv launch (with compile) {took:.2f} s"


@cache
def _tiny_model_dir() -> str:
    from pagedlab.models.tiny import save_tiny_model

    return str(save_tiny_model(tempfile.mkdtemp(prefix="pagedlab_smoke_") + "/llama", "llama", seed=0))


ENGINE_BASE = {"executor": "torch", "model": "hf", "model.dtype": "float32", "max_model_len": "256",
               "kv_cache.budget_gib": "0.01", "workload.num_requests": "6", "workload.prompt_len": "[4,40]",
               "workload.output_len": "[2,20]"}
ENGINE_MODES = {  # config overrides of each end-to-end mode, on top of ENGINE_BASE
    "greedy": {},
    "sampling": {"workload.n": "3", "sampling.temperature": "1.0", "sampling.top_k": "50", "sampling.top_p": "0.9",
                 "sampling.seed": "7"},
    "beam": {"workload.beam_width": "3", "workload.num_requests": "3"},
    "swap": {"kv_cache.num_blocks": "6", "max_model_len": "64", "eviction.mode": "swap"},  # 96 slots: preempts
}


def _engine_run(kernel: str, mode: str, device: str, **extra: object):
    from pagedlab import compose
    from pagedlab.experiment import run_experiment

    over = {**ENGINE_BASE, "model.name_or_path": _tiny_model_dir(), "device": device, "kernel": kernel,
            **ENGINE_MODES[mode], **extra}
    cfg = compose([f"{k}={v}" for k, v in over.items()])
    result = run_experiment(cfg, progress=False)
    df = result.requests
    got = {rid: [list(t) for t in rows.sort_values("seq_index").output_token_ids]
           for rid, rows in df.groupby("request_id", sort=True)}
    return cfg, result, got, bool((df.status == "finished").all())


def _hf_outputs(cfg, device: str) -> dict:
    """Hugging Face `generate` on the same device: greedy or beam rows of each request."""
    from transformers import AutoModelForCausalLM

    from pagedlab.experiment import build_requests

    model = AutoModelForCausalLM.from_pretrained(_tiny_model_dir(), dtype=torch.float32).to(device).eval()
    out = {}
    for r in build_requests(cfg, vocab_size=model.config.vocab_size, max_model_len=int(cfg.max_model_len)):
        beams = r.sampling.beam_width
        extra = {"num_beams": beams, "num_return_sequences": beams, "length_penalty": 0.0,
                 "early_stopping": True} if beams > 1 else {}
        eos = None if r.sampling.ignore_eos else model.config.eos_token_id
        with torch.inference_mode():
            ids = model.generate(torch.tensor([r.prompt_token_ids], device=device),
                                 attention_mask=torch.ones(1, len(r.prompt_token_ids), dtype=torch.long, device=device),
                                 max_new_tokens=r.sampling.max_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=0, **extra)
        rows = ids[:, len(r.prompt_token_ids):].tolist()
        rows = [row[: row.index(eos) + 1] if eos in row else row for row in rows]
        out[r.request_id] = r.sampling.n * rows
    return out


def check_engine(kernel: str, mode: str, device: str = "cuda") -> tuple[bool, str]:
    """The engine end to end on the tiny model; greedy, beam and swap vs HF `generate`, sampling by
    lengths and a same-seed rerun."""
    start = time.perf_counter()
    cfg, result, got, finished = _engine_run(kernel, mode, device)
    took = time.perf_counter() - start
    n_tok = sum(len(t) for rows in got.values() for t in rows)
    if mode == "sampling":
        _, _, again, _ = _engine_run(kernel, mode, device)
        ok = finished and again == got
        return ok, f"{len(got)} requests, {n_tok} tokens in {took:.1f} s, same-seed rerun identical: {again == got}"
    want = _hf_outputs(cfg, device)
    differ = [rid for rid in want if got.get(rid) != want[rid]]
    extra = ""
    if mode == "swap":
        extra = f", swapped out {int(result.summary.get('swapped_out_blocks', 0))} blocks"
        finished = finished and result.summary.get("swapped_out_blocks", 0) > 0
    return finished and not differ and got.keys() == want.keys(), \
        f"{len(want) - len(differ)}/{len(want)} requests match HF generate, {n_tok} tokens in {took:.1f} s{extra}"


def triton_compiled(device: str = "cuda") -> int:
    """Kernels compiled so far for `device` by the Triton backend (the sizes of the JIT caches)."""
    from pagedlab.kernels.triton_backend import kernels

    mod, n = kernels(torch.device(device)), 0
    for name in ("write_kv_kernel", "decode_kernel", "reduce_kernel", "prefill_kernel"):
        fn = getattr(mod, name)
        for entry in getattr(fn, "device_caches", {}).values():
            n += len(entry[0]) if isinstance(entry, tuple) else len(entry)
        n += sum(len(c) for c in getattr(fn, "cache", {}).values())
    return n


def check_compile_counts(device: str = "cuda") -> tuple[bool, str]:
    """A second greedy run with kernel=triton, on other requests (other lengths, so other block-table
    widths and split counts), compiles nothing new."""
    _engine_run("triton", "greedy", device)
    first = triton_compiled(device)
    _engine_run("triton", "greedy", device, **{"workload.seed": 1234, "workload.prompt_len": "[5,60]"})
    second = triton_compiled(device)
    return second == first, f"triton kernels compiled: {first} after run 1, {second} after run 2"


SMOKE_CHECKS: list[tuple[str, Callable[..., tuple[bool, str]], tuple]] = [
    ("cuda build and device", check_cuda, ()),
    ("triton trivial launch", check_triton_launch, ()),
    *[(f"{kernel} {str(dtype)[6:]} block {bs} vs fp32 SDPA", check_kernel_matrix, (kernel, dtype, bs))
      for kernel in SMOKE_KERNELS for dtype in (torch.bfloat16, torch.float32) for bs in (16, 24)],
    *[(f"{kernel} sliding window 24", check_kernel_matrix, (kernel, torch.bfloat16, 16, "cuda", (128,), (1, 4, 7), 24))
      for kernel in SMOKE_KERNELS],
    *[(f"{kernel} split decode, batch 1", check_split_decode, (kernel,)) for kernel in SMOKE_KERNELS],
    *[(f"{kernel} pool over 2^31 elements", check_large_pool, (kernel,)) for kernel in SMOKE_KERNELS],
    *[(f"engine {kernel} {mode}", check_engine, (kernel, mode)) for kernel in SMOKE_KERNELS for mode in ENGINE_MODES],
    ("triton compile counts, second run", check_compile_counts, ()),
]


def smoke(checks=SMOKE_CHECKS) -> int:
    """Run the checks in order, one line each; returns the number of failures. The first check
    (CUDA build and device) failing stops the run."""
    failures = passed = 0
    for i, (name, fn, args) in enumerate(checks):
        start = time.perf_counter()
        try:
            ok, detail = fn(*args)
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, the next ones still run
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail} [{time.perf_counter() - start:.1f} s]", flush=True)
        passed, failures = passed + ok, failures + (not ok)
        if not ok and i == 0:
            print("smoke test stopped: no CUDA device, nothing else can run", flush=True)
            break
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{'PASS' if not failures else 'FAIL'}: {passed}/{len(checks)} checks passed", flush=True)
    return failures


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 64, 128, 256])
    p.add_argument("--contexts", type=ints, default=[512, 1024, 2048, 4096, 8192])
    for name, default in [("heads", 32), ("kv-heads", 8), ("head-dim", 128), ("block-size", 16)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--smoke", action="store_true", help="run the GPU smoke test (SMOKE_CHECKS) and exit")
    a = p.parse_args(argv)
    if a.smoke:
        sys.exit(1 if smoke() else 0)
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
