"""`kernel=triton` (:class:`TritonKernel`): launches the kernels of `triton_kernels` (imported lazily,
see below).

On a non-CUDA device the kernels run under Triton's interpreter with no setup by the user:
`TRITON_INTERPRET=1` is set before the @triton.jit module is imported (Triton reads it when the
decorators run). The interpreter has no bfloat16 and is slow, so it suits small fp32 shapes (tests);
speed is for CUDA.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from pagedlab.errors import BadArgument
from pagedlab.kernels.metadata import PagedMetadata, to_device

if TYPE_CHECKING:
    from pagedlab.models.presets import ModelSpec

BLOCK_N = 64  # keys per decode tile
BLOCK_M = BLOCK_N_PREFILL = 32  # queries x keys per prefill tile
MIN_SPLIT_TOKENS = 256
_modules: dict[bool, ModuleType] = {}


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def kernels(device: torch.device) -> ModuleType:
    """The @triton.jit module for `device`: interpreted unless `device` is CUDA.

    Each mode gets its own instance of `triton_kernels` (loaded under its own name), so CPU tests and
    CUDA runs can share a process. Triton itself is imported first, in its normal mode.
    """
    interpret = device.type != "cuda"
    if interpret not in _modules:
        try:
            import triton  # noqa: F401
        except ImportError as err:  # pragma: no cover - platform without Triton
            raise RuntimeError("kernel=triton needs the `triton` package; use kernel=torch_gather") from err
        if interpret:
            _mend_old_interpreter()
        previous = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        name = f"{__package__}.triton_kernels" + ("_interpreted" if interpret else "")
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_kernels.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if not interpret:  # leave the variable set for interpreted runs, as a user would
            if previous is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = previous
        _modules[interpret] = mod
    return _modules[interpret]


def _mend_old_interpreter() -> None:
    """Triton < 3.7's interpreter turns a loop bound into an int with `int(array)`, which NumPy >= 2.4
    refuses for its 1-element arrays; install the `squeeze()` that Triton 3.7 added (idempotent)."""
    import triton
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 7) or patch is None:
        return
    if getattr(patch, "mended", False):
        return

    def mended(tensor, scope) -> None:
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    mended.mended = True
    interpreter._patch_lang_tensor = mended


MIN_BLOCK_N = 16  # the smallest tile `tl.dot` takes
SHARED_SLACK = 8 << 10  # headroom over `shared_bytes` for what other Triton versions add
_shared_limits: dict[torch.device, int] = {}


def shared_bytes(rows: int, block_n: int, block_d: int, elem: int, pool_elem: int | None = None) -> int:
    """Shared memory (bytes) of one decode/prefill program: the K and V tiles, the query tile and the
    probabilities, in the compute dtype (`elem` bytes; K/V also as loaded, in the pool's `pool_elem`,
    when that differs). Within a few hundred bytes of Triton 3.9's
    sm_80-sm_90 variants; tests/test_triton_compile.py checks compiled variants against it plus
    SHARED_SLACK, the margin the tile choice keeps."""
    kv_tiles = 2 * block_n * block_d * (elem + (pool_elem if pool_elem not in (None, elem) else 0))
    return kv_tiles + (rows * block_d + rows * block_n) * elem


def shared_memory_limit(device: torch.device) -> int | None:
    """Shared memory one program may use on `device` (opt-in maximum; None off CUDA)."""
    if device.type != "cuda":
        return None
    if device not in _shared_limits:
        props = torch.cuda.get_device_properties(device)
        limit = getattr(props, "shared_memory_per_block_optin", 0)
        if not limit:
            from triton.runtime import driver

            index = device.index if device.index is not None else torch.cuda.current_device()
            limit = driver.active.utils.get_device_properties(index)["max_shared_mem"]
        _shared_limits[device] = int(limit)
    return _shared_limits[device]


def block_n_for(rows: int, dim: int, dtype: torch.dtype, limit: int | None, default: int,
                pool_dtype: torch.dtype | None = None) -> int:
    """Keys per tile for a program of `rows` query rows at head dim `dim`, computing in `dtype`: the
    default, halved until the variant fits `limit` bytes of shared memory. Raises ValueError, naming
    what fits, when not even MIN_BLOCK_N-key tiles do."""
    block_d, elem = _pow2(dim), dtype.itemsize
    pool_elem = (pool_dtype or dtype).itemsize
    block_n = default
    while limit is not None and shared_bytes(rows, block_n, block_d, elem, pool_elem) + SHARED_SLACK > limit:
        if block_n <= MIN_BLOCK_N:
            fits = [d for d in (64, 80, 96, 128, 192, 256, 512)
                    if shared_bytes(rows, MIN_BLOCK_N, _pow2(d), elem, pool_elem) + SHARED_SLACK <= limit]
            need = shared_bytes(rows, MIN_BLOCK_N, block_d, elem, pool_elem) + SHARED_SLACK
            raise ValueError(
                f"kernel=triton: head dim {dim} in {str(dtype).removeprefix('torch.')} needs about {need >> 10} KB "
                f"of shared memory per program even with {MIN_BLOCK_N}-key tiles; this GPU allows {limit >> 10} KB. "
                f"Head dims that fit in this dtype: {fits or 'none'}; or use a 2-byte dtype (bf16/fp16), "
                f"or kernel=torch_gather")
        block_n //= 2
    return block_n


def shared_memory_problem(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, limit: int | None) -> str | None:
    """Why the decode or prefill kernel cannot fit ``limit`` bytes of shared memory for this model
    (the preflight asks before any work), or None."""
    try:
        block_n_for(_pow2(heads // kv_heads), dim, dtype, limit, BLOCK_N)
        block_n_for(BLOCK_M, dim, dtype, limit, BLOCK_N_PREFILL)
    except ValueError as exc:
        return str(exc)
    return None


def _on_device(device: torch.device):
    """Launch on `device`: Triton launches on the current CUDA device (and its current stream), so
    tensors on cuda:1 while cuda:0 is current would be read through another device's pointers."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def write_kv(kv: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: PagedMetadata) -> None:
    """Store new keys/values [T, kv_heads, D] into the layer's pool (one program per token)."""
    if not key.shape[0]:
        return
    k = key.to(kv.dtype).reshape(key.shape[0], -1).contiguous()
    v = value.to(kv.dtype).reshape(value.shape[0], -1).contiguous()
    n = k.shape[1]
    with _on_device(kv.device):
        kernels(kv.device).write_kv_kernel[(k.shape[0],)](
            k, v, kv, meta.slot_mapping, k.stride(0), v.stride(0), kv[0].numel(), N=n, BLOCK=_pow2(n, 1)
        )


