"""Model shapes and hardware specs: what the simulator's cost model and the KV budget need.

Model presets follow the published configs (LLaMA, OPT); `tiny_llama` is the CPU-sized model the
torch executor builds with random weights. Hardware numbers are vendor peak figures for dense
bf16/fp16 math, HBM bandwidth and NVLink per GPU; `<gpu>_x<n>` presets run n of them with tensor
parallelism. The cost model (pagedlab/executors/cost_model.py) applies achievable-efficiency factors
on top; docs/cost_model.md gives the source of every number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}
FORWARDS = ("auto", "compact", "hf")  # executor=torch: pagedlab's compact Llama-family forward, or HF's modules


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a decoder-only transformer, enough to size its KV cache and cost a step."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype: str = "float16"
    gated_mlp: bool = True  # LLaMA-style SwiGLU (3 matrices) vs OPT's 2-matrix MLP
    tied_embeddings: bool = False
    max_position_embeddings: int = 2048

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def num_params(self) -> int:
        h, kvd = self.hidden_size, self.num_kv_heads * self.head_dim
        qo = 2 * h * self.num_heads * self.head_dim
        attn = qo + 2 * h * kvd
        mlp = (3 if self.gated_mlp else 2) * h * self.intermediate_size
        embed = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        return self.num_layers * (attn + mlp) + embed

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes


@dataclass(frozen=True)
class HardwareSpec:
    """A node of ``num_gpus`` identical accelerators running one model with tensor parallelism.

    ``memory_gib``, ``peak_tflops`` and ``hbm_gb_s`` are per GPU (vendor peak figures); the efficiencies are
    the achievable fractions the cost model applies. Sources for every number: docs/cost_model.md."""

    name: str
    memory_gib: float  # per GPU
    peak_tflops: float  # per GPU, dense fp16/bf16
    hbm_gb_s: float  # per GPU
    compute_efficiency: float = 0.7  # GEMMs and prefill attention
    bandwidth_efficiency: float = 0.75  # weight, activation and (paged, block 16) KV streaming
    step_overhead_s: float = 2e-3  # host time per engine step: scheduling, input preparation, sampling
    seq_overhead_s: float = 0.0  # host time per sequence in a step (output processing); see HOST_OVERHEADS
    num_gpus: int = 1  # tensor-parallel degree: weights, heads and KV are split across the GPUs
    interconnect_gb_s: float = 0.0  # GPU-GPU link (NVLink), per GPU and direction; 0 with one GPU
    interconnect_efficiency: float = 0.8  # achievable fraction of interconnect_gb_s in a ring all-reduce
    collective_latency_s: float = 10e-6  # fixed cost of one all-reduce / all-gather call
    pcie_gb_s: float = 25.0  # host <-> device, one direction, achievable with pinned memory
    pcie_copy_latency_s: float = 10e-6  # fixed cost of one host <-> device copy call (cudaMemcpyAsync)

    def with_host_overhead(self, profile: str) -> HardwareSpec:
        """This node with the engine's host time per step of ``profile`` (a key of ``HOST_OVERHEADS``)."""
        if profile not in HOST_OVERHEADS:
            raise ValueError(f"host_overhead={profile!r}; expected one of {sorted(HOST_OVERHEADS)}")
        values = HOST_OVERHEADS[profile]
        return self if values is None else replace(self, step_overhead_s=values[0], seq_overhead_s=values[1])

    @property
    def total_memory_gib(self) -> float:
        """Device memory of all GPUs together."""
        return self.memory_gib * self.num_gpus


# The engine's host (CPU) time per step, (per step, per sequence in the step) in seconds; `executor.host_overhead`
# picks one for `executor=sim`. "preset": the hardware preset's own (2 ms a step, nothing per sequence).
# "vllm_2023": vLLM as it ran in 2023, whose host work (scheduling, input preparation, sampling, and output
# processing with incremental detokenization) ran in the step loop and grew with the batch: a least-squares fit
# of Vidur's profile of a vLLM-derived engine (Llama-2-7B, one A100, batch 8-64): 2.0 ms + 0.171 ms a sequence.
# Sources: docs/cost_model.md.
HOST_OVERHEADS: dict[str, tuple[float, float] | None] = {"preset": None, "vllm_2023": (2.0e-3, 0.171e-3)}

MAX_LAYER_ELEMENTS = 2**31 - 1  # one layer's pool [2, blocks, block_size, kv_heads, D] stays int32-indexable


def max_blocks_per_layer(block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """The most blocks a layer's pool may hold with at most MAX_LAYER_ELEMENTS elements (K and V)."""
    return MAX_LAYER_ELEMENTS // (2 * block_size * num_kv_heads * head_dim)


def num_blocks_in_budget(budget_bytes: float, block_size: int, kv_bytes_per_token: int) -> int:
    """`floor(budget_bytes / (block_size * kv_bytes_per_token))`: blocks a KV byte budget holds."""
    return math.floor(budget_bytes / (block_size * kv_bytes_per_token))


def _llama(name: str, layers: int, hidden: int, heads: int, kv: int, inter: int, **kw: Any) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, kv, hidden // heads, inter, kw.pop("vocab", 32000), **kw)


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name, layers, hidden, heads, heads, hidden // heads, 4 * hidden, 50272,
                     gated_mlp=False, tied_embeddings=True)


