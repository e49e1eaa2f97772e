"""`executor=sim`: no tensors, a roofline cost model of one step on a given accelerator.

A step's time is max(compute, memory) plus a fixed overhead, where
  compute = (2 * params * tokens + 4 * layers * heads * head_dim * sum(q_i * ctx_i)) / (peak * eff)
  memory  = (weights + KV read for every context + KV written) / (bandwidth * eff)
so prefill-heavy steps are compute-bound and decode steps are bound by reading the weights and the
batch's KV. Swaps cost host-link time (PCIe), block copies device-memory time.
"""

from __future__ import annotations

from typing import Any

from pagedlab.engine.sampler import SimSampler
from pagedlab.executors.base import StepInput, StepOutput
from pagedlab.models.presets import HardwareSpec, ModelSpec

PCIE_GB_S = 25.0  # host <-> device, one direction, achievable


class SimExecutor:
    """Models step time; returns no logits (the engine's SimSampler picks tokens)."""

    time_source = "modelled"

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, block_size: int) -> None:
        self.model = model
        self.hw = hardware
        self.block_bytes = block_size * model.kv_bytes_per_token
        m = model
        self._flops_per_token = 2 * (m.num_params - m.vocab_size * m.hidden_size)  # lm_head: last tokens only
        self._attn_flops = 4 * m.num_layers * m.num_heads * m.head_dim
        self._lm_head_flops = 2 * m.vocab_size * m.hidden_size
        self._peak = hardware.peak_tflops * 1e12 * hardware.compute_efficiency
        self._bw = hardware.hbm_gb_s * 1e9 * hardware.bandwidth_efficiency

    def step_time(self, step: StepInput) -> float:
        mi = step.model_input
        if not mi.num_seqs:
            compute = memory = 0.0
        else:
            qc = sum(q * c for q, c in zip(mi.query_lens, mi.context_lens))
            flops = self._flops_per_token * mi.num_tokens + self._attn_flops * qc + self._lm_head_flops * mi.num_seqs
            kv_bytes = self.model.kv_bytes_per_token * (sum(mi.context_lens) + mi.num_tokens)
            compute = flops / self._peak
            memory = (self.model.weight_bytes + kv_bytes) / self._bw
        copies = 2 * (len(step.cow_copies) + len(step.fork_copies)) * self.block_bytes / self._bw
        swaps = (len(step.swap_in) + len(step.swap_out)) * self.block_bytes / (PCIE_GB_S * 1e9)
        return max(compute, memory) + copies + swaps + self.hw.step_overhead_s

    def execute(self, step: StepInput) -> StepOutput:
        return StepOutput(logits=None, time_s=self.step_time(step))


class SimBackend:
    """``executor=sim``: the model preset's shapes (or a checkpoint's config.json), costed on the ``hardware``
    preset; the default KV budget is the hardware's memory x ``kv_cache.gpu_memory_utilization`` - weights."""

    simulated = True  # no tensors: the checks use the hardware preset, not a device

    def __init__(self, cfg: Any) -> None:
        from pagedlab.experiment import model_shapes, sim_budget, sim_hardware

        self.spec = model_shapes(cfg)
        self.hardware = sim_hardware(cfg)
        self.default_budget_bytes, self.budget_what = sim_budget(cfg, self.spec)
        self.eos_token_id = None

    def make_executor(self, num_blocks: int, block_size: int, num_swap_blocks: int) -> SimExecutor:
        return SimExecutor(self.spec, self.hardware, block_size)

    def make_sampler(self, seed: int) -> SimSampler:
        return SimSampler(self.spec.vocab_size, seed)