def _num_splits(programs: int, max_ctx: int, device: torch.device) -> int:
    """Context splits per decode sequence: enough programs for about four waves of the GPU's SMs."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= 2 * sms:
        return 1
    return max(1, min(-(-max_ctx // MIN_SPLIT_TOKENS), -(-4 * sms // programs)))


def _decode_plan(meta: PagedMetadata, heads: int, kv_heads: int, dim: int, splits: int | None) -> dict:
    key = ("triton_decode", heads, dim, splits)
    if key not in meta.plans:
        dev = meta.block_tables.device
        seqs = meta.decode_seqs
        max_ctx = max(meta.context_lens_list[s] for s in seqs)
        n = splits or _num_splits(len(seqs) * kv_heads, max_ctx, dev)
        part_len = -(-max_ctx // n)
        part_len = -(-part_len // BLOCK_N) * BLOCK_N
        parts = -(-max_ctx // part_len)
        # sequence ids and their token rows, from the host lists: one copy, no read back; the rows start
        # 16-byte aligned (as `_prefill_tiles`), so Triton's pointer specialisation does not vary by step
        at = -(-len(seqs) // 4) * 4
        idx = to_device(seqs + [0] * (at - len(seqs)) + [meta.query_start_list[s] for s in seqs], torch.int32, dev)
        plan = {"seqs": idx[: len(seqs)], "rows": idx[at:], "part_len": part_len, "parts": parts}
        if parts > 1:
            plan["m"] = torch.empty(len(seqs) * heads * parts, dtype=torch.float32, device=dev)
            plan["l"] = torch.empty_like(plan["m"])
            plan["acc"] = torch.empty(len(seqs) * heads * parts * dim, dtype=torch.float32, device=dev)
        meta.plans[key] = plan
    return meta.plans[key]


def _prefill_tiles(meta: PagedMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    if "triton_prefill" not in meta.plans:
        q = meta.query_lens_list
        tiles = [(s, m) for s in meta.prefill_seqs for m in range(0, q[s], BLOCK_M)]
        # one transfer, two rows padded to 4 int32s (16 bytes): both start 16-byte aligned whatever the
        # number of tiles, so Triton's divisibility specialisation of the pointers does not vary by step
        width = -(-len(tiles) // 4) * 4
        rows = [[s for s, _ in tiles], [m for _, m in tiles]]
        t = to_device([x for r in rows for x in r + [0] * (width - len(tiles))], torch.int32,
                      meta.block_tables.device).view(2, width)
        meta.plans["triton_prefill"] = (t[0, : len(tiles)], t[1, : len(tiles)])
    return meta.plans["triton_prefill"]


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv: torch.Tensor,
    meta: PagedMetadata,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Write the step's K/V, then attend straight from the pool. [T, H, D] in, [T, H, D] out.

    `num_splits` overrides the decode context-split heuristic (tests use it on the CPU).
    """
    with _on_device(kv.device):
        return _attention(query, key, value, kv, meta, scale, sliding_window, num_splits)


