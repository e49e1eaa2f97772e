"""Contiguous allocator (Orca-style): each sequence reserves one run of consecutive blocks.

Two rules are arguments: the reservation rule (how many slots a sequence reserves up front, from
its final length and its length at admission: ``reserve_max`` / ``reserve_pow2`` / ``reserve_oracle``)
and the placement (where the reservation goes: ``first_fit`` or ``best_fit`` over the free runs, exact
size; or ``buddy``, the paper's Orca: a buddy block of the next power-of-two size, aligned to it). With
``buddy`` the rounding up is part of the reservation: allocated slots that are never filled, so the
accounting charges them as internal fragmentation (reserved slots are only those below the final
length). A sequence that outgrows its reservation grows in place when it can: first fit / best fit
by one block when the next block is free, buddy by doubling when its buddy is one free block (a
buddy block can only grow into its buddy, or the buddy invariants break); otherwise ``can_append``
is False and the free slots are noted as external fragmentation. (The built-in reservation rules
reserve at least the final length the engine passes, so growth only happens under a rule that
reserves less, or when a caller appends past the final length it gave.)
Forks and swap-ins take a fresh reservation of the same size and copy the filled blocks. No block
is ever shared.
"""

from __future__ import annotations

from collections.abc import Sequence

from .allocators import (
    BUDDY,
    PLACEMENT_RULES,
    PLACEMENTS,
    RESERVATION_RULES,
    BuddyRuns,
    FreeRuns,
    PlacementRule,
    ReservationRule,
    reserve_max,
    takes_prompt_len,
)
from .block_manager import BlockManager
from .errors import KVBadArgument, KVCacheError
from .invariants import check_contiguous
from .stats import AllocStatus


def _named(arg: str, name: str, table: dict, names: tuple | None = None) -> object:
    if name not in table:
        raise KVBadArgument(arg, name, "one of " + ", ".join(names or table) + " (or a callable)")
    return table[name]


def _label(place: object, reserve: str) -> str:
    """The built-in allocator name of a (placement, reservation rule) pair."""
    return f"orca_{reserve}" if place == BUDDY else f"contiguous_{reserve}"


