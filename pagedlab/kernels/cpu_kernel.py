"""`kernel=cpu` (:class:`CpuKernel`): decode attention in C, read straight from the paged pool (float32, CPU).

torch_gather copies each decoding sequence's blocks into a workspace and runs SDPA over them: the keys
and values cross memory three times, and CPU SDPA is slow for a one-token query. `cpu_paged.c` instead
walks the block table and reads every key and value once, in place, with one call per layer for the
whole batch (OpenMP over sequences x KV heads, on torch's own thread pool). Prefills are compute-bound
and already fast in SDPA: they take torch_gather's path. Writes of the new K/V are torch_gather's too.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``) at
``-O3 -march=native -fopenmp`` into ``$PAGEDLAB_CACHE_DIR`` (default ``~/.cache/pagedlab``), under a
name hashed from the source, the flags, the compiler's version and the CPU's feature flags, so a
changed source, compiler or machine builds anew; later runs load the cached library (about a second
the first time). It is loaded with ctypes: no Python headers, no torch headers, no build step at install.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pagedlab.kernels.metadata import PagedMetadata
from pagedlab.kernels.torch_gather import attend_prefills, write_kv

if TYPE_CHECKING:
    from pagedlab.models.presets import ModelSpec

SOURCE = Path(__file__).with_name("cpu_paged.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-ffp-contract=fast"]
LANES, MAX_HEAD_DIM = 16, 256  # cpu_paged.c: vectors of 16 floats, at most 16 of them per head
_library: ctypes.CDLL | None = None


def compiler() -> str:
    """The C compiler to build with: ``$CC``, else ``cc``."""
    return os.environ.get("CC") or "cc"


def cache_dir() -> Path:
    """Where built libraries are kept: ``$PAGEDLAB_CACHE_DIR``, else ``~/.cache/pagedlab``."""
    return Path(os.environ.get("PAGEDLAB_CACHE_DIR") or Path.home() / ".cache" / "pagedlab")


def _cpu_flags() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return ""


def library_path() -> Path:
    """The built library's path for this source, flags, compiler and CPU (built by `load_library`)."""
    cc = compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, platform.machine(), _cpu_flags()])
    return cache_dir() / f"cpu_paged-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(path: Path) -> None:
    """Compile `SOURCE` into `path` (through a temporary file, so parallel jobs never load a partial one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
    except OSError as exc:
        raise RuntimeError(f"kernel=cpu cannot keep its build in {path.parent} ({exc}); "
                           "set PAGEDLAB_CACHE_DIR to a writable folder") from exc
    try:
        proc = subprocess.run([compiler(), *FLAGS, str(SOURCE), "-o", str(tmp / path.name)],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"kernel=cpu could not be compiled with {compiler()} "
                               f"(exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_library() -> ctypes.CDLL:
    """The compiled kernel (built first when it is not in the cache), loaded once per process."""
    global _library
    if _library is None:
        path = library_path()
        if not path.exists():
            build(path)
        lib = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.pagedlab_decode_f32.argtypes = [p, i64, p, p, p, i64, p, p, i32, i32, i32, i32, i32, i32,
                                            ctypes.c_float, p, i64, i32]
        lib.pagedlab_decode_f32.restype = None
        _library = lib
    return _library


def attend_decodes(query: torch.Tensor, kv: torch.Tensor, meta: PagedMetadata, scale: float,
                   sliding_window: int | None, out: torch.Tensor) -> None:
    """Fill the rows of `out` (contiguous [T, H, D]) of every sequence with one new token, in one C call."""
    _, _, block_size, kv_heads, dim = kv.shape
    if dim % LANES or dim > MAX_HEAD_DIM or kv.dtype != torch.float32 or query.dtype != torch.float32 \
            or kv.device.type != "cpu":
        raise ValueError(f"kernel=cpu takes float32 heads of a multiple of {LANES} values up to {MAX_HEAD_DIM} on the "
                         f"CPU, not {dim} in {kv.dtype} on {kv.device}; use kernel=torch_gather")
    if query.stride(2) != 1 or query.stride(1) != query.shape[2]:
        query = query.contiguous()
    tables, lens, starts = meta.block_tables, meta.context_lens, meta.query_start
    if not (tables.is_contiguous() and lens.is_contiguous() and starts.is_contiguous()):
        tables, lens, starts = tables.contiguous(), lens.contiguous(), starts.contiguous()
    load_library().pagedlab_decode_f32(
        query.data_ptr(), query.stride(0), kv.data_ptr(), kv[1].data_ptr(), tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), starts.data_ptr(), meta.num_seqs, query.shape[1], kv_heads, dim, block_size,
        sliding_window or 0, scale, out.data_ptr(), out.stride(0), torch.get_num_threads())


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv: torch.Tensor,
    meta: PagedMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Write the step's K/V, then attend: decodes in C, prefills as torch_gather does. [T, H, D] -> [T, H, D]."""
    write_kv(kv, key, value, meta)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if meta.decode_seqs:
        attend_decodes(query, kv, meta, scale, sliding_window, out)
    if meta.prefill_seqs:
        attend_prefills(query, key, value, kv, meta, scale, sliding_window, out)
    return out


class CpuKernel:
    """``kernel=cpu`` (see the module docstring): float32 on the CPU, with a C compiler that has OpenMP.
    No options."""

    name = "cpu"
    write_kv = staticmethod(write_kv)
    attention = staticmethod(attention)

    def __init__(self) -> None:
        self.write_kv, self.attention = write_kv, attention

    @staticmethod
    def workspace_bytes(spec: ModelSpec, max_num_seqs: int, max_model_len: int) -> int:
        """Nothing on a device: the scores live in host memory only while a call runs."""
        return 0

    @staticmethod
    def device_warning(device: torch.device) -> str | None:
        return None

    @staticmethod
    def problem(device: torch.device, dtype: torch.dtype | None = None, spec: ModelSpec | None = None) -> str | None:
        """Off the CPU; no C compiler, or one that cannot build it (it is built here, on the first ask);
        not float32; a head size that is not a multiple of LANES up to MAX_HEAD_DIM."""
        if device.type != "cpu":
            return "it runs on the CPU only; use kernel=triton or kernel=torch_gather on a GPU"
        if shutil.which(compiler()) is None:
            return (f"it is compiled on first use and no C compiler {compiler()!r} was found (set CC); "
                    "use kernel=torch_gather")
        try:  # built here, once per machine, so that a compiler that cannot build it is refused before any work
            load_library()
        except (RuntimeError, OSError) as exc:
            return f"{exc}\nuse kernel=torch_gather, or set CC to a compiler with OpenMP (GCC >= 12 or Clang)"
        if dtype is not None and dtype != torch.float32:
            return "it computes in float32 only; use model.dtype=float32, or kernel=torch_gather"
        if spec is not None and (spec.head_dim % LANES or spec.head_dim > MAX_HEAD_DIM):
            return (f"its head size must be a multiple of {LANES} up to {MAX_HEAD_DIM}, and this model's is "
                    f"{spec.head_dim}; use kernel=torch_gather")
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
