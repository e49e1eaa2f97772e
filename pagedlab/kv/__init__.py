"""KV-cache memory manager: paged (PagedAttention) and contiguous allocators, plain Python, no torch."""

from .allocators import ALLOCATORS
from .block_manager import BlockManager
from .block_pool import ORDERS
from .errors import KVCacheError
from .stats import AllocStatus, KVStats, WasteBreakdown

__all__ = [
    "ALLOCATORS",
    "ORDERS",
    "AllocStatus",
    "BlockManager",
    "KVCacheError",
    "KVStats",
    "WasteBreakdown",
]
