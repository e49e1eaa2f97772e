"""End to end: pagedlab's real engine (executor=torch) generates exactly the tokens Hugging Face's
`generate()` does, whatever the memory policy underneath: allocator, block size, copy-on-write,
attention kernel, preemption by recompute or swap, prefix cache; and beam search returns HF's beams.

Tiny random-init Llama and Qwen2 models (fp32) are saved once per session and loaded back through
`model.name_or_path`. The HF reference is computed per request (no padding), greedy or beam, with
`max_new_tokens` = the request's `max_tokens` and EOS only where the request does not ignore it (the
workloads set `ignore_eos`), and memoised for the session, so every configuration of a workload reuses it.
`-m "not slow"` runs one case per dimension; the slow matrix crosses them.
"""

from __future__ import annotations

from functools import cache

import pandas as pd
import pytest
import torch
from cpu_kernel_here import needs_cpu_kernel
from test_engine import make_cfg
from transformers import AutoModelForCausalLM

from pagedlab.engine.preemption import VICTIMS
from pagedlab.experiment import build_requests, run_experiment
from pagedlab.models.tiny import save_tiny_model

KINDS = ["llama", "qwen2"]
ALLOCATORS = ["paged", "contiguous_max", "contiguous_pow2", "contiguous_oracle"]
WORKLOAD = {  # 8 requests, all at t=0, prompts of 4-40 tokens, 2-20 new tokens each
    "executor.name": "torch", "model.name": "hf", "model.dtype": "float32", "device": "cpu",
    "max_model_len": 256, "kv_cache.budget_gib": 0.01,
    "workload.num_requests": 8, "workload.prompt_len": [4, 40], "workload.output_len": [2, 20],
}
TRITON = {"kernel": {"_target_": "pagedlab.kernels.triton_backend.TritonKernel", "name": "triton"},
          "workload.num_requests": 3, "workload.prompt_len": [4, 12],
          "workload.output_len": [2, 5]}  # Triton's interpreter on the CPU: a few short requests
CPU = {"kernel": {"_target_": "pagedlab.kernels.cpu_kernel.CpuKernel", "name": "cpu"}}  # C decode attention
TIGHT = {"kv_cache.num_blocks": 6}  # 96 slots at block_size 16: the batch cannot all stay resident
SAMPLED = {"workload.n": 3, "sampling.temperature": 1.0, "sampling.top_k": 50, "sampling.top_p": 0.9,
           "sampling.seed": 7, "workload.num_requests": 4}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Saved on first use: "llama", "qwen2", and "llama-eos<T>" (llama's weights with EOS token T)."""
    root = tmp_path_factory.mktemp("e2e_models")

    class Dirs(dict):
        def __missing__(self, name: str) -> str:
            kind, _, eos = name.partition("-eos")
            extra = {"eos_token_id": int(eos)} if eos else {}
            self[name] = str(save_tiny_model(root / name, kind, seed=KINDS.index(kind), **extra))
            return self[name]

    return Dirs()


@pytest.fixture(scope="session")
def hf(model_dirs):
    """`hf(kind, cfg)`: HF's outputs for the config's greedy or beam requests, {request_id: [tokens of
    each row]} (beams best first)."""

    @cache
    def model(kind: str):
        m = AutoModelForCausalLM.from_pretrained(model_dirs[kind], dtype=torch.float32).eval()
        m.generation_config.eos_token_id = None  # eos_token_id=None in generate() falls back to this
        return m

    @cache
    def generate(kind: str, prompt: tuple[int, ...], max_tokens: int, beams: int, eos: int | None):
        beam = {"num_beams": beams, "num_return_sequences": beams, "length_penalty": 0.0,
                "early_stopping": True} if beams > 1 else {}
        with torch.inference_mode():
            out = model(kind).generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0, **beam)
        rows = out[:, len(prompt):].tolist()
        return [row[: row.index(eos) + 1] if eos in row else row for row in rows]  # no padding after EOS

    def reference(kind: str, cfg) -> dict:
        requests = build_requests(cfg, vocab_size=1024, max_model_len=int(cfg.max_model_len))
        return {r.request_id: r.sampling.n * generate(  # greedy samples: n copies of the greedy output
                    kind, tuple(r.prompt_token_ids), r.sampling.max_tokens, r.sampling.beam_width,
                    None if r.sampling.ignore_eos else model(kind).config.eos_token_id)
                for r in requests}

    return reference


