"""The KV budget on CUDA (issue 14, item 6), with `torch.cuda.mem_get_info` mocked: memory used
outside the KV pool (gather workspace, Triton split buffers, activations) is reserved, and the pool
is capped so that one layer's tensor stays under 2^31 elements."""

from __future__ import annotations

import pytest
import torch
from test_engine import make_cfg

from pagedlab.executors import torch_executor
from pagedlab.executors.torch_executor import TorchBackend, default_budget_bytes, reserved_bytes
from pagedlab.experiment import kv_num_blocks
from pagedlab.kernels import KERNELS, get_kernel
from pagedlab.models.presets import GIB, MAX_LAYER_ELEMENTS, max_blocks_per_layer, model_spec

H200_FREE = 140 * GIB


@pytest.fixture
def fake_h200(monkeypatch):
    """A CUDA device with 140 GiB free; the model is still built on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (H200_FREE, H200_FREE))
    load = torch_executor.load_model
    monkeypatch.setattr(torch_executor, "load_model", lambda name, dtype, device, seed, forward="auto":
                        load(name, dtype, torch.device("cpu"), seed, forward))


@pytest.mark.parametrize("kernel", ["torch_gather", "triton"])
@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_tiny_model_on_h200_pool_stays_under_2_31_elements(fake_h200, kernel, block_size):
    cfg = make_cfg(**{"executor.name": "torch", "model.name": "tiny_llama", "device": "cuda",
                      "kernel": {"_target_": KERNELS[kernel], "name": kernel}, "block_size": block_size})
    parts = TorchBackend(cfg)
    spec = parts.spec
    num_blocks = kv_num_blocks(cfg, spec.kv_bytes_per_token, parts.default_budget_bytes, parts.budget_what)
    per_layer = 2 * num_blocks * block_size * spec.num_kv_heads * spec.head_dim
    assert per_layer <= MAX_LAYER_ELEMENTS
    assert num_blocks == max_blocks_per_layer(block_size, spec.num_kv_heads, spec.head_dim)  # capped, not less
    assert "2^31" in parts.budget_what


def test_budget_reserves_workspace_and_activations(fake_h200):
    cfg = make_cfg(**{"executor.name": "torch", "model.name": "tiny_llama", "device": "cuda",
                      "kv_cache.gpu_memory_utilization": 0.02})  # small enough not to hit the cap
    parts = TorchBackend(cfg)
    reserved = reserved_bytes(parts.spec, get_kernel("torch_gather"), cfg.max_num_batched_tokens, cfg.max_num_seqs,
                              cfg.max_model_len)
    weights = parts.spec.weight_bytes
    assert parts.default_budget_bytes == pytest.approx(H200_FREE * 0.02 - weights - reserved, abs=1 << 20)  # spec vs real weights
    assert "workspace and activations" in parts.budget_what


def test_reserved_bytes_counts_each_part():
    spec = model_spec("llama3_8b")  # bf16, 32 heads / 8 kv heads, head dim 128
    gather_kernel = get_kernel("torch_gather")
    gather = reserved_bytes(spec, gather_kernel, 8192, 256, 8192)
    triton = reserved_bytes(spec, get_kernel("triton"), 8192, 256, 8192)
    assert gather >= 1 * GIB  # the decode gather workspace alone (it grows to 1 GiB and stays)
    assert triton >= 256 * 32 * (8192 // 256) * 130 * 4  # split-decode m, l, acc buffers
    acts = 2 * 8192 * (4 * 4096 + 3 * 14336) * 2
    assert min(gather, triton) >= acts
    assert reserved_bytes(spec, gather_kernel, 16384, 256, 8192) > gather  # grows with the batch
    assert reserved_bytes(spec, gather_kernel, 8192, 256, 32768) > gather  # and with the context
    forced = reserved_bytes(spec, get_kernel("triton", num_splits=4), 8192, 256, 8192)
    assert triton - forced == 256 * 32 * (8192 // 256 - 4) * 130 * 4  # a fixed split count sizes the buffers


def test_default_budget_subtracts_reserved():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_budget_bytes(cuda, 100, 0.5, 10, reserved=15) == 25
    assert default_budget_bytes(cpu, 100, 0.5, 10, cpu_budget_bytes=7, reserved=15) == 7
