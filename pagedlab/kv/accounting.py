"""Accounting: the O(1) counters every policy keeps, and the snapshots built from them.

Counters (updated in place by the allocators, in the hot path too):

* ``_T``: token slots of resident sequences, shared slots counted once;
* ``_logical``: blocks of resident sequences without sharing (contiguous: reserved blocks);
* ``_cow_copies``, ``_hit_tokens``, ``_query_tokens``: cumulative;
* ``_ext_frag``: free slots seen when a contiguous placement failed, since the last read.

The metrics built from them are defined in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Mapping

from .stats import KVStats, WasteBreakdown


class Accounting:
    """Mixin of ``BlockManager``: counters, ``stats``, ``waste_breakdown``, external fragmentation.

    Needs ``num_blocks``, ``block_size``, ``num_swap_blocks``, ``_swap`` and the hooks ``_free_summary`` and
    ``unfilled_tails`` from the allocator.
    """

    num_blocks: int
    block_size: int
    num_swap_blocks: int

    def _init_counters(self) -> None:
        self._T = 0
        self._logical = 0
        self._cow_copies = 0
        self._hit_tokens = 0
        self._query_tokens = 0
        self._ext_frag = 0

    def _free_summary(self) -> tuple[int, int, int]:
        """(free blocks incl. evictable cached, cached blocks, largest free run)."""
        raise NotImplementedError

    def unfilled_tails(self) -> list[tuple[int, int, int]]:
        """(seq_id, num_tokens, capacity_slots) of resident sequences holding unfilled slots; a shared
        partial block is listed once, under its holder with the lowest seq id. O(#sequences)."""
        raise NotImplementedError

    def take_external_frag(self) -> int:
        """Free slots seen when a contiguous allocation failed for lack of a run since the last call."""
        x, self._ext_frag = self._ext_frag, 0
        return x

    def stats(self) -> KVStats:
        """O(1) snapshot (largest_free_run is O(free runs) for contiguous allocators)."""
        free, cached, largest = self._free_summary()
        used = self.num_blocks - free
        return KVStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            free_blocks=free,
            used_blocks=used,
            token_slots=self._T,
            allocated_slots=used * self.block_size,
            logical_blocks=self._logical,
            largest_free_run=largest,
            cached_blocks=cached,
            swapped_blocks=self._swap.used_blocks(),  # type: ignore[attr-defined]
            cow_copies=self._cow_copies,
            prefix_hit_tokens=self._hit_tokens,
            prefix_query_tokens=self._query_tokens,
        )

    def waste_breakdown(self, final_lens: Mapping[int, int]) -> WasteBreakdown:
        """Split A into T + reserved + internal_frag given each sequence's final length (a missing
        sequence counts as finished at its current length)."""
        reserved = 0
        for sid, n, cap in self.unfilled_tails():
            reserved += max(0, min(final_lens.get(sid, n), cap) - n)
        s = self.stats()
        return WasteBreakdown(
            token_slots=s.token_slots,
            reserved=reserved,
            internal_frag=s.allocated_slots - s.token_slots - reserved,
            allocated=s.allocated_slots,
        )
