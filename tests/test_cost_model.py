"""The simulator's cost model (docs/cost_model.md): the Vidur cross-check, the direction of every term, the
paper's block-size and swap effects, tensor parallelism and the KV budget."""

from __future__ import annotations

import pytest

from pagedlab.executors.base import ModelInput, StepInput, StepOutput
from pagedlab.executors.cost_model import PARTS, CostModel, default_kv_budget_bytes, kv_read_slowdown
from pagedlab.executors.sim import SimExecutor
from pagedlab.models.presets import GIB, HARDWARE_PRESETS, hardware_spec, model_spec

EMPTY = ModelInput([], [], [], [], [], [], [])


def step(query_lens: list[int], context_lens: list[int], **moves: list[tuple[int, int]]) -> StepInput:
    """A step of sequences with these query and context lengths (no real ids, slots or tables needed)."""
    tokens = sum(query_lens)
    mi = ModelInput(list(range(len(query_lens))), [0] * tokens, [0] * tokens, [0] * tokens, list(query_lens),
                    list(context_lens), [[] for _ in query_lens],
                    num_prefill_tokens=sum(q for q in query_lens if q > 1))
    return StepInput(mi, **moves)


def decode(batch: int, context: int) -> StepInput:
    return step([1] * batch, [context] * batch)


def cost(model: str = "llama_7b", hardware: str = "a100_80gb", block_size: int = 16, paged: bool = True) -> CostModel:
    return CostModel(model_spec(model), hardware_spec(hardware), block_size, paged=paged)


def test_vidur_cross_check_batch_256_decode_at_context_300() -> None:
    """Vidur (MLSys 2024, profiled A100 operators): 45 ms for this step; one max(compute, memory) over the
    whole step gave 35 ms, hiding the 40 GB of KV reads under the GEMMs."""
    parts = cost().breakdown(decode(256, 300))
    assert sum(parts.values()) == pytest.approx(45e-3, rel=0.10)
    assert parts["attention"] > parts["gemm"] > 0  # the KV reads are not hidden under the GEMMs


def test_decode_step_grows_with_context_and_batch() -> None:
    cm = cost()
    by_context = [cm.step_time(decode(64, c)) for c in (16, 128, 512, 2048)]
    by_batch = [cm.step_time(decode(b, 512)) for b in (1, 8, 64, 256)]
    assert by_context == sorted(by_context) and len(set(by_context)) == 4
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4


def test_prefill_attention_is_causal_and_quadratic() -> None:
    cm = cost("llama_13b", "a100_40gb")
    one, two = (cm.breakdown(step([n], [n]))["attention"] for n in (2048, 4096))
    assert 3.3 < two / one < 4.0  # compute-bound: (q, ctx) pairs grow with n^2 (plus the linear KV write)
    # a chunk of 100 new tokens after 100 cached ones: 100 * 200 - 100 * 99 / 2 pairs, less than 100 x 200
    assert cm.breakdown(step([100], [200]))["attention"] < cm.breakdown(step([200], [200]))["attention"]


def test_a_mixed_step_pays_for_its_decodes_and_its_prefill() -> None:
    cm = cost()
    prefill, decodes = step([2048], [2048]), decode(128, 1000)
    mixed = step([2048] + [1] * 128, [2048] + [1000] * 128)
    decode_attention = cm.breakdown(decodes)["attention"]
    assert cm.step_time(mixed) > cm.step_time(prefill) + 0.9 * decode_attention


@pytest.mark.parametrize("model", ["llama_7b", "opt_13b", "llama3_8b"])
def test_smaller_blocks_cost_more_attention_and_16_to_128_is_flat(model: str) -> None:
    attention = {b: cost(model, block_size=b).breakdown(decode(64, 1024))["attention"] for b in (1, 2, 4, 8, 16,
                                                                                                  32, 64, 128)}
    small = [attention[b] for b in (1, 2, 4, 8, 16)]
    assert small == sorted(small, reverse=True) and len(set(small)) == 5  # strictly cheaper up to 16
    assert attention[1] > 1.5 * attention[16]
    assert attention[128] <= attention[16] < 1.10 * attention[128]  # flat-ish from 16 to 128


