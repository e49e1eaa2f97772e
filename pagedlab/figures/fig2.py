"""Figure 2: where the KV cache memory goes, Orca (Max / Pow2 / Oracle) against vLLM.

Each system serves the same ShareGPT-like requests on OPT-13B with the paper's ~12 GiB of KV cache (one
A100-40GB); the shares are of the whole KV pool (``pool_*_share``, docs/metrics.md), averaged over the decode
steps in which requests waited for memory: token states, reserved slots, internal and external fragmentation,
and free slots.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pagedlab.figures import common
from pagedlab.figures.paper import FIG2_TOKEN_SHARE, SYSTEM_LABELS

SYSTEMS = ("orca_max", "orca_pow2", "orca_oracle", "paged")
SHARES = {  # summary key -> label, colour (the paper's Fig. 2 legend)
    "pool_token_share": ("token states", "#4c72b0"),
    "pool_reserved_share": ("reservation", "#dd8452"),
    "pool_internal_frag_share": ("internal fragmentation", "#c44e52"),
    "pool_external_frag_share": ("external fragmentation and others", "#8c8c8c"),
    "pool_free_share": ("free", "#e5e5e5"),
}
PAPER_SETTING = ("opt_13b", "a100_40gb", "sharegpt_like")
# today's scale (ours): Llama 3 8B (GQA) on one H100-80GB with its default KV budget, 8K context (Orca (Max)
# reserves 8192 tokens), up to 1024 sequences, a 256-token system prompt shared by all and cached by vLLM
TODAY_SETTING = ("llama3_8b", "h100_80gb", "sharegpt_like")
TODAY_EXTRA = ("max_model_len=8192", "max_num_seqs=1024", "workload.shared_prefix_len=256")


def overrides(system: str, num_requests: int, today: bool) -> list[str]:
    if today:
        extra = [*TODAY_EXTRA, *(["prefix_cache=true"] if system == "paged" else [])]
        return common.base_overrides(*TODAY_SETTING, *extra, f"allocator={system}",
                                     f"workload.num_requests={num_requests}", "kv_cache.swap_gib=0", today=True)
    return common.base_overrides(*PAPER_SETTING, f"allocator={system}", f"workload.num_requests={num_requests}",
                                 "kv_cache.budget_gib=12", "kv_cache.swap_gib=0")


def run(small: bool = False, today: bool = False) -> common.FigureOutput:
    num_requests = (300 if small else 3000) if today else (100 if small else 1000)
    rows: list[dict[str, Any]] = []
    for system in SYSTEMS:
        s = common.run_point(overrides(system, num_requests, today))
        rows.append({"system": system, "label": SYSTEM_LABELS[system], **{k: s[k] for k in SHARES},
                     "paper_token_share": float("nan") if today else FIG2_TOKEN_SHARE[system],
                     "batch_size_mean": s["batch_size_mean"], "num_blocks": s["num_blocks"],
                     "num_requests": num_requests})
    data = pd.DataFrame(rows)
    model, hardware, workload = TODAY_SETTING if today else PAPER_SETTING
    data.insert(0, "scale", "today (ours)" if today else "paper")
    data.insert(1, "model", model)
    data.insert(2, "hardware", hardware)
    data.insert(3, "workload", workload)
    ours = settings_ours(today, num_requests)
    data["ours"] = "; ".join(ours)
    compare = pd.DataFrame([{"result": f"{SYSTEM_LABELS[r.system]}: token states",
                             "paper": "" if today else f"{FIG2_TOKEN_SHARE[r.system]:.1%}",
                             "pagedlab": f"{r.pool_token_share:.1%}"} for r in data.itertuples()])
    title = ("Fig. 2 at today's scale (ours): KV memory" if today
             else "Fig. 2: share of KV memory holding token states")
    return common.FigureOutput("fig2_today" if today else "fig2", title, data, compare,
                               plot(data, today, model, hardware), notes(today, ours))


def settings_ours(today: bool, num_requests: int) -> list[str]:
    out = [f"{num_requests} ShareGPT-like requests all arriving at t=0 (the paper measured while serving its trace)",
           "synthetic lengths fitted to the paper's means (161 in / 338 out)",
           "shares averaged over the decode steps in which requests waited to be admitted", common.batching_note(today)]
    if today:
        out.insert(0, "today's scale: Llama 3 8B (GQA) on one H100-80GB (default KV budget), max_model_len 8192, "
                      "max_num_seqs 1024, 256-token shared system prompt (prefix cache on for vLLM)")
    else:
        out.insert(0, "12 GiB of KV cache, block size 16 (paper: about 12 GiB, Table 1)")
    return out


def notes(today: bool, ours: list[str]) -> list[str]:
    return ["simulated (executor=sim); ours: " + "; ".join(ours),
            "paper: Fig. 2, token states 20.4 / 26.8 / 38.2 / 96.3 % for Orca (Max) / (Pow2) / (Oracle) / vLLM"
            + (" (OPT-13B, shown for reference only)" if today else "")]


def plot(data: pd.DataFrame, today: bool, model: str, hardware: str) -> Any:
    fig, axes = common.new_figure(width=8.4, height=3.8)
    from matplotlib.ticker import PercentFormatter

    ax = axes[0][0]
    ref = "paper, OPT-13B" if today else "paper"
    labels = [f"{r.label}\n({ref} {FIG2_TOKEN_SHARE[r.system]:.1%})" for r in data.itertuples()]
    left = pd.Series(0.0, index=data.index)
    for key, (name, colour) in SHARES.items():
        ax.barh(labels, data[key], left=left, color=colour, label=name, edgecolor="white", lw=0.5)
        left += data[key]
    for y, r in enumerate(data.itertuples()):
        ax.text(0.005, y, f"{r.pool_token_share:.1%}", va="center", color="white", fontsize=9, fontweight="bold")
        paper = FIG2_TOKEN_SHARE[r.system]
        ax.plot([paper, paper], [y - 0.42, y + 0.42], color="black", lw=2)
    ax.plot([], [], color="black", lw=2, label="paper's token states (Fig. 2" + (", OPT-13B)" if today else ")"))
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("share of the KV cache (% of slots)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=7, frameon=False)
    where = common.label(model, hardware, "sharegpt_like")
    ax.set_title(("Fig. 2 at today's scale (ours): " if today else "Fig. 2: ") + f"KV memory use, {where} (simulated)",
                 fontsize=10, pad=34)
    return fig
