"""The result of a run: its summary, per-step and per-sequence tables, and its config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

HEADLINE = ["memory_waste", "kv_utilization_mean", "batch_size_mean", "throughput_tok_s",
            "num_preemptions", "num_finished", "num_rejected", "time_source"]


@dataclass
class RunResult:
    """`summary` (design.md's keys), `steps` (one row per engine step), `requests` (one row per
    sequence, with `request_id` and `output_token_ids`), and the resolved `config`."""

    summary: dict[str, Any]
    steps: pd.DataFrame
    requests: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    def save(self, out_dir: str | Path) -> Path:
        """Write summary.json, steps.parquet, requests.parquet (and config.json) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(self.summary, indent=2, default=str) + "\n")
        self.steps.to_parquet(out / "steps.parquet", index=False)
        self.requests.to_parquet(out / "requests.parquet", index=False)
        if self.config:
            (out / "config.json").write_text(json.dumps(self.config, indent=2, default=str) + "\n")
        return out

    def __repr__(self) -> str:
        head = ", ".join(f"{k}={_fmt(self.summary.get(k))}" for k in HEADLINE if k in self.summary)
        return f"RunResult({head}; steps={len(self.steps)}, sequences={len(self.requests)})"

    def _repr_html_(self) -> str:
        table = pd.Series(self.summary, name="value").to_frame().to_html()
        return f"<b>RunResult</b> ({len(self.steps)} steps, {len(self.requests)} sequences){table}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
