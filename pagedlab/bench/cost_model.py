"""The simulator's cost model against the one it replaced, side by side in one run.

    python -m pagedlab.bench.cost_model [--num-requests 1000] [--model llama_13b] [--hardware a100_40gb]
                                        [--block-size 16] [--rounds 3]

1. The Vidur cross-check step (Llama-2-7B on one A100-80GB, a decode step of 256 sequences at context 300):
   modelled time by the old formula and by the new one, with the new one's parts.
2. Speed: the same sharegpt_like workload (all requests at t=0, paged allocator) simulated end to end with
   each model, rounds interleaved (wall s, sequence-steps/s, modelled tok/s), then the cost model alone
   timed on the steps of that run (µs per step).

The old formula is kept here only for this comparison: max(compute, memory) over the whole step at 60 %
of peak FLOP/s and 80 % of HBM bandwidth, + block copies + swaps at 25 GB/s + 2 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from pagedlab.bench.sim import sim_config
from pagedlab.executors import sim as sim_module
from pagedlab.executors.base import ModelInput, StepInput
from pagedlab.executors.cost_model import CostModel
from pagedlab.experiment import run_experiment
from pagedlab.models.presets import HardwareSpec, ModelSpec, hardware_spec, model_spec


class LegacyCost:
    """The cost model before docs/cost_model.md: one roofline over the whole step."""

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, block_size: int) -> None:
        m = model
        self.model, self.hw = model, hardware
        self.block_bytes = block_size * model.kv_bytes_per_token
        self._flops_per_token = 2 * (m.num_params - m.vocab_size * m.hidden_size)
        self._attn_flops = 4 * m.num_layers * m.num_heads * m.head_dim
        self._lm_head_flops = 2 * m.vocab_size * m.hidden_size
        self._peak = hardware.peak_tflops * 1e12 * 0.6
        self._bw = hardware.hbm_gb_s * 1e9 * 0.8

    def step_time(self, step: StepInput) -> float:
        mi = step.model_input
        if not mi.num_seqs:
            compute = memory = 0.0
        else:
            qc = sum(q * c for q, c in zip(mi.query_lens, mi.context_lens))
            flops = self._flops_per_token * mi.num_tokens + self._attn_flops * qc + self._lm_head_flops * mi.num_seqs
            kv_bytes = self.model.kv_bytes_per_token * (sum(mi.context_lens) + mi.num_tokens)
            compute = flops / self._peak
            memory = (self.model.weight_bytes + kv_bytes) / self._bw
        copies = 2 * (len(step.cow_copies) + len(step.fork_copies)) * self.block_bytes / self._bw
        swaps = (len(step.swap_in) + len(step.swap_out)) * self.block_bytes / 25e9
        return max(compute, memory) + copies + swaps + 2e-3


def decode_step(batch: int, context: int) -> StepInput:
    """A decode step of ``batch`` sequences, each at KV length ``context`` after the step."""
    ones = [1] * batch
    return StepInput(ModelInput(list(range(batch)), [0] * batch, [0] * batch, [0] * batch, ones, [context] * batch,
                                [[]] * batch))


def _legacy_step_time(self: Any, step: StepInput) -> float:
    legacy = self.__dict__.get("_legacy_cost")
    if legacy is None:
        legacy = self._legacy_cost = LegacyCost(self.model, self.hw, self.cost.block_size)
    return legacy.step_time(step)


def simulate(cfg: Any, which: str) -> tuple[float, Any]:
    """Wall seconds and result of one simulated run with the ``old`` or ``new`` step time."""
    new = sim_module.SimExecutor.step_time
    if which == "old":
        sim_module.SimExecutor.step_time = _legacy_step_time
    try:
        t0 = time.perf_counter()
        res = run_experiment(cfg, progress=False)
        return time.perf_counter() - t0, res
    finally:
        sim_module.SimExecutor.step_time = new


def record_steps(cfg: Any) -> list[StepInput]:
    """The StepInputs of one simulated run."""
    steps: list[StepInput] = []
    execute = sim_module.SimExecutor.execute

    def recording(self: Any, step: StepInput) -> Any:
        steps.append(step)
        return execute(self, step)

    sim_module.SimExecutor.execute = recording
    try:
        run_experiment(cfg, progress=False)
    finally:
        sim_module.SimExecutor.execute = execute
    return steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--model", default="llama_13b")
    ap.add_argument("--hardware", default="a100_40gb")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    m7, a100 = model_spec("llama_7b"), hardware_spec("a100_80gb")
    step = decode_step(256, 300)
    new = CostModel(m7, a100, 16)
    parts = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in new.breakdown(step).items() if v)
    print("Vidur cross-check: llama_7b on a100_80gb, decode 256 x context 300 (Vidur: 45 ms)")
    print(f"  old {LegacyCost(m7, a100, 16).step_time(step) * 1e3:.1f} ms   new {new.step_time(step) * 1e3:.1f} ms"
          f"   ({parts} ms)")

    cfg = sim_config("paged", args.num_requests, args.model, args.hardware, args.block_size)
    print(f"\nsharegpt_like x {args.num_requests} at t=0, {args.model} on {args.hardware}, block {args.block_size}, "
          f"{args.rounds} rounds interleaved (median)")
    walls: dict[str, list[float]] = {"old": [], "new": []}
    results: dict[str, Any] = {}
    for _ in range(args.rounds):
        for which in ("old", "new"):
            wall, results[which] = simulate(cfg, which)
            walls[which].append(wall)
    head = f"{'model':6} {'wall s':>7} {'steps':>6} {'seq-steps/s':>12} {'tok/s (modelled)':>17} {'makespan s':>11}"
    print(head)
    print("-" * len(head))
    for which in ("old", "new"):
        res, wall = results[which], statistics.median(walls[which])
        seq_steps = int(res.steps["batch_size"].sum())
        print(f"{which:6} {wall:7.2f} {len(res.steps):6d} {seq_steps / wall:12.0f} "
              f"{res.summary['throughput_tok_s']:17.0f} {res.steps['time'].iloc[-1]:11.1f}")

    steps = record_steps(cfg)
    exec_new = sim_module.SimExecutor(model_spec(args.model), hardware_spec(args.hardware), args.block_size)
    costs = {"old": LegacyCost(model_spec(args.model), hardware_spec(args.hardware), args.block_size).step_time,
             "new": exec_new.step_time}
    per_step: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for which, fn in costs.items():
            t0 = time.perf_counter()
            for s in steps:
                fn(s)
            per_step[which].append((time.perf_counter() - t0) / len(steps))
    seq_steps = sum(len(s.model_input.seq_ids) for s in steps)
    print(f"\ncost model alone on the run's {len(steps)} steps ({seq_steps} sequence-steps)")
    for which in ("old", "new"):
        us = statistics.median(per_step[which]) * 1e6
        print(f"{which:6} {us:7.1f} µs/step  {seq_steps / (us * 1e-6 * len(steps)):12.0f} seq-steps/s")


if __name__ == "__main__":
    main()
