"""The sequence lifecycle after a forward pass, owned by the scheduler (mixed into it): prefill
chunks advance, sampled tokens are appended, finished sequences give their blocks back, beams are
forked and freed, and groups with no live sequence finish.

Forks after a step (beam search) under a copying policy (`cow=false`, contiguous allocators) need
free blocks; when there are too few, other running groups are preempted by recompute to make room
(no swap: its copies would have to run before the pending fork copies), and failing that the beam
group itself is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pagedlab.engine.request import GroupStatus, Sequence, SequenceGroup
from pagedlab.engine.sampler import TokenSampler
from pagedlab.kv import BlockManager

if TYPE_CHECKING:
    from pagedlab.engine.scheduler import SchedulerOutput


class SequenceLifecycle:
    """What happens to sequences between steps; the :class:`~pagedlab.engine.scheduler.Scheduler`
    provides the queues, the block manager and preemption."""

    bm: BlockManager
    running: list[SequenceGroup]
    pending_fork_copies: list[tuple[int, int]]
    on_free: Callable[[int, int], None] | None
    eos_token_id: int | None

    def new_seq_id(self) -> int: ...
    def _pick(self, candidates: list[SequenceGroup]) -> SequenceGroup: ...
    def _preempt(self, group: SequenceGroup, out: SchedulerOutput, swap: bool = True) -> None: ...

    def update(self, sched: SchedulerOutput, sampler: TokenSampler, now: float) -> list[SequenceGroup]:
        """Apply a step at time ``now``: advance prefill chunks, sample and append next tokens, fork
        and free beams, finish groups. Returns the groups that ended (rejected ones included)."""
        ended = list(sched.rejected)
        for group in ended:
            group.finish_time = now
        row = 0
        chunk_end = sched.chunk_end
        for group, seqs in sched.scheduled:
            rows = list(range(row, row + len(seqs)))
            row += len(seqs)
            if group.status is not GroupStatus.RUNNING:  # preempted after the step to make room for forks
                continue
            if chunk_end and any(s.seq_id in chunk_end for s in seqs):  # a prefill chunk: nothing to sample
                for seq in seqs:
                    seq.num_computed = chunk_end.get(seq.seq_id, seq.num_computed)
                continue
            for seq in seqs:
                seq.num_computed = len(seq.tokens)
            if group.is_beam:
                self._beam_step(group, sampler.beam(group, rows, group.sampling.beam_width,
                                                    any(not s.ready for s in group.seqs)), sched)
            elif len(seqs) < len(group.seqs):  # first step of parallel sampling: n from one row
                for seq, token in zip(list(group.seqs), sampler.sample_n(group, rows[0], len(group.seqs))):
                    seq.num_computed = seqs[0].num_computed
                    seq.ready = True
                    self._append(group, seq, token)
            else:
                for seq, r in zip(list(seqs), rows):
                    self._append(group, seq, sampler.sample(group, r))
            if group.first_token_time is None:
                group.first_token_time = now
            if not group.seqs:
                group.status = GroupStatus.FINISHED
                group.finish_time = now
                self.running.remove(group)
                ended.append(group)
        return ended

    def _append(self, group: SequenceGroup, seq: Sequence, token: int) -> None:
        """Add a generated token; a finished sequence gives its blocks back."""
        seq.tokens.append(token)
        p = group.sampling
        if seq.output_len >= p.max_tokens:
            seq.finish_reason = "length"
        elif not p.ignore_eos and token == self.eos_token_id:
            seq.finish_reason = "eos"
        else:
            return
        self.free_seq(seq)
        group.seqs.remove(seq)
        group.done.append(seq)

    def _beam_step(self, group: SequenceGroup, candidates: list[tuple[int, int, float]],
                   sched: SchedulerOutput) -> None:
        """Keep the k best continuations: drop the beams no survivor descends from, fork the
        parents chosen more than once (free first; copying policies preempt others for room, or
        this group itself when even alone it cannot hold the copies)."""
        k = group.sampling.beam_width
        beams = group.seqs
        stop_on_eos = not group.sampling.ignore_eos and self.eos_token_id is not None
        chosen: list[tuple[int, int, float]] = []
        for rank, (parent, token, score) in enumerate(candidates):
            if stop_on_eos and token == self.eos_token_id:
                if rank < k:  # a finished hypothesis, as Hugging Face keeps them
                    hyp = beams[parent].fork(-1)
                    hyp.tokens.append(token)
                    hyp.cum_logprob, hyp.finish_reason = score, "eos"
                    group.done.append(hyp)
                continue
            chosen.append((parent, token, score))
            if len(chosen) == k:
                break
        used = {p for p, _, _ in chosen}
        for i, seq in enumerate(beams):
            if i not in used:
                self.free_seq(seq)
        group.seqs = [beams[i] for i in sorted(used)]  # the beams that still hold KV
        done_eos = len([s for s in group.done if s.finish_reason == "eos"]) >= k
        at_max = bool(chosen) and beams[chosen[0][0]].output_len + 1 >= group.sampling.max_tokens
        finishing = at_max or done_eos or not chosen
        # a parent chosen more than once is forked for each further child: copying policies need room
        first_of = {p: i for i, (p, _, _) in reversed(list(enumerate(chosen)))}
        forks = [beams[p] for i, (p, _, _) in enumerate(chosen) if first_of[p] != i]
        in_place = finishing or self.make_room_for_forks(group, forks, sched)
        survivors: list[Sequence] = []
        for i, (parent, token, score) in enumerate(chosen):
            seq = beams[parent]
            if first_of[parent] != i:
                if in_place and not finishing:
                    seq = self.fork(seq)
                else:  # no KV needed: the group ends now, or is recomputed later
                    seq = seq.fork(self.new_seq_id())
                    seq.num_computed = 0
                seq.tokens.pop()  # the parent's new token was appended already
            seq.ready = True
            seq.tokens.append(token)
            seq.cum_logprob = score
            survivors.append(seq)
        if not in_place:  # even alone the group cannot hold the copies: recompute its beams later
            self.requeue(group, sched)
            group.seqs = survivors
            return
        if finishing:
            # Finished hypotheses only, as HF's beam search returns (early_stopping=True): live beams
            # join them when they reach max_tokens, not when k hypotheses ended with EOS first.
            for seq in group.seqs:
                self.free_seq(seq)
            for seq in survivors:
                seq.finish_reason = "length"
            group.done = sorted(group.done + (survivors if at_max else []), key=lambda s: -s.cum_logprob)[:k]
            group.seqs = []
        else:
            group.seqs = survivors

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks (finished, dropped beam, or preempted by recompute)."""
        if self.on_free is not None:
            self.on_free(seq.seq_id, self.bm.num_tokens(seq.seq_id))
        if self.pending_fork_copies and not self.bm.is_swapped(seq.seq_id):
            # copies into a forked child freed in the same step would write blocks handed out again
            gone = set(self.bm.block_table(seq.seq_id))
            self.pending_fork_copies = [(s, d) for s, d in self.pending_fork_copies if d not in gone]
        self.bm.free(seq.seq_id)

    def fork(self, parent: Sequence) -> Sequence:
        """A child sharing (or, with copying policies, copying) the parent's blocks."""
        child = parent.fork(self.new_seq_id())
        self.pending_fork_copies += self.bm.fork(parent.seq_id, child.seq_id)
        return child

    def make_room_for_forks(self, group: SequenceGroup, parents: list[Sequence], out: SchedulerOutput) -> bool:
        """After a step: whether ``parents`` (one entry per child) can be forked, preempting other
        running groups by recompute while they cannot. False: not even with the group alone."""
        ids = [p.seq_id for p in parents]
        if self.bm.can_fork_many(ids):
            return True
        held = {b for s in group.seqs for b in self.bm.block_table(s.seq_id)}
        if sum(len(self.bm.block_table(i)) for i in ids) > self.bm.num_blocks - len(held):
            return False  # not even with every other group gone: do not preempt them for nothing
        while not self.bm.can_fork_many(ids):
            others = [g for g in self.running if g is not group and g.status is GroupStatus.RUNNING]
            if not others:
                return False
            victim = self._pick(others)
            self.running.remove(victim)
            self._preempt(victim, out, swap=False)
        return True

    def requeue(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """Preempt a running group by recompute (its live sequences must hold KV)."""
        self.running.remove(group)
        self._preempt(group, out, swap=False)
