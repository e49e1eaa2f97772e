"""Figure 13: the mean number of requests batched together at a fixed request rate, vLLM vs Orca.

OPT-13B on one A100-40GB serves a Poisson ShareGPT-like trace at 2 requests/s (the paper's Fig. 13a);
``batch_size_mean`` is the mean number of sequences in a step's batch over all steps (docs/metrics.md).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pagedlab.figures import common
from pagedlab.figures.fig12 import COLOURS
from pagedlab.figures.paper import FIG13_BATCH_RATIO, FIG13_RATE, SYSTEM_LABELS, TRACE_MINUTES

SYSTEMS = ("orca_max", "orca_pow2", "orca_oracle", "paged")
PAPER_SETTING = ("opt_13b", "a100_40gb", "sharegpt_like")
DURATION_S = 600  # ours (the paper: 1-hour traces)
# today's scale (ours): as fig12 --today, at a rate near Orca (Oracle)'s knee there
TODAY_SETTING = ("llama3_8b", "h100_80gb", "sharegpt_like")
TODAY_EXTRA = ("max_model_len=8192", "max_num_seqs=1024", "workload.shared_prefix_len=256")
TODAY_RATE = 8.0
TODAY_DURATION_S = 120


def overrides(system: str, rate: float, num_requests: int, today: bool) -> list[str]:
    setting, extra = (TODAY_SETTING, list(TODAY_EXTRA)) if today else (PAPER_SETTING, [])
    if today and system == "paged":
        extra.append("prefix_cache=true")
    return common.base_overrides(*setting, *extra, f"allocator={system}", f"workload.request_rate={rate:g}",
                                 f"workload.num_requests={num_requests}", today=today)


def run(small: bool = False, today: bool = False) -> common.FigureOutput:
    rate = TODAY_RATE if today else FIG13_RATE
    duration = (20 if small else TODAY_DURATION_S) if today else (60 if small else DURATION_S)
    num_requests = common.requests_for(rate, duration, 30)
    rows: list[dict[str, Any]] = []
    for system in SYSTEMS:
        s = common.run_point(overrides(system, rate, num_requests, today))
        rows.append({"system": system, "label": SYSTEM_LABELS[system], "rate": rate, "num_requests": num_requests,
                     "batch_size_mean": s["batch_size_mean"], "batch_size_max": s["batch_size_max"],
                     "normalized_latency": s["normalized_latency_mean"], "num_preemptions": s["num_preemptions"]})
    data = pd.DataFrame(rows)
    vllm = float(data.loc[data["system"] == "paged", "batch_size_mean"].iloc[0])
    data["vllm_ratio"] = vllm / data["batch_size_mean"]
    data["paper_vllm_ratio"] = [float("nan") if today else FIG13_BATCH_RATIO.get(x, float("nan"))
                                for x in data["system"]]
    model, hardware, workload = TODAY_SETTING if today else PAPER_SETTING
    for i, (k, v) in enumerate({"scale": "today (ours)" if today else "paper", "model": model, "hardware": hardware,
                                "workload": workload}.items()):
        data.insert(i, k, v)
    ours = settings_ours(today, num_requests, duration)
    data["ours"] = "; ".join(ours)
    compare = pd.DataFrame([
        {"result": f"vLLM / {r.label}: mean batched requests",
         "paper": f"{r.paper_vllm_ratio:.1f}x" if r.paper_vllm_ratio == r.paper_vllm_ratio else "",
         "pagedlab": f"{r.vllm_ratio:.2f}x ({vllm:.1f} / {r.batch_size_mean:.1f})"}
        for r in data.itertuples() if r.system != "paged"])
    title = ("Fig. 13 at today's scale (ours): mean batched requests" if today
             else f"Fig. 13a: mean batched requests at {rate:g} req/s")
    return common.FigureOutput("fig13_today" if today else "fig13", title, data, compare,
                               plot(data, today, model, hardware, rate), notes(today, ours))


def settings_ours(today: bool, num_requests: int, duration: float) -> list[str]:
    out = [f"a Poisson trace of {duration:g} s ({num_requests} requests; paper: {TRACE_MINUTES['opt_13b']} min)",
           "synthetic lengths fitted to the paper's means (161 in / 338 out)", common.batching_note(today)]
    if today:
        out.insert(0, f"today's scale, ours: Llama 3 8B (GQA) on one H100-80GB at {TODAY_RATE:g} req/s, "
                      "max_model_len 8192, max_num_seqs 1024, 256-token shared system prompt (prefix cache on for vLLM)")
    return out


def notes(today: bool, ours: list[str]) -> list[str]:
    return ["simulated (executor=sim); ours: " + "; ".join(ours),
            "paper: §6.2 on Fig. 13a, vLLM batches 2.2x the requests of Orca (Oracle) and 4.3x those of Orca (Max)"
            + (" (OPT-13B at 2 req/s, for reference only)" if today else "")]


def plot(data: pd.DataFrame, today: bool, model: str, hardware: str, rate: float) -> Any:
    fig, axes = common.new_figure(ncols=2, width=4.2, height=3.6)
    ax = axes[0][0]
    ax.bar(data["label"], data["batch_size_mean"], color=[COLOURS[s] for s in data["system"]])
    for x, v in enumerate(data["batch_size_mean"]):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("mean batched requests (sequences)")
    ax.set_title(f"{common.label(model, hardware, 'sharegpt_like')}, {rate:g} req/s", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax = axes[0][1]
    others = data[data["system"] != "paged"]
    xs = range(len(others))
    ax.bar([x - 0.2 for x in xs], others["vllm_ratio"], 0.4, color="#c44e52", label="pagedlab (simulated)")
    if not today:
        ax.bar([x + 0.2 for x in xs], others["paper_vllm_ratio"].fillna(0), 0.4, color="#999999",
               label="paper (§6.2, Fig. 13a)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"vs {label}" for label in others["label"]], fontsize=7)
    ax.set_ylabel("vLLM's mean batch / Orca's (x)")
    ax.axhline(1, color="black", lw=0.6)
    ax.legend(fontsize=7)
    ax.set_title("ratio, vLLM over each Orca", fontsize=9)
    fig.suptitle(("Fig. 13 at today's scale (ours)" if today else "Fig. 13a: mean batched requests (simulated)"),
                 fontsize=11)
    return fig
