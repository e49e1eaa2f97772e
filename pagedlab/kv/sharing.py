"""Sharing: fork by reference with copy-on-write, a layer over the paged allocator.

A child shares every block of its parent (reference counts go up, nothing is copied); the first
append into a shared partially-filled block copies it (``PagedBlockManager.append_slots`` does
that for any shared block). Admission therefore counts the prompt's blocks once for the whole
group of ``num_seqs`` sequences, and every sequence's own blocks past the shared full ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from .paged import PagedBlockManager


class CowPagedBlockManager(PagedBlockManager):
    """Paged allocator whose ``fork`` shares blocks and never fails for lack of room (``cow=True``)."""

    def _admission_blocks(self, n: int, eff: int, num_seqs: int) -> tuple[int, int]:
        fb = self._blocks(eff)
        shared = n // self.block_size
        return shared + num_seqs * (fb - shared), self._blocks(n)

    def _fork_consume(self, need: int, num_seqs: int) -> int:
        return need

    def can_fork(self, parent_id: int, num_children: int = 1) -> bool:
        """Always True for a resident parent: the children share its blocks."""
        self._table(parent_id)
        return True

    def can_fork_many(self, parent_ids: Sequence[int]) -> bool:
        """Always True: forks share blocks."""
        return True

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """Child shares the parent's blocks; returns [] (no copies)."""
        ptable = self._fork_check(parent_id, child_id)
        ref = self._pool.ref
        for b in ptable:
            ref[b] += 1
        self._logical += len(ptable)
        self._tables[child_id] = list(ptable)
        self._ntok[child_id] = self._ntok[parent_id]
        return []
