"""Per-step attention metadata: the flattened batch's lists turned into tensors once per step.

Every layer of a step sees the same metadata, so anything a kernel derives from it (decode chunk
plans, Triton tile lists) is computed once and kept in `PagedMetadata.plans`.

Host path. Everything here is known on the host (Python lists from the scheduler), so nothing is ever
read back from the device: the lists stay on `PagedMetadata` for host-side planning, and the tensors go
up in one copy per step (`to_device`: on CUDA staged in pinned memory and copied with
``non_blocking=True``, so building the next tensors overlaps the copy and the host never waits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 1-d tensor of host numbers on `device` without a host sync: on CUDA built in pinned memory and copied
    with ``non_blocking=True`` (PyTorch's caching host allocator records the copy, so the pinned block is
    not handed out again before the copy has read it); elsewhere a plain tensor."""
    if device.type == "cuda":
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


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
    block_tables_list: list[int] = field(default_factory=list)  # host copy of block_tables, flat, row-major
    input_ids: torch.Tensor | None = None  # [T] int64, when build_metadata was given them
    positions: torch.Tensor | None = None  # [T] int64, likewise

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_list[-1]

    @property
    def table_width(self) -> int:
        """Columns of `block_tables` (the padded width)."""
        return self.block_tables.shape[1]

    def table_row(self, seq: int, n: int) -> list[int]:
        """The first `n` block ids of sequence `seq`, from the host copy."""
        w = self.table_width
        return self.block_tables_list[seq * w : seq * w + n]


def build_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    slot_mapping: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
    input_ids: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
) -> PagedMetadata:
    """Build the step's metadata from host lists: one host tensor of every field (and of `input_ids` /
    `positions` when given), one copy to `device` (see `to_device`), views and one int32 conversion there.
    No per-token Python loop, no read back."""
    qlens, clens = list(query_lens), list(context_lens)
    starts = [0, *accumulate(qlens)]
    nblocks = [-(-c // block_size) for c in clens]
    width = max(nblocks, default=0) or 1
    flat: list[int] = []
    for t, n in zip(block_tables, nblocks):
        if len(t) < n:
            raise ValueError(f"block table of {len(t)} blocks is too short for {n} blocks of context")
        flat += t[:n]
        flat += [0] * (width - n)
    s, t = len(qlens), starts[-1]
    slots = list(slot_mapping)
    ids = list(input_ids) if input_ids is not None else []
    pos = list(positions) if positions is not None else []
    # int64 part: slots, last rows, ids, positions; int32 part: tables, context lens, query starts
    packed = to_device(slots + [q - 1 for q in starts[1:]] + ids + pos + flat + clens + starts, torch.long,
                       torch.device(device))
    n64 = len(slots) + s + len(ids) + len(pos)
    i64, i32 = packed[:n64], packed[n64:].to(torch.int32)
    t, a = len(slots), len(slots) + s
    return PagedMetadata(
        block_size=block_size,
        slot_mapping=i64[:t],
        block_tables=i32[: s * width].view(s, width),
        context_lens=i32[s * width : s * width + s],
        query_start=i32[s * width + s :],
        last_rows=i64[t:a],
        query_lens_list=qlens,
        context_lens_list=clens,
        query_start_list=starts,
        decode_seqs=[i for i, q in enumerate(qlens) if q == 1],
        prefill_seqs=[i for i, q in enumerate(qlens) if q > 1],
        block_tables_list=flat,
        input_ids=i64[a : a + len(ids)] if input_ids is not None else None,
        positions=i64[a + len(ids) : a + len(ids) + len(pos)] if positions is not None else None,
    )
