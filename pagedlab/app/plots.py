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
    `load_results` or `sweep` (one row per run; failed runs left out). A group of several runs is
    averaged, and the title says over which keys (a warning too when another key varies within a
    group: pass a frame filtered to one point per group). Returns the matplotlib Axes."""
    import warnings

    import matplotlib.pyplot as plt

    from pagedlab.app.results import _hashable, also_varying
    from pagedlab.viz._context import titled

    missing = [k for k in BREAKDOWN if k not in runs.columns]
    if missing:
        raise ValueError(f"runs lack the breakdown columns {missing}; they come from pagedlab >= 0.1 summaries")
    by = [by] if isinstance(by, str) else list(by)
    if "status" in runs:
        runs = runs[runs["status"] == "finished"]
    averaged = also_varying(runs, by)
    if averaged:
        warnings.warn(f"memory_breakdown: {', '.join(averaged)} also vary within the bars of by={by}: each bar is "
                      f"the mean over them (filter the frame to one value, or pass them in by)", RuntimeWarning,
                      stacklevel=2)
    shares = runs.groupby(by)[list(BREAKDOWN)].mean().sort_values("token_states_share")
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 1.6 + 0.5 * len(shares)))
    left = pd.Series(0.0, index=shares.index)
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in shares.index]
    for key, (label, colour) in BREAKDOWN.items():
        ax.barh(labels, shares[key], left=left, color=colour, label=label)
        left += shares[key]
    for y, share in enumerate(shares["token_states_share"]):
        ax.text(0.01, y, f"{share:.1%}", va="center", color="white", fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of allocated KV memory (fraction)")
    ax.set_ylabel(" / ".join(by))
    constant = {c: runs[c].iloc[0] for c in runs.columns if len(runs) and _hashable(runs[c]).nunique(dropna=False) == 1}
    what = title + (f" (mean over {', '.join(averaged)})" if averaged else "")
    ax.set_title(titled(what, constant, skip=[*by, *averaged]), fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.figure.tight_layout()
    return ax
