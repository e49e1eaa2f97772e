"""Tiny random-init causal LMs (Llama, Qwen2, Mistral shapes) built from configs, seeded, CPU-sized.

`build_tiny_model("llama", seed=0)` gives the same weights on every machine; `save_tiny_model` writes
one to a folder that `from_pretrained` (and `model.name_or_path`) can load back. Nothing is
downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

_SHAPE: dict[str, Any] = {
    "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "initializer_range": 0.1, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """4 layers, hidden 128, 4 heads / 2 KV heads (GQA), head_dim 32, vocab 1024."""
    return LlamaConfig(**{**_SHAPE, **overrides})


def tiny_qwen2_config(**overrides: Any) -> Qwen2Config:
    """Qwen2 shape (q/k/v biases) of the same size; no sliding window unless asked."""
    return Qwen2Config(**{**_SHAPE, "use_sliding_window": False, **overrides})


def tiny_mistral_config(**overrides: Any) -> MistralConfig:
    """Mistral shape of the same size; `sliding_window` defaults to 4096 (never hit by tiny runs)."""
    return MistralConfig(**{**_SHAPE, "sliding_window": 4096, **overrides})


TINY_CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "llama": tiny_llama_config, "qwen2": tiny_qwen2_config, "mistral": tiny_mistral_config,
}


def tiny_config(kind: str = "llama", **overrides: Any) -> PretrainedConfig:
    """Config of a tiny model; `kind` is llama, qwen2 or mistral (a `tiny_` prefix is accepted)."""
    kind = kind.removeprefix("tiny_")
    if kind not in TINY_CONFIGS:
        raise ValueError(f"tiny model kind={kind!r} is not one of {sorted(TINY_CONFIGS)}")
    return TINY_CONFIGS[kind](**overrides)


def build_tiny_model(
    kind: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A randomly initialised tiny causal LM; the global RNG state is left untouched."""
    config = tiny_config(kind, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_tiny_model(path: str | Path, kind: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny model and save it (safetensors + config) to `path`; returns the folder."""
    path = Path(path)
    build_tiny_model(kind, seed, **overrides).save_pretrained(path)
    return path
