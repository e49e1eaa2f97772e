"""Contiguous (Orca-style) building blocks: reservation rules, placements, the free-space structures.

A reservation rule says how many slots a sequence reserves up front; a placement says where in the
pool a reservation goes. ``ContiguousBlockManager`` takes one of each as arguments. Two free-space
structures hold the free blocks:

* :class:`FreeRuns`: maximal runs of consecutive free blocks; a placement rule (``first_fit``,
  ``best_fit`` or a callable) picks the run an exact-size reservation is cut from.
* :class:`BuddyRuns` (``place="buddy"``, the paper's Orca): a binary buddy allocator. A reservation of
  ``n`` blocks takes a free buddy block of ``next_pow2(n)`` blocks aligned to its size, split from the
  smallest larger free buddy; on free it coalesces with its buddy as long as the buddy is free.

Both answer the same questions (``allocate``, ``free``, ``fits``, ``size_for``, ``can_grow``/``grow``,
``largest``, ``runs``), so the contiguous manager does not know which one it has.
"""

from __future__ import annotations

import inspect
from bisect import bisect_left, insort
from collections.abc import Callable, Mapping, Sequence

# BlockManager(allocator=NAME) builds these; contiguous_* place exact reservations first fit, orca_* place
# them with the buddy allocator (the paper's Orca baselines)
ALLOCATORS = ("paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle", "orca_max", "orca_pow2",
              "orca_oracle")

# (final_len, max_model_len[, prompt_len]) -> slots reserved up front (before rounding to whole blocks).
# prompt_len is the sequence's token count at admission; a rule that does not take it is called with two.
ReservationRule = Callable[..., int]
# (run starts in id order, start -> run length, blocks wanted) -> start of the chosen run, or None
PlacementRule = Callable[[Sequence[int], Mapping[int, int], int], "int | None"]


def next_pow2(x: int) -> int:
    """The smallest power of two >= ``x`` (1 for ``x <= 1``)."""
    return 1 << (x - 1).bit_length() if x > 1 else 1


def reserve_max(final_len: int, max_model_len: int | None, prompt_len: int | None = None) -> int:
    """Orca (Max): ``max_model_len`` slots (the sequence may grow to the model's limit)."""
    if max_model_len is None:
        raise ValueError("the 'max' reservation rule needs max_model_len")
    return max(max_model_len, final_len)


def reserve_pow2(final_len: int, max_model_len: int | None, prompt_len: int | None = None) -> int:
    """Orca (Pow2), the paper's rule: the prompt plus the true output length rounded up to a power of two
    (output 25 -> 32 positions), capped at ``max_model_len`` when one is given (a system never reserves
    beyond its model's limit). ``prompt_len``: the tokens held at admission (a re-admitted sequence's
    generated tokens count as prompt); without it the whole final length is rounded up."""
    if prompt_len is None:
        return reserve_pow2_total(final_len, max_model_len)
    out = final_len - prompt_len
    want = prompt_len + (next_pow2(out) if out > 0 else 0)
    return max(final_len, min(want, max_model_len)) if max_model_len else want


def reserve_pow2_total(final_len: int, max_model_len: int | None, prompt_len: int | None = None) -> int:
    """The whole final length (prompt + output) rounded up to a power of two, capped at ``max_model_len``
    (pagedlab's ``pow2`` before it followed the paper; kept as ``reserve: pow2_total``)."""
    p = next_pow2(final_len)
    return max(final_len, min(p, max_model_len)) if max_model_len else p


def reserve_oracle(final_len: int, max_model_len: int | None, prompt_len: int | None = None) -> int:
    """Orca (Oracle): exactly ``final_len`` slots (the final length is known in advance)."""
    return final_len


RESERVATION_RULES: dict[str, ReservationRule] = {
    "max": reserve_max, "pow2": reserve_pow2, "oracle": reserve_oracle, "pow2_total": reserve_pow2_total}


