"""Simulator speed and the paper's Figure 2 check, side by side in one run.

    python -m pagedlab.bench.sim [--num-requests 1000] [--model llama_13b] [--hardware a100_40gb]
                                 [--budget-gib 12] [--request-rate R]

Runs the same sharegpt_like workload (all requests at t=0, or Poisson at ``--request-rate``) through each
allocator policy and prints wall time, steps/s, sequence-steps/s, memory waste, the token-state share over
allocated memory (``1 - memory_waste``) and over the whole KV pool (``pool_token_share``, what the vLLM
paper's Figure 2 reports), next to the paper's Figure 2 figures. The paper's Orca baselines are
``orca_max`` / ``orca_pow2`` / ``orca_oracle`` (buddy placement); ``contiguous_*`` place the same
reservations first fit at their exact size, a stronger baseline of pagedlab's own. The paper's setting
(docs/metrics.md, "Reference numbers"): OPT-13B on one A100-40GB with about 12 GiB of KV cache, i.e.
``--model opt_13b --budget-gib 12``.
"""

from __future__ import annotations

import argparse
import time

from pagedlab.experiment import run_experiment

PAPER_TOKEN_SHARE = {"orca_max": 0.204, "orca_pow2": 0.268, "orca_oracle": 0.382, "paged": 0.963}


def sim_config(allocator: str, num_requests: int, model: str, hardware: str, block_size: int,
               budget_gib: float | None = None, request_rate: float | None = None):
    """The composed config of a simulated run (as ``python -m pagedlab.run`` would build it)."""
    from pagedlab.app.api import compose

    extra = [] if budget_gib is None else [f"kv_cache.budget_gib={budget_gib}"]
    extra += [] if request_rate is None else [f"workload.request_rate={request_rate}"]
    return compose("executor=sim", f"allocator={allocator}", f"model={model}", f"hardware={hardware}",
                   "workload=sharegpt_like", f"workload.num_requests={num_requests}", f"block_size={block_size}",
                   "kv_cache.swap_gib=0", "sampling.max_tokens=64", "logger=none", *extra)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--model", default="llama_13b")
    ap.add_argument("--hardware", default="a100_40gb")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--budget-gib", type=float, default=None, help="KV budget (default: the hardware's)")
    ap.add_argument("--request-rate", type=float, default=None,
                    help="requests/s, Poisson (default: all at t=0)")
    ap.add_argument("--allocators", default="paged,orca_oracle,orca_pow2,orca_max,"
                    "contiguous_oracle,contiguous_pow2,contiguous_max")
    args = ap.parse_args(argv)
    arrivals = "at t=0" if args.request_rate is None else f"at {args.request_rate} req/s"
    budget = "" if args.budget_gib is None else f", {args.budget_gib:g} GiB of KV"
    print(f"sharegpt_like x {args.num_requests} {arrivals}, {args.model} on {args.hardware}{budget}, "
          f"block {args.block_size}")
    head = (f"{'allocator':18} {'wall s':>7} {'steps':>6} {'steps/s':>8} {'seq-steps/s':>12} {'waste':>7} "
            f"{'token share':>11} {'pool token':>10} {'paper':>6} {'batch':>6} {'tok/s (model)':>13}")
    print(head)
    print("-" * len(head))
    for allocator in args.allocators.split(","):
        cfg = sim_config(allocator, args.num_requests, args.model, args.hardware, args.block_size,
                         args.budget_gib, args.request_rate)
        t0 = time.perf_counter()
        res = run_experiment(cfg, progress=False)
        wall = time.perf_counter() - t0
        s, steps = res.summary, res.steps
        seq_steps = int(steps["batch_size"].sum())
        paper = PAPER_TOKEN_SHARE.get(allocator)
        print(f"{allocator:18} {wall:7.2f} {len(steps):6d} {len(steps) / wall:8.0f} {seq_steps / wall:12.0f} "
              f"{s['memory_waste']:7.3f} {1 - s['memory_waste']:11.3f} {s['pool_token_share']:10.3f} "
              f"{paper if paper else '':>6} {s['batch_size_mean']:6.1f} {s['throughput_tok_s']:13.0f}")


if __name__ == "__main__":
    main()
