"""The executor interface: what the engine hands an executor each step, and what it gets back.

Executors know no allocation policy. They receive flattened batches with block tables and slot
mappings already resolved, plus the block copies and swaps the block manager ordered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from pagedlab.models.presets import ModelSpec


@dataclass
class ModelInput:
    """One flattened batch: prefill chunks and decode tokens of all scheduled sequences together."""

    seq_ids: list[int]
    input_ids: list[int]  # all new tokens, sequence after sequence
    positions: list[int]  # position of each new token
    slot_mapping: list[int]  # physical KV slot of each new token
    query_lens: list[int]  # per sequence: new tokens this step (1 for decode)
    context_lens: list[int]  # per sequence: KV length after this step (cached + new)
    block_tables: list[list[int]]  # per sequence, physical block ids (do not mutate)
    num_prefill_tokens: int = 0  # tokens of sequences with query_len > 1

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass
class StepInput:
    """A step's batch plus the memory operations to perform before the forward pass.

    The executor performs them in field order, then the forward pass:
    1. `fork_copies`: copies for forks ordered after the previous step (cow off, beams, samples);
    2. `swap_out`: KV of preempted sequences to host (their device blocks may be reused below);
    3. `swap_in`: KV of resumed sequences back to device;
    4. `cow_copies`: copy-on-write copies for this step's appends.
    """

    model_input: ModelInput
    fork_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) device blocks
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block)
    cow_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) device blocks
    contiguous_kv: bool = False  # each sequence's blocks are one physical run (a layout fact, not a policy)


@dataclass
class StepOutput:
    """Last-token logits per sequence (None for the simulator) and the step's time."""

    logits: torch.Tensor | None
    time_s: float


class Executor(Protocol):
    """Runs one engine step. `time_source` is "wall" (measured) or "modelled" (cost model)."""

    time_source: str

    def execute(self, step: StepInput) -> StepOutput: ...


class Backend(Protocol):
    """What ``executor._target_`` names: built with the composed config, it loads (or describes) the model
    once; the engine then makes executors with the block counts the budget gives, and token samplers.

    ``default_budget_bytes`` is the KV budget when the config sets none (None: unknown), ``budget_what``
    names where it comes from (for error messages); ``eos_token_id`` ends sequences unless
    ``ignore_eos``. ``make_executor`` may be called more than once (fresh engine state per repeat) and
    reuses what was loaded."""

    spec: ModelSpec
    default_budget_bytes: float | None
    budget_what: str
    eos_token_id: int | None

    def make_executor(self, num_blocks: int, block_size: int, num_swap_blocks: int) -> Executor: ...

    def make_sampler(self, seed: int) -> Any: ...
