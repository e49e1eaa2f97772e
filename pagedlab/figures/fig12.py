"""Figure 12: normalized latency against request rate, vLLM (paged) vs Orca (Oracle / Pow2 / Max), and the
request rate each sustains.

For each served system (OPT-13B on one A100-40GB, OPT-66B on four, OPT-175B on eight A100-80GB; Table 1) and
each allocator, :func:`pagedlab.figures.knee.find_knee` finds two knees, each the highest Poisson request rate
under a bound set by vLLM at light load (1/8 of the search's starting rate), the same bound for the four systems:

- ``queue``: the median time to first token stays within ``QUEUE_FACTOR`` x vLLM's at light load. The paper's
  knee is where "the request rate surpasses the capacity of the serving system [and] the queue length continues
  to grow infinitely" (§6.2); a growing queue shows first as waiting before the first token, which jumps from a
  few steps to seconds within a few percent of the rate, so the bound's exact factor hardly matters.
- ``latency``: the mean normalized latency stays within ``LATENCY_FACTOR`` x vLLM's at light load ("similar
  normalized latency", §6.2). It also counts a latency that rises without a queue (larger, slower steps; with
  prompt-only steps, prefills that stall the decodes), so it can come before the capacity.

The paper reports the ratio of sustained rates, vLLM over each Orca (§6.2); both rules' ratios are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pagedlab.figures import common
from pagedlab.figures.knee import Knee, find_knee
from pagedlab.figures.paper import FIG12_RATE_RATIO, SYSTEM_LABELS, TRACE_MINUTES

SYSTEMS = ("paged", "orca_oracle", "orca_pow2", "orca_max")
RULES = ("queue", "latency")  # the knee rules (module doc); the first is the headline
QUEUE_FACTOR = 10.0  # the queue knee: median TTFT at most this x vLLM's at light load (ours)
LATENCY_FACTOR = 2.0  # the latency knee: mean normalized latency at most this x vLLM's at light load (ours)
RULE_METRIC = {"queue": "ttft_p50", "latency": "normalized_latency"}  # a point row's column
RULE_FACTOR = {"queue": QUEUE_FACTOR, "latency": LATENCY_FACTOR}
RULE_LABELS = {"queue": "queue knee", "latency": "latency knee"}
LIGHT_FRACTION = 1 / 8  # light load: this fraction of the search's starting rate
COLOURS = {"paged": "#c44e52", "orca_oracle": "#4c72b0", "orca_pow2": "#55a868", "orca_max": "#8172b2"}


@dataclass(frozen=True)
class Setting:
    """One panel: model on hardware serving a workload; ``start`` (requests/s) seeds the knee search."""

    model: str
    hardware: str
    workload: str
    start: float
    duration_s: float
    extra: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return common.label(self.model, self.hardware, self.workload)


PAPER = (
    Setting("opt_13b", "a100_40gb", "sharegpt_like", 1.0, 600),
    Setting("opt_66b", "a100_40gb_x4", "sharegpt_like", 0.5, 600),
    Setting("opt_175b", "a100_80gb_x8", "sharegpt_like", 2.0, 300),
    Setting("opt_13b", "a100_40gb", "alpaca_like", 10.0, 150),
)
SMALL = (Setting("opt_13b", "a100_40gb", "sharegpt_like", 1.0, 40),)
# today's scale (ours): Llama 3 8B (GQA, 8 KV heads) on one H100-80GB, 8K context, a 256-token system prompt
# shared by every request and cached by vLLM's prefix cache, up to 1024 sequences per batch.
TODAY_EXTRA = ("max_model_len=8192", "max_num_seqs=1024", "workload.shared_prefix_len=256")
TODAY = (Setting("llama3_8b", "h100_80gb", "sharegpt_like", 16.0, 60, TODAY_EXTRA),)
TODAY_SMALL = (Setting("llama3_8b", "h100_80gb", "sharegpt_like", 16.0, 5, TODAY_EXTRA),)


def point_overrides(s: Setting, system: str, rate: float, num_requests: int, today: bool) -> list[str]:
    extra = list(s.extra)
    if today and system == "paged":
        extra.append("prefix_cache=true")  # vLLM caches the shared system prompt; contiguous Orca cannot
    if not today:
        extra += common.table1_budget(s.model)  # the paper's KV slots (Table 1)
    return common.base_overrides(s.model, s.hardware, s.workload, *extra, f"allocator={system}",
                                 f"workload.request_rate={rate:.6g}", f"workload.num_requests={num_requests}",
                                 today=today)


def search(s: Setting, today: bool, rel_tol: float,
           min_requests: int) -> tuple[list[dict[str, Any]], dict[tuple[str, str], Knee]]:
    """Every allocator's knee by each rule for one setting (keyed (system, rule)); a row per evaluated point
    (a point both rules evaluate runs once)."""
    rows: dict[tuple[str, float], dict[str, Any]] = {}

    def run_at(system: str, rate: float) -> dict[str, Any]:
        rate = float(f"{rate:.6g}")  # the two rules' searches reach the same rates by different float paths
        if (system, rate) not in rows:
            n = common.requests_for(rate, s.duration_s, min_requests)
            summary = common.run_point(point_overrides(s, system, rate, n, today))
            rows[system, rate] = {"row": "point", "model": s.model, "hardware": s.hardware, "workload": s.workload,
                                  "system": system, "rate": rate, "num_requests": n,
                                  "normalized_latency": summary["normalized_latency_mean"],
                                  "batch_size_mean": summary["batch_size_mean"],
                                  "num_preemptions": summary["num_preemptions"], "ttft_p50": summary["ttft_p50"]}
        return rows[system, rate]

    light = s.start * LIGHT_FRACTION
    base = run_at("paged", light)
    thresholds = {rule: RULE_FACTOR[rule] * float(base[RULE_METRIC[rule]]) for rule in RULES}
    knees: dict[tuple[str, str], Knee] = {}
    for rule in RULES:
        for system in SYSTEMS:
            def metric(rate: float, system: str = system, rule: str = rule) -> float:
                return float(run_at(system, rate)[RULE_METRIC[rule]])

            # each Orca's search starts from below vLLM's knee: it sustains less
            vllm = knees.get(("paged", rule))
            start = s.start if vllm is None else vllm.rate / (4 if system == "orca_max" else 2)
            knees[system, rule] = find_knee(metric, thresholds[rule], start, rel_tol=rel_tol)
    out = list(rows.values())
    out[0]["row"] = "light_load"
    for row in out:
        row["threshold"] = thresholds["latency"]
        row["ttft_threshold"] = thresholds["queue"]
    return out, knees


def run(small: bool = False, today: bool = False) -> common.FigureOutput:
    settings = (TODAY_SMALL if small else TODAY) if today else (SMALL if small else PAPER)
    rel_tol, min_requests = (0.25, 30) if small else (0.05, 100)
    rows: list[dict[str, Any]] = []
    for s in settings:
        points, knees = search(s, today, rel_tol, min_requests)
        rows += points
        for (system, rule), k in knees.items():
            rows.append({"row": "knee", "model": s.model, "hardware": s.hardware, "workload": s.workload,
                         "system": system, "rule": rule, "knee_rate": k.rate, "over_rate": k.over,
                         "threshold": k.threshold, "evaluations": k.evaluations})
        for rule in RULES:
            for system in SYSTEMS[1:]:
                lo, hi = FIG12_RATE_RATIO.get(system, (math.nan, math.nan))
                if s.workload != "sharegpt_like" or today:
                    lo, hi = math.nan, math.nan  # the paper gives ratios for its ShareGPT runs only
                rows.append({"row": "ratio", "model": s.model, "hardware": s.hardware, "workload": s.workload,
                             "system": system, "rule": rule,
                             "ratio": knees["paged", rule].rate / knees[system, rule].rate,
                             "paper_low": lo, "paper_high": hi})
    scale = "today (ours)" if today else "paper"
    data = pd.DataFrame(rows)
    data.insert(0, "scale", scale)
    data["ours"] = "; ".join(settings_ours(today, settings))
    compare = comparison(data)
    fig = plot(data, settings, today)
    title = ("Fig. 12 at today's scale (ours): sustainable request rate" if today
             else "Fig. 12: sustainable request rate, vLLM vs Orca")
    return common.FigureOutput("fig12_today" if today else "fig12", title, data, compare, fig, notes(today, settings))


def settings_ours(today: bool, settings: tuple[Setting, ...]) -> list[str]:
    durations = ", ".join(sorted({f"{s.duration_s:g} s ({common.label(s.model, workload=s.workload)})"
                                  for s in settings}))
    out = [f"Poisson traces of {durations}"
           + ("" if today else f" (paper: {TRACE_MINUTES['opt_13b']} min, {TRACE_MINUTES['opt_175b']} min for OPT-175B)"),
           "synthetic lengths fitted to the paper's means (ShareGPT 161 in / 338 out, Alpaca 19 / 58)",
           (f"knees, bisected in log rate, vs vLLM at light load ({LIGHT_FRACTION:g} of the search start): the "
            f"queue knee, highest rate with median TTFT <= {QUEUE_FACTOR:g}x vLLM's; the latency knee, mean "
            f"normalized latency <= {LATENCY_FACTOR:g}x vLLM's"),
           common.batching_note(today)]
    if today:
        out.insert(0, "today's scale: Llama 3 8B (GQA) on one H100-80GB, max_model_len 8192, max_num_seqs 1024, "
                      "256-token shared system prompt (prefix cache on for vLLM)")
    return out


def notes(today: bool, settings: tuple[Setting, ...]) -> list[str]:
    return ["simulated (executor=sim, modelled time); ours: " + "; ".join(settings_ours(today, settings)),
            "paper: §6.2 on Fig. 12, vLLM sustains 1.7-2.7x the rate of Orca (Oracle), 2.7-8x Orca (Max), ShareGPT"
            + (" (OPT models, for reference only)" if today else "")]


def comparison(data: pd.DataFrame) -> pd.DataFrame:
    ratios = data[data["row"] == "ratio"]
    knees = data[data["row"] == "knee"].set_index(["model", "workload", "system", "rule"])
    out = []
    for r in ratios.itertuples():
        paper = "" if math.isnan(r.paper_low) else f"{r.paper_low:g}-{r.paper_high:g}x"
        vllm = knees.loc[(r.model, r.workload, "paged", r.rule), "knee_rate"]
        other = knees.loc[(r.model, r.workload, r.system, r.rule), "knee_rate"]
        out.append({"result": f"{common.label(r.model, workload=r.workload)}: vLLM / {SYSTEM_LABELS[r.system]}, "
                              f"{RULE_LABELS[r.rule]}",
                    "paper": paper, "pagedlab": f"{r.ratio:.2f}x ({vllm:.3g} / {other:.3g} req/s)"})
    return pd.DataFrame(out)


def plot(data: pd.DataFrame, settings: tuple[Setting, ...], today: bool) -> Any:
    panels = len(settings) + 1
    ncols = min(3, panels)
    fig, grid = common.new_figure(ncols=ncols, nrows=-(-panels // ncols), width=4.2, height=3.4)
    axes = [ax for row in grid for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, s in zip(axes, settings):
        pts = data[data["row"].isin(["point", "light_load"]) & (data["model"] == s.model)
                   & (data["workload"] == s.workload)]
        threshold = float(pts["threshold"].iloc[0])
        knees = data[(data["row"] == "knee") & (data["model"] == s.model) & (data["workload"] == s.workload)]
        for system in SYSTEMS:
            p = pts[pts["system"] == system].sort_values("rate")
            ax.plot(p["rate"], p["normalized_latency"], "o-", ms=3, color=COLOURS[system], label=SYSTEM_LABELS[system])
            for rule, ls in (("queue", ":"), ("latency", (0, (1, 3)))):
                k = knees[(knees["system"] == system) & (knees["rule"] == rule)]["knee_rate"]
                ax.axvline(float(k.iloc[0]), color=COLOURS[system], ls=ls, lw=1.2 if rule == "queue" else 0.6)
        ax.axhline(threshold, color="black", ls="--", lw=0.8,
                   label=f"latency bound ({LATENCY_FACTOR:g}x light load)")
        ax.set_ylim(0, threshold * 5)
        ax.set_xlim(0, None)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("normalized latency (s/token)")
        ax.set_title(s.label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].plot([], [], color="grey", ls=":", lw=1.2, label=f"queue knee (median TTFT {QUEUE_FACTOR:g}x light load)")
    axes[0].plot([], [], color="grey", ls=(0, (1, 3)), lw=0.6, label="latency knee")
    axes[0].legend(fontsize=7, loc="upper left")
    ax = axes[panels - 1]
    ratios = data[data["row"] == "ratio"]
    groups = [s for s in settings]
    width = 0.8 / (len(SYSTEMS) - 1)
    for j, system in enumerate(SYSTEMS[1:]):
        def ratio(s: Setting, rule: str, system: str = system) -> float:
            return float(ratios[(ratios["model"] == s.model) & (ratios["workload"] == s.workload)
                                & (ratios["system"] == system) & (ratios["rule"] == rule)]["ratio"].iloc[0])

        xs = [i + (j - 1) * width for i in range(len(groups))]
        ax.bar(xs, [ratio(s, RULES[0]) for s in groups], width, color=COLOURS[system],
               label=f"vLLM / {SYSTEM_LABELS[system]}")
        ax.plot(xs, [ratio(s, RULES[1]) for s in groups], "k_", ms=9, mew=1.5,
                label=RULE_LABELS[RULES[1]] if j == 0 else None)
        if system in FIG12_RATE_RATIO and not today:
            lo, hi = FIG12_RATE_RATIO[system]
            for x, s in zip(xs, groups):
                if s.workload == "sharegpt_like":
                    ax.plot([x, x], [lo, hi], color="black", lw=3, alpha=0.45, solid_capstyle="butt")
    if not today:
        ax.plot([], [], color="black", lw=3, alpha=0.45, label="paper's range (ShareGPT)")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([common.label(s.model, workload=s.workload).replace(", ", "\n") for s in groups], fontsize=8)
    ax.axhline(1, color="black", lw=0.6)
    ax.set_ylabel("sustainable rate, vLLM / Orca (x)")
    ax.set_title(f"sustainable-rate ratio (bars: {RULE_LABELS[RULES[0]]})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(("Fig. 12 at today's scale (ours, simulated)" if today else
                  "Fig. 12: normalized latency vs request rate (simulated) and sustainable-rate ratios"), fontsize=11)
    return fig
