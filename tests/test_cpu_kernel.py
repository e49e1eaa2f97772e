"""kernel=cpu (C decode attention read in place from the paged pool) vs SDPA on contiguous K/V; its build
cache and its refusals."""

from __future__ import annotations

import platform
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cpu_kernel_here import needs_cpu_kernel
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kernels import CONTEXTS, MIXED_C, MIXED_Q, check, make_batch, reference

from pagedlab.kernels import cpu_kernel, get_kernel
from pagedlab.kernels.cpu_kernel import CpuKernel

pytestmark = needs_cpu_kernel()


@pytest.mark.parametrize("dim", [16, 32, 48, 64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 8, 12])  # 3: no constant-shape variant; 12: heads in two turns
@pytest.mark.parametrize("bs", [1, 5, 16, 32])
def test_decode_matches_dense_attention(bs, group, dim):
    ctxs = random.Random(bs * group + dim).sample(CONTEXTS + [17, 33, 257], 8)
    check("cpu", [1] * len(ctxs), ctxs, bs, 2, group, dim, seed=bs + group)


@pytest.mark.parametrize("layout", ["shuffled", "runs", "mixed"])
@pytest.mark.parametrize("window", [None, 1, 24, 999])
def test_mixed_batch_with_prefills_and_sliding_window(layout, window):
    """Decodes in C and prefills (plain or over a cached prefix) through SDPA, in one flattened batch."""
    check("cpu", MIXED_Q, MIXED_C, 16, 2, 2, 64, window=window, layout=layout)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_batch_matches_dense_attention(data):
    seqs = data.draw(st.integers(1, 6))
    ctxs = data.draw(st.lists(st.integers(1, 300), min_size=seqs, max_size=seqs))
    qlens = [data.draw(st.sampled_from([1, 1, 1, min(c, 5), c])) for c in ctxs]
    check("cpu", qlens, ctxs, data.draw(st.sampled_from([1, 2, 3, 8, 16, 17, 64])), data.draw(st.integers(1, 3)),
          data.draw(st.integers(1, 10)), data.draw(st.sampled_from([16, 32, 64])),
          window=data.draw(st.one_of(st.none(), st.integers(1, 300))), seed=data.draw(st.integers(0, 99)),
          layout=data.draw(st.sampled_from(["shuffled", "runs", "mixed"])))


