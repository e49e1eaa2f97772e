"""Physical blocks of one memory (device or host): ref counts, free queue, prefix-cache map + LRU."""

from __future__ import annotations

from collections import OrderedDict, deque

from .errors import KVCacheError

ORDERS = ("lifo", "fifo")


class BlockPool:
    """Blocks ``0..num_blocks-1``, each in exactly one state.

    * free: in ``free`` (ref 0, no hash). ``lifo`` reuses the most recently freed block first,
      ``fifo`` the least recently freed; both hand out 0, 1, 2, ... from a fresh pool.
    * cached: in ``lru`` (ref 0, holds a full block registered in ``by_hash``); still reusable by a
      prefix hit, evicted oldest-first (dropping its hash) when no truly free block is left.
    * used: ``ref > 0`` (number of block-table entries pointing at it).

    The block manager's hot path reads ``ref``, ``free`` and ``pop`` directly.
    """

    def __init__(self, num_blocks: int, order: str = "lifo", name: str = "device") -> None:
        self.num_blocks = num_blocks
        self.name = name
        self.ref = [0] * num_blocks
        lifo = order == "lifo"
        self.lifo = lifo
        self.free: deque[int] = deque(reversed(range(num_blocks)) if lifo else range(num_blocks))
        self.pop = self.free.pop if lifo else self.free.popleft
        self.block_hash: list[int | None] = [None] * num_blocks
        self.by_hash: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()

    def available(self) -> int:
        """Blocks that ``take`` can hand out: truly free + evictable cached."""
        return len(self.free) + len(self.lru)

    def eviction_order(self) -> list[int]:
        """Every available block in the order ``take`` hands them out: truly free ones first (in
        ``order``), then cached ones LRU-oldest first."""
        free = list(reversed(self.free)) if self.lifo else list(self.free)
        return free + list(self.lru)

    def take(self) -> int:
        """Remove one block from the available set (free first, else evict LRU-oldest); ref untouched."""
        if self.free:
            return self.pop()
        if self.lru:
            b, _ = self.lru.popitem(last=False)
            del self.by_hash[self.block_hash[b]]  # type: ignore[index]
            self.block_hash[b] = None
            return b
        raise KVCacheError(f"out of {self.name} blocks: all num_blocks={self.num_blocks} are in use")

    def release(self, b: int) -> None:
        """Block ``b`` reached ref 0: cached blocks go to the LRU tail, others to the free queue."""
        if self.block_hash[b] is None:
            self.free.append(b)
        else:
            self.lru[b] = None

    def acquire_cached(self, b: int) -> bool:
        """Reference a prefix-hit block; True if it was unreferenced (taken out of the LRU)."""
        ref = self.ref
        was_free = ref[b] == 0
        if was_free:
            del self.lru[b]
        ref[b] += 1
        return was_free

    def register(self, b: int, h: int) -> None:
        """Make full block ``b`` findable by hash ``h`` (first block with that content wins)."""
        if h not in self.by_hash:
            self.by_hash[h] = b
            self.block_hash[b] = h

    def uncache(self, b: int) -> None:
        """Forget the hash of unreferenced cached block ``b``; it becomes truly free."""
        del self.lru[b]
        del self.by_hash[self.block_hash[b]]  # type: ignore[index]
        self.block_hash[b] = None
        self.free.append(b)

    def clear_cache(self) -> None:
        """Forget every hash; unreferenced cached blocks become truly free."""
        for b in self.lru:
            self.free.append(b)
        self.lru.clear()
        for b in self.by_hash.values():
            self.block_hash[b] = None
        self.by_hash.clear()
