"""KV-cache memory manager: paged (PagedAttention) and contiguous allocators, plain Python, no torch.

``allocator._target_`` names one of :func:`paged_manager` or :class:`ContiguousBlockManager` (or a
user's class, see docs/extending.md); :class:`BlockManager` also builds any built-in from its name.
"""

from .allocators import ALLOCATORS, PLACEMENT_RULES, RESERVATION_RULES
from .block_manager import BlockManager, paged_manager
from .block_pool import ORDERS
from .contiguous import ContiguousBlockManager
from .errors import KVBadArgument, KVCacheError
from .interface import KVManager
from .stats import AllocStatus, KVStats, WasteBreakdown

__all__ = [
    "ALLOCATORS",
    "ORDERS",
    "PLACEMENT_RULES",
    "RESERVATION_RULES",
    "AllocStatus",
    "BlockManager",
    "ContiguousBlockManager",
    "KVBadArgument",
    "KVCacheError",
    "KVManager",
    "KVStats",
    "WasteBreakdown",
    "paged_manager",
]
