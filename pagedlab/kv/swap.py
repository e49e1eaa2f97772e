"""Swap space: the host block pool and the host block tables of swapped-out sequences.

The device side of a swap (which device blocks are released, where a sequence lands on swap-in)
belongs to the allocator; this part only maps device blocks to host blocks and back, keeping
blocks shared inside a swapped group shared on the host.
"""

from __future__ import annotations

from .block_pool import BlockPool
from .errors import KVCacheError


class SwapSpace:
    """``num_swap_blocks`` host blocks with reference counts, and ``tables``: seq id -> host table."""

    def __init__(self, num_swap_blocks: int) -> None:
        self.num_swap_blocks = num_swap_blocks
        self.pool = BlockPool(num_swap_blocks, "lifo", "host")
        self.tables: dict[int, list[int]] = {}

    @staticmethod
    def distinct(tables: list[list[int]]) -> list[int]:
        """Blocks of ``tables`` in first-seen order, each once."""
        seen: dict[int, None] = {}
        for t in tables:
            for b in t:
                seen[b] = None
        return list(seen)

    def free_blocks(self) -> int:
        return len(self.pool.free)

    def used_blocks(self) -> int:
        return self.num_swap_blocks - len(self.pool.free)

    def map_out(self, device_blocks: list[int]) -> dict[int, int]:
        """A fresh host block for each distinct device block (device -> host); raises if no room."""
        free = self.pool.free
        if len(device_blocks) > len(free):
            raise KVCacheError(
                f"swap-out needs {len(device_blocks)} host blocks but only {len(free)} of "
                f"num_swap_blocks={self.num_swap_blocks} are free"
            )
        take = self.pool.take
        return {d: take() for d in device_blocks}

    def hold(self, sid: int, htable: list[int]) -> None:
        """``sid`` is swapped out into host blocks ``htable``."""
        ref = self.pool.ref
        for h in htable:
            ref[h] += 1
        self.tables[sid] = htable

    def release(self, htable: list[int]) -> None:
        """Drop one reference per entry of a host table that left the host."""
        pool = self.pool
        ref = pool.ref
        for h in htable:
            ref[h] -= 1
            if ref[h] == 0:
                pool.release(h)