class ContiguousBlockManager(BlockManager):
    """Reservations of ``reserve(final_len, max_model_len, prompt_len)`` slots placed by ``place``.

    ``reserve``: a rule's name (``max``, ``pow2``, ``oracle``, ``pow2_total``: :data:`RESERVATION_RULES`) or
    a callable ``(final_len, max_model_len[, prompt_len]) -> slots``; default: the rule the ``allocator``
    label names (``contiguous_max``, ``orca_pow2`` ...). ``place``: ``first_fit``, ``best_fit``
    (:data:`PLACEMENT_RULES`), ``buddy`` (:class:`BuddyRuns`) or a callable ``(run starts, start -> length,
    blocks) -> start | None``; default: ``buddy`` for an ``orca_*`` label, else ``first_fit``. ``cow`` is
    accepted and ignored (nothing is ever shared); ``prefix_cache`` must be false.
    """

    contiguous_kv = True  # a sequence's blocks are one physical run (kernels and swaps may read it as one)

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        reserve: str | ReservationRule | None = None,
        place: str | PlacementRule | None = None,
        prefix_cache: bool = False,
        **kwargs: object,
    ) -> None:
        if prefix_cache:
            raise KVBadArgument("prefix_cache", True, "false with a contiguous allocator (contiguous reservations "
                                "never share blocks; the prefix cache needs allocator=paged)")
        if place is None:
            place = BUDDY if str(kwargs.get("allocator", "")).startswith("orca_") else "first_fit"
        if isinstance(reserve, str):
            kwargs.setdefault("allocator", _label(place, reserve))
            reserve = _named("reserve", reserve, RESERVATION_RULES)
        kwargs.setdefault("allocator", _label(place, "oracle") if reserve is None else "contiguous")
        if isinstance(place, str) and place != BUDDY:
            place = _named("place", place, PLACEMENT_RULES, PLACEMENTS)
        super().__init__(num_blocks, block_size, **kwargs)  # type: ignore[arg-type]
        self.cow = False
        if reserve is None:
            name = str(self.allocator)
            reserve = RESERVATION_RULES.get(name.split("_", 1)[1] if "_" in name else name)
            if reserve is None:
                raise KVBadArgument("reserve", None, "one of " + ", ".join(RESERVATION_RULES) + " or a callable")
        if reserve is reserve_max and self.max_model_len is None:
            raise KVBadArgument("max_model_len", None, "an integer: reserve=max reserves max_model_len slots")
        self.reserve = reserve
        self._reserve_takes_prompt = takes_prompt_len(reserve)
        self.place = place
        self._runs: FreeRuns | BuddyRuns
        if place == BUDDY:
            self._runs = BuddyRuns(num_blocks)
        else:
            self._runs = FreeRuns(num_blocks, place)  # type: ignore[arg-type]
        self._res_start: dict[int, int] = {}  # resident: first reserved block
        self._res_len: dict[int, int] = {}  # live (resident or swapped): reserved blocks

    # ------------------------------------------------------------------ helpers
    def _reservation(self, final_len: int, n: int) -> int:
        """Blocks a sequence of ``n`` tokens now and ``final_len`` at the end takes: its rule's slots in
        whole blocks, rounded up as the placement does (buddy: to a power of two)."""
        if self._reserve_takes_prompt:
            slots = self.reserve(final_len, self.max_model_len, prompt_len=n)
        else:
            slots = self.reserve(final_len, self.max_model_len)
        return self._runs.size_for(self._blocks(slots))

    def _admission_blocks(self, n: int, eff: int, num_seqs: int) -> tuple[int, int]:
        need = num_seqs * self._reservation(eff, n)
        return need, need

    def _note_ext_frag(self) -> None:
        self._ext_frag = max(self._ext_frag, self._runs.free_blocks * self.block_size)

    def _take_run(self, res: int, what: str) -> int:
        """First block of a fresh run of ``res`` blocks; raises (noting external fragmentation
        when enough blocks are free in total) if there is none."""
        start = self._runs.allocate(res)
        if start is None:
            if self._runs.free_blocks >= res:
                self._note_ext_frag()
            raise KVCacheError(
                f"{what} needs a contiguous run of {res} blocks "
                f"(free blocks={self._runs.free_blocks}, largest run={self._runs.largest()})"
            )
        return start

    def _blocked_growth(self, seq_ids: Sequence[int]) -> int:
        """Sequences whose reservation is full and whose next block is not free."""
        bs, ntok, rs, rl, runs = self.block_size, self._ntok, self._res_start, self._res_len, self._runs
        blocked = 0
        for sid in seq_ids:
            r = rl[sid]
            if ntok[sid] == r * bs and not runs.can_grow(rs[sid], r):
                blocked += 1
        return blocked

    # ------------------------------------------------------------------ admission
    def can_allocate(self, token_ids: Sequence[int], final_len: int, num_seqs: int = 1) -> AllocStatus:
        """OK / LATER (no room or no run now, keeping ``watermark_blocks`` free) / NEVER."""
        n = len(token_ids)
        if self._never_reason(n, final_len, num_seqs) is not None:
            return AllocStatus.NEVER
        res = self._reservation(max(final_len, n), n)
        runs = self._runs
        if runs.free_blocks - num_seqs * res < self.watermark_blocks:
            return AllocStatus.LATER
        if not runs.fits([res] * num_seqs):
            self._note_ext_frag()
            return AllocStatus.LATER
        return AllocStatus.OK

    def allocate(self, seq_id: int, token_ids: Sequence[int], final_len: int) -> int:
        """Reserve a run for ``seq_id``'s final length; returns 0 (no prefix cache)."""
        n = self._admit_check(seq_id, token_ids, final_len)
        res = self._reservation(max(final_len, n), n)
        start = self._take_run(res, f"sequence {seq_id!r}")
        self._tables[seq_id] = list(range(start, start + self._blocks(n)))
        self._res_start[seq_id] = start
        self._res_len[seq_id] = res
        self._ntok[seq_id] = n
        self._T += n
        self._logical += res
        self._query_tokens += n
        return 0

    # ------------------------------------------------------------------ fork (copies)
    def can_fork(self, parent_id: int, num_children: int = 1) -> bool:
        """Whether ``num_children`` reservations like the parent's can be placed now."""
        self._table(parent_id)
        return self._runs.fits([self._res_len[parent_id]] * num_children)

    def can_fork_many(self, parent_ids: Sequence[int]) -> bool:
        """Whether one child of each entry of ``parent_ids`` (repeats allowed) fits now, all together."""
        if not parent_ids:
            return True
        for p in parent_ids:
            self._table(p)
        return self._runs.fits([self._res_len[p] for p in parent_ids])

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """Child gets a reservation like the parent's and copies of its filled blocks (src, dst)."""
        ptable = self._fork_check(parent_id, child_id)
        n = self._ntok[parent_id]
        res = self._res_len[parent_id]
        start = self._take_run(res, f"fork of {parent_id!r}")
        table = list(range(start, start + len(ptable)))
        self._res_start[child_id] = start
        self._res_len[child_id] = res
        self._T += n
        self._logical += res
        self._tables[child_id] = table
        self._ntok[child_id] = n
        return list(zip(ptable, table))

    # ------------------------------------------------------------------ decode
    def can_append(self, seq_ids: Sequence[int]) -> bool:
        """Whether every sequence in ``seq_ids`` can get one more slot, all together."""
        self._check_batch(seq_ids)
        blocked = self._blocked_growth(seq_ids)
        if blocked and self._runs.free_blocks >= blocked:
            self._note_ext_frag()
        return blocked == 0

    def append_slots(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """One slot per sequence, inside its reservation or grown in place; returns []."""
        if len(token_ids) != len(seq_ids):
            raise KVCacheError(f"len(token_ids)={len(token_ids)} must equal len(seq_ids)={len(seq_ids)}")
        self._check_batch(seq_ids)
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
                    new = self._runs.grow(start, k)
                    rl[sid] = new
                    grown += new - k
                table.append(start + k)
            ntok[sid] = n + 1
        self._T += len(seq_ids)
        self._logical += grown
        return []

    # ------------------------------------------------------------------ free / swap hooks
    def _release_resident(self, sid: int, table: list[int], n: int) -> None:
        res = self._res_len[sid]
        self._runs.free(self._res_start.pop(sid), res)
        self._T -= n
        self._logical -= res

    def _forget(self, sid: int) -> None:
        del self._res_len[sid]

    def _swap_in_problem(self, seq_ids: Sequence[int], watermark: int) -> str | None:
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

    def _swap_in_place(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        pairs: list[tuple[int, int]] = []
        for sid in seq_ids:
            htable = self._host_tables.pop(sid)
            res = self._res_len[sid]
            start = self._runs.allocate(res)
            assert start is not None  # guaranteed by fits()
            table = list(range(start, start + len(htable)))
            pairs.extend(zip(htable, table))
            self._swap.release(htable)
            self._tables[sid] = table
            self._res_start[sid] = start
            self._T += self._ntok[sid]
            self._logical += res
        return pairs

    # ------------------------------------------------------------------ queries
    def _free_summary(self) -> tuple[int, int, int]:
        return self._runs.free_blocks, 0, self._runs.largest()

    def unfilled_tails(self) -> list[tuple[int, int, int]]:
        bs, ntok, rl = self.block_size, self._ntok, self._res_len
        out: list[tuple[int, int, int]] = []
        for sid in self._tables:
            n, res = ntok[sid], rl[sid]
            if res * bs > n:
                out.append((sid, n, res * bs))
        return out

    def _check_layout(self) -> tuple[int, int]:
        return check_contiguous(self)

    def ref_count(self, block: int) -> int:
        """1 if ``block`` is in some resident sequence's table, else 0 (nothing is shared)."""
        return sum(1 for t in self._tables.values() if t and t[0] <= block <= t[-1])

    def reservation(self, seq_id: int) -> tuple[int | None, int]:
        """(first reserved block or None if swapped out, reserved blocks) of a live sequence."""
        self.num_tokens(seq_id)
        return self._res_start.get(seq_id), self._res_len[seq_id]

    def free_blocks_in_eviction_order(self) -> list[int]:
        """Free blocks in the order one-block reservations would take them: first fit, the free runs lowest
        first; buddy, the smallest free buddy block first (lowest start on ties), each from its start."""
        runs = self._runs.runs()
        if self._runs.buddy:
            runs.sort(key=lambda r: (r[1], r[0]))
        return [b for s, ln in runs for b in range(s, s + ln)]

    def free_runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free run, by start."""
        return self._runs.runs()
