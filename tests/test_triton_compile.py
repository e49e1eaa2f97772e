"""The Triton kernels compile for real GPUs, with no GPU here.

The CPU tests run the kernels under Triton's interpreter, which accepts things the compiler rejects
(shapes `tl.dot` cannot tile, type mix-ups, non-constexpr loop bounds in the wrong place). So the
backend's launches are recorded instead of run, for the shapes and dtypes a GPU run uses (bf16, fp16,
fp32; head dims 64 and 128; GQA groups 1 to 8; block sizes 8 to 128; split and unsplit decode), and
each recorded launch is compiled ahead of time to a cubin for Hopper (sm_90, the H200) and Ampere
(sm_80) with the `ptxas` that ships in the triton wheel, and must fit the shared memory of one SM.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from test_kernels import make_batch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pagedlab.kernels import triton_backend

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm80": GPUTarget("cuda", 80, 32)}
SHARED_LIMIT = {"sm90": 227 << 10, "sm80": 163 << 10}  # bytes of shared memory one block may use
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
          torch.int64: "i64"}


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


def _signature(fn, args: tuple, kw: dict) -> tuple[dict, dict]:
    """Triton signature and constexprs of one launch, typed from its Python values."""
    values = dict(zip(fn.arg_names, args)) | kw
    sig, consts = {}, {}
    for i, name in enumerate(fn.arg_names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    return sig, consts


def record_launches(dtype, dim, group, bs, splits, monkeypatch) -> list:
    """The kernel launches of one attention call over a mixed decode + prefill batch."""
    kv, meta, q, k, v, *_ = make_batch([1, 1, 1, 40], [1, 7, 100, 300], bs, 2, group, dim)
    kv, q, k, v = (t.to(dtype) for t in (kv, q, k, v))
    launches: list = []
    real = triton_backend.kernels(torch.device("cuda"))  # compiled-mode module; loading needs no GPU
    monkeypatch.setattr(triton_backend, "kernels", lambda device: _Recorder(real, launches))
    triton_backend.attention(q, k, v, kv, meta, dim**-0.5, num_splits=splits)
    return launches


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
def test_kernels_compile_for_gpu(target, dtype, dim, group, bs, splits, monkeypatch):
    launches = record_launches(dtype, dim, group, bs, splits, monkeypatch)
    names = {fn.__name__ for fn, *_ in launches}
    expected = {"write_kv_kernel", "decode_kernel", "prefill_kernel"} | ({"reduce_kernel"} if splits else set())
    assert names == expected
    for fn, _grid, args, kw in launches:
        sig, consts = _signature(fn, args, kw)
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGETS[target])
        assert compiled.asm["cubin"], fn.__name__
        assert compiled.metadata.shared <= SHARED_LIMIT[target], (fn.__name__, compiled.metadata.shared)
