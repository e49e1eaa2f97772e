"""Victim policies pagedlab does not ship (``eviction.victim``), each a class with ``pick(candidates, kv)``.

The contract is :class:`pagedlab.engine.preemption.VictimPolicy`: ``candidates`` (never empty) are the
running groups not yet grown this step plus the group that needs room; return one of them, the same one
for the same state (no randomness, no dependence on dict or set order). Both policies here break ties by
arrival, newest first (what pagedlab's default ``newest`` and vLLM do), and then by the group's
``order`` (its first sequence id, unique), so equal arrival times cannot leave a tie.

Plug one in with ``conf/eviction/<name>.yaml``::

    _target_: pagedlab.engine.preemption.Preemption
    mode: recompute
    victim:
      _target_: pagedlab_plugins.victims.MostRemaining
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedlab.engine.request import SequenceGroup
from pagedlab.kv import KVManager


def newest_first(g: SequenceGroup) -> tuple[float, int]:
    """The tie-break: a later arrival (then a later first sequence id) sorts higher."""
    return g.arrival_time, g.order


def remaining_tokens(g: SequenceGroup) -> int:
    """Decode steps the group can still run: ``max_tokens`` minus the longest live sequence's output.
    Exact with ``ignore_eos`` (the default); otherwise an upper bound, as an EOS can end it sooner."""
    done = max((s.output_len for s in g.seqs), default=0)
    return max(0, g.sampling.max_tokens - done)


class MostRemaining:
    """Preempt the group with the most decode steps left (``max_tokens`` minus its output so far).

    Rationale (shortest-remaining-processing-time): the groups that are almost done keep running, finish
    within a few steps and give all their blocks back, while the victim is the one that would have held
    its (growing) blocks longest. This is the scheduling rule that minimises mean completion time on one
    machine, so expect a lower mean normalized latency than ``newest`` when requests' ``max_tokens``
    differ; the price is that long requests can be preempted repeatedly (starvation), which
    :class:`FewestPreemptions` addresses.

    Uses only the request's own ``sampling.max_tokens`` (what a server knows), not the true output length.
    """

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup:
        return max(candidates, key=lambda g: (remaining_tokens(g), *newest_first(g)))


class FewestPreemptions:
    """Preempt the group preempted the fewest times so far; ties to the newest arrival.

    Rationale (fairness): under ``newest`` a preempted group goes back to the head of the queue, is
    readmitted first and, being again the newest running group, tends to be the next victim, so a few
    unlucky requests absorb most preemptions (and wait longest). Choosing the least-preempted
    candidate spreads preemptions over the groups: the worst request's count (the max of
    ``result.requests.num_preemptions``) drops toward the mean, at the cost of more requests being hit
    at least once and of preempting older groups that hold more KV (more recompute or swap traffic).
    """

    def pick(self, candidates: Sequence[SequenceGroup], kv: KVManager) -> SequenceGroup:
        return max(candidates, key=lambda g: (-g.num_preemptions, *newest_first(g)))


__all__ = ["FewestPreemptions", "MostRemaining", "newest_first", "remaining_tokens"]
