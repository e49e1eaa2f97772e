"""`executor=torch`: a real HF model over a paged KV cache, timed by the wall clock.

Each step: fork copies, swap-out, swap-in, copy-on-write copies (all vectorised over blocks and
layers, see `pagedlab.kernels.kv_cache`), then one flattened forward of every scheduled sequence's
new tokens. Returns each sequence's last-token logits (fp32) and the step's measured time.
"""

from __future__ import annotations

import time
import warnings
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from pagedlab.cfg_access import cfg_get
from pagedlab.errors import BadArgument
from pagedlab.executors.base import ModelInput, StepInput, StepOutput
from pagedlab.kernels import AttentionKernel, KVCache, build_metadata
from pagedlab.kernels.kv_cache import staging_bytes
from pagedlab.kernels.metadata import DeviceBlockTables
from pagedlab.kernels.torch_gather import TorchGatherKernel
from pagedlab.models.dtypes import resolve_dtype
from pagedlab.models.presets import (
    GIB,
    ModelSpec,
    max_blocks_per_layer,
    num_blocks_in_budget,
    spec_from_hf_config,
)

if TYPE_CHECKING:  # transformers loads only when a model does (the preflight imports this module)
    from pagedlab.models.hf_adapter import HFModel

CPU_BUDGET_BYTES = 1 << 28  # 0.25 GiB of KV when running on the CPU with no budget given
SAMPLER_BYTES_PER_LOGIT = 4 + 4 + 8 + 4 + 4 + 4 + 4  # LogitsSampler's random rows, at most, per logit


num_blocks_from_budget = num_blocks_in_budget  # the one sizing rule (docs/metrics.md), shared with the simulator


