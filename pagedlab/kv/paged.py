"""Paged allocator (PagedAttention): block tables over one ``BlockPool`` of the device.

Any free block can hold any logical block, so admission only counts blocks. A fork copies every
block eagerly here; ``sharing`` layers fork-by-reference with copy-on-write on top, and
``prefix_cache`` layers hashing and prefix hits. Appending into a block another sequence still
references always copies it first (copy-on-write), whichever layers are on: prefix hits share
blocks too.
"""

from __future__ import annotations

from collections.abc import Sequence

from .block_manager import BlockManager
from .block_pool import BlockPool
from .errors import KVCacheError
from .invariants import check_paged
from .stats import AllocStatus


class PagedBlockManager(BlockManager):
    """Paged block tables; ``fork`` copies the parent's blocks (``cow=False``)."""

    def __init__(self, num_blocks: int, block_size: int, **kwargs: object) -> None:
        super().__init__(num_blocks, block_size, **kwargs)  # type: ignore[arg-type]
        self._pool = BlockPool(num_blocks, self.order)

    # ------------------------------------------------------------------ helpers
    def _release(self, table: list[int], n: int) -> int:
        """Drop one reference per table entry (tail first, so the LRU evicts tails first); return
        the filled slots of blocks that became unreferenced."""
        pool, bs = self._pool, self.block_size
        ref = pool.ref
        freed = 0
        for i in range(len(table) - 1, -1, -1):
            b = table[i]
            ref[b] -= 1
            if ref[b] == 0:
                freed += min(bs, n - i * bs)
                pool.release(b)
        return freed

    def _admission_blocks(self, n: int, eff: int, num_seqs: int) -> tuple[int, int]:
        return num_seqs * self._blocks(eff), num_seqs * self._blocks(n)

    def _fork_consume(self, need: int, num_seqs: int) -> int:
        """Blocks a group of ``num_seqs`` sequences of ``need`` blocks takes at admission."""
        return num_seqs * need

    def _shared_hits(self, token_ids: Sequence[int], n: int) -> int:
        """Blocks admission finds already referenced (prefix hits); none without a prefix cache."""
        return 0

    # ------------------------------------------------------------------ admission
    def can_allocate(self, token_ids: Sequence[int], final_len: int, num_seqs: int = 1) -> AllocStatus:
        """OK / LATER (no room now, keeping ``watermark_blocks`` free) / NEVER (can never fit)."""
        n = len(token_ids)
        if self._never_reason(n, final_len, num_seqs) is not None:
            return AllocStatus.NEVER
        consume = self._fork_consume(self._blocks(n), num_seqs) - self._shared_hits(token_ids, n)
        ok = self._pool.available() - consume >= self.watermark_blocks
        return AllocStatus.OK if ok else AllocStatus.LATER

    def allocate(self, seq_id: int, token_ids: Sequence[int], final_len: int) -> int:
        """Give ``seq_id`` slots for all its tokens; return the tokens served by the prefix cache (0)."""
        n = self._admit_check(seq_id, token_ids, final_len)
        nb = self._blocks(n)
        pool = self._pool
        if pool.available() < nb:
            raise KVCacheError(
                f"not enough free blocks for sequence {seq_id!r}: needs {nb}, "
                f"available {pool.available()} of num_blocks={self.num_blocks}"
            )
        ref, take = pool.ref, pool.take
        table = []
        for _ in range(nb):
            b = take()
            ref[b] = 1
            table.append(b)
        self._tables[seq_id] = table
        self._ntok[seq_id] = n
        self._T += n
        self._logical += nb
        self._query_tokens += n
        return 0

    # ------------------------------------------------------------------ fork (eager copies)
    def can_fork(self, parent_id: int, num_children: int = 1) -> bool:
        """Whether ``num_children`` forks of ``parent_id`` fit now."""
        return self._pool.available() >= num_children * len(self._table(parent_id))

    def can_fork_many(self, parent_ids: Sequence[int]) -> bool:
        """Whether one child of each entry of ``parent_ids`` (repeats allowed) fits now, all together."""
        if not parent_ids:
            return True
        return self._pool.available() >= sum(len(self._table(p)) for p in parent_ids)

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """Child gets copies of the parent's blocks; returns the copies (src, dst)."""
        ptable = self._fork_check(parent_id, child_id)
        pool = self._pool
        if pool.available() < len(ptable):
            raise KVCacheError(
                f"fork of {parent_id!r} needs {len(ptable)} free blocks, "
                f"available {pool.available()} of num_blocks={self.num_blocks}"
            )
        n = self._ntok[parent_id]
        table, copies = [], []
        for src in ptable:
            dst = pool.take()
            pool.ref[dst] = 1
            table.append(dst)
            copies.append((src, dst))
        self._T += n
        self._logical += len(table)
        self._tables[child_id] = table
        self._ntok[child_id] = n
        return copies

    # ------------------------------------------------------------------ decode (hot path)
    def _append_need(self, seq_ids: Sequence[int]) -> int:
        """Blocks an append of ``seq_ids`` takes (new last block or copy-on-write). When every
        holder of a shared last block appends, the last one to do so holds it alone by then and
        writes in place, as ``append_slots`` does: k writers of a block with ref count r copy
        k times if k < r, else r - 1 times."""
        bs, ntok, tables, ref = self.block_size, self._ntok, self._tables, self._pool.ref
        need = 0
        writers: dict[int, int] = {}  # shared last block -> how many of seq_ids write into it
        for sid in seq_ids:
            if ntok[sid] % bs == 0:
                need += 1
            else:
                last = tables[sid][-1]
                if ref[last] > 1:
                    writers[last] = writers.get(last, 0) + 1
        return need + sum(k - (k == ref[b]) for b, k in writers.items())

    def can_append(self, seq_ids: Sequence[int]) -> bool:
        """Whether every sequence in ``seq_ids`` can get one more slot, all together."""
        self._check_batch(seq_ids)
        avail = self._pool.available()
        return len(seq_ids) <= avail or self._append_need(seq_ids) <= avail

    def _check_append(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Raise unless one slot for each of ``seq_ids`` fits now."""
        ns = len(seq_ids)
        if len(token_ids) != ns:
            raise KVCacheError(f"len(token_ids)={len(token_ids)} must equal len(seq_ids)={ns}")
        self._check_batch(seq_ids)
        pool = self._pool
        avail = len(pool.free) + len(pool.lru)
        if ns > avail:
            need = self._append_need(seq_ids)
            if need > avail:
                raise KVCacheError(
                    f"out of blocks: append needs {need} new blocks, available {avail} "
                    f"of num_blocks={self.num_blocks} (check can_append first)"
                )

    def append_slots(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """One slot per sequence; returns copy-on-write copies (src, dst). O(1) per sequence."""
        # the checks of _check_append, inlined: the scheduler calls this once per sequence group
        ns = len(seq_ids)
        if len(token_ids) != ns:
            raise KVCacheError(f"len(token_ids)={len(token_ids)} must equal len(seq_ids)={ns}")
        self._check_batch(seq_ids)
        pool = self._pool
        if ns > len(pool.free) + len(pool.lru):
            self._check_append(seq_ids, token_ids)
        bs, ntok, tables = self.block_size, self._ntok, self._tables
        ref, free, pop, take = pool.ref, pool.free, pool.pop, pool.take
        copies: list[tuple[int, int]] = []
        new_blocks = copied = 0
        for sid in seq_ids:
            n = ntok[sid]
            r = n % bs
            if r:
                table = tables[sid]
                last = table[-1]
                if ref[last] > 1:  # copy-on-write: never write into a shared block
                    b = pop() if free else take()
                    ref[b] = 1
                    ref[last] -= 1
                    table[-1] = b
                    copies.append((last, b))
                    copied += r
            else:
                b = pop() if free else take()
                ref[b] = 1
                tables[sid].append(b)
                new_blocks += 1
            ntok[sid] = n + 1
        self._T += len(seq_ids) + copied
        self._logical += new_blocks
        self._cow_copies += len(copies)
        return copies

    # ------------------------------------------------------------------ free / swap hooks
    def _release_resident(self, sid: int, table: list[int], n: int) -> None:
        self._T -= self._release(table, n)
        self._logical -= len(table)

    def _swap_in_problem(self, seq_ids: Sequence[int], watermark: int) -> str | None:
        need = len(self._swap.distinct([self._host_tables[s] for s in seq_ids]))
        avail = self._pool.available()
        if avail - need < watermark:
            return (
                f"swap-in needs {need} device blocks but {avail} of num_blocks={self.num_blocks} "
                f"are available (keeping watermark_blocks={watermark})"
            )
        return None

    def _swap_in_place(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        bs, pool, swap = self.block_size, self._pool, self._swap
        ref = pool.ref
        mapping = {h: pool.take() for h in swap.distinct([self._host_tables[s] for s in seq_ids])}
        for sid in seq_ids:
            htable = self._host_tables.pop(sid)
            n = self._ntok[sid]
            table = [mapping[h] for h in htable]
            for i, d in enumerate(table):
                if ref[d] == 0:
                    self._T += min(bs, n - i * bs)
                ref[d] += 1
            swap.release(htable)
            self._tables[sid] = table
            self._logical += len(table)
        return list(mapping.items())

    # ------------------------------------------------------------------ queries
    def _free_summary(self) -> tuple[int, int, int]:
        pool = self._pool
        free = len(pool.free) + len(pool.lru)
        return free, len(pool.lru), free

    def unfilled_tails(self) -> list[tuple[int, int, int]]:
        bs, ntok, ref = self.block_size, self._ntok, self._pool.ref
        out: list[tuple[int, int, int]] = []
        shared: dict[int, int] = {}  # shared partial block -> index in out
        for sid, table in self._tables.items():
            n = ntok[sid]
            if n % bs:
                entry = (sid, n, len(table) * bs)
                last = table[-1]
                if ref[last] > 1:
                    j = shared.get(last)
                    if j is not None:
                        if sid < out[j][0]:
                            out[j] = entry
                        continue
                    shared[last] = len(out)
                out.append(entry)
        return out

    def _check_layout(self) -> tuple[int, int]:
        return check_paged(self)

    def ref_count(self, block: int) -> int:
        """Block-table entries pointing at device block ``block``."""
        return self._pool.ref[block]

    def free_blocks_in_eviction_order(self) -> list[int]:
        """Truly free blocks in the order ``order`` reuses them, then cached blocks LRU-oldest first."""
        return self._pool.eviction_order()
