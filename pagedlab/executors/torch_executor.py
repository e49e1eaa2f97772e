"""`executor=torch`: a real HF model over a paged KV cache, timed by the wall clock.

Each step: fork copies, swap-out, swap-in, copy-on-write copies (all vectorised over blocks and
layers, see `pagedlab.kernels.kv_cache`), then one flattened forward of every scheduled sequence's
new tokens. Returns each sequence's last-token logits (fp32) and the step's measured time.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from pagedlab.cfg_access import cfg_get
from pagedlab.executors.base import ModelInput, StepInput, StepOutput
from pagedlab.kernels import KVCache, build_metadata, get_kernel
from pagedlab.models.hf_adapter import HFModel, resolve_dtype
from pagedlab.models.presets import (
    GIB,
    ModelSpec,
    max_blocks_per_layer,
    num_blocks_in_budget,
    spec_from_hf_config,
)

CPU_BUDGET_BYTES = 1 << 28  # 0.25 GiB of KV when running on the CPU with no budget given


num_blocks_from_budget = num_blocks_in_budget  # the one sizing rule (docs/metrics.md), shared with the simulator


def reserved_bytes(spec: ModelSpec, kernel: str, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
                   max_model_len: int = 2048) -> int:
    """Device memory the engine uses outside the KV pool and the weights, at most, for this config:

    - torch_gather: its gather workspace (decode chunks up to CHUNK_BYTES, or one whole
      max_model_len sequence for a prefill over a cached prefix; it only grows), the K/V of such a
      prefill with its heads repeated on CUDA, and one masked prefill call's scores and mask;
    - triton: the split-decode buffers (m, l, acc in fp32 for every sequence, head and split);
    - activations of a step of max_num_batched_tokens tokens (hidden states, q/k/v, attention output,
      the MLP's three intermediates, twice for the allocator's overlap between layers) and the fp32
      last-token logits.
    """
    from pagedlab.kernels import torch_gather, triton_backend

    tokens, seqs, ctx = max_num_batched_tokens, max_num_seqs, max_model_len
    b = spec.dtype_bytes
    token_kv = 2 * spec.num_kv_heads * spec.head_dim * b  # one layer
    if kernel == "triton":
        splits = -(-ctx // triton_backend.MIN_SPLIT_TOKENS)
        kernel_bytes = seqs * spec.num_heads * splits * (spec.head_dim + 2) * 4
    else:
        workspace = max(min(torch_gather.CHUNK_BYTES["cuda"], seqs * ctx * token_kv), ctx * token_kv)
        repeated = 2 * ctx * spec.num_heads * spec.head_dim * b
        kernel_bytes = workspace + repeated + 2 * torch_gather.PREFILL_SCORE_BYTES
    width = 4 * spec.hidden_size + 2 * (spec.num_heads + spec.num_kv_heads) * spec.head_dim \
        + 3 * spec.intermediate_size
    activations = 2 * tokens * width * b + 2 * seqs * spec.vocab_size * 4
    return int(kernel_bytes + activations)


def default_budget_bytes(device: torch.device, free_before: int, utilization: float, weight_bytes: int,
                         cpu_budget_bytes: float = CPU_BUDGET_BYTES, reserved: int = 0) -> float:
    """A serving engine's KV budget: on CUDA free memory before loading x utilization - weights -
    `reserved` (memory used outside the KV pool, see `reserved_bytes`)."""
    if device.type != "cuda":
        return cpu_budget_bytes
    return free_before * utilization - weight_bytes - reserved


def cap_blocks(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """`num_blocks`, at most `max_blocks_per_layer` (a layer's pool under 2^31 elements)."""
    return min(num_blocks, max_blocks_per_layer(block_size, num_kv_heads, head_dim))


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A RuntimeWarning, at most once per process per message."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


AUTO_CPU_WARNING = ("pagedlab: device=auto found no CUDA device ({why}); running on the CPU, which is far "
                    "slower. Set device=cpu to silence this, or device=cuda to require a GPU.")
TRITON_CPU_WARNING = ("pagedlab: kernel=triton on the CPU runs Triton's interpreter (TRITON_INTERPRET=1): "
                      "a few tokens per second, for tests and small fp32 shapes only; use kernel=torch_gather "
                      "on the CPU, or a CUDA device.")


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu (with a warning, once)."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "none is visible"
        warn_once(AUTO_CPU_WARNING.format(why=why))
        return torch.device("cpu")
    return torch.device(device)


def warn_triton_on_cpu(kernel: str, device: torch.device) -> None:
    """kernel=triton off CUDA: say (once) that it runs Triton's slow interpreter."""
    if kernel == "triton" and device.type != "cuda":
        warn_once(TRITON_CPU_WARNING)


def load_model(name_or_path: str | None, dtype: str | torch.dtype, device: torch.device, seed: int,
               forward: str = "auto") -> HFModel:
    """A tiny seeded model for None / "tiny_llama" / "tiny_qwen2" / "tiny_mistral", else `from_pretrained`.
    `forward`: auto / compact / hf (see `pagedlab.models.hf_adapter`)."""
    if name_or_path is None or name_or_path in ("tiny_llama", "tiny_qwen2", "tiny_mistral"):
        from pagedlab.models.tiny import build_tiny_model

        dt = resolve_dtype(dtype)
        model = build_tiny_model(name_or_path or "llama", seed, torch.float32 if dt == "auto" else dt)
        return HFModel(model.to(device), forward)
    return HFModel.from_pretrained(name_or_path, dtype, device, forward)


class TorchExecutor:
    """Runs steps on a real model. `num_blocks=None` derives the block count from a byte budget:
    `budget_bytes` if given, else on CUDA `free memory before loading * gpu_memory_utilization -
    weights - reserved_bytes(...)`, else `CPU_BUDGET_BYTES`; a derived count is capped so that one
    layer's pool stays under 2^31 elements.
    """

    time_source = "wall"

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        num_swap_blocks: int = 0,
        kernel: str = "torch_gather",
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        budget_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        max_num_batched_tokens: int = 8192,
        max_num_seqs: int = 256,
        max_model_len: int = 2048,
        model: HFModel | Any | None = None,
        forward: str = "auto",
    ) -> None:
        self.device = resolve_device(device)
        self.kernel_name = kernel
        self.kernel = get_kernel(kernel)
        warn_triton_on_cpu(kernel, self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        if model is None:
            model = load_model(name_or_path, dtype, self.device, seed, forward)
        self.model = model if isinstance(model, HFModel) else HFModel(model.to(self.device), forward)
        if kernel == "triton" and self.device.type != "cuda" and self.model.dtype == torch.bfloat16:
            raise ValueError("kernel=triton on the CPU runs under Triton's interpreter, which has no bfloat16")
        self.block_size = block_size
        if num_blocks is None:
            m = self.model
            if budget_bytes is None:
                reserved = 0
                if self.device.type == "cuda":
                    spec = spec_from_hf_config(m.model.config.get_text_config(), "model",
                                               str(m.dtype).removeprefix("torch."))
                    reserved = reserved_bytes(spec, kernel, max_num_batched_tokens, max_num_seqs, max_model_len)
                budget_bytes = default_budget_bytes(self.device, free_before, gpu_memory_utilization,
                                                    m.weight_bytes, reserved=reserved)
            num_blocks = num_blocks_from_budget(budget_bytes, block_size, self.kv_bytes_per_token)
            num_blocks = cap_blocks(num_blocks, block_size, m.num_kv_heads, m.head_dim)
        if num_blocks < 1:
            raise ValueError(f"KV budget {budget_bytes} bytes holds no block of {block_size} tokens "
                             f"({self.kv_bytes_per_token} bytes per token)")
        self.num_blocks, self.num_swap_blocks = num_blocks, num_swap_blocks
        m = self.model
        self.kv = KVCache(m.num_layers, num_blocks, block_size, m.num_kv_heads, m.head_dim, m.dtype,
                          self.device, num_swap_blocks)

    @property
    def kv_bytes_per_token(self) -> int:
        """`2 * num_layers * num_kv_heads * head_dim * dtype_bytes`."""
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype.itemsize

    num_blocks_from_budget = staticmethod(num_blocks_from_budget)

    def _forward(self, mi: ModelInput) -> torch.Tensor:
        dev = self.device
        meta = build_metadata(mi.query_lens, mi.context_lens, mi.block_tables, mi.slot_mapping,
                              self.block_size, dev)
        ids = torch.tensor(mi.input_ids, dtype=torch.long, device=dev)
        pos = torch.tensor(mi.positions, dtype=torch.long, device=dev)
        return self.model.forward(ids, pos, self.kv, meta, self.kernel)

    def execute(self, step: StepInput) -> StepOutput:
        """Memory operations in the order of `StepInput`'s fields, then the forward pass."""
        start = time.perf_counter()
        with torch.inference_mode():
            self.kv.copy_blocks(step.fork_copies)
            self.kv.swap_out(step.swap_out)
            self.kv.swap_in(step.swap_in)
            self.kv.copy_blocks(step.cow_copies)
            mi = step.model_input
            if mi.num_seqs:
                logits = self._forward(mi)
            else:
                logits = torch.empty(0, self.model.vocab_size, device=self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepOutput(logits=logits, time_s=time.perf_counter() - start)


@dataclass
class EngineParts:
    """What `pagedlab.experiment.build` needs from the torch side before it sizes the KV cache."""

    spec: ModelSpec
    default_budget_bytes: float
    budget_what: str
    eos_token_id: int | None
    make_executor: Callable[[int, int, int], TorchExecutor]


def load_for_engine(cfg: Any) -> EngineParts:
    """Load the configured model once; the executor is made later with the block counts.

    Uses `model.{name,name_or_path,dtype,forward}`, `device`, `kernel.name` and
    `kv_cache.{gpu_memory_utilization,cpu_budget_gib}`. Tiny models are always built with seed 0, so
    `tiny_llama` names one fixed model whatever the workload seed.
    """
    get = partial(cfg_get, cfg)
    name, path = get("model.name", "tiny_llama"), get("model.name_or_path")
    if path is None and not name.startswith("tiny_"):
        raise ValueError(f"executor=torch with model={name} needs model.name_or_path (a local folder or hub "
                         "id); shape presets without weights run with executor=sim")
    device = resolve_device(get("device", "auto"))
    kernel = get("kernel.name", "torch_gather")
    warn_triton_on_cpu(kernel, device)
    free_before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    model = load_model(path or name, get("model.dtype", "auto"), device, seed=0,
                       forward=get("model.forward", "auto"))
    dtype_name = str(model.dtype).removeprefix("torch.")
    spec = spec_from_hf_config(model.model.config.get_text_config(), path or name, dtype_name)
    reserved = reserved_bytes(spec, kernel, int(get("max_num_batched_tokens", 8192)),
                              int(get("max_num_seqs", 256)), int(get("max_model_len", 2048)))
    budget = default_budget_bytes(device, free_before, float(get("kv_cache.gpu_memory_utilization", 0.9)),
                                  model.weight_bytes, float(get("kv_cache.cpu_budget_gib", CPU_BUDGET_BYTES / GIB)) * GIB,
                                  reserved=reserved)
    what = ("free device memory x kv_cache.gpu_memory_utilization - weights - workspace and activations"
            if device.type == "cuda" else "kv_cache.cpu_budget_gib")
    if device.type == "cuda":  # whole blocks under 2^31 elements per layer (byte budget, as the sizing rule takes)
        block_size = int(get("block_size", 16))
        cap = max_blocks_per_layer(block_size, spec.num_kv_heads, spec.head_dim)
        if budget > cap * block_size * spec.kv_bytes_per_token:
            budget = cap * block_size * spec.kv_bytes_per_token
            what += f" (capped at {cap} blocks: one layer's pool under 2^31 elements)"
    eos = getattr(model.model.generation_config, "eos_token_id", None) or model.model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None

    def make(num_blocks: int, block_size: int, num_swap_blocks: int) -> TorchExecutor:
        return TorchExecutor(model=model, num_blocks=num_blocks, block_size=block_size,
                             num_swap_blocks=num_swap_blocks, kernel=kernel, device=device)

    return EngineParts(spec, budget, what, eos, make)
