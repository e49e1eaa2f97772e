"""Both batching styles: `mixed` (decodes and new prompts in one step, the default) and `prefill_first`
(the paper's vLLM: a step prefills newly admitted prompts or decodes, never both)."""

from __future__ import annotations

import pytest
from test_engine import make_cfg

from pagedlab.config import BATCHING, ConfigError
from pagedlab.engine import scheduler as scheduler_module
from pagedlab.engine.scheduler import Scheduler
from pagedlab.errors import BadArgument
from pagedlab.experiment import build

ARRIVING = {"workload.num_requests": 24, "workload.request_rate": 20.0}  # prompts arrive while others decode
CASES = {
    "ample": {},
    "recompute": {"kv_cache.num_blocks": 40, "eviction.mode": "recompute"},
    "swap": {"kv_cache.num_blocks": 40, "eviction.mode": "swap"},
    "beam": {"kv_cache.num_blocks": 60, "workload.beam_width": 3},
    "parallel": {"kv_cache.num_blocks": 60, "workload.n": 3, "sampling.temperature": 1.0},
    "contiguous": {"allocator.name": "contiguous_oracle", "kv_cache.num_blocks": 60},
}


def run_checked(**dotted):
    """Run a sim config, checking every step's SchedulerOutput; returns (result, engine, requests)."""
    built = build(make_cfg(**dotted))
    engine = built.engine
    schedule = engine.scheduler.schedule
    kinds = []

    def checked():
        out = schedule()
        assert out.prefill_groups + out.decode_groups == len(out.scheduled)
        kinds.append((out.prefill_groups, out.decode_groups))
        return out

    engine.scheduler.schedule = checked
    result = engine.run(built.requests)
    return result, engine, built.requests, kinds


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_prefill_first_steps_never_mix_and_every_run_ends(case):
    result, engine, requests, kinds = run_checked(batching="prefill_first", **ARRIVING, **CASES[case])
    steps, s = result.steps, result.summary
    assert s["num_finished"] + s["num_rejected"] == len(requests) == s["num_finished"]
    assert not engine.scheduler.has_unfinished() and engine.bm.seq_ids() == []
    # the step table: a step that runs prompt tokens runs no decode tokens (prompts here are >= 8 tokens)
    prefill = steps[steps["num_prefill_seqs"] > 0]
    assert len(prefill) and (prefill["num_decode_seqs"] == 0).all()
    assert not any(p and d for p, d in kinds)
    assert any(d for _, d in kinds)
    # every request's output is complete
    targets = {r.request_id: r.sampling.max_tokens for r in requests}
    done = result.requests[result.requests["status"] == "finished"]
    assert (done["output_len"] == done["request_id"].map(targets)).all()


def test_mixed_is_the_default_and_does_mix():
    result, engine, _, kinds = run_checked(**ARRIVING)
    assert engine.scheduler.batching == "mixed"
    steps = result.steps
    assert ((steps["num_prefill_seqs"] > 0) & (steps["num_decode_seqs"] > 0)).any()
    assert any(p and d for p, d in kinds)


def test_prefill_first_waits_the_running_groups_while_prompts_are_admitted():
    """All requests at once, room for all: the first steps prefill (no decode) until every prompt is in;
    mixed prefills the same prompts with the first decodes when the token budget splits them."""
    over = {"workload.num_requests": 12, "max_num_batched_tokens": 64, "workload.prompt_len": [20, 40]}
    first, _, _, kinds = run_checked(batching="prefill_first", **over)
    mixed, _, _, mixed_kinds = run_checked(**over)
    n_prefill = next(i for i, (p, _) in enumerate(kinds) if not p)
    assert all(d == 0 for _, d in kinds[:n_prefill]) and n_prefill >= 6
    assert sum(p for p, _ in kinds[:n_prefill]) == 12  # every prompt before the first decode
    assert any(p and d for p, d in mixed_kinds)
    assert first.summary["generated_tokens"] == mixed.summary["generated_tokens"]
    # the decodes waited: the first request's first token comes no earlier than under mixed
    assert first.summary["num_steps"] >= mixed.summary["num_steps"]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_prefill_first_chunked_reprefill_and_swap_in(mode):
    """Beams preempted by recompute come back longer than the token budget (chunked re-prefill), or
    swapped out and back in: under prefill_first the chunks are prefill-only steps and the run ends."""
    over = {"workload.num_requests": 10, "workload.beam_width": 3, "workload.prompt_len": [20, 30],
            "workload.output_len": [20, 30], "kv_cache.num_blocks": 40, "block_size": 4,
            "max_num_batched_tokens": 40, "eviction.mode": mode, "workload.request_rate": 50.0,
            "kv_cache.swap_gib": 0.0 if mode == "recompute" else 1.0}
    result, engine, requests, kinds = run_checked(batching="prefill_first", **over)
    s = result.summary
    assert s["num_finished"] + s["num_rejected"] == len(requests)
    assert s["num_preemptions"] > 0
    if mode == "recompute":
        assert s["chunked_prefill_tokens"] > 0
    else:
        assert s["swapped_in_blocks"] > 0
    assert not any(p and d for p, d in kinds)
    assert not engine.scheduler.has_unfinished()


def test_batching_is_checked_by_the_scheduler_and_the_config():
    assert BATCHING == scheduler_module.BATCHING
    built = build(make_cfg())
    with pytest.raises(BadArgument, match="batching=both is not allowed: expected one of mixed, prefill_fir"):
        Scheduler(built.engine.bm, batching="both")
    from pagedlab.config import validate

    with pytest.raises(ConfigError, match="batching=both is not allowed"):
        validate(make_cfg(batching="both"))
