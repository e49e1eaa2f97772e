"""The engine loop: schedule a step, hand the flattened batch to the executor, choose next tokens,
grow, fork and finish sequences, record the step.

Time is a virtual clock that advances by each step's time: modelled by the simulator, measured
(wall time of the whole step, scheduling and sampling included) by the real executor. Requests
arrive on that clock, so Poisson arrivals need no sleeping and a simulated run is as fast as its
Python.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from pagedlab.engine.recorder import Recorder, summarize
from pagedlab.engine.request import GroupStatus, Request, Sequence, SequenceGroup
from pagedlab.engine.result import RunResult
from pagedlab.engine.scheduler import Scheduler, SchedulerOutput
from pagedlab.executors.base import Executor, ModelInput, StepInput
from pagedlab.kv import BlockManager


class EngineStuck(RuntimeError):
    """A step scheduled nothing while work was waiting and nothing could change: a bug, never a loop."""


class Engine:
    """One scheduler and one block manager driving an executor ("sim" or "torch")."""

    SUMMARY_KEYS = ("prefix_hit_rate", "num_requests")  # what result() adds to the recorder's summary

    def __init__(
        self,
        block_manager: BlockManager,
        scheduler: Scheduler,
        executor: Executor,
        chooser: Any,
        eos_token_id: int | None = None,
    ) -> None:
        self.bm = block_manager
        self.scheduler = scheduler
        self.executor = executor
        self.chooser = chooser
        self.eos_token_id = eos_token_id
        self.block_size = block_manager.block_size
        self.wall = executor.time_source == "wall"
        self.clock = 0.0
        self.recorder = Recorder(block_manager.num_blocks, block_manager.block_size, executor.time_source)
        scheduler.on_free = self.recorder.close_seq
        self.num_requests = 0

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        seq = Sequence(self.scheduler.new_seq_id(), list(request.prompt_token_ids), request.prompt_len)
        self.scheduler.add(SequenceGroup(request, seq))
        self.num_requests += 1

    def run(
        self,
        requests: Iterable[Request],
        progress: Callable[[int], None] | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
    ) -> RunResult:
        """Run every request to completion; `progress(n)` is told of each finished request."""
        pending = deque(sorted(requests, key=lambda r: r.arrival_time))
        if pending:
            self.clock = pending[0].arrival_time
        while pending or self.scheduler.has_unfinished():
            while pending and pending[0].arrival_time <= self.clock:
                self.add_request(pending.popleft())
            if not self.scheduler.has_unfinished():
                self.clock = pending[0].arrival_time
                continue
            row, finished, progressed = self.step()
            if not progressed:
                raise EngineStuck(self._stuck_reason())
            if on_step is not None:
                on_step(row)
            if progress is not None and finished:
                progress(finished)
        return self.result()

    def result(self) -> RunResult:
        """The run's tables and summary; checks that every request ended exactly once."""
        steps = self.recorder.steps_frame()
        requests = self.recorder.requests_frame()
        summary = summarize(steps, requests, self.executor.time_source)
        stats = self.bm.stats()
        summary["prefix_hit_rate"] = stats.prefix_hit_tokens / stats.prefix_query_tokens if (
            stats.prefix_query_tokens) else 0.0
        summary["num_requests"] = self.num_requests
        if summary["num_finished"] + summary["num_rejected"] != self.num_requests:
            raise RuntimeError(f"counts do not add up: {summary['num_finished']} finished + "
                               f"{summary['num_rejected']} rejected != {self.num_requests} requests")
        return RunResult(summary=summary, steps=steps, requests=requests)

    def _stuck_reason(self) -> str:
        s, st = self.scheduler, self.bm.stats()
        head = s.swapped[0] if s.swapped else s.waiting[0] if s.waiting else None
        where = "swapped" if s.swapped else "waiting"
        what = "nothing queued" if head is None else (
            f"request {head.request_id!r} is {where} with {len(head.seqs)} sequence(s) of "
            f"{max(len(q.tokens) for q in head.seqs)} tokens")
        return (f"engine stuck at step {s.step_index}: nothing was scheduled and nothing can change; {what}; "
                f"{len(s.running)} running, {len(s.waiting)} waiting, {len(s.swapped)} swapped; "
                f"{st.free_blocks} of {st.num_blocks} blocks free (watermark {self.bm.watermark_blocks}), "
                f"max_num_seqs={s.max_num_seqs}, max_num_batched_tokens={s.max_num_batched_tokens}")

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> tuple[dict[str, Any], int, bool]:
        """Run one engine step; returns its record, the number of requests it finished, and whether
        it did anything at all (ran, swapped, copied, preempted or rejected)."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        finished = 0
        for group in sched.rejected:
            group.finish_time = self.clock
            self.recorder.record_group(group)
            finished += 1
        model_input = self._build_input(sched)
        stats = self.bm.stats()
        row = self._step_row(sched, model_input, stats)
        self.recorder.note_tails(self.bm.unfilled_tails())  # before sequences are freed below
        if model_input.num_seqs or sched.swap_out or sched.swap_in or sched.fork_copies:
            out = self.executor.execute(StepInput(
                model_input, sched.fork_copies, sched.swap_out, sched.swap_in, sched.block_copies))
            self.chooser.begin_step(out.logits)
            step_time = out.time_s
        else:
            step_time = 0.0
        if self.wall:  # measured: the whole step, scheduling and sampling included
            finished += self._process(sched, self.clock + time.perf_counter() - t0)
            step_time = time.perf_counter() - t0
        else:
            finished += self._process(sched, self.clock + step_time)
        self.clock += step_time
        row["time"], row["step_time"] = self.clock, step_time
        row["num_preempted"] = sched.num_preempted  # forks after the step may have preempted too
        progressed = bool(model_input.num_seqs or sched.swap_out or sched.swap_in or sched.fork_copies
                          or sched.rejected or sched.num_preempted)
        return self.recorder.record_step(row), finished, progressed

    def _build_input(self, sched: SchedulerOutput) -> ModelInput:
        bs = self.block_size
        mi = ModelInput([], [], [], [], [], [], [])
        ids, pos, slots = mi.input_ids, mi.positions, mi.slot_mapping
        chunk_end = sched.chunk_end
        for _, seqs in sched.scheduled:
            for seq in seqs:
                start = seq.num_computed
                end = chunk_end.get(seq.seq_id, len(seq.tokens)) if chunk_end else len(seq.tokens)
                table = self.bm.block_table(seq.seq_id)
                if end - start == 1:  # decode: one token, one slot
                    ids.append(seq.tokens[start])
                    pos.append(start)
                    slots.append(table[start // bs] * bs + start % bs)
                else:  # prefill: slots block by block, not token by token
                    ids.extend(seq.tokens[start:end])
                    pos.extend(range(start, end))
                    mi.num_prefill_tokens += end - start
                    for b in range(start // bs, (end - 1) // bs + 1):
                        base = table[b] * bs
                        slots.extend(range(base + max(start - b * bs, 0), base + min(end - b * bs, bs)))
                mi.seq_ids.append(seq.seq_id)
                mi.query_lens.append(end - start)
                mi.context_lens.append(end)
                mi.block_tables.append(table)
        return mi

    def _step_row(self, sched: SchedulerOutput, mi: ModelInput, stats: Any) -> dict[str, Any]:
        s = self.scheduler
        num_prefill = sum(1 for q in mi.query_lens if q > 1)
        return {
            "step": s.step_index,
            "batch_size": mi.num_seqs,
            "num_prefill_seqs": num_prefill,
            "num_decode_seqs": mi.num_seqs - num_prefill,
            "num_tokens": mi.num_tokens,
            "num_waiting": len(s.waiting),
            "num_running": sum(len(g.seqs) for g in s.running),
            "num_swapped": len(s.swapped),
            "free_blocks": stats.free_blocks,
            "used_blocks": stats.used_blocks,
            "cached_blocks": stats.cached_blocks,
            "token_slots": stats.token_slots,
            "allocated_slots": stats.allocated_slots,
            "external_frag": self.bm.take_external_frag(),
            "logical_blocks": stats.logical_blocks,
            "num_preempted": sched.num_preempted,
            "block_copies": len(sched.block_copies),
            "fork_copies": len(sched.fork_copies),
            "swap_out_blocks": len(sched.swap_out),
            "swap_in_blocks": len(sched.swap_in),
            "swap_fallbacks": sched.num_swap_fallbacks,
            "recomputed_tokens": sched.recomputed_tokens,
            "chunked_tokens": sched.chunked_tokens,
            "prefix_hit_tokens": sched.prefix_hit_tokens,
        }

    # -- after the forward pass -------------------------------------------------------------------
    def _process(self, sched: SchedulerOutput, now: float) -> int:
        """Choose next tokens, then grow, fork, finish. Returns how many requests finished."""
        row = 0
        finished = 0
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
                self._beam_step(group, rows, sched)
            elif len(seqs) < len(group.seqs):  # first step of parallel sampling: n from one row
                for seq, token in zip(list(group.seqs), self.chooser.sample_n(group, rows[0], len(group.seqs))):
                    seq.num_computed = seqs[0].num_computed
                    seq.ready = True
                    self._append(group, seq, token, 0.0)
            else:
                for seq, r in zip(list(seqs), rows):
                    self._append(group, seq, self.chooser.sample(group, r), 0.0)
            if group.first_token_time is None:
                group.first_token_time = now
            if not group.seqs:
                finished += self._finish(group, now)
        return finished

    def _append(self, group: SequenceGroup, seq: Sequence, token: int, logprob: float) -> None:
        """Add a generated token; a finished sequence gives its blocks back."""
        seq.tokens.append(token)
        seq.cum_logprob += logprob
        p = group.sampling
        if seq.output_len >= p.max_tokens:
            seq.finish_reason = "length"
        elif not p.ignore_eos and token == self.eos_token_id:
            seq.finish_reason = "eos"
        else:
            return
        self.scheduler.free_seq(seq)
        group.seqs.remove(seq)
        group.done.append(seq)

    def _beam_step(self, group: SequenceGroup, rows: list[int], sched: SchedulerOutput) -> None:
        """Keep the k best continuations: drop the beams no survivor descends from, fork the
        parents chosen more than once (free first; copying policies preempt others for room, or
        this group itself when even alone it cannot hold the copies)."""
        k = group.sampling.beam_width
        first = any(not s.ready for s in group.seqs)
        beams = group.seqs
        stop_on_eos = not group.sampling.ignore_eos and self.eos_token_id is not None
        chosen: list[tuple[int, int, float]] = []
        for rank, (parent, token, score) in enumerate(self.chooser.beam(group, rows, k, first)):
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
                self.scheduler.free_seq(seq)
        group.seqs = [beams[i] for i in sorted(used)]  # the beams that still hold KV
        done_eos = len([s for s in group.done if s.finish_reason == "eos"]) >= k
        at_max = bool(chosen) and beams[chosen[0][0]].output_len + 1 >= group.sampling.max_tokens
        finishing = at_max or done_eos or not chosen
        # a parent chosen more than once is forked for each further child: copying policies need room
        first_of = {p: i for i, (p, _, _) in reversed(list(enumerate(chosen)))}
        forks = [beams[p] for i, (p, _, _) in enumerate(chosen) if first_of[p] != i]
        in_place = finishing or self.scheduler.make_room_for_forks(group, forks, sched)
        survivors: list[Sequence] = []
        for i, (parent, token, score) in enumerate(chosen):
            seq = beams[parent]
            if first_of[parent] != i:
                if in_place and not finishing:
                    seq = self.scheduler.fork(seq)
                else:  # no KV needed: the group ends now, or is recomputed later
                    seq = seq.fork(self.scheduler.new_seq_id())
                    seq.num_computed = 0
                seq.tokens.pop()  # the parent's new token was appended already
            seq.ready = True
            seq.tokens.append(token)
            seq.cum_logprob = score
            survivors.append(seq)
        if not in_place:  # even alone the group cannot hold the copies: recompute its beams later
            self.scheduler.requeue(group, sched)
            group.seqs = survivors
            return
        if finishing:
            # Finished hypotheses only, as HF's beam search returns (early_stopping=True): live beams
            # join them when they reach max_tokens, not when k hypotheses ended with EOS first.
            for seq in group.seqs:
                self.scheduler.free_seq(seq)
            for seq in survivors:
                seq.finish_reason = "length"
            group.done = sorted(group.done + (survivors if at_max else []), key=lambda s: -s.cum_logprob)[:k]
            group.seqs = []
        else:
            group.seqs = survivors

    def _finish(self, group: SequenceGroup, now: float) -> int:
        group.status = GroupStatus.FINISHED
        group.finish_time = now
        self.scheduler.running.remove(group)
        self.chooser.release(group)
        self.recorder.record_group(group)
        return 1
