"""Paged attention kernels vs SDPA on contiguous K/V (fp32; Triton under its CPU interpreter)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pagedlab.kernels import KVCache, build_metadata, get_kernel

CONTEXTS = [1, 7, 16, 100, 1000]


def make_batch(qlens, ctxs, bs, kv_heads, group, dim, seed=0, spare_blocks=3, layout="shuffled"):
    """A block pool holding each sequence's prefix, plus the step's new q/k/v. layout: "shuffled"
    (blocks in random order), "runs" (each table one run of consecutive blocks, after a spare
    block), "mixed" (runs, but every other sequence's table reversed)."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-c // bs) for c in ctxs]
    num_blocks = sum(need) + spare_blocks
    ids = list(range(num_blocks))
    if layout == "shuffled":
        rng.shuffle(ids)
    tables, it = [], iter(ids[1:] + ids[:1] if layout != "shuffled" else ids)
    for i, n in enumerate(need):
        table = [next(it) for _ in range(n)]
        tables.append(table[::-1] if layout == "mixed" and i % 2 else table)
    kv = torch.randn(2, num_blocks, bs, kv_heads, dim, generator=gen)  # garbage everywhere else
    flat = kv.view(2, -1, kv_heads, dim)
    full_k, full_v, slots, queries = [], [], [], []
    for q, c, t in zip(qlens, ctxs, tables):
        k = torch.randn(c, kv_heads, dim, generator=gen)
        v = torch.randn(c, kv_heads, dim, generator=gen)
        s = [t[p // bs] * bs + p % bs for p in range(c)]
        pre = torch.tensor(s[: c - q], dtype=torch.long)
        flat[0, pre], flat[1, pre] = k[: c - q], v[: c - q]
        full_k.append(k)
        full_v.append(v)
        slots += s[c - q :]
        queries.append(torch.randn(q, kv_heads * group, dim, generator=gen))
    meta = build_metadata(qlens, ctxs, tables, slots, bs)
    new_k = torch.cat([k[c - q :] for k, q, c in zip(full_k, qlens, ctxs)])
    new_v = torch.cat([v[c - q :] for v, q, c in zip(full_v, qlens, ctxs)])
    return kv, meta, torch.cat(queries), new_k, new_v, full_k, full_v


def reference(query, full_k, full_v, qlens, scale, window=None):
    outs, r = [], 0
    for k, v, q in zip(full_k, full_v, qlens):
        c = k.shape[0]
        qpos = torch.arange(c - q, c).view(-1, 1)
        kpos = torch.arange(c)
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        o = F.scaled_dot_product_attention(
            query[r : r + q].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale, enable_gqa=True,
        )
        outs.append(o.transpose(0, 1))
        r += q
    return torch.cat(outs)


def check(kernel, qlens, ctxs, bs, kv_heads, group, dim, window=None, seed=0, layout="shuffled", **options):
    kv, meta, q, k, v, full_k, full_v = make_batch(qlens, ctxs, bs, kv_heads, group, dim, seed, layout=layout)
    scale = dim**-0.5
    out = get_kernel(kernel, **options).attention(q, k, v, kv, meta, scale, window)
    ref = reference(q, full_k, full_v, qlens, scale, window)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-4)
    flat = kv.view(2, -1, kv_heads, dim)
    assert torch.equal(flat[0, meta.slot_mapping], k) and torch.equal(flat[1, meta.slot_mapping], v)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("bs", [1, 8, 16, 32, 64, 128])
def test_gather_decode(bs, group, dim):
    ctxs = random.Random(bs * group + dim).sample(CONTEXTS, len(CONTEXTS))
    check("torch_gather", [1] * len(ctxs), ctxs, bs, 2, group, dim, seed=bs + group)


@pytest.mark.parametrize("min_tokens", [1, 256])
@pytest.mark.parametrize("layout", ["runs", "mixed"])
@pytest.mark.parametrize("bs,group", [(1, 4), (16, 1), (16, 4), (32, 8)])
def test_gather_decode_zero_copy_runs(monkeypatch, bs, group, layout, min_tokens):
    """Sequences stored in one run of consecutive blocks attend to a view of the pool, the others
    are gathered; both match SDPA on contiguous K/V (with and without a sliding window)."""
    from pagedlab.kernels import torch_gather

    monkeypatch.setattr(torch_gather, "VIEW_MIN_TOKENS", min_tokens)
    ctxs = [1000, 7, 300, 16, 1, 100, 257]
    check("torch_gather", [1] * len(ctxs), ctxs, bs, 2, group, 64, seed=bs, layout=layout)
    check("torch_gather", [1] * len(ctxs), ctxs, bs, 2, group, 64, window=40, seed=bs, layout=layout)
    kv, meta, *_ = make_batch([1] * len(ctxs), ctxs, bs, 2, group, 64, bs, layout=layout)
    views, chunks = torch_gather._decode_plan(meta, kv, None)
    viewed = {row for row, _, _ in views}
    expect = {i for i, c in enumerate(ctxs) if c >= min_tokens and (layout == "runs" or i % 2 == 0 or c <= bs)}
    assert viewed == expect
    assert sum(rows.numel() for rows, *_ in chunks) == len(ctxs) - len(views)


@pytest.mark.parametrize("cut_tokens", [1, 64, 1 << 30])
def test_gather_decode_cuts_chunks_by_padding(monkeypatch, cut_tokens):
    """Decode sequences of very different lengths are cut into chunks where the padding would cost more
    than a chunk (CUT_TOKENS): every sequence lands in exactly one chunk, each chunk is as wide as its
    longest sequence, and the result matches SDPA on contiguous K/V (with and without a window)."""
    from pagedlab.kernels import torch_gather

    monkeypatch.setattr(torch_gather, "CUT_TOKENS", {"cpu": cut_tokens, "cuda": cut_tokens})
    monkeypatch.setattr(torch_gather, "VIEW_MIN_TOKENS", 1 << 30)
    ctxs = [1000, 7, 300, 16, 1, 100, 257, 990, 33, 500]
    check("torch_gather", [1] * len(ctxs), ctxs, 16, 2, 2, 64, seed=3)
    check("torch_gather", [1] * len(ctxs), ctxs, 16, 2, 2, 64, window=40, seed=3)
    kv, meta, *_ = make_batch([1] * len(ctxs), ctxs, 16, 2, 2, 64, 3)
    _, chunks = torch_gather._decode_plan(meta, kv, None)
    rows = sorted(r for chunk_rows, *_ in chunks for r in chunk_rows.tolist())
    assert rows == list(range(len(ctxs)))
    for chunk_rows, _, padded, _ in chunks:
        assert padded == -(-max(ctxs[r] for r in chunk_rows.tolist()) // 16) * 16
    expected = {1: len({-(-c // 16) for c in ctxs}), 1 << 30: 1}.get(cut_tokens)
    if expected is not None:  # a cut at every new width, or never
        assert len(chunks) == expected
    else:
        assert 1 < len(chunks) < len(ctxs)


def test_gather_decode_runs_mixed_with_prefill():
    check("torch_gather", MIXED_Q, MIXED_C, 16, 2, 2, 64, layout="runs")
    check("torch_gather", MIXED_Q, MIXED_C, 16, 2, 2, 64, window=24, layout="mixed")


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("bs", [8, 16, 32, 64, 128])
def test_triton_decode(bs, group, dim):
    ctxs = random.Random(bs * group + dim).sample(CONTEXTS, len(CONTEXTS))
    check("triton", [1] * len(ctxs), ctxs, bs, 1, group, dim, seed=bs + group)


# mixed batches: pure prefill, prefill over a cached prefix (prefix-cache hit / chunk / recompute),
# multi-tile prefill, and decode tokens, in one flattened batch
MIXED_Q = [5, 1, 7, 40, 1, 3]
MIXED_C = [5, 1000, 40, 100, 7, 16]


@pytest.mark.parametrize("kernel", ["torch_gather", "triton"])
@pytest.mark.parametrize("bs,group,dim", [(1, 2, 64), (8, 4, 64), (16, 1, 128), (32, 8, 64), (128, 2, 128)])
def test_prefill_over_paged_prefix(kernel, bs, group, dim):
    if kernel == "triton" and bs == 1:
        bs = 8
    check(kernel, MIXED_Q, MIXED_C, bs, 2, group, dim, seed=bs)


@pytest.mark.parametrize("kernel", ["torch_gather", "triton"])
def test_sliding_window(kernel):
    check(kernel, MIXED_Q, MIXED_C, 16, 2, 2, 64, window=24)


@pytest.mark.parametrize("splits", [2, 5])
def test_triton_split_decode(splits):
    check("triton", [1] * 5, CONTEXTS, 16, 2, 4, 64, num_splits=splits)
    check("triton", [1, 1, 4], [1000, 30, 300], 16, 2, 2, 64, window=100, num_splits=splits)


def test_triton_write_kv_matches_gather():
    kv, meta, _, k, v, *_ = make_batch(MIXED_Q, MIXED_C, 16, 2, 2, 64)
    kv2 = kv.clone()
    get_kernel("triton").write_kv(kv, k, v, meta)
    get_kernel("torch_gather").write_kv(kv2, k, v, meta)
    assert torch.equal(kv, kv2)


def test_kv_cache_copy_and_swap_roundtrip():
    cache = KVCache(3, num_blocks=10, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                    device="cpu", num_swap_blocks=6)
    assert cache[1].shape == (2, 10, 4, 2, 8) and len(cache) == 3
    cache.pool.copy_(torch.randn_like(cache.pool))
    before = cache.pool.clone()
    cache.copy_blocks([(1, 7), (2, 8)])
    assert torch.equal(cache.pool[:, :, 7], before[:, :, 1]) and torch.equal(cache.pool[:, :, 8], before[:, :, 2])
    cache.swap_out([(3, 5), (4, 0)])
    cache.pool[:, :, [3, 4]] = 0
    cache.swap_in([(5, 9), (0, 6)])
    assert torch.equal(cache.pool[:, :, 9], before[:, :, 3]) and torch.equal(cache.pool[:, :, 6], before[:, :, 4])
    assert cache.block_bytes == 3 * 2 * 4 * 2 * 8 * 4


@pytest.mark.parametrize("splits", [None, 2])
def test_triton_query_dtype_differs_from_pool(splits):
    """fp32 activations over an fp16 pool (bf16 on a GPU; the interpreter has no bf16): the step's K/V
    are stored in the pool's dtype, K/V are read in it and computed in the query's, as torch_gather
    does; the output has the query's dtype and matches SDPA over the pool-rounded K/V."""
    kv, meta, q, k, v, full_k, full_v = make_batch(MIXED_Q, MIXED_C, 16, 2, 4, 64)
    kv = kv.half()
    kv2 = kv.clone()
    out = get_kernel("triton", num_splits=splits).attention(q, k, v, kv, meta, 0.125)
    get_kernel("torch_gather").write_kv(kv2, k, v, meta)
    assert out.dtype == torch.float32 and kv.dtype == torch.float16
    assert torch.equal(kv, kv2)
    rounded = [[t.half().float() for t in ts] for ts in (full_k, full_v)]
    torch.testing.assert_close(out, reference(q, *rounded, MIXED_Q, 0.125), atol=2e-5, rtol=2e-4)


def test_triton_launches_on_the_pools_device(monkeypatch):
    """Triton launches on the current CUDA device: every launch must happen under
    `torch.cuda.device(<the pool's device>)` (mocked here: no GPU), not on whatever device is current."""
    from pagedlab.kernels import triton_backend

    entered: list = []
    launches: list = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.pop()

    monkeypatch.setattr(torch.cuda, "device", Guard)
    assert isinstance(triton_backend._on_device(torch.device("cuda", 1)), Guard)
    assert triton_backend._on_device(torch.device("cuda", 1)).device == torch.device("cuda", 1)

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(list(entered))

    class Module:
        def __getattr__(self, name):
            return Launcher()

    monkeypatch.setattr(triton_backend, "kernels", lambda device: Module())
    monkeypatch.setattr(triton_backend, "_on_device", lambda device: Guard(device))
    kv, meta, q, k, v, *_ = make_batch(MIXED_Q, MIXED_C, 16, 2, 2, 64)
    triton_backend.attention(q, k, v, kv, meta, 0.125, num_splits=2)
    triton_backend.write_kv(kv, k, v, meta)
    assert len(launches) == 5 and all(g and g[-1] == kv.device for g in launches), launches


def test_gather_workspace_made_in_inference_mode_serves_outside_it_too():
    """The workspace is shared across calls: one allocated under `torch.inference_mode` (an engine
    run) must not break a later call outside it (a test, a notebook)."""
    from pagedlab.kernels import torch_gather

    torch_gather._workspace.clear()
    kv, meta, q, k, v, *_ = make_batch(MIXED_Q, MIXED_C, 16, 2, 2, 64)
    with torch.inference_mode():
        inside = torch_gather.attention(q, k, v, kv.clone(), meta, 0.125)
    outside = torch_gather.attention(q, k, v, kv, meta, 0.125)
    torch.testing.assert_close(inside, outside)


def test_kernel_objects_are_thin_and_refuse_bad_options():
    """The kernel classes (what `kernel._target_` names): their per-layer methods are the module's
    functions (no wrapper), options are constructor keywords, and a bad one names the field."""
    from omegaconf import OmegaConf

    from pagedlab.config import ConfigError, config_dir
    from pagedlab.errors import BadArgument
    from pagedlab.kernels import KERNELS, torch_gather, triton_backend
    from pagedlab.parts import instantiate_part

    gather, triton = get_kernel("torch_gather"), get_kernel("triton")
    assert gather.attention is torch_gather.attention and gather.write_kv is torch_gather.write_kv
    assert triton.attention is triton_backend.attention and triton.num_splits is None
    assert get_kernel("triton", num_splits=3).attention.keywords == {"num_splits": 3}
    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(BadArgument, match=f"num_splits={bad if bad is not True else 'true'} is not allowed"):
            triton_backend.TritonKernel(num_splits=bad)
    with pytest.raises(TypeError):
        torch_gather.TorchGatherKernel(num_splits=2)
    with pytest.raises(ValueError, match="not one of torch_gather, triton"):
        get_kernel("flash")
    for name, target in KERNELS.items():
        kernel = instantiate_part(OmegaConf.load(config_dir() / "kernel" / f"{name}.yaml"), "kernel")
        assert kernel.name == name and f"{type(kernel).__module__}.{type(kernel).__name__}" == target
    node = OmegaConf.create({"_target_": KERNELS["triton"], "name": "triton", "num_splits": 0})
    with pytest.raises(ConfigError, match=r"kernel\.num_splits=0 is not allowed: expected an integer >= 1"):
        instantiate_part(node, "kernel")


def test_kernels_say_where_they_cannot_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    gather, triton = get_kernel("torch_gather"), get_kernel("triton")
    for device in (cpu, cuda):
        assert gather.device_warning(device) is None and gather.problem(device, torch.bfloat16) is None
    assert "Triton's interpreter" in triton.device_warning(cpu) and triton.device_warning(cuda) is None
    assert triton.problem(cpu) is None and triton.problem(cpu, torch.float32) is None
    assert triton.problem(cpu, torch.bfloat16).startswith("Triton's interpreter has no bfloat16; expected")
    assert triton.problem(cuda, torch.bfloat16) is None  # tiles are checked only with the model's shapes
