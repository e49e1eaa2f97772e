"""The Triton kernels compile for real GPUs, with no GPU here.

The CPU tests run the kernels under Triton's interpreter, which accepts things the compiler rejects
(shapes `tl.dot` cannot tile, type mix-ups, non-constexpr loop bounds in the wrong place). So the
backend's launches are recorded instead of run, for the shapes and dtypes a GPU run uses (bf16, fp16,
fp32; head dims 64 and 128; GQA groups 1 to 8; block sizes 8 to 128; split and unsplit decode), and
each recorded launch is compiled ahead of time to a cubin for Hopper (sm_90, the H200) and Ampere
(sm_80) with the `ptxas` that ships in the triton wheel, and must fit the shared memory of one SM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from test_kernels import make_batch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedlab.kernels import triton_backend

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32), "sm89": GPUTarget("cuda", 89, 32)}
SHARED_LIMIT = {"sm90": 227 << 10, "sm80": 163 << 10, "sm89": 99 << 10}  # bytes of shared memory one block may use


class _Recorder:
    """Stands in for the @triton.jit module: `kernel[grid](*args, **kw)` records instead of running."""

    def __init__(self, real, launches: list) -> None:
        self.real, self.launches = real, launches

    def __getattr__(self, name: str):
        fn = getattr(self.real, name)
        launches = self.launches

        class Launcher:
            def __getitem__(self, grid):
                return lambda *args, **kw: launches.append((fn, grid, args, kw))

        return Launcher()


def specialize(fn, args: tuple, kw: dict, target) -> tuple:
    """What the runtime compiles for this launch: `JITFunction.run`'s own binder and `_pack_args`, with
    the CUDA backend of `target`, give the signature, constexprs, the attributes Triton infers from the
    values (divisibility by 16 of pointers and ints, ints equal to 1) and the options. Also the cache
    key under which `run` looks the variant up, so tests can count variants."""
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kw)
    key = compute_cache_key({}, spec, options)
    options, sig, consts, attrs = fn._pack_args(backend, kw, bound, spec, options)
    return sig, consts, attrs, options, key


def compile_launch(fn, args: tuple, kw: dict, target):
    """Compile one recorded launch ahead of time exactly as `kernel[grid](*args, **kw)` would on `target`."""
    sig, consts, attrs, options, _ = specialize(fn, args, kw, target)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def record_launches(dtype, dim, group, bs, splits, qdtype=None, limit=None) -> list:
    """The kernel launches of one attention call over a mixed decode + prefill batch (K/V pool in
    `dtype`, queries in `qdtype`, by default the same)."""
    kv, meta, q, k, v, *_ = make_batch([1, 1, 1, 40], [1, 7, 100, 300], bs, 2, group, dim)
    kv, k, v = (t.to(dtype) for t in (kv, k, v))
    q = q.to(qdtype or dtype)
    launches: list = []
    real = triton_backend.kernels(torch.device("cuda"))  # compiled-mode module; loading needs no GPU
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_backend, "kernels", lambda device: _Recorder(real, launches))
        mp.setattr(triton_backend, "shared_memory_limit", lambda device: limit)  # None: default tiles
        triton_backend.attention(q, k, v, kv, meta, dim**-0.5, num_splits=splits)
    return launches


def compile_case(dtype, dim, group, bs, splits, target, qdtype=None, limit=None) -> dict:
    """Compile every launch of one case for `target` (a key of TARGETS); bytes of shared memory by
    kernel. Attention programs must use no more than the backend's `shared_bytes` estimate."""
    launches = record_launches(dtype, dim, group, bs, splits, qdtype, limit)
    elem, pool_elem = (torch.empty((), dtype=d).element_size() for d in (qdtype or dtype, dtype))
    shared = {}
    for fn, _grid, args, kw in launches:
        compiled = compile_launch(fn, args, kw, TARGETS[target])
        assert compiled.asm["cubin"], fn.__name__
        shared[fn.__name__] = used = compiled.metadata.shared
        if "BLOCK_N" in kw:
            rows = kw.get("BLOCK_G", kw.get("BLOCK_M"))
            estimate = triton_backend.shared_bytes(rows, kw["BLOCK_N"], kw["BLOCK_D"], elem, pool_elem)
            assert used <= estimate + triton_backend.SHARED_SLACK, (fn.__name__, used, estimate)
    return shared


CASES = [
    # dtype, head dim, GQA group, block size, decode splits
    (torch.bfloat16, 128, 4, 16, None),
    (torch.bfloat16, 128, 4, 16, 4),
    (torch.bfloat16, 64, 1, 8, None),
    (torch.bfloat16, 128, 8, 128, 2),
    (torch.float16, 128, 2, 32, None),
    (torch.float32, 64, 8, 64, 3),
]


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("dtype,dim,group,bs,splits", CASES)
def test_kernels_compile_for_gpu(target, dtype, dim, group, bs, splits):
    shared = compile_case(dtype, dim, group, bs, splits, target)
    expected = {"write_kv_kernel", "decode_kernel", "prefill_kernel"} | ({"reduce_kernel"} if splits else set())
    assert set(shared) == expected
    for name, used in shared.items():
        assert used <= SHARED_LIMIT[target], (name, used)