def test_paged_kernel_costs_20_to_26_percent_more_than_contiguous_at_block_16() -> None:
    """Paper Fig. 18a; a contiguous allocator's run reads at contiguous speed whatever its block size."""
    paged = cost().breakdown(decode(64, 1024))["attention"]
    contiguous = [cost(block_size=b, paged=False).breakdown(decode(64, 1024))["attention"] for b in (1, 16, 128)]
    assert 1.20 <= paged / contiguous[1] <= 1.26
    assert contiguous[0] == contiguous[1] == contiguous[2]
    assert kv_read_slowdown(16) == 1.0


def test_swapping_small_blocks_costs_more_than_moving_the_same_bytes_in_large_ones() -> None:
    pairs = [(i, 100 + i) for i in range(64)]
    small = cost(block_size=4).breakdown(StepInput(EMPTY, swap_out=pairs))["swaps"]
    large = cost(block_size=16).breakdown(StepInput(EMPTY, swap_out=pairs[:16]))["swaps"]
    assert small > 2 * large > 0
    # a contiguous layout copies each run of consecutive blocks at once
    contiguous = cost(block_size=4, paged=False).breakdown(StepInput(EMPTY, swap_out=pairs))["swaps"]
    assert contiguous < small


def test_swap_vs_recompute_follows_paper_figure_19() -> None:
    """Swapping a 512-token sequence out and back in vs recomputing it as a prefill (OPT-13B, one A100-40GB):
    swap slower at block sizes <= 8, comparable (within 2x either way) at 16-64."""
    n = 512
    ratio = {}
    for b in (1, 2, 4, 8, 16, 32, 64):
        cm = cost("opt_13b", "a100_40gb", block_size=b)
        recompute = cm.step_time(step([n], [n])) - cm.hw.step_overhead_s
        blocks = [(i, i) for i in range(-(-n // b))]
        ratio[b] = 2 * cm.breakdown(StepInput(EMPTY, swap_out=blocks))["swaps"] / recompute
    assert all(ratio[b] > 1.5 for b in (1, 2, 4, 8))
    assert all(0.5 < ratio[b] < 2 for b in (16, 32, 64))
    assert list(ratio.values()) == sorted(ratio.values(), reverse=True)


def test_tensor_parallel_step_is_faster_but_pays_for_communication() -> None:
    one, four = cost("opt_66b", "a100_40gb"), cost("opt_66b", "a100_40gb_x4")
    for s in (decode(64, 512), step([1024], [1024])):
        parts1, parts4 = one.breakdown(s), four.breakdown(s)
        assert parts1["communication"] == 0 < parts4["communication"]
        assert sum(parts4.values()) < sum(parts1.values())
        assert parts4["gemm"] == pytest.approx(parts1["gemm"] / 4, rel=0.05)


def test_kv_budget_counts_every_gpu() -> None:
    """Paper Table 1: OPT-66B on 4 x A100-40GB holds about 9.7K KV slots; OPT-13B on one A100-40GB 15.7K."""
    opt66, x4 = model_spec("opt_66b"), hardware_spec("a100_40gb_x4")
    budget = default_kv_budget_bytes(opt66, x4, 0.9)
    assert budget == 4 * 40 * GIB * 0.9 - opt66.weight_bytes
    assert budget / opt66.kv_bytes_per_token == pytest.approx(9.7e3, rel=0.05)
    opt13 = model_spec("opt_13b")
    assert default_kv_budget_bytes(opt13, hardware_spec("a100_40gb"), 0.9) / opt13.kv_bytes_per_token == (
        pytest.approx(15.7e3, rel=0.05))
    assert default_kv_budget_bytes(opt66, hardware_spec("a100_40gb"), 0.9) < 0  # does not fit one GPU


def test_kv_heads_fewer_than_gpus_are_replicated() -> None:
    tiny = model_spec("tiny_llama")  # 2 KV heads: on 8 GPUs each GPU keeps one whole head
    x8 = hardware_spec("a100_80gb_x8")
    assert default_kv_budget_bytes(tiny, x8, 0.5) == pytest.approx((8 * 80 * GIB * 0.5 - tiny.weight_bytes) / 4)


@pytest.mark.parametrize("name", sorted(HARDWARE_PRESETS))
def test_every_hardware_preset_costs_a_step(name: str) -> None:
    hw = HARDWARE_PRESETS[name]
    assert hw.name == name and hw.total_memory_gib == hw.memory_gib * hw.num_gpus
    executor = SimExecutor(model_spec("llama3_8b"), hw, 16, paged=True)
    out = executor.execute(step([100, 1, 1], [100, 50, 70], cow_copies=[(1, 2)], swap_in=[(3, 4)]))
    assert isinstance(out, StepOutput) and out.logits is None and out.time_s > hw.step_overhead_s
    parts = executor.cost.breakdown(step([100, 1, 1], [100, 50, 70]))
    assert set(parts) == set(PARTS) and (parts["communication"] > 0) == (hw.num_gpus > 1)


def test_an_empty_step_costs_only_its_moves() -> None:
    cm = cost()
    assert cm.step_time(StepInput(EMPTY)) == cm.hw.step_overhead_s
    assert cm.step_time(StepInput(EMPTY, fork_copies=[(0, 1)])) > cm.hw.step_overhead_s


def test_bench_compares_old_and_new_side_by_side(capsys: pytest.CaptureFixture[str]) -> None:
    from pagedlab.bench.cost_model import LegacyCost, decode_step, main

    old = LegacyCost(model_spec("llama_7b"), hardware_spec("a100_80gb"), 16).step_time(decode_step(256, 300))
    assert old == pytest.approx(35e-3, rel=0.02)  # the figure for the whole-step roofline
    main(["--num-requests", "20", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "Vidur cross-check" in out and "old 35.0 ms" in out and "new 44.9 ms" in out
    assert out.count("seq-steps/s") >= 3


def test_host_overhead_vllm_2023_adds_a_per_sequence_share() -> None:
    """`executor.host_overhead=vllm_2023` (Vidur's profile of a 2023 vLLM engine): 2 ms a step + 0.171 ms a
    sequence; the default ("preset") keeps the preset's fixed 2 ms."""
    from pagedlab.models.presets import HOST_OVERHEADS

    base = hardware_spec("a100_40gb")
    assert base.with_host_overhead("preset") is base and base.seq_overhead_s == 0.0
    paper = base.with_host_overhead("vllm_2023")
    assert (paper.step_overhead_s, paper.seq_overhead_s) == HOST_OVERHEADS["vllm_2023"]
    model = model_spec("opt_13b")
    old, new = CostModel(model, base, 16), CostModel(model, paper, 16)
    for batch in (1, 8, 64):
        extra = new.breakdown(decode(batch, 100))["overhead"] - old.breakdown(decode(batch, 100))["overhead"]
        assert extra == pytest.approx(0.171e-3 * batch)
    assert new.step_time(StepInput(EMPTY)) == paper.step_overhead_s  # nothing per sequence with none
    with pytest.raises(ValueError, match="host_overhead"):
        base.with_host_overhead("bogus")


def test_sim_backend_takes_the_host_overhead_from_the_executor_config() -> None:
    from pagedlab.app.api import compose
    from pagedlab.config import ConfigError
    from pagedlab.experiment import run_experiment

    common = ("executor=sim", "logger=none", "model=opt_13b", "workload=fixed", "workload.num_requests=8")
    times = {}
    for profile in ("preset", "vllm_2023"):
        result = run_experiment(compose(*common, f"executor.host_overhead={profile}"), progress=False)
        times[profile] = float(result.steps["step_time"].sum())
    assert times["vllm_2023"] > times["preset"]  # same steps, each pays 0.171 ms per sequence more
    with pytest.raises(ConfigError, match="host_overhead"):
        run_experiment(compose(*common, "executor.host_overhead=bogus"), progress=False)
