"""The engine loop, one step at a time: schedule, execute, sample, update, record.

The scheduler decides what runs and owns every sequence's lifecycle (admission, growth,
preemption, and, after the forward pass, appending sampled tokens, beam forks and frees,
finishing); the executor runs the flattened batch; the sampler turns logits into tokens; the
recorder keeps one row per step.

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
from pagedlab.engine.request import Request, Sequence, SequenceGroup
from pagedlab.engine.result import RunResult
from pagedlab.engine.sampler import TokenSampler
from pagedlab.engine.scheduler import Scheduler, SchedulerOutput
from pagedlab.executors.base import Executor, ModelInput, StepInput
from pagedlab.kv import KVManager


class EngineStuck(RuntimeError):
    """A step scheduled nothing while work was waiting and nothing could change: a bug, never a loop."""


class Engine:
    """One scheduler and one block manager driving an executor ("sim" or "torch")."""

    SUMMARY_KEYS = ("prefix_hit_rate", "num_requests")  # what result() adds to the recorder's summary

    def __init__(
        self,
        block_manager: KVManager,
        scheduler: Scheduler,
        executor: Executor,
        sampler: TokenSampler,
    ) -> None:
        self.bm = block_manager
        self.scheduler = scheduler
        self.executor = executor
        self.sampler = sampler
        self._plan_step = getattr(sampler, "plan_step", None)  # optional: a step's choices batched at once
        self.block_size = block_manager.block_size
        self.contiguous_kv = bool(getattr(block_manager, "contiguous_kv", False))
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
        summary = summarize(steps, requests, self.executor.time_source, self.recorder.capacity)
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
        for group in sched.rejected:
            group.finish_time = self.clock
        model_input = self._build_input(sched)
        stats = self.bm.stats()
        row = self._step_row(sched, model_input, stats)
        self.recorder.note_tails(self.bm.unfilled_tails())  # before sequences are freed below
        if model_input.num_seqs or sched.swap_out or sched.swap_in or sched.fork_copies:
            out = self.executor.execute(StepInput(
                model_input, sched.fork_copies, sched.swap_out, sched.swap_in, sched.cow_copies, self.contiguous_kv))
            self.sampler.begin_step(out.logits)
            if self._plan_step is not None:
                self._plan_step(sched)
            step_time = out.time_s
        else:
            step_time = 0.0
        if self.wall:  # measured: the whole step, scheduling and sampling included
            ended = self.scheduler.update(sched, self.sampler, self.clock + time.perf_counter() - t0)
            step_time = time.perf_counter() - t0
        else:
            ended = self.scheduler.update(sched, self.sampler, self.clock + step_time)
        for group in ended:
            self.sampler.release(group)
            self.recorder.record_group(group)
        finished = len(ended)
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
            "cow_copies": len(sched.cow_copies),
            "fork_copies": len(sched.fork_copies),
            "swap_out_blocks": len(sched.swap_out),
            "swap_in_blocks": len(sched.swap_in),
            "swap_fallbacks": sched.num_swap_fallbacks,
            "recomputed_tokens": sched.recomputed_tokens,
            "chunked_tokens": sched.chunked_tokens,
            "prefix_hit_tokens": sched.prefix_hit_tokens,
        }