def config(model_dirs, kind: str, **dotted):
    return make_cfg(**{**WORKLOAD, "model.name_or_path": model_dirs[kind], **dotted})


def tokens(result) -> dict:
    """{request_id: [output_token_ids of each row, seq_index order]} of a run (finished requests only)."""
    df = result.requests
    assert (df.status == "finished").all()
    return {rid: [list(t) for t in rows.sort_values("seq_index").output_token_ids]
            for rid, rows in df.groupby("request_id", sort=True)}


def run(cfg, max_steps: int = 3000):
    """run_experiment, failing instead of hanging when a scheduler livelock keeps it stepping."""
    def guard(row: dict) -> None:
        assert row["step"] <= max_steps, f"no end after {max_steps} steps (livelock?)"

    return run_experiment(cfg, progress=False, on_step=guard)


def check_matches_hf(model_dirs, hf, kind: str, **dotted):
    cfg = config(model_dirs, kind, **dotted)
    result = run(cfg)
    got, want = tokens(result), hf(kind, cfg)
    assert got.keys() == want.keys()
    for rid in want:  # one request at a time: a failure names the first that differs
        assert got[rid] == want[rid], f"request {rid}"
    return result


# -- greedy, under every memory policy ----------------------------------------------------------------------

PREEMPTS = ("num_preemptions", "recomputed_tokens")
SWAPS = ("num_preemptions", "swapped_out_blocks", "swapped_in_blocks")


def slow(*args, **kw):
    return pytest.param(*args, **kw, marks=pytest.mark.slow)


def with_cpu_kernel(*args, slow: bool = False, **kw):
    """A case of kernel=cpu: skipped where it cannot be built."""
    return pytest.param(*args, **kw, marks=[needs_cpu_kernel(), *([pytest.mark.slow] if slow else [])])