def test_reads_nothing_outside_each_sequence():
    """Slots past each context (padding of the last block, other blocks) hold NaN: the output stays finite,
    so no key or value outside a sequence's visible tokens is read."""
    qlens, ctxs = [1, 1, 1, 3], [1, 17, 300, 40]
    kv, meta, q, k, v, full_k, full_v = make_batch(qlens, ctxs, 16, 2, 2, 32)
    flat = kv.view(2, -1, 2, 32)
    keep = torch.zeros(flat.shape[1], dtype=torch.bool)
    for table, c in zip(meta.host_tables, ctxs):
        for p in range(c):
            keep[table[p // 16] * 16 + p % 16] = True
    flat[:, ~keep] = float("nan")
    out = get_kernel("cpu").attention(q, k, v, kv, meta, 32**-0.5)
    torch.testing.assert_close(out, reference(q, full_k, full_v, qlens, 32**-0.5), atol=2e-5, rtol=2e-4)


def test_reads_no_key_before_the_window():
    """With a sliding window, the keys before it hold NaN: the output stays finite and equals the reference."""
    qlens, ctxs, window = [1, 1, 1], [40, 300, 17], 24
    kv, meta, q, k, v, full_k, full_v = make_batch(qlens, ctxs, 16, 2, 2, 32)
    flat = kv.view(2, -1, 2, 32)
    for table, c in zip(meta.host_tables, ctxs):
        for p in range(max(c - window, 0)):
            flat[:, table[p // 16] * 16 + p % 16] = float("nan")
    out = get_kernel("cpu").attention(q, k, v, kv, meta, 32**-0.5, window)
    torch.testing.assert_close(out, reference(q, full_k, full_v, qlens, 32**-0.5, window), atol=2e-5, rtol=2e-4)


def test_query_rows_apart_are_read_in_place():
    """The compact forward hands the query as a slice of q|k|v rows ([T, H, D] with rows (H + 2 * kv) * D
    apart): read without a copy, and nothing of the other heads in each row (NaN here) is read."""
    kv, meta, q, k, v, full_k, full_v = make_batch([1, 1, 1], [9, 100, 33], 8, 2, 2, 32)
    rows = torch.full((3, 4 + 2 * 2, 32), float("nan"))
    rows[:, :4] = q
    out = get_kernel("cpu").attention(rows[:, :4], k, v, kv, meta, 0.2)
    torch.testing.assert_close(out, reference(q, full_k, full_v, [1, 1, 1], 0.2), atol=2e-5, rtol=2e-4)


def test_inputs_it_cannot_read_are_refused_by_name():
    kv, meta, q, k, v, _, _ = make_batch([1, 1], [9, 40], 8, 2, 2, 32)
    kernel = get_kernel("cpu")
    with pytest.raises(ValueError, match=r"query.dtype=torch.float64 is not allowed: expected torch.float32"):
        kernel.attention(q.double(), k, v, kv, meta, 0.2)
    strided = kv.transpose(1, 2).contiguous().transpose(1, 2)  # the pool's shape, not its layout
    with pytest.raises(ValueError, match=r"kv=a strided view is not allowed: expected a contiguous pool"):
        cpu_kernel.attend_decodes(q, strided, meta, 0.2, None, torch.empty_like(q))
    meta.block_tables = meta.block_tables.long()
    with pytest.raises(ValueError, match=r"meta.block_tables=torch.int64 is not allowed: expected contiguous torch.int32"):
        kernel.attention(q, k, v, kv, meta, 0.2)


def test_same_output_with_any_thread_count():
    kv, meta, q, k, v, _, _ = make_batch([1] * 6, [5, 60, 700, 16, 1, 129], 16, 2, 4, 64)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(get_kernel("cpu").attention(q, k, v, kv.clone(), meta, 0.125))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_strided_query_from_hf_modules():
    """The HF-modules path hands a [T, H, D] view of a [1, H, T, D] tensor: copied, then attended."""
    kv, meta, q, k, v, full_k, full_v = make_batch([1, 1, 1], [9, 100, 33], 8, 2, 2, 32)
    strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    out = get_kernel("cpu").attention(strided, k, v, kv, meta, 0.2)
    torch.testing.assert_close(out, reference(q, full_k, full_v, [1, 1, 1], 0.2), atol=2e-5, rtol=2e-4)


def test_refuses_what_it_cannot_run(monkeypatch):
    kernel = CpuKernel()
    assert kernel.problem(torch.device("cpu"), torch.float32) is None
    assert "CPU only" in kernel.problem(torch.device("cuda"))
    assert "float32" in kernel.problem(torch.device("cpu"), torch.bfloat16)
    for head_dim in (40, 8, 512):
        why = kernel.problem(torch.device("cpu"), torch.float32, SimpleNamespace(head_dim=head_dim))
        assert f"is {head_dim}" in why and "kernel=torch_gather" in why
    kv, meta, q, k, v, _, _ = make_batch([1], [10], 16, 1, 1, 40)
    with pytest.raises(ValueError, match="head_dim=40 is not allowed: expected a multiple of 16 up to 256"):
        kernel.attention(q, k, v, kv, meta, 0.1)
    monkeypatch.setenv("CC", "no-such-compiler-xyz -O2")  # a command with arguments: the program is named
    assert "no C compiler 'no-such-compiler-xyz'" in kernel.problem(torch.device("cpu"))


def test_builds_once_into_the_cache_and_reports_a_failed_build(monkeypatch, tmp_path):
    monkeypatch.setenv("PAGEDLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_library", None)
    lib = cpu_kernel.load_library()
    built = list(tmp_path.glob("cpu_paged-*.so"))
    assert built == [cpu_kernel.library_path()] and not list(tmp_path.glob("tmp*"))
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernel, "_library", None)
    assert cpu_kernel.load_library() is not lib and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    check("cpu", [1, 1], [3, 50], 16, 2, 2, 32)

    monkeypatch.setattr(cpu_kernel, "_library", None)
    monkeypatch.setattr(cpu_kernel, "FLAGS", [*cpu_kernel.FLAGS, "-DPAGEDLAB_TEST_FLAG"])  # another key
    monkeypatch.setenv("CC", shutil.which("false") or "false")
    why = CpuKernel.problem(torch.device("cpu"))
    assert why.startswith("it could not be compiled (exit 1) by `") and "kernel=torch_gather" in why
    assert list(tmp_path.glob("cpu_paged-*.so")) == built and not list(tmp_path.glob("tmp*"))


def _has_flags(*flags: str) -> bool:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(flags) <= set(line.split())


@pytest.mark.slow
@pytest.mark.parametrize("march,flags", [("x86-64-v2", ("sse4_2", "popcnt")),
                                         ("x86-64-v3", ("avx2", "fma", "bmi2", "movbe"))])
def test_vectors_build_for_narrower_cpus(monkeypatch, tmp_path, march, flags):
    """The 16-float vector extensions lower to SSE (v2) or AVX2 (v3) registers too, with the same results."""
    if platform.machine() != "x86_64" or not _has_flags(*flags):
        pytest.skip(f"{march} needs an x86-64 CPU with {', '.join(flags)}")
    monkeypatch.setenv("PAGEDLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernel, "_library", None)
    monkeypatch.setattr(cpu_kernel, "FLAGS", [f"-march={march}" if f == "-march=native" else f for f in cpu_kernel.FLAGS])
    check("cpu", MIXED_Q, MIXED_C, 16, 2, 4, 64, window=100)
    check("cpu", [1, 1, 1], [1, 17, 300], 5, 1, 3, 48)


def test_an_unwritable_cache_is_refused_with_the_folder_to_set(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("PAGEDLAB_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    monkeypatch.setattr(cpu_kernel, "_library", None)
    why = CpuKernel.problem(torch.device("cpu"))
    assert "PAGEDLAB_CACHE_DIR" in why and str(blocker / "cache") in why
