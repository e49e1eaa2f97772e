"""Allocators pagedlab does not ship (``allocator._target_``): conservative admission over paged blocks,
and a worst-fit placement rule for the contiguous allocator.

The engine builds an allocator as ``_target_(num_blocks, block_size, cow=..., prefix_cache=...,
num_swap_blocks=..., max_model_len=..., watermark_blocks=..., **the YAML's other keys)``; the contract
is :class:`pagedlab.kv.KVManager`. Subclassing one of pagedlab's block managers keeps everything the
engine reads (accounting, swap, ``unfilled_tails``, ``check_invariants``) and leaves only the policy to
write, as here: ``ConservativeAdmission`` changes admission and nothing else.

``conf/allocator/conservative_paged.yaml``::

    name: conservative_paged
    _target_: pagedlab_plugins.allocators.conservative_paged
    reserve_fraction: 1.0

``conf/allocator/contiguous_worst_fit.yaml`` passes :func:`worst_fit` as the ``place`` argument of
pagedlab's ``ContiguousBlockManager`` (a function in YAML: ``{_target_: hydra.utils.get_method, path: ...}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

from pagedlab.errors import BadArgument
from pagedlab.kv import AllocStatus, BlockManager
from pagedlab.kv.block_manager import implementation


class ConservativeAdmission:
    """Admission that never overcommits: a mixin over a paged block manager class.

    TGI-style servers admit a request only when the KV for its *whole* final length is free, so running
    requests never run out of room and nothing is ever preempted; the price is memory held idle for
    tokens not generated yet (and fewer requests in the batch). vLLM's paged allocator admits on the
    prompt alone and preempts when memory runs short. This mixin makes the paged allocator behave like
    the former, so the two can be compared on the same blocks.

    A group is admitted when ``available - committed - final >= watermark_blocks``:

    * ``final``: blocks the new group holds at its final length (``prompt + max_tokens``, shared prompt
      blocks counted once when ``cow``): the paged allocator's own ``_admission_blocks``;
    * ``committed``: blocks the live sequences will still take before they end
      (:meth:`committed_blocks`): each resident sequence's final blocks minus its table, one copy per
      extra holder of a shared partial block (copy-on-write), and a swapped sequence's final blocks.

    ``reserve_fraction`` (0..1) is the share of a sequence's remaining ``max_tokens`` reserved at admission:
    1 (default) is fully conservative; below 1 it overcommits, admitting more and preempting sometimes
    (the allocator still answers ``can_append`` from the blocks actually free), a knob between the two
    regimes. With 1, greedy and parallel-sampling runs never preempt: every block a sequence takes was
    counted in ``committed`` when its group was admitted. Beam search (forks after admission) can in
    corner cases still need a preemption, which the scheduler then does as usual.
    """

    def __init__(self, num_blocks: int, block_size: int, *, reserve_fraction: float = 1.0,
                 **kwargs: Any) -> None:
        if isinstance(reserve_fraction, bool) or not isinstance(reserve_fraction, (int, float)) \
                or not 0 <= reserve_fraction <= 1:
            raise BadArgument("reserve_fraction", reserve_fraction,
                              "a number in [0, 1] (1: reserve the whole final length; below 1: overcommit)")
        super().__init__(num_blocks, block_size, **kwargs)
        self.reserve_fraction = float(reserve_fraction)
        self._final_blocks: dict[int, int] = {}  # live sequence -> blocks it may hold at its end

    # ------------------------------------------------------------------ the policy
    def _target_len(self, n: int, final_len: int) -> int:
        """Tokens reserved for a sequence of ``n`` tokens that may grow to ``final_len``."""
        return n + math.ceil(self.reserve_fraction * max(0, final_len - n))

    def committed_blocks(self) -> int:
        """Blocks the live sequences will still take from the pool before they end (at most)."""
        bs, ntok, ref, final = self.block_size, self._ntok, self._pool.ref, self._final_blocks
        need = 0
        shared_tails: dict[int, int] = {}  # shared partial block -> copies (every holder but the last)
        for sid, table in self._tables.items():
            need += max(0, final[sid] - len(table))
            if ntok[sid] % bs and ref[table[-1]] > 1:
                shared_tails[table[-1]] = ref[table[-1]] - 1
        for sid in self._host_tables:  # swapped out: all of it comes back
            need += final[sid]
        return need + sum(shared_tails.values())

    def can_allocate(self, token_ids: Sequence[int], final_len: int, num_seqs: int = 1) -> AllocStatus:
        status = super().can_allocate(token_ids, final_len, num_seqs)
        if status is not AllocStatus.OK:
            return status
        n = len(token_ids)
        final, _ = self._admission_blocks(n, self._target_len(n, max(final_len, n)), num_seqs)
        free_after = self._pool.available() - self.committed_blocks() - final
        return AllocStatus.OK if free_after >= self.watermark_blocks else AllocStatus.LATER

    # ------------------------------------------------------------------ bookkeeping
    def allocate(self, seq_id: int, token_ids: Sequence[int], final_len: int) -> int:
        hit = super().allocate(seq_id, token_ids, final_len)
        n = len(token_ids)
        self._final_blocks[seq_id] = self._blocks(self._target_len(n, max(final_len, n)))
        return hit

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        copies = super().fork(parent_id, child_id)
        self._final_blocks[child_id] = self._final_blocks[parent_id]
        return copies

    def _forget(self, sid: int) -> None:
        super()._forget(sid)
        self._final_blocks.pop(sid, None)


@cache
def _conservative(base: type[BlockManager]) -> type[BlockManager]:
    """``ConservativeAdmission`` over one of pagedlab's composed paged classes (one class per base)."""
    return type(f"Conservative{base.__name__}", (ConservativeAdmission, base), {})


def conservative_paged(num_blocks: int, block_size: int, *, cow: bool = True, prefix_cache: bool = False,
                       **kwargs: Any) -> BlockManager:
    """``allocator=conservative_paged``: pagedlab's paged allocator (with the sharing and prefix-cache layers
    as ``cow`` / ``prefix_cache`` ask) under :class:`ConservativeAdmission`. ``kwargs``: ``reserve_fraction``
    and :class:`pagedlab.kv.BlockManager`'s (``order``, ``watermark_blocks`` ...)."""
    base = implementation("paged", bool(cow), bool(prefix_cache))
    return _conservative(base)(num_blocks, block_size, allocator="conservative_paged", cow=cow,
                               prefix_cache=prefix_cache, **kwargs)


def worst_fit(starts: Sequence[int], length: Mapping[int, int], n: int) -> int | None:
    """Placement rule: the *largest* free run that holds ``n`` blocks (lowest start on ties).

    First fit and best fit (pagedlab's rules) leave small remainders that no later reservation fits;
    worst fit carves every reservation out of the biggest hole so that the remainder stays as large as
    possible. Whether that lowers external fragmentation for KV reservations is an experiment:
    ``allocator=contiguous_worst_fit`` against ``contiguous_oracle`` (first fit) on the same workload.
    Same signature as :data:`pagedlab.kv.allocators.PlacementRule`."""
    best = None
    for s in starts:
        ln = length[s]
        if ln >= n and (best is None or ln > length[best]):
            best = s
    return best


__all__ = ["ConservativeAdmission", "conservative_paged", "worst_fit"]