# (model, config overrides, summary counters the case must exercise (> 0)); the unmarked ones cover each
# dimension once, the slow ones cross them.
GREEDY = [
    pytest.param("llama", {}, (), id="llama-paged-block16"),
    pytest.param("qwen2", {}, (), id="qwen2-paged-block16"),
    pytest.param("llama", {"model.forward": "hf"}, (), id="llama-hf-modules"),  # the rest: compact forward
    pytest.param("qwen2", {**TRITON, "model.forward": "hf", "block_size": 8}, (), id="qwen2-triton-hf-modules"),
    pytest.param("llama", {"block_size": 1}, (), id="llama-block1"),
    pytest.param("qwen2", {"block_size": 32, "allocator.name": "contiguous_max"}, (), id="qwen2-max-block32"),
    pytest.param("llama", {"block_size": 8, "allocator.name": "contiguous_pow2"}, (), id="llama-pow2-block8"),
    pytest.param("qwen2", {"allocator.name": "contiguous_oracle", "allocator.order": "fifo"}, (), id="qwen2-oracle"),
    # n=3 greedy samples: one output thrice, from shared blocks (copy-on-write at every append into the
    # shared last block) or from blocks copied at fork
    pytest.param("llama", {"workload.n": 3, "cow": True, "block_size": 8}, ("cow_copies",), id="llama-n3-cow"),
    pytest.param("qwen2", {"workload.n": 3, "cow": False}, ("fork_copies",), id="qwen2-n3-copy"),
    pytest.param("llama", {**TIGHT, "eviction.mode": "recompute"}, PREEMPTS, id="llama-recompute"),
    pytest.param("llama", {**TIGHT, "eviction.mode": "swap"}, SWAPS, id="llama-swap"),
    *[slow(k, {"block_size": b}, (), id=f"{k}-block{b}") for k, b in
      [("llama", 8), ("llama", 32), ("qwen2", 1), ("qwen2", 8)]],
    *[slow(k, {"allocator.name": a, "block_size": b}, (), id=f"{k}-{a}-block{b}")
      for k in KINDS for a in ALLOCATORS[1:] for b in (8, 32)],
    *[slow(k, {**TIGHT, "eviction.mode": m, "eviction.victim": v}, SWAPS if m == "swap" else PREEMPTS,
           id=f"{k}-{m}-{v}") for k in KINDS for m in ("recompute", "swap") for v in VICTIMS],
    slow("llama", {"block_size": 1, "kv_cache.num_blocks": 96}, PREEMPTS, id="llama-block1-recompute"),
    slow("qwen2", {"block_size": 2, "kv_cache.num_blocks": 48, "eviction.mode": "swap"}, SWAPS,
         id="qwen2-block2-swap"),
    slow("llama", {**TIGHT, "eviction.mode": "swap", "kv_cache.swap_gib": 2 * 16 * 2048 / 2**30},
         (*SWAPS, "recomputed_tokens"), id="llama-swap-space-full"),  # the host holds 2 blocks: falls back
    slow("qwen2", {"allocator.name": "contiguous_pow2", "kv_cache.num_blocks": 8, "max_model_len": 64},
         (), id="qwen2-pow2-admission-waits"),  # reservations never grow: requests wait instead
    slow("llama", {"workload.n": 3, "cow": True, "eviction.mode": "swap", "kv_cache.num_blocks": 10},
         (*SWAPS, "cow_copies"), id="llama-n3-cow-swap"),
    slow("qwen2", {"workload.n": 3, "cow": False, "kv_cache.num_blocks": 10, "kv_cache.swap_gib": 0},
         (*PREEMPTS, "fork_copies"),
         id="qwen2-n3-copy-recompute"),
    # recomputed groups of 3 samples outgrow the 48-token budget: re-prefilled in chunks
    pytest.param("qwen2", {"workload.n": 3, "cow": False, "kv_cache.num_blocks": 10, "kv_cache.swap_gib": 0,
                           "max_num_batched_tokens": 48}, (*PREEMPTS, "chunked_prefill_tokens"),
                 id="qwen2-n3-recompute-chunked"),
    slow("llama", {"workload.n": 3, "cow": True, "block_size": 4, "kv_cache.num_blocks": 30, "kv_cache.swap_gib": 0,
                   "max_num_batched_tokens": 40}, (*PREEMPTS, "chunked_prefill_tokens"),
         id="llama-n3-cow-recompute-chunked"),
    slow("llama", {"workload.n": 2, "allocator.name": "contiguous_oracle"}, (), id="llama-n2-oracle"),
    slow("qwen2", {"prefix_cache": True, "block_size": 4, "workload.shared_prefix_len": 24,
                   "workload.prompt_len": [26, 40], "workload.request_rate": 20.0}, (),
         id="qwen2-prefix-poisson"),  # arrivals on the wall clock: hits vary, tokens must not
    slow("llama", {**TIGHT, "prefix_cache": True, "workload.shared_prefix_len": 32, "workload.n": 2,
                   "workload.prompt_len": [34, 40], "kv_cache.swap_gib": 0}, ("prefix_hit_rate", *PREEMPTS),
         id="llama-prefix-n2-tight"),  # no host space: the n=2 groups are recomputed, hitting the cache
    pytest.param("qwen2", {**TRITON, "block_size": 8}, (), id="qwen2-triton"),
    with_cpu_kernel("llama", CPU, (), id="llama-cpu"),
    with_cpu_kernel("qwen2", {**CPU, "model.forward": "hf", "block_size": 8}, (), id="qwen2-cpu-hf-modules"),
    with_cpu_kernel("qwen2", {**CPU, **TIGHT, "eviction.mode": "swap"}, SWAPS, id="qwen2-cpu-swap"),
    with_cpu_kernel("llama", {**CPU, "workload.n": 3, "cow": True, "block_size": 4}, ("cow_copies",),
                    id="llama-cpu-n3-cow"),
    with_cpu_kernel("llama", {**CPU, **TIGHT, "eviction.mode": "recompute"}, PREEMPTS, slow=True,
                    id="llama-cpu-recompute"),
    with_cpu_kernel("qwen2", {**CPU, "block_size": 1}, (), slow=True, id="qwen2-cpu-block1"),
    with_cpu_kernel("llama", {**CPU, "block_size": 32, "allocator.name": "contiguous_max"}, (), slow=True,
                    id="llama-cpu-max-block32"),
    with_cpu_kernel("qwen2", {**CPU, "prefix_cache": True, "block_size": 4, "workload.shared_prefix_len": 8,
                              "workload.prompt_len": [10, 14]}, ("prefix_hit_rate",), slow=True,
                    id="qwen2-cpu-prefix"),
    slow("llama", {**TRITON, "block_size": 16, "cow": True, "workload.n": 2}, ("cow_copies",),
         id="llama-triton-n2-cow"),
    slow("qwen2", {**TRITON, "block_size": 4, "kv_cache.num_blocks": 6, "eviction.mode": "swap"}, SWAPS,
         id="qwen2-triton-swap"),
    slow("llama", {**TRITON, "block_size": 4, "kv_cache.num_blocks": 5}, PREEMPTS, id="llama-triton-recompute"),
    slow("qwen2", {**TRITON, "block_size": 32, "allocator.name": "contiguous_max"}, (), id="qwen2-triton-max"),
    slow("llama", {**TRITON, "prefix_cache": True, "block_size": 4, "workload.shared_prefix_len": 8,
                   "workload.prompt_len": [10, 14]}, ("prefix_hit_rate",), id="llama-triton-prefix"),
]


