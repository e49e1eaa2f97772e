"""Which running group is preempted when memory runs short (`eviction.victim`).

A victim policy looks at the candidate groups (those not yet grown this step, and the group that
needs room) and names one. `lru` is the group that has been resident longest: admitted, or swapped
back in, the earliest.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedlab.engine.request import SequenceGroup
from pagedlab.kv import BlockManager

VICTIMS = ("newest", "lru", "largest")


def pick_victim(policy: str, candidates: Sequence[SequenceGroup], bm: BlockManager) -> SequenceGroup:
    """``newest``: the latest arrival (vLLM's rule); ``lru``: resident the longest; ``largest``: the
    group holding the most token slots."""
    if policy == "newest":
        return max(candidates, key=lambda g: g.arrival_time)
    if policy == "lru":
        return min(candidates, key=lambda g: g.last_resident_step)
    return max(candidates, key=lambda g: sum(bm.num_tokens(i) for i in g.seq_ids()))