MODEL_PRESETS: dict[str, ModelSpec] = {
    "tiny_llama": ModelSpec("tiny_llama", 4, 128, 4, 2, 32, 256, 1024, dtype="float32",
                            max_position_embeddings=4096),
    "llama_7b": _llama("llama_7b", 32, 4096, 32, 32, 11008),
    "llama_13b": _llama("llama_13b", 40, 5120, 40, 40, 13824),
    "llama_70b": _llama("llama_70b", 80, 8192, 64, 8, 28672, max_position_embeddings=4096),
    "llama3_8b": _llama("llama3_8b", 32, 4096, 32, 8, 14336, vocab=128256, dtype="bfloat16",
                        max_position_embeddings=8192),
    "llama3_70b": _llama("llama3_70b", 80, 8192, 64, 8, 28672, vocab=128256, dtype="bfloat16",
                         max_position_embeddings=8192),
    "opt_13b": _opt("opt_13b", 40, 5120, 40),
    "opt_66b": _opt("opt_66b", 64, 9216, 72),
    "opt_175b": _opt("opt_175b", 96, 12288, 96),
}

_SINGLE_GPU: dict[str, HardwareSpec] = {  # SXM parts; NVLink per direction: A100 300 GB/s, H100/H200 450 GB/s
    "a100_40gb": HardwareSpec("a100_40gb", 40, 312, 1555, interconnect_gb_s=300),
    "a100_80gb": HardwareSpec("a100_80gb", 80, 312, 2039, interconnect_gb_s=300),
    "h100_80gb": HardwareSpec("h100_80gb", 80, 989, 3350, interconnect_gb_s=450, pcie_gb_s=50.0),
    "h200": HardwareSpec("h200", 139, 989, 4800, interconnect_gb_s=450, pcie_gb_s=50.0),
}
# `<gpu>_x<n>`: n GPUs of one node with tensor parallelism. The paper's setups (Kwon et al., SOSP 2023,
# Table 1): OPT-13B / LLaMA-13B on one A100-40GB, OPT-66B on a100_40gb_x4, OPT-175B on a100_80gb_x8; today's
# GPUs at 2, 4 and 8 (Llama 3 70B's 131 GiB of weights need at least two).
TENSOR_PARALLEL = (("a100_40gb", 4), ("a100_80gb", 8), *((g, n) for g in ("h100_80gb", "h200") for n in (2, 4, 8)))
HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    **_SINGLE_GPU,
    **{f"{g}_x{n}": replace(_SINGLE_GPU[g], name=f"{g}_x{n}", num_gpus=n) for g, n in TENSOR_PARALLEL},
}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"{kind}={name!r} is not a known preset; allowed: {', '.join(sorted(table))}")
    return table[name]


def model_spec(name: str, dtype: str | None = None) -> ModelSpec:
    """A model preset by name, optionally with another dtype ("auto" keeps the preset's)."""
    spec = _lookup(MODEL_PRESETS, "model", name)
    if dtype and dtype != "auto":
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"model.dtype={dtype!r} is not allowed; allowed: auto, {', '.join(DTYPE_BYTES)}")
        spec = replace(spec, dtype=dtype)
    return spec


def hardware_spec(name: str) -> HardwareSpec:
    return _lookup(HARDWARE_PRESETS, "hardware", name)


def spec_from_hf_config(hf_config: Any, name: str, dtype: str = "float16") -> ModelSpec:
    """A ModelSpec read off a Hugging Face config object (Llama, Qwen2, Mistral, OPT, ...)."""
    c = hf_config
    hidden = getattr(c, "hidden_size", None) or c.d_model
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", 4 * hidden)
    return ModelSpec(
        name=name,
        num_layers=c.num_hidden_layers,
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate_size=inter,
        vocab_size=c.vocab_size,
        dtype=dtype,
        gated_mlp=not hasattr(c, "ffn_dim"),
        tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(c, "max_position_embeddings", 2048),
    )


def hf_config_file(name_or_path: str) -> Path | None:
    """The ``config.json`` of a local checkpoint folder or of a hub id already in the local HF cache,
    else None. Never touches the network."""
    local = Path(name_or_path).expanduser()
    if (local / "config.json").is_file():
        return local / "config.json"
    if local.exists() or name_or_path.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return None
    return Path(found) if isinstance(found, str) else None


@lru_cache(maxsize=64)
def spec_from_hf_path(name_or_path: str, dtype: str | None = "auto") -> ModelSpec:
    """A ModelSpec from a checkpoint's ``config.json`` (local folder or cached hub id; no weights, no
    network). ``dtype`` "auto" takes the checkpoint's dtype, float32 when it names none (as loading does)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    if dtype in (None, "auto"):
        dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
        dtype = dtype if dtype in DTYPE_BYTES else "float32"
    elif dtype not in DTYPE_BYTES:
        raise ValueError(f"model.dtype={dtype!r} is not allowed; allowed: auto, {', '.join(DTYPE_BYTES)}")
    return spec_from_hf_config(config.get_text_config(), name_or_path, dtype)
