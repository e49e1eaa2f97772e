"""`executor=sim`: no tensors, a cost model of one step on a given accelerator (or tensor-parallel node).

A step is the sum of its operators (GEMMs, norms and activations, attention, LM head, all-reduces, block
copies, swaps, a fixed overhead), each costing max(compute, memory) as kernels run one after another:
pagedlab/executors/cost_model.py, with every constant's source in docs/cost_model.md.
"""

from __future__ import annotations

from typing import Any

from pagedlab.engine.sampler import SimSampler
from pagedlab.errors import one_of
from pagedlab.executors.base import StepInput, StepOutput
from pagedlab.executors.cost_model import CostModel
from pagedlab.models.presets import HOST_OVERHEADS, HardwareSpec, ModelSpec


class SimExecutor:
    """Models step time; returns no logits (the engine's SimSampler picks tokens).

    A step whose ``contiguous_kv`` is set (the allocator lays each sequence out as one run of blocks), or
    ``paged=False``, reads KV at contiguous speed and swaps each run of consecutive blocks with one copy
    per layer."""

    time_source = "modelled"

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, block_size: int, *, paged: bool = True) -> None:
        self.model = model
        self.hw = hardware
        self.block_bytes = block_size * model.kv_bytes_per_token
        self.cost = CostModel(model, hardware, block_size, paged=paged)

    def step_time(self, step: StepInput) -> float:
        return self.cost.step_time(step)

    def execute(self, step: StepInput) -> StepOutput:
        return StepOutput(logits=None, time_s=self.step_time(step))


class SimBackend:
    """``executor=sim``: the model preset's shapes (or a checkpoint's config.json), costed on the ``hardware``
    preset (all its GPUs), with the engine's host time per step of ``executor.host_overhead`` (a key of
    :data:`pagedlab.models.presets.HOST_OVERHEADS`; ``preset`` when unset); the default KV budget is their
    memory x ``kv_cache.gpu_memory_utilization`` - weights
    (:func:`pagedlab.executors.cost_model.default_kv_budget_bytes`)."""

    simulated = True  # no tensors: the checks use the hardware preset, not a device

    def __init__(self, cfg: Any, host_overhead: str = "preset") -> None:
        from pagedlab.experiment import model_shapes, sim_budget, sim_hardware

        self.check_arguments(host_overhead=host_overhead)
        self.spec = model_shapes(cfg)
        self.hardware = sim_hardware(cfg).with_host_overhead(host_overhead)
        self.default_budget_bytes, self.budget_what = sim_budget(cfg, self.spec)
        self.eos_token_id = None

    @staticmethod
    def check_arguments(host_overhead: str = "preset", **_: Any) -> None:
        """Refuse a bad ``executor.host_overhead`` before any work (the preflight calls this too)."""
        one_of("host_overhead", host_overhead, tuple(HOST_OVERHEADS))

    def make_executor(self, num_blocks: int, block_size: int, num_swap_blocks: int) -> SimExecutor:
        return SimExecutor(self.spec, self.hardware, block_size)

    def make_sampler(self, seed: int) -> SimSampler:
        return SimSampler(self.spec.vocab_size, seed)
