"""Contiguous (Orca-style) building blocks: reservation rules, placement rules, the free-run map.

A reservation rule says how many slots a sequence reserves up front; a placement rule says which
free run a reservation goes into. ``ContiguousBlockManager`` takes one of each as arguments.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Mapping, Sequence

ALLOCATORS = ("paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle")

# (final_len, max_model_len) -> slots reserved up front (before rounding to whole blocks)
ReservationRule = Callable[[int, "int | None"], int]
# (run starts in id order, start -> run length, blocks wanted) -> start of the chosen run, or None
PlacementRule = Callable[[Sequence[int], Mapping[int, int], int], "int | None"]


def reserve_max(final_len: int, max_model_len: int | None) -> int:
    """``max_model_len`` slots (the sequence may grow to the model's limit)."""
    if max_model_len is None:
        raise ValueError("the 'max' reservation rule needs max_model_len")
    return max(max_model_len, final_len)


def reserve_pow2(final_len: int, max_model_len: int | None) -> int:
    """The next power of two >= ``final_len``, capped at ``max_model_len`` when one is given (a
    system never reserves beyond its model's limit)."""
    p = 1 << (final_len - 1).bit_length()
    return max(final_len, min(p, max_model_len)) if max_model_len else p


def reserve_oracle(final_len: int, max_model_len: int | None) -> int:
    """Exactly ``final_len`` slots (the final length is known in advance)."""
    return final_len


RESERVATION_RULES: dict[str, ReservationRule] = {"max": reserve_max, "pow2": reserve_pow2, "oracle": reserve_oracle}


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


class FreeRuns:
    """Free blocks as maximal runs of consecutive block ids; ``place`` picks the run to allocate from."""

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