@pytest.mark.parametrize(("kind", "case", "expect"), GREEDY)
def test_greedy_matches_hf(model_dirs, hf, kind, case, expect):
    """Every row of every request is HF's greedy continuation."""
    result = check_matches_hf(model_dirs, hf, kind, **case)
    for key in expect:
        assert result.summary[key] > 0, key


def test_prefix_cache_matches_hf(model_dirs, hf):
    """Requests share a 32-token system prompt; all arrive at once, so the first prompt's blocks are
    registered at admission and the others read them in the same forward pass (the kernel writes
    every new token's K/V of a layer before attending)."""
    result = check_matches_hf(model_dirs, hf, "llama", prefix_cache=True, block_size=8, **{
        "workload.shared_prefix_len": 32, "workload.prompt_len": [34, 60]})
    assert result.summary["prefix_hit_rate"] > 0.3


def test_saved_requests_parquet_holds_the_generated_tokens(model_dirs, hf, tmp_path):
    result = check_matches_hf(model_dirs, hf, "llama", **{"workload.n": 2})
    saved = pd.read_parquet(result.save(tmp_path) / "requests.parquet")
    assert saved.request_id.tolist() == result.requests.request_id.tolist()
    assert saved.seq_index.tolist() == result.requests.seq_index.tolist()
    assert [list(t) for t in saved.output_token_ids] == [list(t) for t in result.requests.output_token_ids]
    assert (saved.output_len == saved.output_token_ids.map(len)).all()


# -- parallel sampling -------------------------------------------------------------------------------------

def sampled(model_dirs, **dotted) -> dict:
    return tokens(run(config(model_dirs, "llama", **{**SAMPLED, **dotted})))


def test_parallel_sampling_is_reproducible_and_seeded(model_dirs):
    """n=3 at temperature 1.0 with top-k / top-p: the same seeds give the same tokens, sharing (cow=true)
    or copying (cow=false) the prompt's blocks; another sampling seed gives other tokens."""
    a = sampled(model_dirs, cow=True)
    assert all(len(rows) == 3 for rows in a.values())
    assert any(len({tuple(t) for t in rows}) > 1 for rows in a.values())  # the samples diverge
    assert sampled(model_dirs, cow=True) == a
    assert sampled(model_dirs, cow=False) == a
    assert sampled(model_dirs, **{"sampling.seed": 8}) != a


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_parallel_sampling_survives_preemption(model_dirs, mode):
    """Preempted samples keep their tokens and their generator: the same tokens as with ample memory."""
    tight = run(config(model_dirs, "llama", **SAMPLED, **{"kv_cache.num_blocks": 8, "eviction.mode": mode}))
    assert tight.summary["num_preemptions"] > 0
    assert tokens(tight) == sampled(model_dirs)


# -- beam search -------------------------------------------------------------------------------------------

BEAM = {"workload.num_requests": 3, "workload.prompt_len": [4, 24], "workload.output_len": [3, 10]}


