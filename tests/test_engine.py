"""Engine behaviour on the simulator: completion, preemption, determinism, sharing, rejection."""

from __future__ import annotations

import pytest
from cfgs import make

from pagedlab.engine.preemption import VICTIMS
from pagedlab.experiment import build, run_experiment

BASE = {
    "block_size": 16, "cow": True, "prefix_cache": False, "seed": 0, "device": "cpu",
    "max_num_seqs": 256, "max_num_batched_tokens": 8192, "max_model_len": 2048,
    "kv_cache": {"budget_gib": None, "gpu_memory_utilization": 0.9, "num_blocks": None, "swap_gib": 4.0,
                 "watermark": 0.01, "cpu_budget_gib": 0.25},
    "allocator": {"name": "paged", "order": "lifo"},
    "eviction": {"mode": "recompute", "victim": "newest"},
    "kernel": {"_target_": "pagedlab.kernels.torch_gather.TorchGatherKernel", "name": "torch_gather"},
    "executor": {"name": "sim"},
    "model": {"name": "llama_13b", "name_or_path": None, "dtype": "auto"},
    "hardware": {"name": "a100_40gb"},
    "workload": {"name": "uniform", "num_requests": 24, "request_rate": None, "seed": None,
                 "prompt_len": [8, 40], "output_len": [4, 40], "n": None, "beam_width": None,
                 "shared_prefix_len": 0},
    "sampling": {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "n": 1, "beam_width": 1, "max_tokens": 64,
                 "ignore_eos": True, "seed": None},
    "logger": {"name": "none"},
}


def make_cfg(**dotted):
    """The sim config above with dotted overrides, e.g. make_cfg(**{"allocator.name": "contiguous_max"})
    (a part's ``name`` picks its conf/ YAML, see tests/cfgs.py)."""
    return make(BASE, **dotted)


def run(**dotted):
    return run_experiment(make_cfg(**dotted), progress=False)


def finished_lengths(result):
    df = result.requests[result.requests["status"] == "finished"]
    return dict(zip(zip(df.request_id, df.seq_index), df.output_len))


ALLOCATORS = ["paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle", "orca_max", "orca_pow2",
              "orca_oracle"]