def reserved_bytes(spec: ModelSpec, kernel: AttentionKernel, max_num_batched_tokens: int = 8192,
                   max_num_seqs: int = 256, max_model_len: int = 2048, block_size: int = 16) -> int:
    """Device memory the engine uses outside the KV pool and the weights, at most, for this config:

    - the kernel's own (`kernel.workspace_bytes`: torch_gather's gather workspace, Triton's
      split-decode buffers);
    - the KV cache's device staging for block copies and swaps (`kv_cache.staging_bytes`);
    - activations of a step of max_num_batched_tokens tokens (hidden states, q/k/v, attention output,
      the MLP's three intermediates, twice for the allocator's overlap between layers) and the fp32
      last-token logits;
    - the sampler's batched work over [max_num_seqs, vocab] (`SAMPLER_BYTES_PER_LOGIT`: scaled logits,
      sorted values and their int64 order, probabilities, cumulative sums, the exponential noise).
    """
    tokens, seqs = max_num_batched_tokens, max_num_seqs
    b = spec.dtype_bytes
    kernel_bytes = kernel.workspace_bytes(spec, max_num_seqs, max_model_len)
    width = 4 * spec.hidden_size + 2 * (spec.num_heads + spec.num_kv_heads) * spec.head_dim \
        + 3 * spec.intermediate_size
    activations = 2 * tokens * width * b + 2 * seqs * spec.vocab_size * 4
    staging = staging_bytes(block_size * spec.kv_bytes_per_token)
    sampler = seqs * spec.vocab_size * SAMPLER_BYTES_PER_LOGIT
    return int(kernel_bytes + activations + staging + sampler)


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


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu (with a warning, once)."""
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "none is visible"
        warn_once(AUTO_CPU_WARNING.format(why=why))
        return torch.device("cpu")
    return torch.device(device)


def warn_kernel(kernel: AttentionKernel, device: torch.device) -> None:
    """What the kernel says about running on `device` (kernel=triton on the CPU: Triton's slow
    interpreter), once per process."""
    message = kernel.device_warning(device)
    if message:
        warn_once(message)


def check_kernel(kernel: AttentionKernel, device: torch.device, dtype: torch.dtype) -> None:
    """ValueError when the kernel cannot run on `device` in `dtype` (kernel=triton: bfloat16 on the CPU)."""
    why = kernel.problem(device, dtype)
    if why:
        raise ValueError(f"kernel={kernel.name} is not allowed with dtype {str(dtype).removeprefix('torch.')} "
                         f"on {device}: {why}")


def load_model(name_or_path: str | None, dtype: str | torch.dtype, device: torch.device, seed: int,
               forward: str = "auto") -> HFModel:
    """A tiny seeded model for None / "tiny_llama" / "tiny_qwen2" / "tiny_mistral", else `from_pretrained`.
    `forward`: auto / compact / hf (see `pagedlab.models.hf_adapter`)."""
    from pagedlab.models.hf_adapter import HFModel

    if name_or_path is None or name_or_path in ("tiny_llama", "tiny_qwen2", "tiny_mistral"):
        from pagedlab.models.tiny import build_tiny_model

        dt = resolve_dtype(dtype)
        model = build_tiny_model(name_or_path or "llama", seed, torch.float32 if dt == "auto" else dt)
        return HFModel(model.to(device), forward)
    return HFModel.from_pretrained(name_or_path, dtype, device, forward)


class TorchExecutor:
    """Runs steps on a real model with `kernel` (an AttentionKernel; None: TorchGatherKernel).
    `num_blocks=None` derives the block count from a byte budget:
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
        kernel: AttentionKernel | None = None,
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
        sync_time: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.sync_time = sync_time
        self.kernel = kernel = kernel if kernel is not None else TorchGatherKernel()
        warn_kernel(kernel, self.device)
        free_before = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else 0
        from pagedlab.models.hf_adapter import HFModel

        if model is None:
            model = load_model(name_or_path, dtype, self.device, seed, forward)
        self.model = model if isinstance(model, HFModel) else HFModel(model.to(self.device), forward)
        check_kernel(kernel, self.device, self.model.dtype)
        self.block_size = block_size
        if num_blocks is None:
            m = self.model
            if budget_bytes is None:
                reserved = 0
                if self.device.type == "cuda":
                    spec = spec_from_hf_config(m.model.config.get_text_config(), "model",
                                               str(m.dtype).removeprefix("torch."))
                    reserved = reserved_bytes(spec, kernel, max_num_batched_tokens, max_num_seqs, max_model_len,
                                              block_size)
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
        self.tables = DeviceBlockTables(self.device)  # block tables on the device, updated incrementally

    @property
    def kv_bytes_per_token(self) -> int:
        """`2 * num_layers * num_kv_heads * head_dim * dtype_bytes`."""
        m = self.model
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * m.dtype.itemsize

    num_blocks_from_budget = staticmethod(num_blocks_from_budget)

    def _forward(self, mi: ModelInput) -> torch.Tensor:
        dev = self.device
        meta = build_metadata(mi.query_lens, mi.context_lens, mi.block_tables, mi.slot_mapping, self.block_size,
                              dev, mi.input_ids, mi.positions, mi.seq_ids, self.tables)  # one (pinned) copy up
        return self.model.forward(meta.input_ids, meta.positions, self.kv, meta, self.kernel)

    def execute(self, step: StepInput) -> StepOutput:
        """Memory operations in the order of `StepInput`'s fields, then the forward pass.

        Nothing here waits for the device: on CUDA the returned logits may still be being computed
        (`time_s` then covers the launches only; the engine times the whole step, up to the sampler's one
        transfer of the chosen tokens). `sync_time=True` waits, for benches that time `execute` alone."""
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
        if self.sync_time and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return StepOutput(logits=logits, time_s=time.perf_counter() - start)


