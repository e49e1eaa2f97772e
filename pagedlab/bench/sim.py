"""Simulator speed and the paper's Figure 2 check, side by side in one run.

    python -m pagedlab.bench.sim [--num-requests 1000] [--model llama_13b] [--hardware a100_40gb]

Runs the same sharegpt_like workload (all requests at t=0) through each allocator policy and
prints wall time, steps/s, sequence-steps/s, memory waste and the token-state share next to the
vLLM paper's Figure 2 figures.
"""

from __future__ import annotations

import argparse
import time

from pagedlab.experiment import run_experiment

PAPER_TOKEN_SHARE = {"contiguous_max": 0.204, "contiguous_pow2": 0.268, "contiguous_oracle": 0.382, "paged": 0.963}


def sim_config(allocator: str, num_requests: int, model: str, hardware: str, block_size: int):
    """The composed config of a simulated run (as ``python -m pagedlab.run`` would build it)."""
    from pagedlab.app.api import compose

    return compose("executor=sim", f"allocator={allocator}", f"model={model}", f"hardware={hardware}",
                   "workload=sharegpt_like", f"workload.num_requests={num_requests}", f"block_size={block_size}",
                   "kv_cache.swap_gib=0", "sampling.max_tokens=64", "logger=none")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--model", default="llama_13b")
    ap.add_argument("--hardware", default="a100_40gb")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--allocators", default="paged,contiguous_oracle,contiguous_pow2,contiguous_max")
    args = ap.parse_args(argv)
    print(f"sharegpt_like x {args.num_requests} at t=0, {args.model} on {args.hardware}, block {args.block_size}")
    head = (f"{'allocator':18} {'wall s':>7} {'steps':>6} {'steps/s':>8} {'seq-steps/s':>12} {'waste':>7} "
            f"{'token share':>11} {'paper':>6} {'batch':>6} {'tok/s (model)':>13}")
    print(head)
    print("-" * len(head))
    for allocator in args.allocators.split(","):
        cfg = sim_config(allocator, args.num_requests, args.model, args.hardware, args.block_size)
        t0 = time.perf_counter()
        res = run_experiment(cfg, progress=False)
        wall = time.perf_counter() - t0
        s, steps = res.summary, res.steps
        seq_steps = int(steps["batch_size"].sum())
        paper = PAPER_TOKEN_SHARE.get(allocator)
        print(f"{allocator:18} {wall:7.2f} {len(steps):6d} {len(steps) / wall:8.0f} {seq_steps / wall:12.0f} "
              f"{s['memory_waste']:7.3f} {1 - s['memory_waste']:11.3f} {paper if paper else '':>6} "
              f"{s['batch_size_mean']:6.1f} {s['throughput_tok_s']:13.0f}")


if __name__ == "__main__":
    main()
