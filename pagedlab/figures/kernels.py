"""Figure 18a: attention kernel latency, PagedAttention (block size 16) against a contiguous kernel.

From the cost model (docs/cost_model.md), one layer's decode attention of OPT-13B on one A100-40GB: every
sequence reads its whole context's K and V once, at the paged KV read speed (block 16) or the contiguous one.
The model was calibrated to the paper's 20-26 % (Fig. 18a), so this figure shows the calibration, not an
independent measurement; a GPU run of pagedlab's kernels (``python -m pagedlab.bench.kernels``) measures them.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from pagedlab.executors.cost_model import KERNEL_FLOOR_S, CostModel
from pagedlab.figures import common
from pagedlab.figures.paper import FIG18A_PAGED_OVERHEAD
from pagedlab.models.presets import hardware_spec, model_spec

BATCH_SIZES = (8, 32)  # ours
CONTEXT_LENS = (64, 128, 256, 512, 1024, 2048)  # ours
SETTING = ("opt_13b", "a100_40gb")
BLOCK_SIZE = 16


def attention_s(cm: CostModel, batch: int, context: int, paged: bool) -> float:
    """One layer's decode attention: ``batch`` sequences each reading ``context`` tokens of KV."""
    ctx = batch * context
    bw = cm.kv_bw if paged else cm.kv_bw_contiguous
    return max(cm.attn_flops * ctx / cm.peak, cm.kv_token_bytes * ctx / bw, KERNEL_FLOOR_S)


def run(small: bool = False, today: bool = False) -> common.FigureOutput:
    model, hardware = SETTING
    cm = CostModel(model_spec(model), hardware_spec(hardware), BLOCK_SIZE)
    rows = []
    for batch in BATCH_SIZES:
        for context in CONTEXT_LENS:
            paged, contiguous = attention_s(cm, batch, context, True), attention_s(cm, batch, context, False)
            rows.append({"scale": "paper", "model": model, "hardware": hardware, "batch_size": batch,
                         "context_len": context, "block_size": BLOCK_SIZE, "paged_us": paged * 1e6,
                         "contiguous_us": contiguous * 1e6, "overhead": paged / contiguous - 1,
                         "paper_low": FIG18A_PAGED_OVERHEAD[0], "paper_high": FIG18A_PAGED_OVERHEAD[1]})
    data = pd.DataFrame(rows)
    ours = [f"batch sizes {BATCH_SIZES} and context lengths {CONTEXT_LENS[0]}-{CONTEXT_LENS[-1]} (ours)",
            ("one layer's decode attention from the cost model, whose paged overhead at block 16 was calibrated to this "
            "figure (so it is not an independent check)")]
    data["ours"] = "; ".join(ours)
    lo, hi = data["overhead"].min(), data["overhead"].max()
    compare = pd.DataFrame([{"result": "paged kernel latency over contiguous (block 16)",
                             "paper": f"+{FIG18A_PAGED_OVERHEAD[0]:.0%} to +{FIG18A_PAGED_OVERHEAD[1]:.0%}",
                             "pagedlab": f"+{lo:.1%}" + ("" if hi - lo < 1e-3 else f" to +{hi:.1%}")}])
    notes = ["cost model (no run); ours: " + "; ".join(ours),
             "paper: §7.1 on Fig. 18a, the PagedAttention kernel is 20-26 % slower than FasterTransformer's"]
    return common.FigureOutput("kernels", "Fig. 18a: attention kernel latency, paged vs contiguous", data, compare,
                               plot(data, model, hardware), notes)


def plot(data: pd.DataFrame, model: str, hardware: str) -> Any:
    fig, axes = common.new_figure(ncols=len(BATCH_SIZES), width=4.2, height=3.4)
    for ax, batch in zip(axes[0], BATCH_SIZES):
        g = data[data["batch_size"] == batch].sort_values("context_len")
        xs = range(len(g))
        ax.bar([x - 0.2 for x in xs], g["paged_us"], 0.4, color="#c44e52", label=f"paged (block {BLOCK_SIZE})")
        ax.bar([x + 0.2 for x in xs], g["contiguous_us"], 0.4, color="#4c72b0", label="contiguous")
        lo, hi = FIG18A_PAGED_OVERHEAD
        for x, c in zip(xs, g["contiguous_us"]):
            ax.plot([x - 0.2, x - 0.2], [c * (1 + lo), c * (1 + hi)], color="black", lw=3, alpha=0.5)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str(c) for c in g["context_len"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("attention latency, one layer (µs)")
        ax.set_title(f"batch size {batch}, {common.label(model, hardware)}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].plot([], [], color="black", lw=3, alpha=0.5, label="paper: contiguous +20-26 %")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Fig. 18a: attention kernel latency, paged vs contiguous (cost model)", fontsize=11)
    return fig