class TorchBackend:
    """`executor=torch` (conf/executor/torch.yaml; see `pagedlab.executors.base.Backend`): loads the
    configured model once; the engine then makes executors with the block counts the budget gives.

    Uses `model.{name,name_or_path,dtype,forward}`, `device`, `kernel` (built from its `_target_`),
    `kv_cache.{gpu_memory_utilization,cpu_budget_gib}`, `block_size` and `max_num_{batched_tokens,seqs}`,
    `max_model_len` (for the memory reserved outside the pool). Its own argument, `executor.threads`,
    sets torch's CPU threads (null: torch's default, one per core; a parallel joblib sweep gives each job
    its share, see `pagedlab.run`); the summary reports the count as `cpu_threads`. Tiny models are always built with
    seed 0, so `tiny_llama` names one fixed model whatever the workload seed.
    """

    def __init__(self, cfg: Any, threads: int | None = None) -> None:
        from pagedlab.parts import instantiate_part

        self.check_arguments(threads=threads)
        get = partial(cfg_get, cfg)
        name, path = get("model.name", "tiny_llama"), get("model.name_or_path")
        if path is None and not name.startswith("tiny_"):
            raise ValueError(f"executor=torch with model={name} needs model.name_or_path (a local folder or hub "
                             "id); shape presets without weights run with executor=sim")
        self.device = device = resolve_device(get("device", "auto"))
        if threads is not None and device.type == "cpu":
            torch.set_num_threads(threads)
        self.cpu_threads: int | None = torch.get_num_threads() if device.type == "cpu" else None
        node = get("kernel")
        self.kernel = kernel = instantiate_part(node, "kernel") if node is not None else TorchGatherKernel()
        warn_kernel(kernel, device)
        free_before = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
        self.model = model = load_model(path or name, get("model.dtype", "auto"), device, seed=0,
                                        forward=get("model.forward", "auto"))
        check_kernel(kernel, device, model.dtype)
        dtype_name = str(model.dtype).removeprefix("torch.")
        self.spec = spec = spec_from_hf_config(model.model.config.get_text_config(), path or name, dtype_name)
        reserved = reserved_bytes(spec, kernel, int(get("max_num_batched_tokens", 8192)),
                                  int(get("max_num_seqs", 256)), int(get("max_model_len", 2048)),
                                  int(get("block_size", 16)))
        cpu_budget = float(get("kv_cache.cpu_budget_gib", CPU_BUDGET_BYTES / GIB)) * GIB
        budget = default_budget_bytes(device, free_before, float(get("kv_cache.gpu_memory_utilization", 0.9)),
                                      model.weight_bytes, cpu_budget, reserved=reserved)
        what = ("free device memory x kv_cache.gpu_memory_utilization - weights - workspace and activations"
                if device.type == "cuda" else "kv_cache.cpu_budget_gib")
        if device.type == "cuda":  # whole blocks under 2^31 elements per layer (byte budget, as the sizing rule takes)
            block_size = int(get("block_size", 16))
            cap = max_blocks_per_layer(block_size, spec.num_kv_heads, spec.head_dim)
            if budget > cap * block_size * spec.kv_bytes_per_token:
                budget = cap * block_size * spec.kv_bytes_per_token
                what += f" (capped at {cap} blocks: one layer's pool under 2^31 elements)"
        self.default_budget_bytes: float | None = budget
        self.budget_what = what
        eos = getattr(model.model.generation_config, "eos_token_id", None) or model.model.config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        self.eos_token_id: int | None = eos

    @staticmethod
    def check_arguments(threads: int | None = None, **_: Any) -> None:
        """Refuse a bad ``executor.threads`` before any work (the preflight calls this too)."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise BadArgument("threads", threads, "an integer >= 1, or null (torch's default: one per core)")

    def make_executor(self, num_blocks: int, block_size: int, num_swap_blocks: int) -> TorchExecutor:
        """An executor over a fresh KV pool of these sizes, on the model loaded once."""
        return TorchExecutor(model=self.model, num_blocks=num_blocks, block_size=block_size,
                             num_swap_blocks=num_swap_blocks, kernel=self.kernel, device=self.device)

    def make_sampler(self, seed: int) -> Any:
        """Token choices from the executor's logits."""
        from pagedlab.engine.sampler import LogitsSampler

        return LogitsSampler(seed)

