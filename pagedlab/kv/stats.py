"""Value types returned by the block manager: admission status, statistics, waste breakdown."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class AllocStatus(enum.Enum):
    """Answer of ``BlockManager.can_allocate``."""

    OK = "ok"  # can be admitted now
    LATER = "later"  # not enough free blocks (or no contiguous run) now; retry later
    NEVER = "never"  # can never fit: the engine rejects the request


@dataclass(frozen=True)
class KVStats:
    """Snapshot of the device cache; slot counts are in tokens, the rest in blocks."""

    num_blocks: int
    block_size: int
    free_blocks: int  # truly free + unreferenced cached (evictable)
    used_blocks: int  # referenced by some resident sequence (== physical blocks in use)
    token_slots: int  # T: physical slots holding a token's KV, shared slots counted once
    allocated_slots: int  # A = used_blocks * block_size
    logical_blocks: int  # blocks the resident sequences would hold with no sharing
    largest_free_run: int  # blocks; paged: == free_blocks (paged never needs contiguity)
    cached_blocks: int  # unreferenced blocks kept by the prefix cache
    swapped_blocks: int  # host blocks in use
    cow_copies: int  # cumulative copy-on-write block copies (append into a shared block)
    prefix_hit_tokens: int  # cumulative tokens served from the prefix cache
    prefix_query_tokens: int  # cumulative tokens of all allocations


@dataclass(frozen=True)
class WasteBreakdown:
    """Split of the allocated slots: ``token_slots + reserved + internal_frag == allocated``."""

    token_slots: int  # T
    reserved: int  # allocated slots the owner fills later (positions < its final length)
    internal_frag: int  # allocated slots never filled
    allocated: int  # A
