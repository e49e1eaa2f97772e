"""device=auto falling back to the CPU, and kernel=triton on the CPU (Triton's interpreter), are said
once and clearly (issue 14, item 9)."""

from __future__ import annotations

import warnings

import pytest
import torch

from pagedlab.executors import torch_executor
from pagedlab.executors.torch_executor import TorchExecutor, resolve_device
from pagedlab.kernels.torch_gather import TorchGatherKernel
from pagedlab.kernels.triton_backend import TritonKernel


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(torch_executor, "_warned", set())


def test_auto_on_a_cpu_only_build_warns_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.warns(RuntimeWarning, match=r"device=auto found no CUDA device \(this torch is a CPU-only build\)"):
        assert resolve_device("auto") == torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("auto") == torch.device("cpu")  # once
        assert resolve_device("cpu") == torch.device("cpu")  # an explicit cpu is not warned about


def test_auto_with_cuda_does_not_warn(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("auto") == torch.device("cuda")


def test_triton_on_the_cpu_says_it_is_interpreted():
    with pytest.warns(RuntimeWarning, match="kernel=triton on the CPU runs Triton's interpreter"):
        ex = TorchExecutor("tiny_llama", kernel=TritonKernel(), device="cpu", num_blocks=4)
    assert ex.device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TorchExecutor("tiny_llama", kernel=TritonKernel(), device="cpu", num_blocks=4)  # once
        TorchExecutor("tiny_llama", kernel=TorchGatherKernel(), device="cpu", num_blocks=4)
