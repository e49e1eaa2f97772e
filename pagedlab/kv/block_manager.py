"""BlockManager: per-sequence block tables over a paged or contiguous allocator.

Fork with copy-on-write (or eager copies), swap space on a host pool, prefix caching by a
chained hash of full blocks, and O(1) memory accounting (see design.md for the metrics).

Conventions worth knowing:

* Block tables list the blocks that hold the sequence's tokens, ``ceil(num_tokens / block_size)``
  entries. For contiguous allocators that is a prefix of the sequence's reservation; the rest of
  the reservation counts as allocated (A) but is not in the table. A contiguous sequence that
  outgrows its reservation grows in place by one block when the next block is free, otherwise
  ``can_append`` is False (and the free slots are noted as external fragmentation).
* Only the last block of a sequence can be partially filled, and a block is only written while
  its ref count is 1, so a shared block has the same fill for all holders.
* A shared partially-filled block is attributed, in ``unfilled_tails`` and ``waste_breakdown``, to
  its holder with the lowest sequence id (both use the same rule, so the split the recorder
  computes from ``unfilled_tails`` equals ``waste_breakdown``).
* Swap: a block shared inside the swapped group maps to one host block (sharing kept); a block
  also held by a sequence outside the group keeps its device copy for those holders, and the
  swapped group gets its own device copy on swap-in. Device blocks released by swap-out go the
  usual way (a prefix-cached block stays in the LRU); blocks allocated on swap-in are not
  registered in the prefix cache (the sequence keeps hashing the blocks it fills afterwards).
* Prefix cache: ``allocate`` registers the prompt's full blocks at once, so a request admitted in
  the same step can already hit them (the executor must write every new token's KV of a layer
  before attending, as the torch executor does). Until the sequence's first ``append_slots`` (its
  prefill has run) those blocks are provisional: freeing or swapping out the sequence before then
  drops their hashes once unreferenced, so a rolled-back admission never leaves uncomputed blocks
  in the cache.
* ``can_allocate``/``can_swap_in`` keep ``watermark_blocks`` free; ``allocate``/``swap_in`` only
  fail when there is physically no room.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .allocators import ALLOCATORS, FreeRuns, reservation_slots
from .block_pool import ORDERS, BlockPool
from .errors import KVCacheError
from .stats import AllocStatus, KVStats, WasteBreakdown

_EMPTY_HASH = 0  # chain seed of the first block (hash(None) is not stable across runs on 3.10/3.11)


def _check_int(name: str, value: object, lo: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise KVCacheError(f"{name}={value!r} is invalid: must be an integer >= {lo}{why}")


class BlockManager:
    """KV-cache memory manager; see module docstring and contracts.md section 1."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        allocator: str = "paged",
        order: str = "lifo",
        cow: bool = True,
        prefix_cache: bool = False,
        num_swap_blocks: int = 0,
        max_model_len: int | None = None,
        watermark_blocks: int = 0,
    ) -> None:
        _check_int("block_size", block_size, 1)
        _check_int("num_blocks", num_blocks, 1, " (the KV budget is smaller than one block)")
        if allocator not in ALLOCATORS:
            raise KVCacheError(f"allocator={allocator!r} is unknown: allowed values are {list(ALLOCATORS)}")
        if order not in ORDERS:
            raise KVCacheError(f"order={order!r} is unknown: allowed values are {list(ORDERS)}")
        _check_int("num_swap_blocks", num_swap_blocks, 0)
        if max_model_len is not None:
            _check_int("max_model_len", max_model_len, 1)
        _check_int("watermark_blocks", watermark_blocks, 0)
        if watermark_blocks >= num_blocks:
            raise KVCacheError(
                f"watermark_blocks={watermark_blocks} must be < num_blocks={num_blocks} "
                "(otherwise nothing could ever be admitted)"
            )
        paged = allocator == "paged"
        if not paged and prefix_cache:
            raise KVCacheError(f"prefix_cache=True needs allocator='paged' (got allocator={allocator!r})")
        if allocator == "contiguous_max" and max_model_len is None:
            raise KVCacheError("allocator='contiguous_max' needs max_model_len (got None)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.allocator = allocator
        self.order = order
        self.cow = bool(cow) and paged
        self.prefix_cache = bool(prefix_cache)
        self.num_swap_blocks = num_swap_blocks
        self.max_model_len = max_model_len
        self.watermark_blocks = watermark_blocks
        self._paged = paged
        self._pool = BlockPool(num_blocks if paged else 0, order)  # paged only
        self._runs = FreeRuns(0 if paged else num_blocks)
        self._host = BlockPool(num_swap_blocks, "lifo", "host")
        self._ntok: dict[int, int] = {}  # every live sequence (resident or swapped) -> tokens
        self._tables: dict[int, list[int]] = {}  # resident sequences -> device block table
        self._host_tables: dict[int, list[int]] = {}  # swapped sequences -> host block table
        self._res_start: dict[int, int] = {}  # contiguous, resident: first reserved block
        self._res_len: dict[int, int] = {}  # contiguous, live: reserved blocks
        self._last_hash: dict[int, int] = {}  # prefix cache: chain hash of the last full block
        self._partial: dict[int, list[int]] = {}  # prefix cache: tokens of the partial last block
        self._provisional: dict[int, list[int]] = {}  # prefix cache: seq -> provisional blocks it holds
        self._prov: set[int] = set()  # blocks registered by an admission whose prefill has not run
        self._T = 0  # token slots of resident sequences, shared slots once
        self._logical = 0  # blocks of resident sequences without sharing (contiguous: reserved)
        self._cow_copies = 0
        self._hit_tokens = 0
        self._query_tokens = 0
        self._ext_frag = 0

    # ------------------------------------------------------------------ helpers
    def _blocks(self, slots: int) -> int:
        return -(-slots // self.block_size)

    def _reservation(self, final_len: int) -> int:
        return self._blocks(reservation_slots(self.allocator, final_len, self.max_model_len))

    def _table(self, sid: int) -> list[int]:
        t = self._tables.get(sid)
        if t is None:
            if sid in self._host_tables:
                raise KVCacheError(f"sequence {sid!r} is swapped out; swap it in first")
            raise KVCacheError(f"unknown sequence id {sid!r}: not allocated or already freed")
        return t

    def _check_batch(self, seq_ids: Sequence[int], swapped: bool = False) -> None:
        ids = set(seq_ids)
        if len(ids) != len(seq_ids):
            dups = sorted({s for s in seq_ids if list(seq_ids).count(s) > 1})
            raise KVCacheError(f"duplicate sequence ids in one batch: {dups}")
        where = self._host_tables if swapped else self._tables
        if where.keys() >= ids:
            return
        for sid in seq_ids:
            if sid in where:
                continue
            if swapped:
                if sid in self._tables:
                    raise KVCacheError(f"sequence {sid!r} is not swapped out")
                raise KVCacheError(f"unknown sequence id {sid!r}: not allocated or already freed")
            self._table(sid)

    def _hashes(self, token_ids: Sequence[int], num_full: int) -> list[int]:
        """Chained hashes of the first ``num_full`` full blocks of ``token_ids``."""
        bs, h, out = self.block_size, _EMPTY_HASH, []
        for i in range(num_full):
            h = hash((h, tuple(token_ids[i * bs : (i + 1) * bs])))
            out.append(h)
        return out

    def _prefix_hits(self, hashes: list[int], num_tokens: int) -> list[int]:
        """Cached blocks for the longest cached prefix, at most (num_tokens-1)//block_size blocks."""
        by_hash, hits = self._pool.by_hash, []
        for h in hashes[: (num_tokens - 1) // self.block_size]:
            b = by_hash.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _never_reason(self, n: int, final_len: int, num_seqs: int) -> str | None:
        """Why a group of ``num_seqs`` sequences (``n`` tokens now) can never be admitted, or None."""
        if n < 1:
            raise KVCacheError("token_ids is empty: a sequence needs at least one token")
        _check_int("num_seqs", num_seqs, 1)
        eff = max(final_len, n)
        mml = self.max_model_len
        if mml is not None and eff > mml:
            return f"final_len={eff} exceeds max_model_len={mml}"
        if self._paged:
            fb = self._blocks(eff)
            shared = n // self.block_size if self.cow else 0
            final = shared + num_seqs * (fb - shared)
            now = self._blocks(n) * (1 if self.cow else num_seqs)
        else:
            final = now = num_seqs * self._reservation(eff)
        if final > self.num_blocks:
            return (
                f"sequence needs {final} blocks (final_len={eff}, num_seqs={num_seqs}, "
                f"block_size={self.block_size}) but the whole cache has num_blocks={self.num_blocks}"
            )
        if now > self.num_blocks - self.watermark_blocks:
            return (
                f"sequence needs {now} blocks at admission but at most num_blocks - watermark_blocks = "
                f"{self.num_blocks - self.watermark_blocks} can be free for admission"
            )
        return None

    def _note_ext_frag(self) -> None:
        self._ext_frag = max(self._ext_frag, self._runs.free_blocks * self.block_size)

    def _take_run(self, res: int, what: str) -> int:
        """First block of a fresh contiguous run of `res` blocks; raises (noting external
        fragmentation when enough blocks are free in total) if there is none."""
        start = self._runs.allocate(res)
        if start is None:
            if self._runs.free_blocks >= res:
                self._note_ext_frag()
            raise KVCacheError(
                f"{what} needs a contiguous run of {res} blocks "
                f"(free blocks={self._runs.free_blocks}, largest run={self._runs.largest()})"
            )
        return start

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

    def _drop_provisional(self, sid: int) -> None:
        """Un-cache the blocks ``sid`` registered at admission if nobody references them now."""
        blocks = self._provisional.pop(sid, None)
        if blocks:
            pool, prov = self._pool, self._prov
            for b in blocks:
                if pool.ref[b] == 0 and b in prov:
                    prov.discard(b)
                    if b in pool.lru:
                        pool.uncache(b)

    def _release_host(self, table: list[int]) -> None:
        host = self._host
        for h in table:
            host.ref[h] -= 1
            if host.ref[h] == 0:
                host.release(h)

    # ------------------------------------------------------------------ admission
    def can_allocate(self, token_ids: Sequence[int], final_len: int, num_seqs: int = 1) -> AllocStatus:
        """OK / LATER (no room now, keeping ``watermark_blocks`` free) / NEVER (can never fit)."""
        n = len(token_ids)
        if self._never_reason(n, final_len, num_seqs) is not None:
            return AllocStatus.NEVER
        if self._paged:
            pool = self._pool
            need = self._blocks(n)
            shared_hits = 0
            if self.prefix_cache:
                hits = self._prefix_hits(self._hashes(token_ids, n // self.block_size), n)
                shared_hits = sum(1 for b in hits if pool.ref[b] > 0)
            consume = need - shared_hits + (0 if self.cow else (num_seqs - 1) * need)
            ok = pool.available() - consume >= self.watermark_blocks
            return AllocStatus.OK if ok else AllocStatus.LATER
        res = self._reservation(max(final_len, n))
        runs = self._runs
        if runs.free_blocks - num_seqs * res < self.watermark_blocks:
            return AllocStatus.LATER
        if not runs.fits([res] * num_seqs):
            self._note_ext_frag()
            return AllocStatus.LATER
        return AllocStatus.OK

    def allocate(self, seq_id: int, token_ids: Sequence[int], final_len: int) -> int:
        """Give ``seq_id`` slots for all its tokens; return the tokens served by the prefix cache."""
        if seq_id in self._ntok:
            raise KVCacheError(f"sequence id {seq_id!r} already exists (duplicate seq id)")
        n = len(token_ids)
        reason = self._never_reason(n, final_len, 1)
        if reason is not None:
            raise KVCacheError(reason)
        bs = self.block_size
        nb = self._blocks(n)
        if not self._paged:
            res = self._reservation(max(final_len, n))
            start = self._take_run(res, f"sequence {seq_id!r}")
            self._tables[seq_id] = list(range(start, start + nb))
            self._res_start[seq_id] = start
            self._res_len[seq_id] = res
            self._ntok[seq_id] = n
            self._T += n
            self._logical += res
            self._query_tokens += n
            return 0
        pool = self._pool
        num_full = n // bs
        hashes = self._hashes(token_ids, num_full) if self.prefix_cache else []
        hits = self._prefix_hits(hashes, n) if self.prefix_cache else []
        lru_hits = sum(1 for b in hits if pool.ref[b] == 0)
        if pool.available() - lru_hits < nb - len(hits):
            raise KVCacheError(
                f"not enough free blocks for sequence {seq_id!r}: needs {nb - len(hits)}, "
                f"available {pool.available() - lru_hits} of num_blocks={self.num_blocks}"
            )
        table = list(hits)
        for b in hits:
            pool.acquire_cached(b)
        ref = pool.ref
        registered = [b for b in hits if b in self._prov]  # hit blocks still being prefilled
        for i in range(len(hits), nb):
            b = pool.take()
            ref[b] = 1
            table.append(b)
            if i < len(hashes):
                pool.register(b, hashes[i])
                if pool.block_hash[b] is not None:
                    registered.append(b)
                    self._prov.add(b)
        if registered:
            self._provisional[seq_id] = registered
        self._tables[seq_id] = table
        self._ntok[seq_id] = n
        self._T += n - len(hits) * bs + lru_hits * bs
        self._logical += nb
        hit_tokens = len(hits) * bs
        self._hit_tokens += hit_tokens
        self._query_tokens += n
        if self.prefix_cache:
            self._last_hash[seq_id] = hashes[-1] if hashes else _EMPTY_HASH
            self._partial[seq_id] = list(token_ids[num_full * bs :])
        return hit_tokens

    # ------------------------------------------------------------------ fork
    def can_fork(self, parent_id: int, num_children: int = 1) -> bool:
        """Whether ``num_children`` forks of ``parent_id`` fit now (always True for paged + cow)."""
        table = self._table(parent_id)
        if self.cow:
            return True
        if self._paged:
            return self._pool.available() >= num_children * len(table)
        return self._runs.fits([self._res_len[parent_id]] * num_children)

    def can_fork_many(self, parent_ids: Sequence[int]) -> bool:
        """Whether one child of each entry of ``parent_ids`` (repeats allowed) fits now, all together."""
        if self.cow or not parent_ids:
            return True
        tables = [self._table(p) for p in parent_ids]
        if self._paged:
            return self._pool.available() >= sum(map(len, tables))
        return self._runs.fits([self._res_len[p] for p in parent_ids])

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """Child gets the parent's tokens: shared (paged+cow, returns []) or copied (src, dst)."""
        ptable = self._table(parent_id)
        if child_id in self._ntok:
            raise KVCacheError(f"child sequence id {child_id!r} already exists (duplicate seq id)")
        n = self._ntok[parent_id]
        copies: list[tuple[int, int]] = []
        if self.cow:
            ref = self._pool.ref
            for b in ptable:
                ref[b] += 1
            table = list(ptable)
            self._logical += len(table)
        elif self._paged:
            pool = self._pool
            if pool.available() < len(ptable):
                raise KVCacheError(
                    f"fork of {parent_id!r} needs {len(ptable)} free blocks, "
                    f"available {pool.available()} of num_blocks={self.num_blocks}"
                )
            table = []
            for src in ptable:
                dst = pool.take()
                pool.ref[dst] = 1
                table.append(dst)
                copies.append((src, dst))
            self._T += n
            self._logical += len(table)
        else:
            res = self._res_len[parent_id]
            start = self._take_run(res, f"fork of {parent_id!r}")
            table = list(range(start, start + len(ptable)))
            copies = list(zip(ptable, table))
            self._res_start[child_id] = start
            self._res_len[child_id] = res
            self._T += n
            self._logical += res
        self._tables[child_id] = table
        self._ntok[child_id] = n
        if self.prefix_cache:
            self._last_hash[child_id] = self._last_hash[parent_id]
            self._partial[child_id] = list(self._partial[parent_id])
            if parent_id in self._provisional:
                self._provisional[child_id] = list(self._provisional[parent_id])
        return copies

    # ------------------------------------------------------------------ decode (hot path)
    def _append_need(self, seq_ids: Sequence[int]) -> int:
        """Blocks a paged append of ``seq_ids`` takes (new last block or copy-on-write). When every
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

    def _blocked_growth(self, seq_ids: Sequence[int]) -> int:
        """Contiguous: sequences whose reservation is full and whose next block is not free."""
        bs, ntok, rs, rl, runs = self.block_size, self._ntok, self._res_start, self._res_len, self._runs
        blocked = 0
        for sid in seq_ids:
            r = rl[sid]
            if ntok[sid] == r * bs and not runs.is_run_start(rs[sid] + r):
                blocked += 1
        return blocked

    def can_append(self, seq_ids: Sequence[int]) -> bool:
        """Whether every sequence in ``seq_ids`` can get one more slot, all together."""
        self._check_batch(seq_ids)
        if self._paged:
            avail = self._pool.available()
            return len(seq_ids) <= avail or self._append_need(seq_ids) <= avail
        blocked = self._blocked_growth(seq_ids)
        if blocked and self._runs.free_blocks >= blocked:
            self._note_ext_frag()
        return blocked == 0

    def append_slots(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """One slot per sequence; returns copy-on-write copies (src, dst). O(1) per sequence."""
        ns = len(seq_ids)
        if len(token_ids) != ns:
            raise KVCacheError(f"len(token_ids)={len(token_ids)} must equal len(seq_ids)={ns}")
        self._check_batch(seq_ids)
        if not self._paged:
            return self._append_contiguous(seq_ids)
        pool = self._pool
        avail = len(pool.free) + len(pool.lru)
        if ns > avail:
            need = self._append_need(seq_ids)
            if need > avail:
                raise KVCacheError(
                    f"out of blocks: append needs {need} new blocks, available {avail} "
                    f"of num_blocks={self.num_blocks} (check can_append first)"
                )
        if self.prefix_cache:
            return self._append_prefix(seq_ids, token_ids)
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
        self._T += ns + copied
        self._logical += new_blocks
        self._cow_copies += len(copies)
        return copies

    def _append_prefix(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Paged append that also registers blocks in the prefix cache as they become full."""
        pool = self._pool
        bs, ntok, tables = self.block_size, self._ntok, self._tables
        ref, take, register = pool.ref, pool.take, pool.register
        partial, last_hash, provisional = self._partial, self._last_hash, self._provisional
        if provisional:  # their prefill has run: their provisional blocks hold real KV now
            for sid in seq_ids:
                blocks = provisional.pop(sid, None)
                if blocks:
                    self._prov.difference_update(blocks)
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

    def _append_contiguous(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        blocked = self._blocked_growth(seq_ids)
        if blocked:
            raise KVCacheError(
                f"{blocked} sequence(s) outgrew their contiguous reservation and the next block is "
                f"not free (free blocks={self._runs.free_blocks}; check can_append first)"
            )
        bs, ntok, tables, rs, rl = self.block_size, self._ntok, self._tables, self._res_start, self._res_len
        grown = 0
        for sid in seq_ids:
            n = ntok[sid]
            if n % bs == 0:
                table = tables[sid]
                k = len(table)
                start = rs[sid]
                if k == rl[sid]:
                    self._runs.take_block(start + k)
                    rl[sid] = k + 1
                    grown += 1
                table.append(start + k)
            ntok[sid] = n + 1
        self._T += len(seq_ids)
        self._logical += grown
        return []

    # ------------------------------------------------------------------ free
    def free(self, seq_id: int) -> None:
        """Release every block of ``seq_id`` (resident or swapped)."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            n = self._ntok.pop(seq_id)
            if self._paged:
                self._T -= self._release(table, n)
                self._logical -= len(table)
            else:
                res = self._res_len.pop(seq_id)
                self._runs.free(self._res_start.pop(seq_id), res)
                self._T -= n
                self._logical -= res
        elif seq_id in self._host_tables:
            self._release_host(self._host_tables.pop(seq_id))
            del self._ntok[seq_id]
            self._res_len.pop(seq_id, None)
        else:
            raise KVCacheError(f"unknown sequence id {seq_id!r}: not allocated or already freed")
        if self.prefix_cache:
            del self._last_hash[seq_id], self._partial[seq_id]
            self._drop_provisional(seq_id)

    # ------------------------------------------------------------------ swap
    def _distinct(self, tables: list[list[int]]) -> list[int]:
        seen: dict[int, None] = {}
        for t in tables:
            for b in t:
                seen[b] = None
        return list(seen)

    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        """Whether the host pool has room for every distinct device block of ``seq_ids``."""
        self._check_batch(seq_ids)
        return len(self._distinct([self._tables[s] for s in seq_ids])) <= len(self._host.free)

    def swap_out(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Move ``seq_ids`` to host blocks; returns (device, host) copies, sharing kept."""
        self._check_batch(seq_ids)
        host = self._host
        distinct = self._distinct([self._tables[s] for s in seq_ids])
        if len(distinct) > len(host.free):
            raise KVCacheError(
                f"swap-out needs {len(distinct)} host blocks but only {len(host.free)} of "
                f"num_swap_blocks={self.num_swap_blocks} are free"
            )
        mapping = {d: host.take() for d in distinct}
        for sid in seq_ids:
            table = self._tables.pop(sid)
            htable = [mapping[d] for d in table]
            for h in htable:
                host.ref[h] += 1
            self._host_tables[sid] = htable
            if self._paged:
                self._T -= self._release(table, self._ntok[sid])
                self._logical -= len(table)
                self._drop_provisional(sid)
            else:
                res = self._res_len[sid]
                self._runs.free(self._res_start.pop(sid), res)
                self._T -= self._ntok[sid]
                self._logical -= res
        return list(mapping.items())

    def _swap_in_problem(self, seq_ids: Sequence[int], watermark: int) -> str | None:
        if self._paged:
            need = len(self._distinct([self._host_tables[s] for s in seq_ids]))
            avail = self._pool.available()
            if avail - need < watermark:
                return (
                    f"swap-in needs {need} device blocks but {avail} of num_blocks={self.num_blocks} "
                    f"are available (keeping watermark_blocks={watermark})"
                )
            return None
        sizes = [self._res_len[s] for s in seq_ids]
        runs = self._runs
        if runs.free_blocks - sum(sizes) < watermark:
            return (
                f"swap-in needs {sum(sizes)} device blocks but {runs.free_blocks} of "
                f"num_blocks={self.num_blocks} are free (keeping watermark_blocks={watermark})"
            )
        if not runs.fits(sizes):
            self._note_ext_frag()
            return f"swap-in needs contiguous runs of {sizes} blocks; largest free run is {runs.largest()}"
        return None

    def can_swap_in(self, seq_ids: Sequence[int], watermark: int | None = None) -> bool:
        """Whether ``seq_ids`` can come back now, keeping ``watermark`` (default ``watermark_blocks``) free."""
        self._check_batch(seq_ids, swapped=True)
        return self._swap_in_problem(seq_ids, self.watermark_blocks if watermark is None else watermark) is None

    def swap_in(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Bring ``seq_ids`` back to device blocks; returns (host, device) copies, sharing kept."""
        self._check_batch(seq_ids, swapped=True)
        problem = self._swap_in_problem(seq_ids, 0)
        if problem is not None:
            raise KVCacheError(problem)
        bs = self.block_size
        if not self._paged:
            pairs: list[tuple[int, int]] = []
            for sid in seq_ids:
                htable = self._host_tables.pop(sid)
                res = self._res_len[sid]
                start = self._runs.allocate(res)
                assert start is not None  # guaranteed by fits()
                table = list(range(start, start + len(htable)))
                pairs.extend(zip(htable, table))
                self._release_host(htable)
                self._tables[sid] = table
                self._res_start[sid] = start
                self._T += self._ntok[sid]
                self._logical += res
            return pairs
        pool = self._pool
        ref = pool.ref
        mapping = {h: pool.take() for h in self._distinct([self._host_tables[s] for s in seq_ids])}
        for sid in seq_ids:
            htable = self._host_tables.pop(sid)
            n = self._ntok[sid]
            table = [mapping[h] for h in htable]
            for i, d in enumerate(table):
                if ref[d] == 0:
                    self._T += min(bs, n - i * bs)
                ref[d] += 1
            self._release_host(htable)
            self._tables[sid] = table
            self._logical += len(table)
        return list(mapping.items())

    # ------------------------------------------------------------------ queries
    def block_table(self, seq_id: int) -> list[int]:
        """Live device block table of a resident sequence (callers must not mutate it)."""
        return self._table(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        """Slots the sequence holds (resident or swapped)."""
        try:
            return self._ntok[seq_id]
        except KeyError:
            raise KVCacheError(f"unknown sequence id {seq_id!r}: not allocated or already freed") from None

    def is_swapped(self, seq_id: int) -> bool:
        if seq_id not in self._ntok:
            raise KVCacheError(f"unknown sequence id {seq_id!r}: not allocated or already freed")
        return seq_id in self._host_tables

    def seq_ids(self) -> list[int]:
        """Every live sequence id, resident or swapped."""
        return list(self._ntok)

    def clear_prefix_cache(self) -> None:
        """Forget every cached hash; unreferenced cached blocks become truly free."""
        self._pool.clear_cache()
        self._prov.clear()
        self._provisional.clear()

    def take_external_frag(self) -> int:
        """Free slots seen when a contiguous allocation failed for lack of a run since the last call."""
        x, self._ext_frag = self._ext_frag, 0
        return x

    def stats(self) -> KVStats:
        """O(1) snapshot (largest_free_run is O(free runs) for contiguous allocators)."""
        if self._paged:
            pool = self._pool
            free = len(pool.free) + len(pool.lru)
            cached, largest = len(pool.lru), free
        else:
            free, cached, largest = self._runs.free_blocks, 0, self._runs.largest()
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
            swapped_blocks=self.num_swap_blocks - len(self._host.free),
            cow_copies=self._cow_copies,
            prefix_hit_tokens=self._hit_tokens,
            prefix_query_tokens=self._query_tokens,
        )

    def unfilled_tails(self) -> list[tuple[int, int, int]]:
        """(seq_id, num_tokens, capacity_slots) of resident sequences holding unfilled slots; a shared
        partial block is listed once, under its holder with the lowest seq id. O(#sequences)."""
        bs, ntok = self.block_size, self._ntok
        out: list[tuple[int, int, int]] = []
        if not self._paged:
            for sid in self._tables:
                n, res = ntok[sid], self._res_len[sid]
                if res * bs > n:
                    out.append((sid, n, res * bs))
            return out
        ref = self._pool.ref
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

    # ------------------------------------------------------------------ invariants (tests)
    def check_invariants(self) -> None:
        """Recompute everything from the block tables; raise AssertionError on any mismatch."""

        def fail(msg: str) -> None:
            raise AssertionError(f"BlockManager invariant broken: {msg}")

        bs, N = self.block_size, self.num_blocks
        if self._tables.keys() & self._host_tables.keys():
            fail("a sequence is both resident and swapped")
        if set(self._ntok) != self._tables.keys() | self._host_tables.keys():
            fail("token counts do not match the live sequences")
        if self.prefix_cache and not (self._last_hash.keys() == self._partial.keys() == self._ntok.keys()):
            fail("prefix-cache state does not match the live sequences")
        if not self._provisional.keys() <= self._ntok.keys():
            fail("provisional prefix blocks of a dead sequence")
        if not self._prov <= {b for bl in self._provisional.values() for b in bl}:
            fail("a provisional block has no provisional holder")
        T = logical = 0
        for sid, table in self._tables.items():
            n = self._ntok[sid]
            if len(table) != self._blocks(n):
                fail(f"seq {sid}: {len(table)} blocks for {n} tokens")
            if len(set(table)) != len(table):
                fail(f"seq {sid}: a block appears twice in its table")
            if self.prefix_cache and len(self._partial[sid]) != n % bs:
                fail(f"seq {sid}: partial-block tokens {len(self._partial[sid])} != {n % bs}")
        if self._paged:
            pool = self._pool
            holders = [0] * N
            fill: dict[int, int] = {}
            for sid, table in self._tables.items():
                n = self._ntok[sid]
                for i, b in enumerate(table):
                    holders[b] += 1
                    f = min(bs, n - i * bs)
                    if fill.setdefault(b, f) != f:
                        fail(f"block {b} has different fills for its holders")
                logical += len(table)
            T = sum(fill.values())
            free, lru = set(pool.free), set(pool.lru)
            if len(free) != len(pool.free):
                fail("a block is twice in the free queue")
            if free & lru:
                fail("a block is both free and cached")
            for b in range(N):
                if pool.ref[b] != holders[b]:
                    fail(f"block {b}: ref {pool.ref[b]} != {holders[b]} table entries")
                if holders[b] and (b in free or b in lru):
                    fail(f"block {b} is referenced and free")
                if b in free and pool.block_hash[b] is not None:
                    fail(f"free block {b} still has a hash")
                if b in lru and pool.block_hash[b] is None:
                    fail(f"cached block {b} has no hash")
            used = sum(1 for h in holders if h)
            if len(free) + len(lru) + used != N:
                fail(f"free {len(free)} + cached {len(lru)} + used {used} != num_blocks {N}")
            for h, b in pool.by_hash.items():
                if pool.block_hash[b] != h:
                    fail(f"hash map entry for block {b} is stale")
                if holders[b] and fill[b] != bs:
                    fail(f"cached block {b} is not full")
            if sum(1 for h in pool.block_hash if h is not None) != len(pool.by_hash):
                fail("block hashes and hash map disagree")
        else:
            owner: list[int | None] = [None] * N
            for sid, table in self._tables.items():
                start, res = self._res_start[sid], self._res_len[sid]
                if table != list(range(start, start + len(table))) or len(table) > res:
                    fail(f"seq {sid}: table {table} is not a prefix of its reservation")
                for b in range(start, start + res):
                    if owner[b] is not None:
                        fail(f"block {b} reserved by {owner[b]} and {sid}")
                    owner[b] = sid
                T += self._ntok[sid]
                logical += res
            nfree, prev_end = 0, -1
            for s, ln in self._runs.runs():
                if ln < 1 or s <= prev_end:
                    fail(f"free runs overlap, touch or are empty at {s}")
                for b in range(s, s + ln):
                    if owner[b] is not None:
                        fail(f"block {b} is free and reserved by {owner[b]}")
                nfree += ln
                prev_end = s + ln
            used = sum(1 for o in owner if o is not None)
            if nfree != self._runs.free_blocks or nfree + used != N:
                fail(f"free {nfree} + used {used} != num_blocks {N}")
            if self._res_len.keys() != self._ntok.keys():
                fail("reservations do not match the live sequences")
        if T != self._T:
            fail(f"token_slots counter {self._T} != recomputed {T}")
        if logical != self._logical:
            fail(f"logical_blocks counter {self._logical} != recomputed {logical}")
        host = self._host
        hold = [0] * self.num_swap_blocks
        for table in self._host_tables.values():
            for h in table:
                hold[h] += 1
        hfree = set(host.free)
        for h in range(self.num_swap_blocks):
            if host.ref[h] != hold[h] or (hold[h] > 0) == (h in hfree):
                fail(f"host block {h}: ref {host.ref[h]}, holders {hold[h]}, free {h in hfree}")
        if len(hfree) != len(host.free):
            fail("a host block is twice in the free queue")