def takes_prompt_len(rule: ReservationRule) -> bool:
    """Whether a reservation rule accepts the ``prompt_len`` argument (built-ins do; a user's
    ``(final_len, max_model_len)`` function is called with two)."""
    try:
        params = inspect.signature(rule).parameters
    except (TypeError, ValueError):
        return False
    return "prompt_len" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def first_fit(starts: Sequence[int], length: Mapping[int, int], n: int) -> int | None:
    """The lowest run that holds ``n`` blocks."""
    for s in starts:
        if length[s] >= n:
            return s
    return None


def best_fit(starts: Sequence[int], length: Mapping[int, int], n: int) -> int | None:
    """The smallest run that holds ``n`` blocks (lowest start on ties)."""
    best = None
    for s in starts:
        ln = length[s]
        if ln >= n and (best is None or ln < length[best]):
            best = s
    return best


PLACEMENT_RULES: dict[str, PlacementRule] = {"first_fit": first_fit, "best_fit": best_fit}
BUDDY = "buddy"  # place=buddy: the BuddyRuns free-space structure instead of a placement rule over FreeRuns
PLACEMENTS = (*PLACEMENT_RULES, BUDDY)  # every placement name ContiguousBlockManager(place=...) takes


class FreeRuns:
    """Free blocks as maximal runs of consecutive block ids; ``place`` picks the run to allocate from.
    A reservation takes exactly the blocks it asks for."""

    buddy = False

    def __init__(self, num_blocks: int, place: PlacementRule = first_fit) -> None:
        self._starts: list[int] = [0] if num_blocks else []  # sorted run starts
        self._len: dict[int, int] = {0: num_blocks} if num_blocks else {}  # start -> length
        self._end: dict[int, int] = {num_blocks: 0} if num_blocks else {}  # exclusive end -> start
        self.free_blocks = num_blocks
        self.place = place

    def _add(self, s: int, n: int) -> None:
        self._len[s] = n
        self._end[s + n] = s
        insort(self._starts, s)

    def _remove(self, s: int) -> int:
        n = self._len.pop(s)
        del self._end[s + n]
        del self._starts[bisect_left(self._starts, s)]
        return n

    def allocate(self, n: int) -> int | None:
        """Start of ``n`` consecutive blocks taken from the run the placement rule picks, or None."""
        s = self.place(self._starts, self._len, n)
        if s is None:
            return None
        rest = self._remove(s) - n
        if rest:
            self._add(s + n, rest)
        self.free_blocks -= n
        return s

    def take_block(self, b: int) -> bool:
        """Take block ``b`` if it starts a free run (growing a reservation in place)."""
        if b not in self._len:
            return False
        rest = self._remove(b) - 1
        if rest:
            self._add(b + 1, rest)
        self.free_blocks -= 1
        return True

    def is_run_start(self, b: int) -> bool:
        return b in self._len

    @staticmethod
    def size_for(n: int) -> int:
        """Blocks a reservation of ``n`` blocks takes: exactly ``n``."""
        return n

    def can_grow(self, start: int, size: int) -> bool:
        """Whether the reservation ``start..start+size-1`` can grow in place: its next block is free."""
        return start + size in self._len

    def grow(self, start: int, size: int) -> int:
        """Grow the reservation by its next block (check :meth:`can_grow` first); returns its new size."""
        self.take_block(start + size)
        return size + 1

    def free(self, s: int, n: int) -> None:
        """Return blocks ``s..s+n-1``, coalescing with neighbouring runs."""
        self.free_blocks += n
        left = self._end.get(s)
        if left is not None:
            n += self._remove(left)
            s = left
        if s + n in self._len:
            n += self._remove(s + n)
        self._add(s, n)

    def fits(self, sizes: list[int]) -> bool:
        """Whether the placement rule could place every reservation in ``sizes`` (in order) now.
        A simulated placement shrinks its run in place; the rules only look at run lengths."""
        starts, lens, place = self._starts, dict(self._len), self.place
        for size in sizes:
            s = place(starts, lens, size)
            if s is None:
                return False
            lens[s] -= size
        return True

    def largest(self) -> int:
        return max(self._len.values(), default=0)

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free run, by start."""
        return [(s, self._len[s]) for s in self._starts]


class BuddyRuns:
    """Free blocks as a binary buddy allocator (the paper's Orca places its reservations this way).

    A block of order ``k`` is ``2**k`` blocks starting at a multiple of ``2**k``; its buddy starts at
    ``start ^ 2**k``. The pool need not be a power of two: it starts as the maximal aligned buddies of
    ``num_blocks`` (its binary digits, largest first: 983 = 512 + 256 + 128 + 64 + 16 + 4 + 2 + 1), and two
    free buddies merge only into a block that ends inside the pool, which is exactly a block inside one of
    those. ``allocate(n)`` takes a block of order ``ceil(log2 n)``: the lowest free block of that order, or
    the lowest of the smallest larger order split in halves (the upper halves stay free). ``free`` gives a
    block back and merges it with its buddy while the buddy is free and of the same order, so free blocks
    are always maximal. A reservation rounded up to its buddy size holds the rounding as allocated slots.
    """

    buddy = True

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: list[list[int]] = [[] for _ in range(max(1, num_blocks.bit_length()))]  # order -> starts
        self._order: dict[int, int] = {}  # free block start -> its order
        self.free_blocks = num_blocks
        start = 0
        for k in reversed(range(num_blocks.bit_length())):
            if num_blocks >> k & 1:
                self._free[k].append(start)
                self._order[start] = k
                start += 1 << k

    @staticmethod
    def size_for(n: int) -> int:
        """Blocks a reservation of ``n`` blocks takes: the next power of two."""
        return next_pow2(n)

    def _push(self, s: int, k: int) -> None:
        insort(self._free[k], s)
        self._order[s] = k

    def _pop(self, s: int, k: int) -> None:
        lst = self._free[k]
        del lst[bisect_left(lst, s)]
        del self._order[s]

    def allocate(self, n: int) -> int | None:
        """Start of a buddy block of ``next_pow2(n)`` blocks, or None if no free block is that large."""
        k = (n - 1).bit_length() if n > 1 else 0
        free = self._free
        for j in range(k, len(free)):
            if free[j]:
                break
        else:
            return None
        s = free[j].pop(0)
        del self._order[s]
        while j > k:  # split: keep the lower half, the upper half stays free
            j -= 1
            self._push(s + (1 << j), j)
        self.free_blocks -= 1 << k
        return s

    def free(self, s: int, n: int) -> None:
        """Give back the buddy block of ``n`` (a power of two) blocks at ``s``, merging with free buddies."""
        k = n.bit_length() - 1
        self.free_blocks += n
        order = self._order
        while True:
            b = s ^ (1 << k)
            if order.get(b) != k:
                break
            self._pop(b, k)
            s = min(s, b)
            k += 1
        self._push(s, k)

    def fits(self, sizes: list[int]) -> bool:
        """Whether every reservation in ``sizes`` (blocks, in order) could be placed now: placement only
        depends on how many free blocks each order has, so counts are split as allocate would."""
        counts = [len(lst) for lst in self._free]
        for size in sizes:
            k = (size - 1).bit_length() if size > 1 else 0
            for j in range(k, len(counts)):
                if counts[j]:
                    break
            else:
                return False
            counts[j] -= 1
            for i in range(k, j):
                counts[i] += 1
        return True

    def can_grow(self, start: int, size: int) -> bool:
        """Whether the block ``start`` of ``size`` blocks can double in place: it is the lower half of its
        parent and its buddy (the upper half) is one free block of the same order."""
        return start & size == 0 and self._order.get(start + size) == size.bit_length() - 1

    def grow(self, start: int, size: int) -> int:
        """Double the block in place by taking its free buddy (check :meth:`can_grow`); returns its new
        size."""
        self._pop(start + size, size.bit_length() - 1)
        self.free_blocks -= size
        return 2 * size

    def largest(self) -> int:
        for k in range(len(self._free) - 1, -1, -1):
            if self._free[k]:
                return 1 << k
        return 0

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free buddy block, by start (neighbours that are not buddies may touch)."""
        return sorted((s, 1 << k) for s, k in self._order.items())

    def free_orders(self) -> dict[int, int]:
        """Free block start -> order (for the invariant checker)."""
        return dict(self._order)
