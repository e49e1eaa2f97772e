"""`workload=trace`: requests from a JSONL or CSV file.

Columns: `prompt_token_ids` (a list, or a JSON list in CSV) or `prompt_len` (random tokens), and
optionally `max_tokens`, `arrival_time`, `request_id`, `n`, `beam_width`, `temperature`, `top_p`,
`top_k`, `seed`, `ignore_eos`. Missing values take the `sampling` defaults; a row without
`request_id` is identified by its index.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pagedlab.engine.request import Request, SamplingParams

OPTIONAL = ("max_tokens", "n", "beam_width", "temperature", "top_p", "top_k", "seed", "ignore_eos")
CASTS = {"max_tokens": int, "n": int, "beam_width": int, "top_k": int, "seed": int, "temperature": float,
         "top_p": float, "ignore_eos": bool}


def read_trace(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"workload.path={str(path)!r} does not exist")
    if path.suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=path.suffix == ".jsonl")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    raise ValueError(f"workload.path={str(path)!r}: allowed file types are .jsonl, .json and .csv")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def trace_requests(path: str | Path, *, seed: int, vocab_size: int, defaults: SamplingParams) -> list[Request]:
    df = read_trace(path)
    if "prompt_token_ids" not in df and "prompt_len" not in df:
        raise ValueError(f"workload.path={str(path)!r} needs a 'prompt_token_ids' or 'prompt_len' column; "
                         f"found {list(df.columns)}")
    rng = np.random.default_rng(seed)
    requests = []
    for i, row in enumerate(df.to_dict("records")):
        tokens = row.get("prompt_token_ids")
        if isinstance(tokens, str):
            tokens = json.loads(tokens)
        if not isinstance(tokens, (list, np.ndarray)):  # absent in this row: random tokens
            tokens = rng.integers(0, vocab_size, int(row["prompt_len"])).tolist()
        overrides = {k: CASTS[k](row[k]) for k in OPTIONAL if k in row and _present(row[k])}
        rid, arrival = row.get("request_id"), row.get("arrival_time")
        requests.append(Request(rid if _present(rid) else i, [int(t) for t in tokens],
                                float(arrival) if _present(arrival) else 0.0, defaults.updated(**overrides)))
    return requests
