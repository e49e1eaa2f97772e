"""The GPU-ready host path (issue 13, deliverable 4), checked on the CPU where the code is shared:

- nothing is read back from the device inside a step (`TorchExecutor.execute`), and the sampler brings
  a step's choices to the host in one transfer;
- sampling is batched and a request's tokens do not depend on which other requests share its batch;
- block copies and swaps through the reused staging buffers give what direct copies give, and the
  staging is counted in the KV budget.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from test_e2e import SAMPLED, config, model_dirs, run, tokens  # noqa: F401 (model_dirs: a fixture)

from pagedlab.engine.request import GroupStatus, Request, SamplingParams, Sequence, SequenceGroup
from pagedlab.engine.sampler import LogitsSampler
from pagedlab.executors import torch_executor
from pagedlab.executors.torch_executor import TorchExecutor, reserved_bytes
from pagedlab.kernels import get_kernel, kv_cache
from pagedlab.kernels.kv_cache import KVCache, staging_bytes
from pagedlab.models.presets import model_spec

VOCAB = 50
READ_BACKS = ("item", "cpu", "tolist", "numpy", "__int__", "__float__", "__index__", "__bool__")


# -- sampling ------------------------------------------------------------------------------------------------

def group(rid, *, rows=1, **sampling) -> SequenceGroup:
    g = SequenceGroup(Request(rid, [1, 2, 3], sampling=SamplingParams(**sampling)), Sequence(rid * 10, [1, 2, 3], 3))
    for i in range(1, rows):
        g.seqs.append(g.seqs[0].fork(rid * 10 + i))
    g.status = GroupStatus.RUNNING
    return g


def step(sampler: LogitsSampler, groups: list[SequenceGroup], rows: dict, plan: bool) -> dict:
    """One step over `groups` (rows of logits from `rows[request_id]`), as the lifecycle asks."""
    logits = torch.cat([rows[g.request_id][: len(g.seqs)] for g in groups])
    sampler.begin_step(logits)
    if plan:
        sampler.plan_step(SimpleNamespace(scheduled=[(g, list(g.seqs)) for g in groups], chunk_end={}))
    out, r = {}, 0
    for g in groups:
        idx = list(range(r, r + len(g.seqs)))
        r += len(g.seqs)
        if g.is_beam:
            out[g.request_id] = sampler.beam(g, idx, g.sampling.beam_width, False)
        else:
            out[g.request_id] = [sampler.sample(g, i) for i in idx]
    return out


def test_sampled_tokens_do_not_depend_on_the_batch():
    """A request's draws depend on its seed and its own history only: alone, or batched with greedy,
    random and beam groups (in any order), planned or not, it gets the same tokens."""
    gen = torch.Generator().manual_seed(0)
    steps = [{rid: torch.randn(3, VOCAB, generator=gen) for rid in range(5)} for _ in range(6)]

    def tokens_of_0(others: list[int], plan: bool, first: bool = False) -> list:
        sampler = LogitsSampler(base_seed=1)
        a = group(0, rows=2, temperature=0.8, top_k=20, top_p=0.9)
        kinds = {1: {"temperature": 0.0}, 2: {"temperature": 1.3, "seed": 5}, 3: {"beam_width": 3},
                 4: {"temperature": 1.0, "top_p": 0.5}}
        gs = [group(r, rows=3 if r == 3 else 1, **kinds[r]) for r in others]
        batch = [a, *gs] if first else [*gs, a]
        return [step(sampler, batch, rows, plan)[0] for rows in steps]

    alone = tokens_of_0([], plan=True)
    assert len({t for s in alone for t in s}) > 3  # really random
    assert tokens_of_0([1, 2, 3, 4], plan=True) == alone
    assert tokens_of_0([3, 1], plan=True, first=True) == alone
    assert tokens_of_0([2, 4], plan=False) == alone


def test_a_planned_draw_not_taken_is_made_again():
    """A group planned but not sampled (preempted after the forward for a beam's fork room) draws the
    same token at its next step as if the plan had never been made."""
    row = torch.randn(1, VOCAB)
    a, b = LogitsSampler(), LogitsSampler()
    g = group(0, temperature=1.0)
    a.begin_step(row)
    a.plan_step(SimpleNamespace(scheduled=[(g, list(g.seqs))], chunk_end={}))  # planned, never taken
    a.begin_step(row)
    b.begin_step(row)
    assert a.sample(g, 0) == b.sample(g, 0)


def test_batched_beam_scores_match_one_group_at_a_time():
    gen = torch.Generator().manual_seed(3)
    groups = [group(0, rows=2, beam_width=2), group(1, rows=4, beam_width=4), group(2, rows=3, beam_width=3)]
    for i, g in enumerate(groups):
        for j, s in enumerate(g.seqs):
            s.cum_logprob = -0.5 * (i + j)
    logits = torch.randn(9, VOCAB, generator=gen)
    batched, single = LogitsSampler(), LogitsSampler()
    batched.begin_step(logits)
    batched.plan_step(SimpleNamespace(scheduled=[(g, list(g.seqs)) for g in groups], chunk_end={}))
    single.begin_step(logits)
    r = 0
    for g in groups:
        rows = list(range(r, r + len(g.seqs)))
        r += len(g.seqs)
        got = batched.beam(g, rows, g.sampling.beam_width, False)
        want = single.beam(g, rows, g.sampling.beam_width, False)
        assert got == want and len(got) == 2 * g.sampling.beam_width
        lp = torch.log_softmax(logits[rows], -1) + torch.tensor([s.cum_logprob for s in g.seqs])[:, None]
        parent, token, score = got[0]
        assert score == pytest.approx(lp.max().item()) and lp[parent, token] == lp.max()
    assert batched.transfers == 1


def test_parallel_sampling_does_not_depend_on_the_batch(model_dirs):  # noqa: F811
    """End to end: n=3 samples of 4 requests, batched together or one group at a time, same tokens."""
    together = tokens(run(config(model_dirs, "llama", **SAMPLED)))
    alone = tokens(run(config(model_dirs, "llama", **SAMPLED, max_num_seqs=3)))
    assert together == alone


# -- no read back inside a step -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", [
    pytest.param({**SAMPLED, "kv_cache.num_blocks": 8, "eviction.mode": "swap"}, id="sampled-swap"),
    pytest.param({"workload.num_requests": 6, "workload.prompt_len": [4, 24], "workload.output_len": [3, 10],
                  "workload.beam_width": 3, "cow": False, "block_size": 8, "kv_cache.num_blocks": 12,
                  "eviction.mode": "swap"}, id="beam-copy-swap"),  # test_e2e's qwen2-3-copy-swap, on llama
    pytest.param({**SAMPLED, "kv_cache.num_blocks": 8, "eviction.mode": "swap", "model.forward": "hf"},
                 id="sampled-swap-hf-modules"),
])
def test_no_read_back_inside_a_step_and_one_transfer_per_step(model_dirs, monkeypatch, case):  # noqa: F811
    """Every tensor-to-host conversion raises inside `TorchExecutor.execute` (block copies, swaps,
    metadata, forward); the sampler brings each step's choices to the host once, when planned. The KV
    cache runs staged as on CUDA (one block per chunk) and gives the tokens of the direct copies."""
    want = tokens(run(config(model_dirs, "llama", **case)))
    init = KVCache.__init__
    monkeypatch.setattr(kv_cache, "SWAP_CHUNK_BYTES", 1)
    monkeypatch.setattr(KVCache, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "staged": True}))
    state = {"in_step": False, "outside_plan": 0, "steps": 0}
    execute = TorchExecutor.execute

    def guarded_execute(self, step_input):
        state["in_step"] = True
        try:
            return execute(self, step_input)
        finally:
            state["in_step"] = False

    for name in READ_BACKS:
        real = getattr(torch.Tensor, name)

        def guard(self, *args, _real=real, _name=name, **kwargs):
            if state["in_step"]:
                raise AssertionError(f"Tensor.{_name} inside a step")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, guard)
    monkeypatch.setattr(TorchExecutor, "execute", guarded_execute)
    plan_step, compute = LogitsSampler.plan_step, LogitsSampler._compute

    def counted_plan(self, sched):
        state["planning"] = True
        before = self.transfers
        try:
            plan_step(self, sched)
        finally:
            state["planning"] = False
        assert self.transfers - before <= 1
        state["steps"] += 1

    def counted_compute(self, *args):
        state["outside_plan"] += not state.get("planning")
        return compute(self, *args)

    monkeypatch.setattr(LogitsSampler, "plan_step", counted_plan)
    monkeypatch.setattr(LogitsSampler, "_compute", counted_compute)
    result = run(config(model_dirs, "llama", **case))
    s = result.summary
    assert s["num_finished"] == s["num_requests"] and s["swapped_out_blocks"] > 0 and s["swapped_in_blocks"] > 0
    assert state["steps"] > 0 and state["outside_plan"] == 0
    assert tokens(result) == want


# -- staged copies and swaps, and the budget --------------------------------------------------------------

def test_staged_copies_and_swaps_match_direct_ones_and_reuse_the_staging(monkeypatch):
    """Chunks of 2 blocks through the device staging, swaps through the pinned (here: plain) staging:
    the same pools as direct copies; the host staging is allocated once for swaps of one size."""
    block_bytes = 2 * 2 * 4 * 2 * 8 * 4  # layers, K/V, block_size, heads, dim, fp32
    monkeypatch.setattr(kv_cache, "SWAP_CHUNK_BYTES", 2 * block_bytes)
    staged = KVCache(2, 12, 4, 2, 8, torch.float32, "cpu", num_swap_blocks=6, staged=True)
    direct = KVCache(2, 12, 4, 2, 8, torch.float32, "cpu", num_swap_blocks=6, staged=False)
    assert staged.chunk_blocks == 2 and staging_bytes(staged.block_bytes) == 2 * block_bytes
    staged.pool.copy_(torch.randn_like(staged.pool))
    direct.pool.copy_(staged.pool)
    staged.host.zero_()  # the host pool starts uninitialised
    direct.host.zero_()
    rng = random.Random(0)
    for i in range(20):
        blocks = rng.sample(range(12), 6)
        pairs = list(zip(blocks[:3], blocks[3:]))
        swaps = list(zip(rng.sample(range(12), 3), rng.sample(range(6), 3)))
        for kv in (staged, direct):
            with torch.inference_mode(i % 2 == 0):  # the staging serves in and out of inference mode
                kv.copy_blocks(pairs)
                kv.swap_out(swaps)
                kv.swap_in([(h, d) for d, h in swaps[::-1]])
                kv.copy_blocks([(1, 2), (2, 3), (3, 4)])  # a chain: every source is read before any write
        assert torch.equal(staged.pool, direct.pool) and torch.equal(staged.host, direct.host)
    assert staged.pinned_allocations == 1
    assert staged._stage.numel() * staged._stage.element_size() <= staging_bytes(staged.block_bytes)


def test_swap_out_is_in_the_host_pool_when_read():
    kv = KVCache(1, 4, 2, 1, 4, torch.float32, "cpu", num_swap_blocks=2, staged=True)
    kv.pool.copy_(torch.randn_like(kv.pool))
    kv.swap_out([(3, 1)])
    assert torch.equal(kv.host[:, :, 1], kv.pool[:, :, 3])


def test_budget_counts_the_staging_and_the_sampler(monkeypatch):
    """`reserved_bytes` (what the default CUDA budget subtracts) holds the kernel's workspace, the
    activations, the KV cache's device staging for block copies and swaps, and the sampler's batched work."""
    spec = model_spec("llama3_8b")
    for name in ("torch_gather", "triton"):
        kernel = get_kernel(name)
        full = reserved_bytes(spec, kernel, 8192, 256, 8192, block_size=16)
        monkeypatch.setattr(torch_executor, "staging_bytes", lambda block_bytes: 0)
        assert full - reserved_bytes(spec, kernel, 8192, 256, 8192, block_size=16) == \
            staging_bytes(16 * spec.kv_bytes_per_token) >= 16 * spec.kv_bytes_per_token
        monkeypatch.undo()
    assert staging_bytes(1 << 30) == 1 << 30  # at least one block, whatever its size


# -- block tables on the device ----------------------------------------------------------------------------

def test_device_block_tables_send_only_what_changed():
    """Across steps of appends, copy-on-write replacements, shrinking tables and more sequences than
    slots, the device rows equal the host tables; a step where no table changed writes nothing."""
    from pagedlab.kernels.metadata import DeviceBlockTables, build_metadata

    bs, rng = 4, random.Random(1)
    dev_tables = DeviceBlockTables("cpu", slots=4, width=2)
    tables: dict[int, list[int]] = {}
    next_id = 0
    for step_no in range(60):
        if len(tables) < 6 or rng.random() < 0.2:  # a new sequence
            tables[next_id] = [rng.randrange(100) for _ in range(rng.randint(1, 5))]
            next_id += 1
        if rng.random() < 0.2:  # one ends
            tables.pop(rng.choice(list(tables)))
        for t in tables.values():
            r = rng.random()
            if r < 0.3:
                t.append(rng.randrange(100))
            elif r < 0.4:
                t[rng.randrange(len(t))] = rng.randrange(100)  # copy-on-write
            elif r < 0.45 and len(t) > 1:
                t.pop()
        batch = rng.sample(list(tables), min(len(tables), rng.randint(1, 7)))
        ctx = [len(tables[s]) * bs - rng.randrange(bs) for s in batch]
        host = [list(tables[s]) for s in batch]
        meta = build_metadata([1] * len(batch), ctx, host, list(range(len(batch))), bs, "cpu",
                              seq_ids=batch, device_tables=dev_tables)
        want = build_metadata([1] * len(batch), ctx, host, list(range(len(batch))), bs, "cpu")
        for i, c in enumerate(ctx):
            n = -(-c // bs)
            assert meta.block_tables[i, :n].tolist() == want.block_tables[i, :n].tolist() == host[i][:n], step_no
        before = dev_tables.written
        build_metadata([1] * len(batch), ctx, host, list(range(len(batch))), bs, "cpu",
                       seq_ids=batch, device_tables=dev_tables)
        assert dev_tables.written == before  # nothing changed: nothing sent
    assert dev_tables.table.shape[0] >= 7 and dev_tables.table.shape[1] >= 5
