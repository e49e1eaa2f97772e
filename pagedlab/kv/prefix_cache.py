"""Prefix cache: chained hashes of full blocks, registration and hit lookup, a layer over paged.

A full block is known by the hash of (hash of the block before it, its tokens), so equal hashes
mean equal prefixes. ``allocate`` reuses the cached blocks of the longest cached prefix (never
the block holding the prompt's last token, which the prefill must compute) and registers the
prompt's other full blocks; ``append_slots`` registers each block as it becomes full. A block
whose last reference goes stays in the pool's LRU, findable by its hash, until it is evicted.

Blocks registered by ``allocate`` are provisional until the sequence's first ``append_slots``
(its prefill has run): a sequence freed or swapped out before then drops their hashes once they
are unreferenced, so a rolled-back admission never leaves uncomputed blocks in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from .block_pool import BlockPool
from .errors import KVCacheError
from .invariants import check_prefix_cache
from .paged import PagedBlockManager
from .sharing import CowPagedBlockManager

EMPTY_HASH = 0  # chain seed of the first block (hash(None) is not stable across runs on 3.10/3.11)


class PrefixCache:
    """Per-sequence hash chains and provisional registrations over the pool's hash map."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.last_hash: dict[int, int] = {}  # seq -> chain hash of its last full block
        self.partial: dict[int, list[int]] = {}  # seq -> tokens of its partial last block
        self.provisional: dict[int, list[int]] = {}  # seq -> provisional blocks it holds
        self.prov: set[int] = set()  # blocks registered by an admission whose prefill has not run

    def hashes(self, token_ids: Sequence[int], num_full: int) -> list[int]:
        """Chained hashes of the first ``num_full`` full blocks of ``token_ids``."""
        bs, h, out = self.block_size, EMPTY_HASH, []
        for i in range(num_full):
            h = hash((h, tuple(token_ids[i * bs : (i + 1) * bs])))
            out.append(h)
        return out

    def hits(self, hashes: list[int], num_tokens: int) -> list[int]:
        """Cached blocks for the longest cached prefix, at most (num_tokens-1)//block_size blocks."""
        by_hash, hits = self.pool.by_hash, []
        for h in hashes[: (num_tokens - 1) // self.block_size]:
            b = by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def start(self, sid: int, hashes: list[int], token_ids: Sequence[int], num_full: int) -> None:
        self.last_hash[sid] = hashes[-1] if hashes else EMPTY_HASH
        self.partial[sid] = list(token_ids[num_full * self.block_size :])

    def copy(self, parent: int, child: int) -> None:
        self.last_hash[child] = self.last_hash[parent]
        self.partial[child] = list(self.partial[parent])
        if parent in self.provisional:
            self.provisional[child] = list(self.provisional[parent])

    def confirm(self, seq_ids: Sequence[int]) -> None:
        """The prefill of ``seq_ids`` has run: their provisional blocks hold real KV now."""
        provisional = self.provisional
        for sid in seq_ids:
            blocks = provisional.pop(sid, None)
            if blocks:
                self.prov.difference_update(blocks)

    def drop_provisional(self, sid: int) -> None:
        """Un-cache the blocks ``sid`` registered at admission if nobody references them now."""
        blocks = self.provisional.pop(sid, None)
        if blocks:
            pool, prov = self.pool, self.prov
            for b in blocks:
                if pool.ref[b] == 0 and b in prov:
                    prov.discard(b)
                    if b in pool.lru:
                        pool.uncache(b)

    def forget(self, sid: int) -> None:
        del self.last_hash[sid], self.partial[sid]
        self.drop_provisional(sid)

    def clear(self) -> None:
        self.pool.clear_cache()
        self.prov.clear()
        self.provisional.clear()


class PrefixCacheLayer:
    """Layer (mixin, listed before a ``PagedBlockManager`` class) adding the prefix cache."""

    def __init__(self, num_blocks: int, block_size: int, **kwargs: object) -> None:
        super().__init__(num_blocks, block_size, **kwargs)  # type: ignore[call-arg]
        self._pc = PrefixCache(self._pool, block_size)

    def _shared_hits(self, token_ids: Sequence[int], n: int) -> int:
        pc, ref = self._pc, self._pool.ref
        hits = pc.hits(pc.hashes(token_ids, n // self.block_size), n)
        return sum(1 for b in hits if ref[b] > 0)

    def allocate(self, seq_id: int, token_ids: Sequence[int], final_len: int) -> int:
        """Give ``seq_id`` slots for all its tokens; return the tokens served by the prefix cache."""
        n = self._admit_check(seq_id, token_ids, final_len)
        bs, pool, pc = self.block_size, self._pool, self._pc
        nb = self._blocks(n)
        num_full = n // bs
        hashes = pc.hashes(token_ids, num_full)
        hits = pc.hits(hashes, n)
        ref = pool.ref
        lru_hits = sum(1 for b in hits if ref[b] == 0)
        if pool.available() - lru_hits < nb - len(hits):
            raise KVCacheError(
                f"not enough free blocks for sequence {seq_id!r}: needs {nb - len(hits)}, "
                f"available {pool.available() - lru_hits} of num_blocks={self.num_blocks}"
            )
        table = list(hits)
        for b in hits:
            pool.acquire_cached(b)
        prov = pc.prov
        registered = [b for b in hits if b in prov]  # hit blocks still being prefilled
        for i in range(len(hits), nb):
            b = pool.take()
            ref[b] = 1
            table.append(b)
            if i < len(hashes):
                pool.register(b, hashes[i])
                if pool.block_hash[b] is not None:
                    registered.append(b)
                    prov.add(b)
        if registered:
            pc.provisional[seq_id] = registered
        self._tables[seq_id] = table
        self._ntok[seq_id] = n
        self._T += n - len(hits) * bs + lru_hits * bs
        self._logical += nb
        hit_tokens = len(hits) * bs
        self._hit_tokens += hit_tokens
        self._query_tokens += n
        pc.start(seq_id, hashes, token_ids, num_full)
        return hit_tokens

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        copies = super().fork(parent_id, child_id)  # type: ignore[misc]
        self._pc.copy(parent_id, child_id)
        return copies

    def append_slots(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """One slot per sequence, registering blocks as they become full; returns copy-on-write
        copies (src, dst). O(1) per sequence."""
        self._check_append(seq_ids, token_ids)
        pool, pc = self._pool, self._pc
        bs, ntok, tables = self.block_size, self._ntok, self._tables
        ref, take, register = pool.ref, pool.take, pool.register
        partial, last_hash = pc.partial, pc.last_hash
        if pc.provisional:
            pc.confirm(seq_ids)
        copies: list[tuple[int, int]] = []
        new_blocks = copied = 0
        for sid, tok in zip(seq_ids, token_ids):
            n = ntok[sid]
            r = n % bs
            table = tables[sid]
            if r:
                last = table[-1]
                if ref[last] > 1:
                    b = take()
                    ref[b] = 1
                    ref[last] -= 1
                    table[-1] = b
                    copies.append((last, b))
                    copied += r
            else:
                b = take()
                ref[b] = 1
                table.append(b)
                new_blocks += 1
            ntok[sid] = n + 1
            part = partial[sid]
            part.append(tok)
            if r == bs - 1:
                h = hash((last_hash[sid], tuple(part)))
                last_hash[sid] = h
                part.clear()
                register(table[-1], h)
        self._T += len(seq_ids) + copied
        self._logical += new_blocks
        self._cow_copies += len(copies)
        return copies

    def _release_resident(self, sid: int, table: list[int], n: int) -> None:
        super()._release_resident(sid, table, n)  # type: ignore[misc]
        self._pc.drop_provisional(sid)

    def _forget(self, sid: int) -> None:
        self._pc.forget(sid)

    def clear_prefix_cache(self) -> None:
        """Forget every cached hash; unreferenced cached blocks become truly free."""
        self._pc.clear()

    def block_hash(self, block: int) -> int | None:
        """Prefix-cache hash of device block ``block`` (None: not registered)."""
        return self._pool.block_hash[block]

    def check_invariants(self) -> None:
        """Recompute everything from the block tables; raise AssertionError on any mismatch."""
        check_prefix_cache(self)
        super().check_invariants()  # type: ignore[misc]


class PrefixCachedPaged(PrefixCacheLayer, PagedBlockManager):
    """Paged allocator with a prefix cache and eager-copy forks (``cow=False``)."""


class PrefixCachedCowPaged(PrefixCacheLayer, CowPagedBlockManager):
    """Paged allocator with a prefix cache and copy-on-write forks (the default with a cache)."""
