"""Plots people would rather look at than read: the paper's Figure 2 memory breakdown."""

from __future__ import annotations

from typing import Any

import pandas as pd

BREAKDOWN = {  # summary key -> label, colour
    "token_states_share": ("token states", "#4c72b0"),
    "reserved_share": ("reserved", "#dd8452"),
    "internal_frag_share": ("internal fragmentation", "#c44e52"),
    "external_frag_share": ("external fragmentation", "#8c8c8c"),
}


def memory_breakdown(runs: pd.DataFrame, by: str | list[str] = "allocator", ax: Any = None,
                     title: str = "KV-cache memory: where the slots go") -> Any:
    """Stacked horizontal bars of each run group's KV memory split (token states, reserved,
    internal and external fragmentation), as in the vLLM paper's Figure 2. `runs` is a frame from
    `load_results` or `sweep` (one row per run; groups are averaged). Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt

    missing = [k for k in BREAKDOWN if k not in runs.columns]
    if missing:
        raise ValueError(f"runs lack the breakdown columns {missing}; they come from pagedlab >= 0.1 summaries")
    shares = runs.groupby(by)[list(BREAKDOWN)].mean().sort_values("token_states_share")
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.5 + 0.5 * len(shares)))
    left = pd.Series(0.0, index=shares.index)
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in shares.index]
    for key, (label, colour) in BREAKDOWN.items():
        ax.barh(labels, shares[key], left=left, color=colour, label=label)
        left += shares[key]
    for y, share in enumerate(shares["token_states_share"]):
        ax.text(0.01, y, f"{share:.1%}", va="center", color="white", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of allocated KV memory")
    ax.set_title(title, pad=26)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=4, fontsize=8, frameon=False)
    ax.figure.tight_layout()
    return ax