POOL_SHARES = ["pool_token_share", "pool_reserved_share", "pool_internal_frag_share",
               "pool_external_frag_share", "pool_free_share"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_every_request_finishes_with_its_target_length(allocator):
    built = build(make_cfg(**{"allocator.name": allocator}))
    targets = {r.request_id: r.sampling.max_tokens for r in built.requests}
    result = built.engine.run(built.requests)
    df = result.requests
    assert (df.status == "finished").all() and len(df) == len(targets)
    assert all(df.output_len == df.request_id.map(targets))
    assert all(len(t) == n for t, n in zip(df.output_token_ids, df.output_len))
    assert built.engine.bm.stats().used_blocks == 0
    assert result.summary["num_finished"] == len(targets)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("victim", VICTIMS)
def test_preemption_under_tiny_budget_keeps_lengths_and_leaks_nothing(mode, victim):
    ample = run()
    built = build(make_cfg(**{"kv_cache.num_blocks": 12, "eviction.mode": mode, "eviction.victim": victim}))
    tight = built.engine.run(built.requests)
    assert tight.summary["num_preemptions"] > 0
    if mode == "swap":
        assert tight.summary["swapped_out_blocks"] > 0 and tight.summary["swapped_in_blocks"] > 0
    else:
        assert tight.summary["recomputed_tokens"] > 0
    assert finished_lengths(tight) == finished_lengths(ample)
    stats = built.engine.bm.stats()
    assert stats.used_blocks == 0 and stats.swapped_blocks == 0
    built.engine.bm.check_invariants()


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_preemption_with_contiguous_and_paged_policies(allocator):
    result = run(**{"kv_cache.num_blocks": 40, "allocator.name": allocator, "workload.num_requests": 16,
                    "max_model_len": 128})
    assert result.summary["num_finished"] == 16
    assert (result.requests.output_len == result.requests.max_tokens).all()


def test_same_seed_same_result_and_other_seed_differs():
    cfg = {"sampling.temperature": 1.0, "workload.n": 2}
    a, b = run(**cfg), run(**cfg)
    assert a.requests.output_token_ids.tolist() == b.requests.output_token_ids.tolist()
    assert a.summary == b.summary
    c = run(**cfg, seed=1)
    assert a.requests.output_token_ids.tolist() != c.requests.output_token_ids.tolist()


def test_parallel_sampling_shares_blocks_with_cow_and_yields_same_tokens():
    cfg = {"workload.n": 4, "workload.output_len": [20, 60], "workload.prompt_len": [40, 100]}
    shared, copied = run(**cfg, cow=True), run(**cfg, cow=False)
    assert shared.summary["sharing_saving"] > 0.05
    assert copied.summary["sharing_saving"] == 0
    assert shared.summary["cow_copies"] > 0 and copied.summary["fork_copies"] > 0
    assert shared.steps.used_blocks.mean() < copied.steps.used_blocks.mean()
    assert shared.requests.output_token_ids.tolist() == copied.requests.output_token_ids.tolist()
    assert len(shared.requests) == 4 * 24


@pytest.mark.parametrize("cow", [True, False])
def test_beam_search_runs_with_and_without_cow(cow):
    built = build(make_cfg(cow=cow, **{"workload.beam_width": 3, "workload.num_requests": 8}))
    result = built.engine.run(built.requests)
    df = result.requests
    assert len(df) == 3 * 8 and (df.output_len == df.max_tokens).all()
    assert result.summary["num_finished"] == 8
    if cow:
        assert result.summary["sharing_saving"] > 0.1
    assert built.engine.bm.stats().used_blocks == 0


def test_request_longer_than_cache_is_rejected_and_the_rest_finish(tmp_path):
    trace = tmp_path / "trace.jsonl"
    rows = ['{"prompt_len": 20, "max_tokens": 10}', '{"prompt_len": 400, "max_tokens": 10, "request_id": "huge"}',
            '{"prompt_len": 30, "max_tokens": 5, "arrival_time": 0.5}']
    trace.write_text("\n".join(rows) + "\n")
    result = run(**{"workload.name": "trace", "workload.path": str(trace), "kv_cache.num_blocks": 10})
    df = result.requests.set_index("request_id")
    assert df.loc["huge", "status"] == "rejected" and "cache" in df.loc["huge", "finish_reason"]
    assert result.summary["num_rejected"] == 1 and result.summary["num_finished"] == 2
    assert df.loc["0", "output_len"] == 10 and df.loc["2", "output_len"] == 5
    result.save(tmp_path / "run")  # mixed ids are written as text


def test_prefix_cache_hits_a_shared_system_prompt():
    cfg = {"workload.shared_prefix_len": 64, "workload.prompt_len": [80, 120], "workload.request_rate": 50.0}
    off, on = run(**cfg), run(**cfg, prefix_cache=True)
    assert off.summary["prefix_hit_rate"] == 0
    assert on.summary["prefix_hit_rate"] > 0.3
    assert finished_lengths(on) == finished_lengths(off)


def test_memory_accounting_splits_waste_exactly():
    result = run(**{"allocator.name": "contiguous_pow2"})
    s = result.steps
    assert (s.token_slots + s.reserved_slots + s.internal_frag == s.allocated_slots).all()
    assert (s.reserved_slots >= 0).all() and (s.internal_frag >= 0).all()
    total = result.summary
    parts = total["token_states_share"] + total["reserved_share"] + total["internal_frag_share"] + total[
        "external_frag_share"]
    assert parts == pytest.approx(1.0)
    assert 1 - total["memory_waste"] == pytest.approx(total["token_states_share"])
    assert sum(total[k] for k in POOL_SHARES) == pytest.approx(1.0)


@pytest.mark.parametrize("allocator", ["orca_max", "orca_pow2", "orca_oracle"])
def test_orca_runs_end_with_counts_adding_up(allocator):
    """Buddy placement under memory pressure (45 blocks = 32 + 8 + 4 + 1), with beam forks: every request
    ends, the invariants hold after every step, and nothing leaks."""
    cfg = {"allocator.name": allocator, "kv_cache.num_blocks": 45, "max_model_len": 128, "block_size": 8,
           "workload.num_requests": 12, "workload.prompt_len": [4, 40], "workload.output_len": [4, 40],
           "workload.beam_width": 2, "workload.request_rate": 20.0}
    built = build(make_cfg(**cfg))
    assert built.engine.bm.allocator == allocator and built.engine.bm._runs.buddy
    result = built.engine.run(built.requests, on_step=lambda row: built.engine.bm.check_invariants())
    s = result.summary
    assert s["num_finished"] + s["num_rejected"] == s["num_requests"] == 12 and s["num_finished"] > 0
    assert s["fork_copies"] > 0 and s["pool_free_share"] < 0.5  # forks copied; the pool was under pressure
    stats = built.engine.bm.stats()
    assert stats.used_blocks == 0 and stats.swapped_blocks == 0
    assert sum(s[k] for k in POOL_SHARES) == pytest.approx(1.0)


@pytest.mark.parametrize("allocator", ["paged", "contiguous_oracle", "orca_pow2"])
def test_pool_shares_split_the_whole_pool(allocator):
    result = run(**{"allocator.name": allocator, "kv_cache.num_blocks": 30, "max_model_len": 128})
    s, steps = result.summary, result.steps
    assert sum(s[k] for k in POOL_SHARES) == pytest.approx(1.0)
    assert all(0 <= s[k] <= 1 for k in POOL_SHARES)
    from pagedlab.engine.recorder import pool_split

    capacity = 30 * 16
    parts = pool_split(steps, capacity)
    assert (parts.sum(axis=1) == capacity).all() and (parts >= 0).all().all()
    loaded = steps[(steps.num_decode_seqs > 0) & (steps.num_waiting + steps.num_swapped > 0)]
    assert len(loaded) and s["pool_token_share"] == pytest.approx((loaded.token_slots / capacity).mean())
    if allocator == "paged":
        assert s["pool_external_frag_share"] == 0
    ample = run(**{"allocator.name": allocator, "max_model_len": 128})  # nothing waits: all decode steps
    decode, cap = ample.steps[ample.steps.num_decode_seqs > 0], ample.summary["num_blocks"] * 16
    assert (decode.num_waiting + decode.num_swapped == 0).all()
    assert ample.summary["pool_token_share"] == pytest.approx((decode.token_slots / cap).mean())
    assert ample.summary["pool_free_share"] > 0.9


def test_figure2_token_shares_ordered_as_in_the_paper():
    """The paper's Figure 2 setting (OPT-13B, one A100-40GB, 12 GiB of KV cache, ShareGPT): the share of
    the pool holding token states orders Orca Max < Pow2 < Oracle < paged (values: docs/metrics.md)."""
    cfg = {"workload.name": "sharegpt_like", "workload.num_requests": 300, "model.name": "opt_13b",
           "kv_cache.budget_gib": 12, "kv_cache.swap_gib": 0}
    share = {a: run(**cfg, **{"allocator.name": a}).summary["pool_token_share"]
             for a in ["orca_max", "orca_pow2", "orca_oracle", "paged"]}
    assert share["orca_max"] < share["orca_pow2"] < share["orca_oracle"] < share["paged"], share


def test_poisson_arrivals_and_latency_metrics():
    result = run(**{"workload.request_rate": 5.0})
    s = result.summary
    assert s["time_source"] == "modelled"
    assert s["throughput_tok_s"] > 0 and s["ttft_p50"] > 0 and s["normalized_latency_mean"] > 0
    assert (result.requests.arrival_time.diff().dropna() >= 0).all()


def test_paper_scale_memory_waste_paged_vs_contiguous_max():
    cfg = {"workload.name": "sharegpt_like", "workload.num_requests": 300}
    paged = run(**cfg).summary
    orca_max = run(**cfg, **{"allocator.name": "contiguous_max"}).summary
    assert paged["memory_waste"] < 0.04
    assert 0.12 < 1 - orca_max["memory_waste"] < 0.30
    assert paged["batch_size_mean"] > 2 * orca_max["batch_size_mean"]


def test_recompute_mode_swaps_groups_of_several_sequences():
    """Recomputing 3 beams re-prefills each on its own (9 blocks > 8): the group that fitted with
    sharing could never come back, so, as in vLLM, such groups are swapped while the host has room."""
    cfg = {"model.name": "tiny_llama", "max_model_len": 256, "block_size": 8, "kv_cache.num_blocks": 8,
           "workload.num_requests": 3, "workload.prompt_len": [4, 24], "workload.output_len": [3, 10],
           "workload.beam_width": 3}
    result = run(**cfg)
    s = result.summary
    assert s["num_rejected"] == 0 and s["num_preemptions"] > 0
    assert s["swapped_out_blocks"] > 0 and s["recomputed_tokens"] == 0
    assert (result.requests.output_len == result.requests.max_tokens).all()


def test_summary_keys_are_known_before_running():
    """The keys a `+objective` may name are known without a run, and are exactly a run's keys."""
    from pagedlab.experiment import summary_keys

    assert set(run(**{"workload.num_requests": 3}).summary) == summary_keys()


def test_docs_metrics_lists_every_column_and_summary_key():
    """docs/metrics.md has a table row for every step column, per-sequence column and summary key."""
    import re
    from pathlib import Path

    from pagedlab.experiment import summary_keys

    text = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()

    def rows(section: str) -> set[str]:
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        cells = re.findall(r"^\| ([^|]+) \|", body, re.MULTILINE)  # first cell; it may name several keys
        return {name for cell in cells for name in re.findall(r"`([a-z_0-9]+)`", cell)}

    result = run(**{"workload.num_requests": 3})
    assert rows("## Step columns") == set(result.steps.columns)
    assert rows("## Per-sequence columns") == set(result.requests.columns)
    assert rows("## Summary keys") == summary_keys()


def test_beam_scores_are_built_on_the_logits_device(monkeypatch):
    """Beam search adds the beams' cumulative scores to the step's log-probs: on CUDA both must be
    on the logits' device (no GPU here, so the device asked for is checked)."""
    import torch

    from pagedlab.engine.request import Request, SamplingParams, Sequence, SequenceGroup
    from pagedlab.engine.sampler import LogitsSampler

    group = SequenceGroup(Request(0, [1, 2], sampling=SamplingParams(beam_width=2)), Sequence(0, [1, 2], 2))
    group.seqs.append(group.seqs[0].fork(1))
    sampler = LogitsSampler()
    sampler.begin_step(torch.randn(2, 11))
    asked, real = [], torch.tensor

    def tensor(*args, **kwargs):
        asked.append(kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    assert len(sampler.beam(group, [0, 1], 2, first=False)) == 4
    assert asked and all(d == sampler.logits.device for d in asked)  # row ids and cumulative scores
