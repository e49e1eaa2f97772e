"""The invariant checker: recompute a block manager's state from its block tables (tests only).

``check_invariants(m)`` raises AssertionError naming the first mismatch. It reads the manager's
internals (it is part of the package), dispatching on the allocator's layout: paged block
tables over a ``BlockPool``, or contiguous reservations over ``FreeRuns`` (maximal free runs) or
``BuddyRuns`` (aligned power-of-two buddy blocks, maximally coalesced).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .allocators import BuddyRuns
    from .block_manager import BlockManager
    from .contiguous import ContiguousBlockManager
    from .paged import PagedBlockManager
    from .prefix_cache import PrefixCacheLayer


def fail(msg: str) -> None:
    raise AssertionError(f"BlockManager invariant broken: {msg}")


def check_invariants(m: BlockManager) -> None:
    """Tables, the allocator's layout, the counters and the host pool."""
    check_tables(m)
    T, logical = m._check_layout()  # type: ignore[attr-defined]
    if T != m._T:
        fail(f"token_slots counter {m._T} != recomputed {T}")
    if logical != m._logical:
        fail(f"logical_blocks counter {m._logical} != recomputed {logical}")
    check_host(m)


def check_tables(m: BlockManager) -> None:
    """Every live sequence is resident or swapped, and each table has one block per started block."""
    if m._tables.keys() & m._host_tables.keys():
        fail("a sequence is both resident and swapped")
    if set(m._ntok) != m._tables.keys() | m._host_tables.keys():
        fail("token counts do not match the live sequences")
    for sid, table in m._tables.items():
        n = m._ntok[sid]
        if len(table) != m._blocks(n):
            fail(f"seq {sid}: {len(table)} blocks for {n} tokens")
        if len(set(table)) != len(table):
            fail(f"seq {sid}: a block appears twice in its table")


def check_paged(m: PagedBlockManager) -> tuple[int, int]:
    """Ref counts equal table entries, every block is in exactly one state, hashes are consistent;
    returns the recomputed (token slots, logical blocks)."""
    bs, N, pool = m.block_size, m.num_blocks, m._pool
    holders = [0] * N
    fill: dict[int, int] = {}
    logical = 0
    for sid, table in m._tables.items():
        n = m._ntok[sid]
        for i, b in enumerate(table):
            holders[b] += 1
            f = min(bs, n - i * bs)
            if fill.setdefault(b, f) != f:
                fail(f"block {b} has different fills for its holders")
        logical += len(table)
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
    return sum(fill.values()), logical


def check_contiguous(m: ContiguousBlockManager) -> tuple[int, int]:
    """Tables are prefixes of disjoint reservations, the free space is disjoint from them and in the
    free-space structure's own form; returns the recomputed (token slots, logical blocks)."""
    N = m.num_blocks
    owner: list[int | None] = [None] * N
    T = logical = 0
    buddy = m._runs.buddy
    for sid, table in m._tables.items():
        start, res = m._res_start[sid], m._res_len[sid]
        if table != list(range(start, start + len(table))) or len(table) > res:
            fail(f"seq {sid}: table {table} is not a prefix of its reservation")
        if buddy and (res & (res - 1) or start % res or start + res > N):
            fail(f"seq {sid}: reservation of {res} blocks at {start} is not an aligned power-of-two "
                 "buddy block")
        for b in range(start, start + res):
            if owner[b] is not None:
                fail(f"block {b} reserved by {owner[b]} and {sid}")
            owner[b] = sid
        T += m._ntok[sid]
        logical += res
    for sid, res in m._res_len.items():
        if buddy and res & (res - 1):
            fail(f"seq {sid}: reservation of {res} blocks is not a power of two")
    nfree, prev_end = 0, -1
    for s, ln in m._runs.runs():
        if ln < 1 or s < prev_end or (not buddy and s == prev_end):
            fail(f"free runs overlap, touch or are empty at {s}")
        for b in range(s, s + ln):
            if owner[b] is not None:
                fail(f"block {b} is free and reserved by {owner[b]}")
        nfree += ln
        prev_end = s + ln
    if buddy:
        check_buddies(m._runs)  # type: ignore[arg-type]
    used = sum(1 for o in owner if o is not None)
    if nfree != m._runs.free_blocks or nfree + used != N:
        fail(f"free {nfree} + used {used} != num_blocks {N}")
    if m._res_len.keys() != m._ntok.keys():
        fail("reservations do not match the live sequences")
    return T, logical


def check_buddies(runs: BuddyRuns) -> None:
    """Every free block is an aligned power-of-two block inside the pool, listed once under its order, and
    none has a free buddy of its own order (free blocks are maximally coalesced)."""
    orders = runs.free_orders()
    listed = [(s, k) for k, starts in enumerate(runs._free) for s in starts]
    if sorted(listed) != sorted(orders.items()) or any(lst != sorted(lst) for lst in runs._free):
        fail("buddy free lists and the free-block map disagree (or a list is unsorted)")
    for s, k in orders.items():
        size = 1 << k
        if s % size or s + size > runs.num_blocks:
            fail(f"free buddy block of order {k} at {s} is not aligned or leaves the pool")
        if orders.get(s ^ size) == k:
            fail(f"free buddies {min(s, s ^ size)} and {max(s, s ^ size)} of order {k} were not merged")


def check_prefix_cache(m: PrefixCacheLayer) -> None:
    """Hash chains exist exactly for the live sequences; provisional blocks have live holders."""
    pc, bs = m._pc, m.block_size
    if not (pc.last_hash.keys() == pc.partial.keys() == m._ntok.keys()):
        fail("prefix-cache state does not match the live sequences")
    if not pc.provisional.keys() <= m._ntok.keys():
        fail("provisional prefix blocks of a dead sequence")
    if not pc.prov <= {b for bl in pc.provisional.values() for b in bl}:
        fail("a provisional block has no provisional holder")
    for sid in m._tables:
        if len(pc.partial[sid]) != m._ntok[sid] % bs:
            fail(f"seq {sid}: partial-block tokens {len(pc.partial[sid])} != {m._ntok[sid] % bs}")


def check_host(m: BlockManager) -> None:
    """Host ref counts equal host-table entries; a host block is free iff nobody holds it."""
    host, n = m._swap.pool, m.num_swap_blocks
    hold = [0] * n
    for table in m._host_tables.values():
        for h in table:
            hold[h] += 1
    hfree = set(host.free)
    for h in range(n):
        if host.ref[h] != hold[h] or (hold[h] > 0) == (h in hfree):
            fail(f"host block {h}: ref {host.ref[h]}, holders {hold[h]}, free {h in hfree}")
    if len(hfree) != len(host.free):
        fail("a host block is twice in the free queue")
