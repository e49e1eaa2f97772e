"""Preemption: what happens to a running group when memory runs short (``eviction``).

``Preemption(mode, victim)`` is what ``eviction._target_`` builds: ``mode`` is ``recompute`` (drop the
group's KV, recompute it on readmission) or ``swap`` (move its blocks to host swap space); ``victim``
is a :class:`VictimPolicy`, or the name of a built-in one:

- ``newest``: the latest arrival (vLLM's rule: the lowest priority goes first);
- ``longest_resident``: the group admitted, or swapped back in, the earliest;
- ``lru``: the group scheduled least recently (a group can wait unscheduled while it is prefilled in
  chunks or was swapped in without room to grow); ties, the common case in continuous batching
  where every running group runs each step, go to the newest arrival;
- ``largest``: the group holding the most token slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from pagedlab.engine.request import SequenceGroup
from pagedlab.errors import BadArgument, one_of
from pagedlab.kv import KVManager

EVICTION_MODES = ("recompute", "swap")


class VictimPolicy(Protocol):
    """Names the group to preempt. ``candidates`` (never empty) are the running groups not yet grown this
    step plus the group that needs room; ``kv`` is the memory manager (``kv.num_tokens(seq_id)``...).
    Groups carry ``arrival_time``, ``last_scheduled_step``, ``last_resident_step``, ``seq_ids()`` and
    their sampling params. Must return one of ``candidates`` and be deterministic."""

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup: ...


class Newest:
    """The latest arrival."""

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup:
        return max(candidates, key=lambda g: g.arrival_time)


class LongestResident:
    """The group admitted, or swapped back in, the earliest."""

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup:
        return min(candidates, key=lambda g: g.last_resident_step)


class LeastRecentlyScheduled:
    """The group scheduled least recently; ties to the newest arrival."""

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup:
        return min(candidates, key=lambda g: (g.last_scheduled_step, -g.arrival_time))


class Largest:
    """The group holding the most token slots."""

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup:
        return max(candidates, key=lambda g: sum(kv.num_tokens(i) for i in g.seq_ids()))


VICTIMS: dict[str, type] = {"newest": Newest, "longest_resident": LongestResident, "lru": LeastRecentlyScheduled,
                            "largest": Largest}


def victim_policy(victim: str | VictimPolicy) -> VictimPolicy:
    """A policy object: ``victim`` itself, or the built-in one its name names (:data:`VICTIMS`)."""
    if isinstance(victim, str):
        return VICTIMS[one_of("victim", victim, tuple(VICTIMS))]()
    if not callable(getattr(victim, "pick", None)):
        raise BadArgument("victim", victim, "one of " + ", ".join(VICTIMS) + " or an object with pick(candidates, kv)")
    return victim


class Preemption:
    """How memory is reclaimed from running groups: ``mode`` (recompute or swap) and the ``victim`` policy."""

    def __init__(self, mode: str = "recompute", victim: str | VictimPolicy = "newest") -> None:
        self.mode = one_of("mode", mode, EVICTION_MODES)
        self.victim = victim_policy(victim)

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup:
        return self.victim.pick(candidates, kv)
