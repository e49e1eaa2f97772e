"""Iteration-level scheduling (continuous batching): admission, growth, preemption, swapping.

Each step, in order:
1. running groups (first come, first served) each get one more slot per sequence; when the block
   manager cannot give one, a victim is preempted (`eviction.victim`, chosen among the groups not yet
   grown this step and the current one) by recompute or swap (`eviction.mode`) until it can;
2. swapped groups come back while they fit;
3. only when no group waits in swap, waiting requests are admitted in arrival order while the
   block manager can hold their prompts and `max_num_seqs` / `max_num_batched_tokens` allow.
A request that can never fit is rejected with its reason and the run goes on.

That is ``batching="mixed"`` (the default): a step decodes the running groups and prefills newly
admitted prompts together. ``batching="prefill_first"`` runs the paper's vLLM: a step either
prefills or decodes, never both. When a group is part-way through a chunked prefill, or (with no
group waiting in swap) a waiting prompt can be admitted, the step prefills only (chunks first, then
admissions with the token budget left) and the running groups wait; otherwise it runs steps 1-2.

A group preempted by recompute can come back with more tokens than `max_num_batched_tokens` (each
of its n samples or beams is re-prefilled). It is admitted with all its KV slots and prefilled in
chunks that fit the token budget (chunked prefill, as vLLM does): first every sequence up to its
last token, then one step in which every sequence computes its last token and samples together,
as beam search needs.

After the forward pass :meth:`Scheduler.update` (from :mod:`pagedlab.engine.lifecycle`) applies
the step: prefill chunks advance, sampled tokens are appended, beams forked and freed, finished
groups leave.

Forks after a step (beam search) under a copying policy (`cow=false`, contiguous allocators) need
free blocks; when there are too few, other running groups are preempted by recompute to make room
(no swap: its copies would have to run before the pending fork copies), and failing that the beam
group itself is (:meth:`Scheduler.make_room_for_forks`, :meth:`Scheduler.requeue`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count

from pagedlab.engine.lifecycle import SequenceLifecycle
from pagedlab.engine.preemption import Preemption
from pagedlab.engine.request import GroupStatus, Sequence, SequenceGroup
from pagedlab.errors import one_of
from pagedlab.kv import AllocStatus, KVManager

BATCHING = ("mixed", "prefill_first")  # decodes and new prompts in one step; or a step of either


@dataclass
class SchedulerOutput:
    """What one step runs: the sequences per group, and the memory operations before it."""

    scheduled: list[tuple[SequenceGroup, list[Sequence]]] = field(default_factory=list)
    fork_copies: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    cow_copies: list[tuple[int, int]] = field(default_factory=list)
    rejected: list[SequenceGroup] = field(default_factory=list)
    chunk_end: dict[int, int] = field(default_factory=dict)  # seq id -> end of a partial prefill chunk
    num_preempted: int = 0
    num_swap_fallbacks: int = 0  # swap wanted but host space full: recomputed instead
    recomputed_tokens: int = 0
    chunked_tokens: int = 0  # prefill tokens scheduled as partial chunks
    prefix_hit_tokens: int = 0
    prefill_groups: int = 0  # groups whose prompt, recompute or prefill chunk this step computes
    decode_groups: int = 0  # groups whose sequences each compute one new token (grown this step)

    @property
    def num_seqs(self) -> int:
        return sum(len(seqs) for _, seqs in self.scheduled)


class Scheduler(SequenceLifecycle):
    """Owns the waiting, running and swapped queues, drives the block manager, and (through
    :class:`SequenceLifecycle`) applies each step's outcome to the sequences."""

    def __init__(
        self,
        block_manager: KVManager,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        max_model_len: int | None = None,
        preemption: Preemption | None = None,
        eos_token_id: int | None = None,
        batching: str = "mixed",
    ) -> None:
        self.bm = block_manager
        self.batching = one_of("batching", batching, BATCHING)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.preemption = preemption if preemption is not None else Preemption()
        self.eos_token_id = eos_token_id
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: deque[SequenceGroup] = deque()
        self.pending_fork_copies: list[tuple[int, int]] = []
        self.on_free: Callable[[int, int], None] | None = None  # told (seq id, slots held) at each free
        self._seq_ids = count()
        self.step_index = 0

    # -- queue API ------------------------------------------------------------------------------
    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def add(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

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

    # -- one step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.step_index += 1
        out = SchedulerOutput(fork_copies=self.pending_fork_copies)
        self.pending_fork_copies = []
        if self.batching == "mixed" or not self._schedule_prefills(out):
            tokens_left = self.max_num_batched_tokens
            tokens_left -= self._schedule_running(out, tokens_left)
            if not out.num_preempted:  # memory is short: grow what runs, bring nothing in
                self._schedule_swapped(out)
                if not self.swapped and self.batching == "mixed":
                    self._admit_waiting(out, tokens_left)
        for group, _ in out.scheduled:
            group.last_scheduled_step = self.step_index
        return out

    def _schedule_prefills(self, out: SchedulerOutput) -> bool:
        """``prefill_first``: a prefill-only step, if there is prefill work: the next chunk of every group
        part-way through a chunked prefill, then (when no group waits in swap) waiting groups admitted
        with the token budget left. Whether it scheduled anything (rejections alone do not count)."""
        tokens_left = self.max_num_batched_tokens
        for group in self.running:
            if group.prefilling:
                tokens_left -= self._schedule_chunk(group, out, tokens_left)
        if not self.swapped:
            self._admit_waiting(out, tokens_left)
        return bool(out.scheduled)

    def _schedule_running(self, out: SchedulerOutput, tokens_left: int) -> int:
        queue = deque(self.running)
        kept: list[SequenceGroup] = []
        prefilling: list[SequenceGroup] = []
        num_tokens = 0
        while queue:
            group = queue.popleft()
            if group.prefilling:  # its slots are allocated; it gets a chunk of what the decodes leave
                kept.append(group)
                prefilling.append(group)
                continue
            ids = group.seq_ids()
            while not self.bm.can_append(ids):
                victim = self._pick_victim(queue, group)
                self._preempt(victim, out)
                if victim is group:
                    break
                queue.remove(victim)
            else:
                out.cow_copies += self.bm.append_slots(ids, [s.tokens[-1] for s in group.seqs])
                out.scheduled.append((group, list(group.seqs)))
                out.decode_groups += 1
                num_tokens += len(ids)
                kept.append(group)
        self.running = kept
        for group in prefilling:
            num_tokens += self._schedule_chunk(group, out, tokens_left - num_tokens)
        return num_tokens

    def _schedule_chunk(self, group: SequenceGroup, out: SchedulerOutput, budget: int) -> int:
        """Schedule the next prefill chunk of a group admitted with more tokens than the budget;
        returns its tokens. The last step computes every sequence's last token together."""
        remaining = [len(s.tokens) - s.num_computed for s in group.seqs]
        if sum(remaining) <= budget or all(r <= 1 for r in remaining):
            group.prefilling = False  # decodes exceed the budget too, when it is below max_num_seqs
            out.scheduled.append((group, list(group.seqs)))
            out.prefill_groups += 1
            return sum(remaining)
        chunk: list[Sequence] = []
        used = 0
        for seq, r in zip(group.seqs, remaining):
            take = min(r - 1, budget - used)
            if take > 0:
                out.chunk_end[seq.seq_id] = seq.num_computed + take
                chunk.append(seq)
                used += take
        if chunk:
            out.scheduled.append((group, chunk))
            out.prefill_groups += 1
        out.chunked_tokens += used
        return used

    def _schedule_swapped(self, out: SchedulerOutput) -> None:
        num_seqs = sum(len(g.seqs) for g in self.running)
        while self.swapped:
            group = self.swapped[0]
            ids = group.seq_ids()
            # the watermark keeps room for running groups to grow; with none running it would only
            # keep a group that once filled the cache from ever coming back
            room = self.bm.can_swap_in(ids) if self.running else self.bm.can_swap_in(ids, watermark=0)
            if num_seqs + len(ids) > self.max_num_seqs or not room:
                break
            self.swapped.popleft()
            out.swap_in += self.bm.swap_in(ids)
            group.status = GroupStatus.RUNNING
            group.last_resident_step = self.step_index
            self.running.append(group)
            num_seqs += len(ids)
            if group.prefilling:  # its chunks go on from the next step
                continue
            if self.bm.can_append(ids):  # else it grows next step (and may be preempted then)
                out.cow_copies += self.bm.append_slots(ids, [s.tokens[-1] for s in group.seqs])
                out.scheduled.append((group, list(group.seqs)))
                out.decode_groups += 1

    def _admit_waiting(self, out: SchedulerOutput, tokens_left: int) -> None:
        num_seqs = sum(len(g.seqs) for g in self.running)
        while self.waiting:
            group = self.waiting[0]
            reason = self._never_fits(group)
            if reason is None:
                group_seqs = max(len(group.seqs), group.sampling.num_seqs)
                new_tokens = sum(len(s.tokens) for s in group.seqs)
                chunked = new_tokens > self.max_num_batched_tokens  # recomputed: prefilled in chunks
                if num_seqs + group_seqs > self.max_num_seqs or tokens_left <= 0 or (
                        new_tokens > tokens_left and not chunked):
                    break
                status = self._allocate(group, out)
                if status is AllocStatus.LATER and (self.running or self.swapped):
                    break
                if status is AllocStatus.OK:
                    self.waiting.popleft()
                    num_seqs += len(group.seqs)
                    if chunked:
                        group.prefilling = True
                        tokens_left -= self._schedule_chunk(group, out, tokens_left)
                    else:
                        out.scheduled.append((group, [s for s in group.seqs if s.ready]))
                        out.prefill_groups += 1
                        tokens_left -= new_tokens
                    continue
                reason = (
                    f"needs more KV blocks than the cache can give it ({self.bm.num_blocks} blocks, "
                    "watermark included)"
                )
            self.waiting.popleft()
            group.status = GroupStatus.REJECTED
            group.reject_reason = reason
            out.rejected.append(group)

    def _never_fits(self, group: SequenceGroup) -> str | None:
        req = group.request
        num_seqs = req.sampling.num_seqs
        if num_seqs > self.max_num_seqs:
            what = "beam_width" if req.sampling.beam_width > 1 else "n"
            return f"needs {num_seqs} sequences ({what}={num_seqs}) but max_num_seqs={self.max_num_seqs}"
        if self.max_model_len is not None and req.final_len > self.max_model_len:
            return f"prompt + max_tokens = {req.final_len} exceeds max_model_len={self.max_model_len}"
        if req.prompt_len > self.max_num_batched_tokens and group.seqs[0].output_len == 0:
            return f"prompt of {req.prompt_len} tokens exceeds max_num_batched_tokens={self.max_num_batched_tokens}"
        return None

    def _allocate(self, group: SequenceGroup, out: SchedulerOutput) -> AllocStatus:
        """Give the group's sequences their slots: a fresh prompt (then fork its samples or
        beams), or, after preemption by recompute, every live sequence's tokens again."""
        final_len = group.request.final_len
        fresh = group.seqs[0].output_len == 0 and len(group.seqs) == 1
        fork_count = group.sampling.num_seqs - 1 if fresh else 0
        done: list[Sequence] = []
        for seq in group.seqs:
            status = self.bm.can_allocate(seq.tokens, final_len, num_seqs=1 + fork_count)
            if status is not AllocStatus.OK:
                for s in done:  # all or nothing
                    self.free_seq(s)
                    s.num_computed = 0
                return status
            seq.num_computed = self.bm.allocate(seq.seq_id, seq.tokens, final_len)
            out.prefix_hit_tokens += seq.num_computed
            if seq.output_len > 0:
                # KV computed before the preemption and computed again (the last token never had KV)
                out.recomputed_tokens += max(0, len(seq.tokens) - 1 - seq.num_computed)
            done.append(seq)
        for _ in range(fork_count):
            child = self.fork(group.seqs[0])
            child.ready = False
            group.seqs.append(child)
        group.status = GroupStatus.RUNNING
        group.last_resident_step = self.step_index
        self.running.append(group)
        return AllocStatus.OK

    # -- preemption -------------------------------------------------------------------------------
    def _pick_victim(self, unscheduled: deque[SequenceGroup], current: SequenceGroup) -> SequenceGroup:
        return self._pick([*unscheduled, current])

    def _pick(self, candidates: list[SequenceGroup]) -> SequenceGroup:
        return self.preemption.pick(candidates, self.bm)

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput, swap: bool = True) -> None:
        out.num_preempted += 1
        group.num_preemptions += 1
        unready = [s for s in group.seqs if not s.ready]
        if unready:  # admitted this step, never sampled: back to one prompt, forked again on admission
            for seq in unready:
                self.free_seq(seq)
            group.seqs = [s for s in group.seqs if s.ready]
        ids = group.seq_ids()
        # Like vLLM, a group of several live sequences is swapped even under recompute when the host
        # has room: recomputing re-prefills each sequence on its own, losing the sharing that let the
        # group fit at all.
        if swap and (self.preemption.mode == "swap" or len(ids) > 1):
            if self.bm.can_swap_out(ids):
                out.swap_out += self.bm.swap_out(ids)
                group.status = GroupStatus.SWAPPED
                self.swapped.append(group)
                return
            out.num_swap_fallbacks += self.preemption.mode == "swap"
        for seq in group.seqs:
            self.free_seq(seq)
            seq.num_computed = 0
        group.prefilling = False
        group.status = GroupStatus.WAITING
        self.waiting.appendleft(group)
