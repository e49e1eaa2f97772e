"""Which running group is preempted when memory runs short (`eviction.victim`).

A victim policy looks at the candidate groups (those not yet grown this step, and the group that
needs room) and names one:

- ``newest``: the latest arrival (vLLM's rule: the lowest priority goes first);
- ``longest_resident``: the group admitted, or swapped back in, the earliest;
- ``lru``: the group scheduled least recently (a group can wait unscheduled while it is prefilled in
  chunks or was swapped in without room to grow); ties, the common case in continuous batching
  where every running group runs each step, go to the newest arrival;
- ``largest``: the group holding the most token slots.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedlab.engine.request import SequenceGroup
from pagedlab.kv import BlockManager

VICTIMS = ("newest", "longest_resident", "lru", "largest")


def pick_victim(policy: str, candidates: Sequence[SequenceGroup], bm: BlockManager) -> SequenceGroup:
    """The group ``policy`` (one of :data:`VICTIMS`) preempts among ``candidates``."""
    if policy == "newest":
        return max(candidates, key=lambda g: g.arrival_time)
    if policy == "longest_resident":
        return min(candidates, key=lambda g: g.last_resident_step)
    if policy == "lru":
        return min(candidates, key=lambda g: (g.last_scheduled_step, -g.arrival_time))
    return max(candidates, key=lambda g: sum(bm.num_tokens(i) for i in g.seq_ids()))
