"""Property test: every simulated run ends, its counts add up, and memory stays consistent.

Hypothesis draws valid configurations across every part that changes scheduling and memory
(allocator, block size, cow, prefix cache, recompute or swap down to no swap space, every victim,
tiny `max_num_seqs` and token budgets, greedy / parallel / beam groups, shared prefixes, tiny KV
budgets, mixed or prefill-first batching) and runs the simulator on a few short requests. Each run
must end within a step bound, `num_finished + num_rejected == num_requests`, every finished request
has all its sequences, the block manager's invariants hold after every step, and nothing is mixed: a
shadow KV cache replays every copy, swap and write the executor is asked for, and each scheduled
sequence must read back its own tokens at their positions. Under `batching=prefill_first` no step
both prefills and decodes.
"""

from __future__ import annotations

from typing import Any

import pytest
from cfgs import with_parts
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from pagedlab.engine.metrics import POOL_SHARES
from pagedlab.engine.preemption import VICTIMS
from pagedlab.engine.request import SamplingParams
from pagedlab.experiment import build

KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # llama_7b, float16


@st.composite
def configs(draw: Any) -> dict[str, Any]:
    """A valid configuration; choices come from a Hypothesis-seeded RNG, so they are uniform
    (Hypothesis alone favours edge values, which here means rejected requests, not pressure)."""
    rnd = draw(st.randoms(use_true_random=True))
    # paged in half the draws: reservation allocators never preempt, so pressure paths live here
    allocator = rnd.choice(["paged"] * 6 + ["contiguous_max", "contiguous_pow2", "contiguous_oracle",
                                             "orca_max", "orca_pow2", "orca_oracle"])
    mode = rnd.choice(["greedy", "parallel", "beam"])
    width = rnd.randint(2, 6) if mode != "greedy" else 1
    block_size = rnd.choice([1, 2, 3, 4, 8, 16, 32, 64])
    num_requests = rnd.randint(1, 8)
    shared_prefix = rnd.choice([0, 0, block_size, 2 * block_size])
    prompt_hi, output_hi = rnd.randint(1, 48), rnd.randint(1, 48)
    final = shared_prefix + prompt_hi + output_hi
    max_model_len = final + rnd.randint(0, 16)
    pow2 = min(max_model_len, shared_prefix + prompt_hi + (1 << (output_hi - 1).bit_length()))
    reserve = {"paged": final, "oracle": final, "max": max_model_len, "pow2": pow2}[allocator.split("_")[-1]]
    blocks = -(-reserve // block_size)
    if allocator.startswith("orca_"):  # a buddy block of the next power of two
        blocks = 1 << (blocks - 1).bit_length()
    one_request = width * blocks
    # mostly limits that admit every request; one draw in six rejects some or forces chunks
    tight = rnd.random() < 1 / 6
    max_num_seqs = rnd.choice([1, 2] if tight else [width, 2 * width, 4 * width, 256])
    # a cache from under one request's worst case (sharing may still fit it; else it is rejected) to about
    # half of what the requests that can run at once would need: memory pressure, preemption and swapping
    concurrent = max(1, min(num_requests, max_num_seqs // width))
    num_blocks = max(1, int(one_request * (0.8 + rnd.random() ** 2 * concurrent / 2)))
    max_num_batched_tokens = rnd.choice([1, 3, max(1, prompt_hi // 2)] if tight else
                                        [shared_prefix + prompt_hi, shared_prefix + prompt_hi + 16, 8192])
    swap_blocks = rnd.choice([0, 1, 4, 16, 100_000])
    mixed = rnd.random() < 0.25  # greedy, parallel and beam requests in one run
    return {
        "_mixed_seed": rnd.randint(0, 2**31) if mixed else None,
        "executor": {"name": "sim"},
        "model": {"name": "llama_7b", "dtype": "auto"},
        "hardware": {"name": "a100_80gb"},
        "allocator": {"name": allocator, "order": rnd.choice(["lifo", "fifo"])},
        "eviction": {"mode": rnd.choice(["recompute", "swap"]), "victim": rnd.choice(list(VICTIMS))},
        "block_size": block_size,
        "cow": rnd.random() < 0.5,
        "prefix_cache": allocator == "paged" and rnd.random() < 0.5,
        "seed": rnd.randint(0, 3),
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_model_len": max_model_len,
        "batching": rnd.choice(["mixed", "prefill_first"]),
        "kv_cache": {"num_blocks": num_blocks, "watermark": rnd.choice([0.0, 0.01, 0.1]),
                     "swap_gib": swap_blocks * block_size * KV_BYTES_PER_TOKEN / 2**30},
        "workload": {"name": rnd.choice(["uniform", "fixed"]), "num_requests": num_requests,
                     "request_rate": rnd.choice([None, 50.0]), "seed": None,
                     "prompt_len": [max(1, prompt_hi // 2), prompt_hi],
                     "output_len": [max(1, output_hi // 2), output_hi],
                     "shared_prefix_len": shared_prefix,
                     "n": width if mode == "parallel" else None,
                     "beam_width": width if mode == "beam" else None},
        "sampling": {"temperature": 1.0 if mode == "parallel" else 0.0, "top_p": 1.0, "top_k": 0, "n": 1,
                     "beam_width": 1, "max_tokens": 64, "ignore_eos": True, "seed": None},
    }


def step_bound(requests: list[Any], max_num_batched_tokens: int) -> int:
    """Generous: every token of every sequence recomputed many times, in chunks of the budget."""
    total = sum((r.prompt_len + r.sampling.max_tokens) * r.sampling.num_seqs for r in requests)
    return 50 * total // max(1, min(max_num_batched_tokens, 8)) + 500


class ShadowKV:
    """Replays what the executor is asked to do on a dict of (token, position) per slot: copies and
    swaps, then the step's KV writes (all of them before attention, as the executors do), then
    checks that every scheduled sequence's context holds its own tokens."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.bs = engine, engine.block_size
        self.dev: dict[int, tuple[int, int]] = {}
        self.host: dict[int, tuple[int, int]] = {}
        self.seqs: dict[int, Any] = {}
        schedule, execute = engine.scheduler.schedule, engine.executor.execute

        def scheduled() -> Any:
            out = schedule()
            self.seqs = {s.seq_id: s for _, seqs in out.scheduled for s in seqs}
            assert out.prefill_groups + out.decode_groups == len(out.scheduled)
            if engine.scheduler.batching == "prefill_first":
                assert not (out.prefill_groups and out.decode_groups), "a prefill_first step mixes"
            return out

        def executed(step: Any) -> Any:
            self.replay(step)
            return execute(step)

        engine.scheduler.schedule, engine.executor.execute = scheduled, executed

    def copy(self, pairs: list[tuple[int, int]], src: dict, dst: dict) -> None:
        assert len({d for _, d in pairs}) == len(pairs), f"two copies into one block: {pairs}"
        bs = self.bs
        rows = [[src.get(s * bs + o) for o in range(bs)] for s, _ in pairs]  # all reads before writes
        for (_, d), row in zip(pairs, rows):
            for o, v in enumerate(row):
                dst[d * bs + o] = v

    def replay(self, step: Any) -> None:
        self.copy(step.fork_copies, self.dev, self.dev)
        self.copy(step.swap_out, self.dev, self.host)
        self.copy(step.swap_in, self.host, self.dev)
        self.copy(step.cow_copies, self.dev, self.dev)
        mi, bs = step.model_input, self.bs
        for t, p, slot in zip(mi.input_ids, mi.positions, mi.slot_mapping):  # written before attention reads
            self.dev[slot] = (t, p)
        for sid, c, table in zip(mi.seq_ids, mi.context_lens, mi.block_tables):
            tokens = self.seqs[sid].tokens
            for p in range(c):
                got = self.dev.get(table[p // bs] * bs + p % bs)
                assert got == (tokens[p], p), f"sequence {sid} reads {got} at position {p}, not its own token"


def mix_kinds(requests: list[Any], seed: int) -> None:
    """Give each request its own kind: greedy, parallel n (2-4) or beam (2-4)."""
    import random

    rnd = random.Random(seed)
    for r in requests:
        kind = rnd.choice(["greedy", "parallel", "beam"])
        r.sampling = SamplingParams(max_tokens=r.sampling.max_tokens, temperature=1.0 if kind == "parallel" else 0.0,
                                    n=rnd.randint(2, 4) if kind == "parallel" else 1,
                                    beam_width=rnd.randint(2, 4) if kind == "beam" else 1)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_every_simulated_run_ends_adds_up_and_mixes_nothing(raw: dict[str, Any]) -> None:
    mixed_seed = raw.pop("_mixed_seed")
    cfg = OmegaConf.create(with_parts(raw))
    built = build(cfg)
    engine, requests = built.engine, built.requests
    if mixed_seed is not None:
        mix_kinds(requests, mixed_seed)
    ShadowKV(engine)
    bound = step_bound(requests, cfg.max_num_batched_tokens)

    def on_step(row: dict[str, Any]) -> None:
        engine.bm.check_invariants()
        assert row["step"] <= bound, f"run did not end within {bound} steps"

    result = engine.run(requests, on_step=on_step)
    s = result.summary
    for what in ("num_preemptions", "num_rejected", "swapped_out_blocks"):  # --hypothesis-show-statistics
        if s.get(what):
            event(f"{what} > 0")
    assert s["num_finished"] + s["num_rejected"] == len(requests) == s["num_requests"]
    assert not engine.scheduler.has_unfinished()
    assert engine.bm.seq_ids() == [], "sequences left holding KV after the run"
    assert engine.recorder.open_tails == 0, "tails of freed sequences left open"
    if s["num_steps"]:
        assert sum(s[k] for k in POOL_SHARES) == pytest.approx(1.0), {k: s[k] for k in POOL_SHARES}
    df = result.requests
    for rid, rows in df.groupby("request_id"):
        status = set(rows["status"])
        assert len(status) == 1, f"request {rid} has mixed statuses {status}"
        if status == {"finished"}:
            req = next(r for r in requests if str(r.request_id) == str(rid))
            expect = req.sampling.n if req.sampling.beam_width == 1 else None
            if expect is not None:
                assert len(rows) == expect, f"request {rid}: {len(rows)} sequences, expected {expect}"
            assert (rows["output_len"] >= 1).all()
            assert (rows["output_len"] <= req.sampling.max_tokens).all()
        else:
            assert rows["finish_reason"].notna().all()


@pytest.mark.parametrize("overrides", [
    {"max_num_seqs": 1, "workload": {"n": 4}},
    {"max_num_seqs": 2, "workload": {"beam_width": 4}},
])
def test_groups_larger_than_max_num_seqs_are_rejected_not_spun(overrides: dict[str, Any]) -> None:
    base = {
        "executor": {"name": "sim"}, "model": {"name": "llama_7b"}, "hardware": {"name": "a100_80gb"},
        "allocator": {"name": "paged"}, "eviction": {"mode": "recompute", "victim": "newest"},
        "block_size": 16, "cow": True, "prefix_cache": False, "seed": 0, "max_num_seqs": 256,
        "max_num_batched_tokens": 8192, "max_model_len": 256, "kv_cache": {"num_blocks": 64},
        "workload": {"name": "uniform", "num_requests": 4, "prompt_len": [4, 8], "output_len": [4, 8]},
        "sampling": {"temperature": 1.0},
    }
    cfg = OmegaConf.create(with_parts(OmegaConf.to_container(OmegaConf.merge(base, overrides))))
    built = build(cfg)
    result = built.engine.run(built.requests)
    assert result.summary["num_rejected"] == 4 and result.summary["num_finished"] == 0
    assert result.requests["finish_reason"].str.contains("max_num_seqs").all()
