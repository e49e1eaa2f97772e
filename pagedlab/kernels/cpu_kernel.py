"""`kernel=cpu` (:class:`CpuKernel`): decode attention in C, read straight from the paged pool (float32, CPU).

torch_gather copies each decoding sequence's blocks into a workspace and runs SDPA over them: the keys
and values cross memory three times, and CPU SDPA is slow for a one-token query. `cpu_paged.c` instead
walks the block table and reads every key and value once, in place, with one call per layer for the
whole batch (OpenMP over sequences x KV heads). Prefills are compute-bound and already fast in SDPA:
they take torch_gather's path. Writes of the new K/V are torch_gather's too.

The C source is compiled on first use with the system C compiler (``$CC``, else ``cc``) at
``-O3 -march=native -fopenmp`` into ``$PAGEDLAB_CACHE_DIR`` (default ``~/.cache/pagedlab``), under a
name hashed from the source, the flags, the compiler and the CPU as the compiler sees it, so a changed
source, compiler or machine builds anew; later runs load the cached library (a second or two the first
time). It is loaded with ctypes: no Python headers, no torch headers, no build step at install.

Threads: as many as torch's (``torch.get_num_threads()``, so ``executor.threads`` holds). The library
links ``libgomp.so.1`` by name, so where torch's wheel ships that same library (x86-64 Linux) the process
has one OpenMP runtime and one pool of threads; a torch built on another runtime (LLVM or Intel OpenMP,
macOS) gets a second pool next to its own.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pagedlab.kernels import torch_gather
from pagedlab.kernels.metadata import PagedMetadata
from pagedlab.kernels.torch_gather import write_kv

if TYPE_CHECKING:
    from pagedlab.models.presets import ModelSpec

SOURCE = Path(__file__).with_name("cpu_paged.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-ffp-contract=fast"]
LANES, MAX_HEAD_DIM = 16, 256  # cpu_paged.c: vectors of 16 floats, at most 16 of them per head
_library: ctypes.CDLL | None = None


def compiler() -> list[str]:
    """The C compiler command to build with: ``$CC`` (it may carry arguments, e.g. ``ccache gcc``), else ``cc``."""
    return shlex.split(os.environ.get("CC", "")) or ["cc"]


def cache_dir() -> Path:
    """Where built libraries are kept: ``$PAGEDLAB_CACHE_DIR``, else ``~/.cache/pagedlab``."""
    return Path(os.environ.get("PAGEDLAB_CACHE_DIR") or Path.home() / ".cache" / "pagedlab")


def _run(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL).stdout
    except OSError:
        return ""


def library_path() -> Path:
    """The built library's path for this source, flags and compiler, and the CPU as the compiler sees it
    (``-march=native``'s predefined macros: AVX-512 on x86, SVE on Arm...), so that a cache shared by
    different machines never hands one a build for another's instructions."""
    cc = compiler()
    target = [f for f in FLAGS if f.startswith(("-march", "-mcpu"))]
    native = _run([*cc, *target, "-dM", "-E", "-x", "c", os.devnull])
    key = "\n".join([SOURCE.read_text(), " ".join(FLAGS), " ".join(cc), _run([*cc, "--version"]),
                     platform.machine(), native])
    return cache_dir() / f"cpu_paged-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


class BuildError(RuntimeError):
    """The kernel could not be built here; the message completes "kernel=cpu is not allowed: "."""


def build(path: Path) -> None:
    """Compile `SOURCE` into `path` (through a temporary file, so parallel jobs never load a partial one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent))
    except OSError as exc:
        raise BuildError(f"its build cannot be kept in {path.parent} ({exc}); set PAGEDLAB_CACHE_DIR to a "
                         "writable folder, or use kernel=torch_gather") from exc
    try:
        command = [*compiler(), *FLAGS, str(SOURCE), "-o", str(tmp / path.name)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            err = proc.stderr if len(proc.stderr) <= 3000 else proc.stderr[:2000] + "\n...\n" + proc.stderr[-800:]
            raise BuildError(f"it could not be compiled (exit {proc.returncode}) by `{' '.join(command)}`:\n{err}\n"
                             "expected a C compiler with OpenMP and vector extensions (GCC >= 12 or Clang with "
                             "libomp; set CC), or use kernel=torch_gather")
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


def check_inputs(query: torch.Tensor, kv: torch.Tensor, meta: PagedMetadata, out: torch.Tensor) -> None:
    """ValueError naming the first argument the C code could not read as it assumes (it takes raw pointers).
    The step's metadata is the same for every layer: it is checked once per step."""
    _, _, _, kv_heads, dim = kv.shape
    problems = [
        ("kv.device", kv.device.type, kv.device.type == "cpu", "cpu"),
        ("kv.dtype", kv.dtype, kv.dtype == torch.float32, "torch.float32"),
        ("query.dtype", query.dtype, query.dtype == torch.float32, "torch.float32"),
        ("head_dim", dim, dim % LANES == 0 and 0 < dim <= MAX_HEAD_DIM,
         f"a multiple of {LANES} up to {MAX_HEAD_DIM}"),
        ("query heads", query.shape[1], query.shape[1] % kv_heads == 0, f"a multiple of kv_heads={kv_heads}"),
        ("kv", "a strided view", kv.is_contiguous(), "a contiguous pool"),
        ("out", "a strided view", out.is_contiguous(), "a contiguous tensor"),
    ]
    if "cpu_checked" not in meta.plans:
        problems += [(f"meta.{name}", t.dtype, t.dtype == torch.int32 and t.is_contiguous(), "contiguous torch.int32")
                     for name, t in (("block_tables", meta.block_tables), ("context_lens", meta.context_lens),
                                     ("query_start", meta.query_start))]
    for name, value, ok, allowed in problems:
        if not ok:
            raise ValueError(f"kernel=cpu: {name}={value} is not allowed: expected {allowed} (or kernel=torch_gather)")
    meta.plans["cpu_checked"] = True


def attend_decodes(query: torch.Tensor, kv: torch.Tensor, meta: PagedMetadata, scale: float,
                   sliding_window: int | None, out: torch.Tensor) -> None:
    """Fill the rows of `out` (contiguous [T, H, D]) of every sequence with one new token, in one C call."""
    if not meta.decode_seqs:
        return
    check_inputs(query, kv, meta, out)
    if query.stride(2) != 1 or query.stride(1) != query.shape[2]:  # rows may be apart (a slice of q|k|v)
        query = query.contiguous()
    _, _, block_size, kv_heads, dim = kv.shape
    tables, window = meta.block_tables, min(sliding_window or 0, 2**31 - 1)
    load_library().pagedlab_decode_f32(
        query.data_ptr(), query.stride(0), kv.data_ptr(), kv[1].data_ptr(), tables.data_ptr(), tables.stride(0),
        meta.context_lens.data_ptr(), meta.query_start.data_ptr(), meta.num_seqs, query.shape[1], kv_heads, dim,
        block_size, window, scale, out.data_ptr(), out.stride(0), torch.get_num_threads())


# write the step's K/V, then attend: decodes in C, prefills as torch_gather does. [T, H, D] -> [T, H, D]
attention = partial(torch_gather.attention, decodes=attend_decodes)


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
        if shutil.which(compiler()[0]) is None:
            return (f"it is compiled on first use and no C compiler {compiler()[0]!r} was found; expected one "
                    "with OpenMP (GCC >= 12 or Clang with libomp; set CC), or use kernel=torch_gather")
        try:  # built here, once per machine, so that a compiler that cannot build it is refused before any work
            load_library()
        except BuildError as exc:
            return str(exc)
        except OSError as exc:  # a built library that does not load
            return f"its build could not be loaded ({exc}); use kernel=torch_gather"
        if dtype is not None and dtype != torch.float32:
            return "it computes in float32 only; use model.dtype=float32, or kernel=torch_gather"
        if spec is not None and (spec.head_dim % LANES or spec.head_dim > MAX_HEAD_DIM):
            return (f"its head size must be a multiple of {LANES} up to {MAX_HEAD_DIM}, and this model's is "
                    f"{spec.head_dim}; use kernel=torch_gather")
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