@pytest.mark.parametrize(("kind", "width", "case", "expect"), [
    pytest.param("llama", 3, {}, ("cow_copies",), id="llama-3"),
    pytest.param("qwen2", 2, {"cow": False, "block_size": 4}, ("fork_copies",), id="qwen2-2-copy"),
    slow("qwen2", 4, {"block_size": 1}, (), id="qwen2-4-block1"),
    slow("llama", 4, {"allocator.name": "contiguous_pow2"}, (), id="llama-4-pow2"),
    # no host space: a beam group is recomputed (with room on the host it would be swapped, as in vLLM)
    slow("llama", 3, {"block_size": 8, "kv_cache.num_blocks": 10, "kv_cache.swap_gib": 0}, PREEMPTS,
         id="llama-3-recompute"),
    slow("qwen2", 3, {"block_size": 8, "kv_cache.num_blocks": 10, "eviction.mode": "swap"}, SWAPS, id="qwen2-3-swap"),
    slow("qwen2", 3, {"cow": False, "block_size": 8, "kv_cache.num_blocks": 12, "eviction.mode": "swap",
                      "workload.num_requests": 6}, (*SWAPS, "fork_copies"), id="qwen2-3-copy-swap"),
    slow("llama", 3, {"prefix_cache": True, "block_size": 4, "workload.shared_prefix_len": 8},
         ("prefix_hit_rate", "cow_copies"), id="llama-3-prefix"),
    slow("llama", 2, {**TRITON, "block_size": 8}, ("cow_copies",), id="llama-2-triton"),
    with_cpu_kernel("qwen2", 3, {**CPU, "block_size": 8}, ("cow_copies",), id="qwen2-3-cpu"),
    # copies at fork under pressure, no host space, a small token budget: beams are preempted and
    # recomputed, and still return HF's beams
    pytest.param("llama", 3, {"cow": False, "prefix_cache": True, "block_size": 4, "kv_cache.num_blocks": 28,
                              "kv_cache.swap_gib": 0, "max_num_batched_tokens": 32, "workload.num_requests": 4,
                              "workload.shared_prefix_len": 8, "workload.output_len": [10, 20]},
                 ("fork_copies", *PREEMPTS), id="llama-3-copy-prefix-tight"),
])
def test_beam_search_matches_hf(model_dirs, hf, kind, width, case, expect):
    """The rows of a beam request are HF's `num_return_sequences=num_beams` beams, best first (with no
    EOS every beam has max_tokens tokens, so HF's length_penalty and early_stopping do not matter)."""
    result = check_matches_hf(model_dirs, hf, kind, **{**BEAM, **case, "workload.beam_width": width})
    assert result.requests.groupby("request_id").cumulative_logprob.apply(lambda s: s.is_monotonic_decreasing).all()
    for key in expect:
        assert result.summary[key] > 0, key


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_beam_group_that_fills_the_cache_exactly_is_not_preempted(model_dirs, hf, mode):
    """A 17-token prompt (3 blocks of 8, the last holding 1 token) and 3 beams of 5 new tokens need
    2 shared + 3 own blocks: all 5 of the cache. After the first step the 3 beams share the partial
    last block and free blocks are 2: two copy-on-write copies, and the third beam writes in place.
    (Counting 3 copies once preempted this lone group for good: by recompute it was then rejected,
    by swap it was swapped out and in forever.)"""
    result = check_matches_hf(model_dirs, hf, "llama", block_size=8, **{
        "workload.name": "fixed", "workload.num_requests": 1, "workload.prompt_len": [17, 17],
        "workload.output_len": [5, 5], "workload.beam_width": 3, "kv_cache.num_blocks": 5, "eviction.mode": mode})
    assert result.summary["num_preemptions"] == 0 and result.summary["cow_copies"] > 0


def test_eos_stops_like_hf(model_dirs, hf):
    """With `ignore_eos=false` a greedy sequence ends with the model's EOS token, as in HF."""
    result = check_matches_hf(model_dirs, hf, "llama-eos83", **{"sampling.ignore_eos": False})
    df = result.requests
    assert ((df.finish_reason == "eos") & (df.output_len < df.max_tokens)).any()


def test_beam_search_with_eos_matches_hf(model_dirs, hf):
    """Beam search with EOS: finished hypotheses ranked by cumulative log-prob, and the search ends once
    num_beams of them have ended with EOS, returning those only: HF's `length_penalty=0.0,
    early_stopping=True`. (HF's defaults, length_penalty=1.0 and early_stopping=False, rank by
    log-prob / length and search on while a live beam could still win: a different, not a wrong,
    policy, that pagedlab does not implement.) Request 6 here finishes three EOS hypotheses before
    max_tokens while a live beam scores higher than the third: HF returns the hypothesis, and so
    must pagedlab."""
    result = check_matches_hf(model_dirs, hf, "llama-eos1014", **{
        "workload.beam_width": 3, "workload.num_requests": 16, "sampling.ignore_eos": False})
    df = result.requests
    assert (df[df.request_id == 6].finish_reason == "eos").all()
