"""The config's dtype names (long and short) as torch dtypes. Imports torch only, so the preflight can
resolve a model's dtype without loading transformers."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,  # and the
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # short names the config allows


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """"auto" stays "auto" (the checkpoint's dtype); names map to torch dtypes."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[dtype]
