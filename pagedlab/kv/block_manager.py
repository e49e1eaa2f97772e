"""BlockManager: per-sequence block tables over a paged or contiguous allocator.

Fork with copy-on-write (or eager copies), swap space on a host pool, prefix caching by a
chained hash of full blocks, and O(1) memory accounting (see docs/metrics.md for the metrics).

``BlockManager(...)`` is the one entry point: it validates the arguments and returns the class
composed for them. The parts, one module each:

* ``block_pool``: physical blocks with reference counts, free queue and LRU of cached blocks.
* ``paged``: paged block tables (allocate, append, free, fork with eager copies).
* ``sharing``: fork by reference with copy-on-write, a layer over ``paged``.
* ``prefix_cache``: chained block hashes, registration and hit lookup, a layer over ``paged``.
* ``contiguous`` + ``allocators``: reservations under a reservation rule (max / pow2 / oracle)
  and a placement (first fit or best fit over free runs, or a buddy allocator), both arguments.
* ``swap``: the host pool and the swapped sequences' host tables.
* ``accounting``: the counters and ``stats`` / ``waste_breakdown``.
* ``invariants``: the checker that recomputes everything from the block tables (tests).

This module holds what every policy shares: argument checks, sequence lookup, ``free``, the swap
protocol and the queries. Each policy fills in the hooks at the end of the class.

Conventions worth knowing:

* Block tables list the blocks that hold the sequence's tokens, ``ceil(num_tokens / block_size)``
  entries. For contiguous allocators that is a prefix of the sequence's reservation; the rest of
  the reservation counts as allocated (A) but is not in the table. A contiguous sequence that
  outgrows its reservation grows in place by one block when the next block is free, otherwise
  ``can_append`` is False (and the free slots are noted as external fragmentation). With buddy
  placement a reservation is a power-of-two block aligned to its size and grows by doubling into its
  free buddy.
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

from collections.abc import Sequence

from .accounting import Accounting
from .allocators import ALLOCATORS
from .block_pool import ORDERS
from .errors import KVBadArgument, KVCacheError
from .invariants import check_invariants as _check_invariants
from .stats import AllocStatus
from .swap import SwapSpace


def _check_int(name: str, value: object, lo: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise KVCacheError(f"{name}={value!r} is invalid: must be an integer >= {lo}{why}")


def _validate(num_blocks, block_size, order, num_swap_blocks, max_model_len, watermark_blocks) -> None:
    _check_int("block_size", block_size, 1)
    _check_int("num_blocks", num_blocks, 1, " (the KV budget is smaller than one block)")
    if order not in ORDERS:
        raise KVBadArgument("order", order, "one of " + ", ".join(ORDERS))
    _check_int("num_swap_blocks", num_swap_blocks, 0)
    if max_model_len is not None:
        _check_int("max_model_len", max_model_len, 1)
    _check_int("watermark_blocks", watermark_blocks, 0)
    if watermark_blocks >= num_blocks:
        raise KVCacheError(
            f"watermark_blocks={watermark_blocks} must be < num_blocks={num_blocks} "
            "(otherwise nothing could ever be admitted)"
        )


def implementation(allocator: str, cow: bool = True, prefix_cache: bool = False) -> type[BlockManager]:
    """The composed class ``BlockManager`` builds for these arguments (the only policy switch)."""
    if allocator not in ALLOCATORS:
        raise KVBadArgument("allocator", allocator, "one of " + ", ".join(ALLOCATORS))
    if allocator != "paged":
        from .contiguous import ContiguousBlockManager

        return ContiguousBlockManager
    from .paged import PagedBlockManager
    from .prefix_cache import PrefixCachedCowPaged, PrefixCachedPaged
    from .sharing import CowPagedBlockManager

    if prefix_cache:
        return PrefixCachedCowPaged if cow else PrefixCachedPaged
    return CowPagedBlockManager if cow else PagedBlockManager


def paged_manager(num_blocks: int, block_size: int, *, cow: bool = True, prefix_cache: bool = False,
                  **kwargs: object) -> BlockManager:
    """``allocator=paged``: block tables over fixed-size blocks, with the sharing layer (``cow``) and the
    prefix-cache layer (``prefix_cache``) composed in as asked. ``kwargs``: see :class:`BlockManager`."""
    impl = implementation("paged", bool(cow), bool(prefix_cache))
    return impl(num_blocks, block_size, allocator="paged", cow=cow, prefix_cache=prefix_cache, **kwargs)  # type: ignore[arg-type]


class BlockManager(Accounting):
    """KV-cache memory manager; see the module docstring (the metrics: docs/metrics.md).

    ``BlockManager(...)`` returns an instance of the subclass composed for the arguments.
    """

    contiguous_kv = False  # True where each sequence's blocks form one physical run (contiguous allocators)

    def __new__(cls, *args: object, **kwargs: object) -> BlockManager:  # noqa: PYI034
        """``BlockManager(...)`` builds the class composed for its arguments (checked in ``__init__``)."""
        impl = cls if cls is not BlockManager else implementation(
            str(kwargs.get("allocator", "paged")), bool(kwargs.get("cow", True)), bool(kwargs.get("prefix_cache", False)))
        return object.__new__(impl)

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
        _validate(num_blocks, block_size, order, num_swap_blocks, max_model_len, watermark_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.allocator = allocator
        self.order = order
        self.cow = bool(cow)
        self.prefix_cache = bool(prefix_cache)
        self.num_swap_blocks = num_swap_blocks
        self.max_model_len = max_model_len
        self.watermark_blocks = watermark_blocks
        self._swap = SwapSpace(num_swap_blocks)
        self._ntok: dict[int, int] = {}  # every live sequence (resident or swapped) -> tokens
        self._tables: dict[int, list[int]] = {}  # resident sequences -> device block table
        self._host_tables = self._swap.tables  # swapped sequences -> host block table
        self._init_counters()

    # ------------------------------------------------------------------ helpers
    def _blocks(self, slots: int) -> int:
        return -(-slots // self.block_size)

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

    def _never_reason(self, n: int, final_len: int, num_seqs: int) -> str | None:
        """Why a group of ``num_seqs`` sequences (``n`` tokens now) can never be admitted, or None."""
        if n < 1:
            raise KVCacheError("token_ids is empty: a sequence needs at least one token")
        _check_int("num_seqs", num_seqs, 1)
        eff = max(final_len, n)
        mml = self.max_model_len
        if mml is not None and eff > mml:
            return f"final_len={eff} exceeds max_model_len={mml}"
        final, now = self._admission_blocks(n, eff, num_seqs)
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

    def _admit_check(self, seq_id: int, token_ids: Sequence[int], final_len: int) -> int:
        """Raise unless ``seq_id`` is new and could ever fit; return its token count."""
        if seq_id in self._ntok:
            raise KVCacheError(f"sequence id {seq_id!r} already exists (duplicate seq id)")
        n = len(token_ids)
        reason = self._never_reason(n, final_len, 1)
        if reason is not None:
            raise KVCacheError(reason)
        return n

    def _fork_check(self, parent_id: int, child_id: int) -> list[int]:
        """The parent's table; raise if the parent is not resident or the child exists."""
        ptable = self._table(parent_id)
        if child_id in self._ntok:
            raise KVCacheError(f"child sequence id {child_id!r} already exists (duplicate seq id)")
        return ptable

    # ------------------------------------------------------------------ free
    def free(self, seq_id: int) -> None:
        """Release every block of ``seq_id`` (resident or swapped)."""
        table = self._tables.pop(seq_id, None)
        if table is not None:
            self._release_resident(seq_id, table, self._ntok.pop(seq_id))
        elif seq_id in self._host_tables:
            self._swap.release(self._host_tables.pop(seq_id))
            del self._ntok[seq_id]
        else:
            raise KVCacheError(f"unknown sequence id {seq_id!r}: not allocated or already freed")
        self._forget(seq_id)

    # ------------------------------------------------------------------ swap
    def can_swap_out(self, seq_ids: Sequence[int]) -> bool:
        """Whether the host pool has room for every distinct device block of ``seq_ids``."""
        self._check_batch(seq_ids)
        return len(self._swap.distinct([self._tables[s] for s in seq_ids])) <= self._swap.free_blocks()

    def swap_out(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Move ``seq_ids`` to host blocks; returns (device, host) copies, sharing kept."""
        self._check_batch(seq_ids)
        swap, tables = self._swap, self._tables
        mapping = swap.map_out(swap.distinct([tables[s] for s in seq_ids]))
        for sid in seq_ids:
            table = tables.pop(sid)
            swap.hold(sid, [mapping[d] for d in table])
            self._release_resident(sid, table, self._ntok[sid])
        return list(mapping.items())

    def can_swap_in(self, seq_ids: Sequence[int], watermark: int | None = None) -> bool:
        """Whether ``seq_ids`` can come back now, keeping ``watermark`` (default ``watermark_blocks``) free."""
        self._check_batch(seq_ids, swapped=True)
        return (
            self._swap_in_problem(seq_ids, self.watermark_blocks if watermark is None else watermark) is None
        )

    def swap_in(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Bring ``seq_ids`` back to device blocks; returns (host, device) copies, sharing kept."""
        self._check_batch(seq_ids, swapped=True)
        problem = self._swap_in_problem(seq_ids, 0)
        if problem is not None:
            raise KVCacheError(problem)
        return self._swap_in_place(seq_ids)

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

    def host_block_table(self, seq_id: int) -> list[int]:
        """Host block table of a swapped-out sequence (read-only)."""
        t = self._host_tables.get(seq_id)
        if t is None:
            raise KVCacheError(f"sequence {seq_id!r} is not swapped out")
        return list(t)

    def host_ref_count(self, block: int) -> int:
        """Host-table entries pointing at host block ``block``."""
        return self._swap.pool.ref[block]

    def clear_prefix_cache(self) -> None:
        """Forget every cached hash; unreferenced cached blocks become truly free (no-op without a
        prefix cache)."""

    def block_hash(self, block: int) -> int | None:
        """Prefix-cache hash of device block ``block`` (None: not registered / no prefix cache)."""
        return None

    def check_invariants(self) -> None:
        """Recompute everything from the block tables; raise AssertionError on any mismatch."""
        _check_invariants(self)

    # ------------------------------------------------------------------ the allocation contract
    # Every policy (paged.py, contiguous.py and their layers) implements these; the scheduler uses them.
    def can_allocate(self, token_ids: Sequence[int], final_len: int, num_seqs: int = 1) -> AllocStatus:
        """OK / LATER (no room now, keeping ``watermark_blocks`` free) / NEVER (can never fit) for a
        group of ``num_seqs`` sequences that start as ``token_ids`` and grow to ``final_len``."""
        raise NotImplementedError

    def allocate(self, seq_id: int, token_ids: Sequence[int], final_len: int) -> int:
        """Give ``seq_id`` slots for all its tokens; return the tokens served by the prefix cache."""
        raise NotImplementedError

    def can_fork(self, parent_id: int, num_children: int = 1) -> bool:
        """Whether ``num_children`` forks of ``parent_id`` fit now."""
        raise NotImplementedError

    def can_fork_many(self, parent_ids: Sequence[int]) -> bool:
        """Whether one child of each entry of ``parent_ids`` (repeats allowed) fits now, all together."""
        raise NotImplementedError

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """Child gets the parent's tokens: shared (returns []) or copied (the (src, dst) copies)."""
        raise NotImplementedError

    def can_append(self, seq_ids: Sequence[int]) -> bool:
        """Whether every sequence in ``seq_ids`` can get one more slot, all together."""
        raise NotImplementedError

    def append_slots(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """One slot per sequence; returns the copy-on-write copies (src, dst) it needs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ policy hooks
    def _admission_blocks(self, n: int, eff: int, num_seqs: int) -> tuple[int, int]:
        """(blocks the group holds at its final length, blocks it takes at admission)."""
        raise NotImplementedError

    def _release_resident(self, sid: int, table: list[int], n: int) -> None:
        """Drop the device blocks of resident ``sid`` (table already popped; its reservation and
        token count are kept for a swap-out)."""
        raise NotImplementedError

    def _forget(self, sid: int) -> None:
        """Drop what is left of freed ``sid`` (its reservation, its prefix-cache state)."""

    def _swap_in_problem(self, seq_ids: Sequence[int], watermark: int) -> str | None:
        raise NotImplementedError

    def _check_layout(self) -> tuple[int, int]:
        """Check the allocator's own state; return recomputed (token slots, logical blocks)."""
        raise NotImplementedError

    def _swap_in_place(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        raise NotImplementedError

    def ref_count(self, block: int) -> int:
        """Block-table entries pointing at device block ``block``."""
        raise NotImplementedError

    def free_blocks_in_eviction_order(self) -> list[int]:
        """Every device block a new allocation could take, in the order it would take them."""
        raise NotImplementedError