def _attention(query, key, value, kv, meta, scale, sliding_window, num_splits) -> torch.Tensor:
    write_kv(kv, key, value, meta)
    if query.stride(-1) != 1:
        query = query.contiguous()
    mod = kernels(kv.device)
    num_tokens, heads, dim = query.shape
    kv_heads, bs = kv.shape[3], kv.shape[2]
    group = heads // kv_heads
    out = torch.empty(num_tokens, heads, dim, dtype=query.dtype, device=query.device)
    scale_log2 = scale * math.log2(math.e)
    window = sliding_window or 0
    prec = _precision(query.dtype)  # the kernels compute in the query's dtype (K/V converted on load)
    # tiles small enough for the device's shared memory (fp32 at head dim 256 needs smaller tiles on
    # 99 KB parts: A10, L4, RTX 4090); checked before any launch
    limit = shared_memory_limit(kv.device)
    block_g = _pow2(group)
    common = {"KV_HEADS": kv_heads, "G": group, "D": dim, "BS": bs, "BLOCK_D": _pow2(dim), "PREC": prec}
    strides = (query.stride(0), query.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0))
    if meta.decode_seqs:
        block_n = block_n_for(block_g, dim, query.dtype, limit, BLOCK_N, kv.dtype)
        plan = _decode_plan(meta, heads, kv_heads, dim, num_splits)
        split = plan["parts"] > 1
        dummy = out if not split else None
        mod.decode_kernel[(len(meta.decode_seqs), kv_heads, plan["parts"])](
            query, kv, out, meta.block_tables, meta.context_lens, plan["rows"], plan["seqs"],
            plan.get("m", dummy), plan.get("l", dummy), plan.get("acc", dummy),
            scale_log2, *strides, kv[0].numel(), window, plan["part_len"], plan["parts"],
            BLOCK_G=block_g, BLOCK_N=block_n, SPLIT=split, **common,
        )
        if split:
            mod.reduce_kernel[(len(meta.decode_seqs), heads)](
                out, plan["rows"], plan["m"], plan["l"], plan["acc"], out.stride(0), out.stride(1),
                plan["parts"], HEADS=heads, D=dim, BLOCK_P=_pow2(plan["parts"], 2), BLOCK_D=_pow2(dim),
            )
    if meta.prefill_seqs:
        block_n = block_n_for(BLOCK_M, dim, query.dtype, limit, BLOCK_N_PREFILL, kv.dtype)
        tile_seq, tile_m = _prefill_tiles(meta)
        mod.prefill_kernel[(tile_seq.numel(), heads)](
            query, kv, out, meta.block_tables, meta.context_lens, meta.query_start, tile_seq, tile_m,
            scale_log2, *strides, kv[0].numel(), window,
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, **common,
        )
    return out


CPU_WARNING = ("pagedlab: kernel=triton on the CPU runs Triton's interpreter (TRITON_INTERPRET=1): "
               "a few tokens per second, for tests and small fp32 shapes only; use kernel=torch_gather "
               "on the CPU, or a CUDA device.")


class TritonKernel:
    """``kernel=triton``: reads the block table in the kernel (no gather). Option ``num_splits``: context
    splits per decode sequence (null: enough programs for about four waves of the GPU's SMs; 1: none).

    Its `write_kv` and `attention` are this module's functions (``num_splits`` bound when set), bound on
    the instance, so the per-layer call goes through no wrapper."""

    name = "triton"
    write_kv = staticmethod(write_kv)
    attention = staticmethod(attention)

    def __init__(self, num_splits: int | None = None) -> None:
        if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                       or num_splits < 1):
            raise BadArgument("num_splits", num_splits, "an integer >= 1, or null (chosen per step)")
        self.num_splits = num_splits
        self.write_kv = write_kv
        self.attention = attention if num_splits is None else partial(attention, num_splits=num_splits)

    def workspace_bytes(self, spec: ModelSpec, max_num_seqs: int, max_model_len: int) -> int:
        """The split-decode buffers at most: m, l and acc in fp32 for every sequence, head and split."""
        splits = self.num_splits or -(-max_model_len // MIN_SPLIT_TOKENS)
        return max_num_seqs * spec.num_heads * splits * (spec.head_dim + 2) * 4

    @staticmethod
    def device_warning(device: torch.device) -> str | None:
        """Off CUDA it runs Triton's interpreter: slow."""
        return CPU_WARNING if device.type != "cuda" else None

    @staticmethod
    def problem(device: torch.device, dtype: torch.dtype | None = None, spec: ModelSpec | None = None) -> str | None:
        """No `triton` package; bfloat16 off CUDA (the interpreter has none); on CUDA, tiles that do not
        fit the device's shared memory for `spec`'s head dim and GQA group in `dtype`."""
        if importlib.util.find_spec("triton") is None:
            return "the `triton` package is not installed; expected kernel=torch_gather (or `pip install triton`)"
        if dtype is None:
            return None
        if device.type != "cuda":
            if dtype == torch.bfloat16:
                return ("Triton's interpreter has no bfloat16; expected model.dtype=float32 or float16, "
                        "kernel=torch_gather, or a CUDA device")
            return None
        if spec is None:
            return None
        why = shared_memory_problem(spec.num_heads, spec.num_kv_heads, spec.head_dim, dtype,
                                    shared_memory_limit(device))
        return why.removeprefix("kernel=triton: ") if why else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_splits={self.num_splits})"
