"""Contiguous reservation policies (Orca-style) and the first-fit free-run map they allocate from."""

from __future__ import annotations

from bisect import bisect_left, insort

ALLOCATORS = ("paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle")


def reservation_slots(allocator: str, final_len: int, max_model_len: int | None) -> int:
    """Slots one sequence reserves up front (before rounding to whole blocks).

    max: ``max_model_len``; pow2: the next power of two >= ``final_len``, capped at ``max_model_len``
    when one is given (a system never reserves beyond its model's limit); oracle: ``final_len``.
    """
    if allocator == "contiguous_max":
        assert max_model_len is not None
        return max(max_model_len, final_len)
    if allocator == "contiguous_pow2":
        p = 1 << (final_len - 1).bit_length()
        return max(final_len, min(p, max_model_len)) if max_model_len else p
    return final_len


class FreeRuns:
    """Free blocks as maximal runs of consecutive block ids; first-fit allocation from low ids."""

    def __init__(self, num_blocks: int) -> None:
        self._starts: list[int] = [0] if num_blocks else []  # sorted run starts
        self._len: dict[int, int] = {0: num_blocks} if num_blocks else {}  # start -> length
        self._end: dict[int, int] = {num_blocks: 0} if num_blocks else {}  # exclusive end -> start
        self.free_blocks = num_blocks

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
        """First fit: start of ``n`` consecutive blocks taken from the lowest run that fits, or None."""
        for s in self._starts:
            if self._len[s] >= n:
                rest = self._remove(s) - n
                if rest:
                    self._add(s + n, rest)
                self.free_blocks -= n
                return s
        return None

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
        """Whether first fit could place every reservation in ``sizes`` (in order) right now."""
        lens = [self._len[s] for s in self._starts]
        for size in sizes:
            for i, free in enumerate(lens):
                if free >= size:
                    lens[i] = free - size
                    break
            else:
                return False
        return True

    def largest(self) -> int:
        return max(self._len.values(), default=0)

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of every free run, by start."""
        return [(s, self._len[s]) for s in self._starts]
