"""The sequence lifecycle after a forward pass, owned by the scheduler (mixed into it): prefill
chunks advance, sampled tokens are appended, finished sequences give their blocks back, beams are
forked and freed, and groups with no live sequence finish. Forks that need room, and the frees,
are the scheduler's (:mod:`pagedlab.engine.scheduler`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedlab.engine.request import GroupStatus, Sequence, SequenceGroup
from pagedlab.engine.sampler import TokenSampler

if TYPE_CHECKING:
    from pagedlab.engine.scheduler import SchedulerOutput


class SequenceLifecycle:
    """What happens to sequences between steps; the :class:`~pagedlab.engine.scheduler.Scheduler`
    provides the queues, the block manager and preemption."""

    running: list[SequenceGroup]
    eos_token_id: int | None

    if TYPE_CHECKING:  # provided by the Scheduler
        def new_seq_id(self) -> int: ...
        def free_seq(self, seq: Sequence) -> None: ...
        def fork(self, parent: Sequence) -> Sequence: ...
        def make_room_for_forks(self, group: SequenceGroup, parents: list[Sequence],
                                out: SchedulerOutput) -> bool: ...
        def requeue(self, group: SequenceGroup, out: SchedulerOutput) -> None: ...

    def update(self, sched: SchedulerOutput, sampler: TokenSampler, now: float) -> list[SequenceGroup]:
        """Apply a step at time ``now``: advance prefill chunks, sample and append next tokens, fork
        and free beams, finish groups. Returns the groups that ended (rejected ones included)."""
        ended = list(sched.rejected)  # their finish_time is the step's start, set by the engine
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
                                                    any(not s.ready for s in group.seqs)), sched, now)
            elif len(seqs) < len(group.seqs):  # first step of parallel sampling: n from one row
                for seq, token in zip(list(group.seqs), sampler.sample_n(group, rows[0], len(group.seqs))):
                    seq.num_computed = seqs[0].num_computed
                    seq.ready = True
                    self._append(group, seq, token, now)
            else:
                for seq, r in zip(list(seqs), rows):
                    self._append(group, seq, sampler.sample(group, r), now)
            if group.first_token_time is None:
                group.first_token_time = now
            if not group.seqs:
                group.status = GroupStatus.FINISHED
                group.finish_time = now
                self.running.remove(group)
                ended.append(group)
        return ended

    def _append(self, group: SequenceGroup, seq: Sequence, token: int, now: float) -> None:
        """Add a generated token; a finished sequence gives its blocks back."""
        seq.tokens.append(token)
        p = group.sampling
        if seq.output_len >= p.max_tokens:
            seq.finish_reason = "length"
        elif not p.ignore_eos and token == self.eos_token_id:
            seq.finish_reason = "eos"
        else:
            return
        seq.finish_time = now
        self.free_seq(seq)
        group.seqs.remove(seq)
        group.done.append(seq)

    def _beam_step(self, group: SequenceGroup, candidates: list[tuple[int, int, float]],
                   sched: SchedulerOutput, now: float) -> None:
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
                    hyp.cum_logprob, hyp.finish_reason, hyp.finish_time = score, "eos", now
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
                seq.finish_reason, seq.finish_time = "length", now
            group.done = sorted(group.done + (survivors if at_max else []), key=lambda s: -s.cum_logprob)[:k]
            group.seqs = []
        else:
            group.seqs = survivors
