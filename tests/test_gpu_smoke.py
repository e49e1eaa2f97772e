"""`python -m pagedlab.bench.gpu --smoke` (issue 14, item 10): on a machine without CUDA it says so and
exits non-zero; its check functions themselves run on the CPU (fp32, small shapes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pagedlab.bench import gpu


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_smoke_without_cuda_exits_nonzero_with_a_clear_message():
    proc = subprocess.run([sys.executable, "-m", "pagedlab.bench.gpu", "--smoke"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0
    assert "FAIL cuda build and device: no CUDA device" in proc.stdout
    assert proc.stdout.count("\n") == 3  # the check, why it stopped, the total: nothing else ran


def test_check_table_is_ordered_and_complete():
    names = [name for name, *_ in gpu.SMOKE_CHECKS]
    assert names[:2] == ["cuda build and device", "triton trivial launch"]
    assert names[-1] == "triton compile counts, second run"
    for kernel in gpu.SMOKE_KERNELS:
        for dtype in ("bfloat16", "float32"):
            for bs in (16, 24):
                assert f"{kernel} {dtype} block {bs} vs fp32 SDPA" in names
        for mode in ("greedy", "sampling", "beam", "swap"):
            assert f"engine {kernel} {mode}" in names
        assert f"{kernel} pool over 2^31 elements" in names and f"{kernel} split decode, batch 1" in names


def test_one_failure_makes_smoke_fail_and_the_rest_still_run(capsys):
    def boom():
        raise RuntimeError("bad\nmore")

    checks = [("ok", lambda: (True, "1"), ()), ("boom", boom, ()), ("after", lambda: (True, "2"), ())]
    assert gpu.smoke(checks) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS ok: 1") and out[1].startswith("FAIL boom: RuntimeError: bad")
    assert out[2].startswith("PASS after") and out[3] == "FAIL: 2/3 checks passed"


@pytest.mark.parametrize("kernel", ["torch_gather", "triton"])
def test_kernel_checks_run_on_the_cpu(kernel):
    ok, detail = gpu.check_kernel_matrix(kernel, torch.float32, 24, "cpu", dims=(64,), groups=(1, 7))
    assert ok, detail
    ok, detail = gpu.check_kernel_matrix(kernel, torch.float32, 16, "cpu", dims=(32,), groups=(4,), window=24)
    assert ok, detail


def test_engine_check_runs_on_the_cpu():
    ok, detail = gpu.check_engine("torch_gather", "greedy", "cpu")
    assert ok, detail
    assert "6/6 requests match HF generate" in detail
