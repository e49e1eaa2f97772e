"""Per-step attention metadata: the flattened batch's lists turned into tensors once per step.

Every layer of a step sees the same metadata, so anything a kernel derives from it (decode chunk
plans, Triton tile lists) is computed once and kept in `PagedMetadata.plans`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch


@dataclass
class PagedMetadata:
    """Tensors (on the KV cache's device) and host lists describing one flattened batch."""

    block_size: int
    slot_mapping: torch.Tensor  # [T] int64, physical slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32, zero-padded
    context_lens: torch.Tensor  # [S] int32, KV length after this step
    query_start: torch.Tensor  # [S + 1] int32, offsets of each sequence's tokens in the batch
    last_rows: torch.Tensor  # [S] int64, row of each sequence's last new token
    query_lens_list: list[int]
    context_lens_list: list[int]
    query_start_list: list[int]
    decode_seqs: list[int]  # sequences with exactly one new token
    prefill_seqs: list[int]  # sequences with more than one new token
    plans: dict[Any, Any] = field(default_factory=dict)  # per-step caches of the kernels

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_list[-1]


def build_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    slot_mapping: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> PagedMetadata:
    """Build the step's metadata with one `torch.tensor` call per field (no per-token Python loop)."""
    qlens, clens = list(query_lens), list(context_lens)
    starts = [0, *accumulate(qlens)]
    nblocks = [-(-c // block_size) for c in clens]
    width = max(nblocks, default=0) or 1
    tables = [list(t[:n]) + [0] * (width - n) for t, n in zip(block_tables, nblocks)]
    for t, n in zip(block_tables, nblocks):
        if len(t) < n:
            raise ValueError(f"block table of {len(t)} blocks is too short for {n} blocks of context")
    dev = torch.device(device)
    return PagedMetadata(
        block_size=block_size,
        slot_mapping=torch.tensor(list(slot_mapping), dtype=torch.long, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev).view(len(qlens), width),
        context_lens=torch.tensor(clens, dtype=torch.int32, device=dev),
        query_start=torch.tensor(starts, dtype=torch.int32, device=dev),
        last_rows=torch.tensor(starts[1:], dtype=torch.long, device=dev) - 1,
        query_lens_list=qlens,
        context_lens_list=clens,
        query_start_list=starts,
        decode_seqs=[i for i, q in enumerate(qlens) if q == 1],
        prefill_seqs=[i for i, q in enumerate(qlens) if q > 1],
    )
