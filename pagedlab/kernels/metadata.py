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
    host_tables: Sequence[Sequence[int]] = ()  # host copy of the block tables (per sequence, at least as long)
    input_ids: torch.Tensor | None = None  # [T] int64, when build_metadata was given them
    positions: torch.Tensor | None = None  # [T] int64, likewise

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_list)

    @property
    def num_tokens(self) -> int:
        return self.query_start_list[-1]

    def table_row(self, seq: int, n: int) -> list[int]:
        """The first `n` block ids of sequence `seq`, from the host copy (zero-padded)."""
        row = list(self.host_tables[seq][:n])
        return row + [0] * (n - len(row))


class DeviceBlockTables:
    """Block tables kept on the device across steps: one row per sequence slot, rewritten only where a
    sequence's table changed since it was last written (appended blocks, copy-on-write replacements, a
    table that came back from swap), so a step sends the few changed entries, not every table.

    A host mirror of each row decides what changed (a list compare per sequence, whatever its seq id:
    correctness never rests on ids being unique). Slots of sequences not in the batch are reused when slots
    run out; rows and columns grow by doubling. Entries past a sequence's table may hold stale block ids
    (always valid ones, so a padded gather reads a real block, which its mask drops).
    """

    def __init__(self, device: torch.device | str, slots: int = 64, width: int = 16) -> None:
        self.device = torch.device(device)
        self.table = torch.zeros(slots, width, dtype=torch.int32, device=self.device)
        self.slot_of: dict[int, int] = {}
        self.mirror: list[list[int]] = [[] for _ in range(slots)]
        self.free = list(range(slots - 1, -1, -1))
        self.written = 0  # entries written so far (tests)
        self._pending = (0, 0)

    def plan(self, seq_ids: Sequence[int], tables: Sequence[Sequence[int]]) -> list[int]:
        """Host bookkeeping for a batch: returns the ints to send, slots then (rows, cols, values) of the
        changed entries; `apply` takes them back on the device."""
        live = set(seq_ids)
        need = max((len(t) for t in tables), default=0)
        if need > self.table.shape[1]:
            self._grow(self.table.shape[0], max(need, 2 * self.table.shape[1]))
        if len(live) > self.table.shape[0]:
            self._grow(max(len(live), 2 * self.table.shape[0]), self.table.shape[1])
        slots, rows, cols, vals = [], [], [], []
        for sid, t in zip(seq_ids, tables):
            slot = self.slot_of.get(sid)
            if slot is None:
                if not self.free:
                    self._release(live)
                slot = self.slot_of[sid] = self.free.pop()
                self.mirror[slot] = []
            m = self.mirror[slot]
            if m != t:
                i = len(m) if len(m) <= len(t) and t[: len(m)] == m else next(
                    (j for j, (x, y) in enumerate(zip(m, t)) if x != y), min(len(m), len(t)))
                rows += [slot] * (len(t) - i)
                cols += range(i, len(t))
                vals += t[i:]
                self.mirror[slot] = list(t)
            slots.append(slot)
        self.written += len(vals)
        self._pending = len(slots), len(vals)
        return slots + rows + cols + vals

    def apply(self, packed: torch.Tensor, width: int) -> torch.Tensor:
        """Write the changed entries (`packed`: `plan`'s ints, on the device) and return the batch's tables,
        [S, width] int32 (the first `width` columns of each sequence's row)."""
        s, n = self._pending
        slots = packed[:s]
        if n:
            r, c, v = packed[s : s + n], packed[s + n : s + 2 * n], packed[s + 2 * n : s + 3 * n]
            self.table.index_put_((r, c), v.to(torch.int32))
        if width > self.table.shape[1]:
            self._grow(self.table.shape[0], width)
        return self.table[:, :width].index_select(0, slots)

    def _release(self, live: set[int]) -> None:
        for sid, slot in list(self.slot_of.items()):
            if sid not in live:
                del self.slot_of[sid]
                self.free.append(slot)

    def _grow(self, slots: int, width: int) -> None:
        old = self.table
        with torch.inference_mode(False):  # a normal tensor: written in and out of inference mode
            self.table = torch.zeros(slots, width, dtype=torch.int32, device=self.device)
            self.table[: old.shape[0], : old.shape[1]] = old
        self.mirror += [[] for _ in range(slots - old.shape[0])]
        self.free = list(range(slots - 1, old.shape[0] - 1, -1)) + self.free


def build_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    slot_mapping: Sequence[int],
    block_size: int,
    device: torch.device | str = "cpu",
    input_ids: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    seq_ids: Sequence[int] | None = None,
    device_tables: DeviceBlockTables | None = None,
) -> PagedMetadata:
    """Build the step's metadata from host lists: one host tensor of every field (and of `input_ids` /
    `positions` when given), one copy to `device` (see `to_device`), views and one int32 conversion there.
    No per-token Python loop, no read back. With `device_tables` (and the batch's `seq_ids`) the block
    tables come from its rows on the device, and only their changed entries are sent."""
    qlens, clens = list(query_lens), list(context_lens)
    starts = [0, *accumulate(qlens)]
    nblocks = [-(-c // block_size) for c in clens]
    width = max(nblocks, default=0) or 1
    for t, n in zip(block_tables, nblocks):
        if len(t) < n:
            raise ValueError(f"block table of {len(t)} blocks is too short for {n} blocks of context")
    s = len(qlens)
    flat: list[int] = []
    if device_tables is None:
        for t, n in zip(block_tables, nblocks):
            flat += t[:n]
            flat += [0] * (width - n)
        update: list[int] = []
    else:
        update = device_tables.plan(list(seq_ids), block_tables)
    slots = list(slot_mapping)
    ids = list(input_ids) if input_ids is not None else []
    pos = list(positions) if positions is not None else []
    # int64 part: slots, last rows, ids, positions, table updates; int32 part: tables, context lens, starts,
    # each int32 field starting on 16 bytes (4 ints) so Triton sees the same pointer alignment every step
    # (a kernel specialised on it would compile another variant when it changes)
    flat += [0] * (-len(flat) % 4)
    clens_padded = clens + [0] * (-s % 4)
    packed = to_device(slots + [q - 1 for q in starts[1:]] + ids + pos + update + flat + clens_padded + starts,
                       torch.long, torch.device(device))
    t, a = len(slots), len(slots) + s
    n64 = a + len(ids) + len(pos) + len(update)
    i64, i32 = packed[:n64], packed[n64:].to(torch.int32)
    if device_tables is None:
        tables = i32[: s * width].view(s, width)
    else:
        tables = device_tables.apply(i64[n64 - len(update) :], width)
    return PagedMetadata(
        block_size=block_size,
        slot_mapping=i64[:t],
        block_tables=tables,
        context_lens=i32[len(flat) : len(flat) + s],
        query_start=i32[len(flat) + len(clens_padded) :],
        last_rows=i64[t:a],
        query_lens_list=qlens,
        context_lens_list=clens,
        query_start_list=starts,
        decode_seqs=[i for i, q in enumerate(qlens) if q == 1],
        prefill_seqs=[i for i, q in enumerate(qlens) if q > 1],
        host_tables=block_tables,
        input_ids=i64[a : a + len(ids)] if input_ids is not None else None,
        positions=i64[a + len(ids) : a + len(ids) + len(pos)] if positions is not None else None,
    )
