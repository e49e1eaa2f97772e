"""Figure 19: the cost of preemption, swapping against recomputation, per block size.

(a) Microbenchmark, from the cost model (docs/cost_model.md): moving one sequence's KV out to host memory and
back (one PCIe copy per block, for K and V, in every layer) against recomputing it as a prefill, OPT-13B on one
A100-40GB. (b) End to end: vLLM's normalized latency with ``eviction=swap`` and ``eviction=recompute`` under
memory pressure, ShareGPT-like requests at a fixed rate.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pagedlab.executors.base import ModelInput, StepInput
from pagedlab.executors.cost_model import CostModel
from pagedlab.figures import common, fig18
from pagedlab.figures.paper import FIG18B_BLOCK_SIZES, FIG19_COMPARABLE_AT, FIG19_SWAP_SLOWER_AT
from pagedlab.models.presets import hardware_spec, model_spec

SEQ_TOKENS = 512  # the microbenchmark's sequence (ours)
PAPER_SETTING = ("opt_13b", "a100_40gb")
# ours: Fig. 18b's ShareGPT rate and trace, 0.8 of vLLM's queue knee at block 16 (fig18.KNEE_FRACTION): memory
# binds and sequences are preempted, but the queue stays bounded
E2E_RATE, E2E_DURATION_S = fig18.WORKLOADS["sharegpt_like"]
SMALL_SIZES = (1, 64)
TODAY_SETTING = ("llama3_8b", "h100_80gb")
TODAY_EXTRA = ("max_model_len=8192", "max_num_seqs=1024", "workload.shared_prefix_len=256", "prefix_cache=true",
               "kv_cache.budget_gib=8")  # a small KV budget (ours), so that today's GPU preempts at all
# ours: a rate at which the 8 GiB pool runs short at block 16 too (at 24 req/s only small blocks preempt, at 6 none)
TODAY_RATE, TODAY_DURATION_S = 36.0, 125
MODES = ("recompute", "swap")
COLOURS = {"recompute": "#4c72b0", "swap": "#c44e52", "swap_out": "#dd8452", "swap_in": "#8172b2"}
EMPTY = ModelInput([], [], [], [], [], [], [])


def microbenchmark(model: str, hardware: str, block_size: int, tokens: int = SEQ_TOKENS) -> dict[str, float]:
    """Seconds to swap ``tokens`` tokens' KV out, in, and to recompute them as one prefill (the fixed per-step
    overhead left out of all three)."""
    cm = CostModel(model_spec(model), hardware_spec(hardware), block_size)
    blocks = [(i, i) for i in range(-(-tokens // block_size))]
    prefill = ModelInput([0], [0] * tokens, list(range(tokens)), [0] * tokens, [tokens], [tokens], [[]],
                         num_prefill_tokens=tokens)
    return {"swap_out_s": cm.breakdown(StepInput(EMPTY, swap_out=blocks))["swaps"],
            "swap_in_s": cm.breakdown(StepInput(EMPTY, swap_in=blocks))["swaps"],
            "recompute_s": cm.step_time(StepInput(prefill)) - cm.hw.step_overhead_s}


def e2e_overrides(mode: str, block_size: int, rate: float, num_requests: int, today: bool) -> list[str]:
    model, hardware = TODAY_SETTING if today else PAPER_SETTING
    extra = TODAY_EXTRA if today else common.table1_budget(model)
    return common.base_overrides(model, hardware, "sharegpt_like", *extra, "allocator=paged", f"eviction={mode}",
                                 f"block_size={block_size}", f"workload.request_rate={rate:g}",
                                 f"workload.num_requests={num_requests}", today=today)


def run(small: bool = False, today: bool = False) -> common.FigureOutput:
    model, hardware = TODAY_SETTING if today else PAPER_SETTING
    rows: list[dict[str, Any]] = []
    for b in FIG18B_BLOCK_SIZES:
        m = microbenchmark(model, hardware, b)
        rows.append({"part": "microbenchmark", "block_size": b, "tokens": SEQ_TOKENS, **m,
                     "swap_in_out_s": m["swap_out_s"] + m["swap_in_s"],
                     "swap_over_recompute": (m["swap_out_s"] + m["swap_in_s"]) / m["recompute_s"]})
    rate = TODAY_RATE if today else E2E_RATE
    num_requests = common.requests_for(rate, (TODAY_DURATION_S if today else E2E_DURATION_S) / (6 if small else 1), 30)
    for mode in MODES:
        for b in SMALL_SIZES if small else FIG18B_BLOCK_SIZES:
            s = common.run_point(e2e_overrides(mode, b, rate, num_requests, today))
            rows.append({"part": "end_to_end", "block_size": b, "eviction": mode, "rate": rate,
                         "num_requests": num_requests, "normalized_latency": s["normalized_latency_mean"],
                         "ttft_p50": s["ttft_p50"],
                         "num_preemptions": s["num_preemptions"], "swapped_out_blocks": s["swapped_out_blocks"],
                         "recomputed_tokens": s["recomputed_tokens"]})
    data = pd.DataFrame(rows)
    for i, (k, v) in enumerate({"scale": "today (ours)" if today else "paper", "model": model,
                                "hardware": hardware}.items()):
        data.insert(i, k, v)
    ours = settings_ours(today, rate, num_requests)
    data["ours"] = "; ".join(ours)
    micro = data[data["part"] == "microbenchmark"].set_index("block_size")
    e2e = data[data["part"] == "end_to_end"].pivot(index="block_size", columns="eviction", values="normalized_latency")
    small_b = [b for b in FIG19_SWAP_SLOWER_AT if b in micro.index]
    mid_b = [b for b in FIG19_COMPARABLE_AT if b in micro.index]
    compare = [
        {"result": f"microbenchmark: swap in+out / recompute, block {','.join(map(str, small_b))}",
         "paper": "" if today else "> 1 (swap slower)",
         "pagedlab": " / ".join(f"{micro.loc[b, 'swap_over_recompute']:.2f}" for b in small_b)},
        {"result": f"microbenchmark: swap in+out / recompute, block {','.join(map(str, mid_b))}",
         "paper": "" if today else "comparable",
         "pagedlab": " / ".join(f"{micro.loc[b, 'swap_over_recompute']:.2f}" for b in mid_b)},
    ]
    compare.append({"result": "end to end: latency with swap / recompute, block " + ",".join(map(str, e2e.index)),
                    "paper": "" if today else "> 1 at small blocks, ~1 at 16-64",
                    "pagedlab": " / ".join(f"{r.swap / r.recompute:.2f}" for r in e2e.itertuples())})
    title = ("Fig. 19 at today's scale (ours): swap vs recompute" if today
             else "Fig. 19: swap vs recompute per block size")
    return common.FigureOutput("fig19_today" if today else "fig19", title, data, pd.DataFrame(compare),
                               plot(data, today, model, hardware, rate), notes(today, ours))


def settings_ours(today: bool, rate: float, num_requests: int) -> list[str]:
    where = (f", {fig18.KNEE_FRACTION:g} of vLLM's queue knee at block 16 "
             f"(Fig. 12: {fig18.VLLM_QUEUE_KNEE_AT_16['sharegpt_like']:.3g} req/s), as in Fig. 18b")
    out = [f"(a) one {SEQ_TOKENS}-token sequence, from the cost model (one PCIe copy per block, K and V, per layer)",
           (f"(b) ShareGPT-like, {rate:g} req/s x {num_requests} requests{'' if today else where} (paper: its rate is "
            "not given in the text), 4 GiB of host swap space"), common.batching_note(today)]
    if today:
        out.insert(0, "today's scale: Llama 3 8B (GQA) on one H100-80GB with an 8 GiB KV budget, 256-token "
                      "shared system prompt, prefix cache on")
    else:
        out.insert(0, "KV slots as in the paper's Table 1")
    return out


def notes(today: bool, ours: list[str]) -> list[str]:
    return ["simulated (executor=sim); ours: " + "; ".join(ours),
            ("paper: §7.3 on Fig. 19, swapping is slower than recomputation at small blocks (many small PCIe "
            "transfers), recomputation costs the same at every block size, the two are comparable at 16-64")]


def plot(data: pd.DataFrame, today: bool, model: str, hardware: str, rate: float) -> Any:
    fig, axes = common.new_figure(ncols=2, width=4.2, height=3.4)
    ax = axes[0][0]
    m = data[data["part"] == "microbenchmark"].sort_values("block_size")
    for key, name, colour in (("recompute_s", "recompute", COLOURS["recompute"]),
                              ("swap_in_s", "swap in", COLOURS["swap_in"]),
                              ("swap_out_s", "swap out (= swap in)", COLOURS["swap_out"]),
                              ("swap_in_out_s", "swap in + out", COLOURS["swap"])):
        ax.plot(m["block_size"], m[key] * 1e3, "--" if key == "swap_out_s" else "o-", ms=3, color=colour, label=name)
    ax.axvspan(min(FIG19_COMPARABLE_AT) / 1.25, max(FIG19_COMPARABLE_AT) * 1.25, color="#55a868", alpha=0.15,
               label="paper: comparable (16-64)")
    common.log_axis(ax, "x")
    common.log_axis(ax, "y")
    ax.set_xticks(list(m["block_size"]))
    ax.set_xticklabels([str(b) for b in m["block_size"]])
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel(f"time, {SEQ_TOKENS}-token sequence (ms)")
    ax.set_title(f"(a) microbenchmark, {common.label(model, hardware)}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    e = data[data["part"] == "end_to_end"]
    for mode in MODES:
        g = e[e["eviction"] == mode].sort_values("block_size")
        ax.plot(g["block_size"], g["normalized_latency"], "o-", ms=3, color=COLOURS[mode], label=mode)
    ax.axvspan(min(FIG19_COMPARABLE_AT) / 1.25, max(FIG19_COMPARABLE_AT) * 1.25, color="#55a868", alpha=0.15,
               label="paper: comparable (16-64)")
    common.log_axis(ax, "x")
    blocks = sorted(e["block_size"].unique())
    ax.set_xticks(blocks)
    ax.set_xticklabels([str(b) for b in blocks])
    lat = e["normalized_latency"]
    if float(lat.max()) > 6 * float(lat.min()):  # small blocks' swaps run away: a log axis keeps every point
        common.log_axis(ax, "y")
    else:
        ax.set_ylim(0, float(lat.max()) * 1.1)
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("normalized latency (s/token)")
    ax.set_title(f"(b) end to end, ShareGPT, {rate:g} req/s", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.suptitle(("Fig. 19 at today's scale (ours): " if today else "Fig. 19: ")
                 + "swap vs recompute (simulated)", fontsize=11)
    return fig