def test_compile_with_interpreter_set_at_startup():
    """With TRITON_INTERPRET=1 in the environment when the process starts, Triton's own @jit helpers
    (`tl.max`, `tl.standard`'s combine functions) are InterpretedFunctions; the CUDA kernels must not
    reference them, or every compile fails with "Unsupported function referenced"."""
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"TRITON_INTERPRET": "1",
                        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    code = ("import torch, test_triton_compile as t; "
            "print(sorted(t.compile_case(torch.bfloat16, 64, 4, 16, 2, 'sm90')))")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "reduce_kernel" in run.stdout and "decode_kernel" in run.stdout


@pytest.mark.parametrize("target", list(TARGETS))
def test_fp32_queries_over_bf16_pool_compile(target):
    """`tl.dot` needs both operands in one dtype: K/V tiles are converted to the query's on load."""
    shared = compile_case(torch.bfloat16, 128, 4, 16, 2, target, qdtype=torch.float32, limit=SHARED_LIMIT[target])
    assert set(shared) == {"write_kv_kernel", "decode_kernel", "prefill_kernel", "reduce_kernel"}
    assert max(shared.values()) <= SHARED_LIMIT[target]


def _launch_keys(qlens, ctxs, splits, bs=16) -> dict:
    """Cache key of each kernel launched for one step, as `JITFunction.run` computes it on sm_90."""
    kv, meta, q, k, v, *_ = make_batch(qlens, ctxs, bs, 2, 4, 64)
    launches: list = []
    real = triton_backend.kernels(torch.device("cuda"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(triton_backend, "kernels", lambda device: _Recorder(real, launches))
        triton_backend.attention(q, k, v, kv, meta, 0.125, num_splits=splits)
    return {fn.__name__: (specialize(fn, args, kw, TARGETS["sm90"])[4], tuple(sorted(kw.items())))
            for fn, _g, args, kw in launches}


STEPS = {  # block-table widths 1, 7, 16, 19, 3 / 10, 9, 16, 19, 12 blocks; 2 or 3 decode splits
    None: [([1, 1, 5], [3, 9, 12]), ([1, 1, 20], [100, 7, 40]), ([1, 1, 9], [256, 30, 200]),
           ([1, 1, 33], [300, 50, 290]), ([1, 1, 2], [48, 17, 48])],
    3: [([1, 1, 5], [3, 9, 150]), ([1, 1, 20], [100, 7, 140]), ([1, 1, 9], [256, 30, 200]),
        ([1, 1, 33], [300, 50, 290]), ([1, 1, 2], [48, 17, 190])],
}


@pytest.mark.parametrize("splits", list(STEPS))
def test_one_variant_across_steps(splits):
    """Steps differ in the block table's width (its row stride) and in the number of decode splits; the
    kernels must not be specialised on these (divisibility by 16, equality to 1), or each new value
    compiles another variant inside a timed step."""
    keys: dict = {}
    for qlens, ctxs in STEPS[splits]:
        for name, key in _launch_keys(qlens, ctxs, splits).items():
            keys.setdefault(name, set()).add(key)
    # variants only where a constexpr the backend picks differs: unsplit vs split decode (SPLIT) and
    # the split merge's BLOCK_P (the split count rounded up to a power of two): a few variants, each
    # compiled once, not one per block-table width or split count
    variants = {name: len({key for key, _ in k}) for name, k in keys.items()}
    constexprs = {name: len({c for _, c in k}) for name, k in keys.items()}
    assert variants == constexprs
    if not splits:
        assert variants == {name: 1 for name in keys}
    assert ("reduce_kernel" in keys) == bool(splits)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_256_fits_shared_memory(target, dtype):
    """At head dim 256 in fp32 the default tiles need about 148 KB of shared memory (the runtime's
    variant, with its divisibility attributes), over the 99 KB of sm_86/sm_89 parts (A10, L4, RTX 4090):
    given the device's limit, the backend picks smaller key tiles, and the compiled variants fit."""
    limit = SHARED_LIMIT[target]
    shared = compile_case(dtype, 256, 4, 16, 2, target, limit=limit)
    assert max(shared.values()) <= limit, shared


def test_shared_memory_rule():
    limit = 99 << 10
    assert triton_backend.block_n_for(32, 256, torch.float32, None, 32) == 32  # off CUDA: defaults
    assert triton_backend.block_n_for(16, 256, torch.float32, 227 << 10, 64) == 64  # H100/H200
    assert triton_backend.block_n_for(16, 256, torch.float32, limit, 64) == 32  # decode, 99 KB
    assert triton_backend.block_n_for(32, 256, torch.float32, limit, 32) == 16  # prefill, 99 KB
    assert triton_backend.block_n_for(16, 256, torch.bfloat16, limit, 64) == 64
    assert triton_backend.block_n_for(32, 256, torch.bfloat16, limit, 32) == 32
    with pytest.raises(ValueError, match=r"head dim 512 in float32 .* allows 99 KB.*fit in this dtype: \[64.*256\]"):
        triton_backend.block_n_for(32, 512, torch.float32, limit, 32)
