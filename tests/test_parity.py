"""One scheduler and one block manager serve both executors: the same workload and budget give
identical memory accounting under executor=sim and executor=torch; only time differs."""

from __future__ import annotations

import pytest
from test_engine import make_cfg

from pagedlab.experiment import run_experiment

ACCOUNTING = ["step", "batch_size", "num_prefill_seqs", "num_decode_seqs", "num_tokens", "num_waiting",
              "num_running", "num_swapped", "free_blocks", "used_blocks", "token_slots", "allocated_slots",
              "external_frag", "logical_blocks", "memory_waste", "num_preempted", "cow_copies",
              "fork_copies", "swap_out_blocks", "swap_in_blocks", "recomputed_tokens", "reserved_slots",
              "internal_frag"]


def tiny(executor: str, **dotted):
    cfg = make_cfg(**{"executor.name": executor, "model.name": "tiny_llama", "workload.num_requests": 10,
                      "workload.prompt_len": [4, 40], "workload.output_len": [2, 24], **dotted})
    return run_experiment(cfg, progress=False)


@pytest.mark.parametrize("case", [
    {"kv_cache.budget_gib": 0.001},  # same bytes, so the same blocks under both executors
    {"kv_cache.num_blocks": 9, "eviction.mode": "recompute"},
    {"kv_cache.num_blocks": 9, "eviction.mode": "swap"},
    {"allocator.name": "contiguous_pow2", "kv_cache.num_blocks": 24, "max_model_len": 128},
    {"workload.n": 3, "cow": True, "kv_cache.num_blocks": 64},
], ids=["ample", "recompute", "swap", "pow2", "parallel"])
def test_sim_and_torch_account_memory_identically(case):
    sim, real = tiny("sim", **case), tiny("torch", **case)
    assert sim.summary["time_source"] == "modelled" and real.summary["time_source"] == "wall"
    assert sim.steps[ACCOUNTING].equals(real.steps[ACCOUNTING])
    for key in ("memory_waste", "num_preemptions", "recomputed_tokens", "swapped_out_blocks", "cow_copies",
                "sharing_saving", "num_finished"):
        assert sim.summary[key] == real.summary[key], key
    assert (sim.requests.output_len == real.requests.output_len).all()
