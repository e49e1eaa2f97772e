"""Build an engine from a composed config, run its workload, return a RunResult.

The KV budget is fixed in bytes so that runs with different block sizes or allocators compete for
the same memory: num_blocks = floor(budget_bytes / (block_size * kv_bytes_per_token)).
`kv_cache.num_blocks` overrides the budget; otherwise the budget is `kv_cache.budget_gib`, or, when
unset, derived as a serving engine does: device memory x gpu_memory_utilization - weights (the
simulator uses the `hardware` preset; the torch executor the real device; on the CPU
`kv_cache.cpu_budget_gib`).

Wall-clock runs (``time_source = wall``) first run ``warmup_requests`` requests, untimed, through a
fresh engine on the same executor (its time is ``warmup_s``); then the measured run is repeated
``repeats`` times, each on fresh engine state, and the timed summary keys are the mean over repeats
with ``_std``, ``_min`` and ``_max`` (docs/metrics.md, "Time: modelled vs wall").
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedlab.cfg_access import cfg_get as _get
from pagedlab.engine.engine import Engine
from pagedlab.engine.request import Request, SamplingParams
from pagedlab.engine.result import RunResult
from pagedlab.engine.scheduler import Scheduler
from pagedlab.models.presets import (
    GIB,
    HardwareSpec,
    ModelSpec,
    hardware_spec,
    model_spec,
    num_blocks_in_budget,
    spec_from_hf_path,
)
from pagedlab.parts import instantiate_part, locate


@dataclass
class Built:
    """Everything a run needs, built from the config."""

    engine: Engine
    requests: list[Request]
    model: ModelSpec
    num_blocks: int
    num_swap_blocks: int
    new_engine: Callable[[], Engine] | None = None  # fresh engine state (block manager, scheduler, sampler,
    # recorder) on the same executor: loaded weights and KV tensors are reused, block tables start empty
    cpu_threads: int | None = None  # torch's CPU threads for a wall-clock run on the CPU


def num_blocks_for(budget_bytes: float, block_size: int, kv_bytes_per_token: int, what: str) -> int:
    """Blocks a byte budget holds; a budget smaller than one block is an error."""
    block_bytes = block_size * kv_bytes_per_token
    n = num_blocks_in_budget(budget_bytes, block_size, kv_bytes_per_token)
    if n < 1:
        raise ValueError(f"{what}={budget_bytes / GIB:.4g} GiB holds no block: one block of {block_size} tokens "
                         f"needs {block_bytes} bytes ({kv_bytes_per_token} bytes per token)")
    return n


def sampling_defaults(cfg: Any) -> SamplingParams:
    s = _get(cfg, "sampling", {}) or {}
    fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "beam_width", "ignore_eos")
    return SamplingParams(**{k: s[k] for k in fields if k in s and s[k] is not None})


def build_requests(cfg: Any, vocab_size: int, max_model_len: int) -> list[Request]:
    """The requests of the workload ``workload._target_`` names."""
    workload = instantiate_part(cfg.workload, "workload")
    return workload.requests(vocab_size=vocab_size, max_model_len=max_model_len, defaults=sampling_defaults(cfg),
                             seed=int(_get(cfg, "seed", 0)))


def model_shapes(cfg: Any) -> ModelSpec:
    """The model's shapes without loading weights: the preset, or the checkpoint's ``config.json`` for
    ``model=hf`` (and for executor=torch with ``model.name_or_path`` set)."""
    name, path, dtype = _get(cfg, "model.name", "llama_13b"), _get(cfg, "model.name_or_path"), _get(cfg, "model.dtype")
    if name == "hf" or (path and not simulated(cfg)):
        if not path:
            raise ValueError("model=hf needs model.name_or_path=<a local checkpoint folder or hub id>")
        return spec_from_hf_path(str(path), dtype or "auto")
    return model_spec(name, dtype)


def simulated(cfg: Any) -> bool:
    """Whether the executor the config names runs no tensors (its backend class says ``simulated = True``)."""
    return bool(getattr(locate(cfg.executor, "executor"), "simulated", False))


def sim_hardware(cfg: Any) -> HardwareSpec:
    """The ``hardware`` preset the simulator runs on."""
    return hardware_spec(_get(cfg, "hardware.name", "a100_40gb"))


def sim_budget(cfg: Any, spec: ModelSpec) -> tuple[float, str]:
    """The simulator's default KV budget in bytes (all the hardware's GPUs' memory x utilization - weights)
    and its name."""
    from pagedlab.executors.cost_model import default_kv_budget_bytes

    hw = sim_hardware(cfg)
    util = float(_get(cfg, "kv_cache.gpu_memory_utilization", 0.9))
    return default_kv_budget_bytes(spec, hw, util), f"hardware={hw.name} x kv_cache.gpu_memory_utilization - weights"


def kv_num_blocks(cfg: Any, kv_bytes_per_token: int, default_budget: float | None, default_what: str) -> int:
    """The KV block count: ``kv_cache.num_blocks``, else ``kv_cache.budget_gib`` (else the default budget)
    in whole blocks. Raises ValueError when the budget holds no block or no default is known (None)."""
    num_blocks = _get(cfg, "kv_cache.num_blocks")
    if num_blocks is not None:
        return int(num_blocks)
    block_size = int(_get(cfg, "block_size", 16))
    budget_gib = _get(cfg, "kv_cache.budget_gib")
    if budget_gib is not None:
        return num_blocks_for(float(budget_gib) * GIB, block_size, kv_bytes_per_token, "kv_cache.budget_gib")
    if default_budget is None:
        raise ValueError(f"{default_what} is not known before the model is loaded")
    return num_blocks_for(default_budget, block_size, kv_bytes_per_token, default_what)


def kv_runtime_args(cfg: Any, num_blocks: int, num_swap_blocks: int) -> dict[str, Any]:
    """What the engine passes an allocator besides its own arguments (see :class:`pagedlab.kv.KVManager`)."""
    return {"num_blocks": int(num_blocks), "block_size": int(cfg.block_size), "cow": bool(_get(cfg, "cow", True)),
            "prefix_cache": bool(_get(cfg, "prefix_cache", False)), "num_swap_blocks": num_swap_blocks,
            "max_model_len": int(_get(cfg, "max_model_len", 2048)),
            "watermark_blocks": int(float(_get(cfg, "kv_cache.watermark", 0.01)) * int(num_blocks))}


def sampler_runtime_args(node: Any, seed: int, vocab_size: int, eos_token_id: int | None) -> dict[str, Any]:
    """What the engine passes a ``sampling.sampler`` besides its own arguments: ``seed``, and the model's
    ``vocab_size`` and ``eos_token_id`` when the constructor takes them and the node does not set them."""
    args: dict[str, Any] = {"seed": seed}
    if node is None:
        return args
    try:
        params = inspect.signature(locate(node, "sampling.sampler")).parameters
    except (TypeError, ValueError):  # no signature to read: seed only
        return args
    for name, value in (("vocab_size", vocab_size), ("eos_token_id", eos_token_id)):
        if name in params and name not in node:
            args[name] = value
    return args


def build(cfg: Any, cpu_threads: int | None = None) -> Built:
    """Instantiate every part the config names (``_target_``, see pagedlab/parts.py): the executor's backend
    (model or its shapes), then per engine the allocator, preemption, scheduler and token sampler.
    ``cpu_threads`` is the default for an executor whose ``threads`` is null (a parallel sweep's share)."""
    block_size = int(cfg.block_size)
    max_model_len = int(_get(cfg, "max_model_len", 2048))
    share = {"threads": cpu_threads} if cpu_threads and _get(cfg, "executor.threads", 0) is None else {}
    backend = instantiate_part(cfg.executor, "executor", cfg, **share)
    spec = backend.spec
    num_blocks = kv_num_blocks(cfg, spec.kv_bytes_per_token, backend.default_budget_bytes, backend.budget_what)
    swap_gib = float(_get(cfg, "kv_cache.swap_gib", 0.0))
    num_swap = num_blocks_in_budget(swap_gib * GIB, block_size, spec.kv_bytes_per_token)
    seed = int(_get(cfg, "seed", 0))
    executor = backend.make_executor(int(num_blocks), block_size, num_swap)
    sampler_node = _get(cfg, "sampling.sampler")
    sampler_args = sampler_runtime_args(sampler_node, seed, spec.vocab_size, backend.eos_token_id)

    def new_engine() -> Engine:
        kv = instantiate_part(cfg.allocator, "allocator", **kv_runtime_args(cfg, num_blocks, num_swap))
        scheduler = Scheduler(
            kv, max_num_seqs=int(_get(cfg, "max_num_seqs", 256)),
            max_num_batched_tokens=int(_get(cfg, "max_num_batched_tokens", 8192)), max_model_len=max_model_len,
            preemption=instantiate_part(cfg.eviction, "eviction"), eos_token_id=backend.eos_token_id,
            batching=str(_get(cfg, "batching", "mixed")),
        )
        sampler = (instantiate_part(sampler_node, "sampling.sampler", **sampler_args)
                   if sampler_node is not None else backend.make_sampler(seed))
        return Engine(kv, scheduler, executor, sampler)

    engine = new_engine()
    requests = build_requests(cfg, spec.vocab_size, max_model_len)
    return Built(engine, requests, spec, int(num_blocks), num_swap, new_engine,
                 getattr(backend, "cpu_threads", None))


# the summary keys measured on the clock: averaged over repeats, with a spread
TIMED_KEYS = ("throughput_tok_s", "requests_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "normalized_latency_mean",
              "makespan_s")
SPREAD_SUFFIXES = ("_std", "_min", "_max")


WARMUP_MAX_TOKENS = 16  # output tokens of a warm-up request: past the first few steps, decode repeats itself


def warmup_requests(requests: list[Request], n: int) -> list[Request]:
    """The first ``n`` requests of the workload (arrival order), all arriving at 0, batched together at
    once: their prompts and sampling, with at most WARMUP_MAX_TOKENS output tokens each (the first
    prefill and decode steps are the ones that pay first-call costs)."""
    first = sorted(requests, key=lambda r: r.arrival_time)[:n]
    return [dataclasses.replace(r, arrival_time=0.0, sampling=dataclasses.replace(
        r.sampling, max_tokens=min(r.sampling.max_tokens, WARMUP_MAX_TOKENS))) for r in first]


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary from the repeats': the first repeat's, with each timed key replaced by the mean
    over repeats plus ``<key>_std`` (sample standard deviation, ddof=1; 0 for one repeat), ``_min``
    and ``_max``, and ``repeats``."""
    out = dict(summaries[0])
    for key in TIMED_KEYS:
        vals = [float(s[key]) for s in summaries]
        out[key] = vals[0] if all(_same(v, vals[0]) for v in vals) else sum(vals) / len(vals)  # exact if equal
        if len(vals) > 1 and not math.isnan(out[key]):
            mean = out[key]
            out[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        else:  # one repeat measures no spread: 0 (not NaN, so equal summaries compare equal); `repeats` says so
            out[f"{key}_std"] = 0.0 if not math.isnan(out[key]) else float("nan")
        out[f"{key}_min"], out[f"{key}_max"] = min(vals), max(vals)
    out["repeats"] = len(summaries)
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def run_experiment(cfg: Any, progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None,
                   cpu_threads: int | None = None) -> RunResult:
    """Run the workload the config describes; returns summary, per-step and per-sequence tables.
    ``cpu_threads``: torch threads for an executor whose ``threads`` is null (see :func:`build`).

    Wall-clock runs first run ``warmup_requests`` requests through a fresh engine (untimed, reported
    as ``warmup_s``); the measured run is repeated ``repeats`` times on fresh engine state. The tables
    (and ``on_step``) are the first repeat's; the timed summary keys are means over the repeats."""
    built = build(cfg, cpu_threads)
    wall = built.engine.executor.time_source == "wall"
    repeats = int(_get(cfg, "repeats", 1))
    n_warm = int(_get(cfg, "warmup_requests", 4)) if wall else 0
    warmup_s = 0.0
    if n_warm and built.requests and built.new_engine is not None:
        t0 = time.perf_counter()
        built.new_engine().run(warmup_requests(built.requests, n_warm))
        warmup_s = time.perf_counter() - t0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(built.requests) * repeats, desc="requests", unit="req", leave=False)
    try:
        result = built.engine.run(built.requests, progress=bar.update if bar else None, on_step=on_step)
        summaries = [result.summary]
        for _ in range(repeats - 1):
            engine = built.new_engine() if built.new_engine is not None else build(cfg).engine
            summaries.append(engine.run(built.requests, progress=bar.update if bar else None).summary)
    finally:
        if bar is not None:
            bar.close()
    if not wall:  # the simulator is deterministic: a repeat that differs is a bug, not noise
        for i, s in enumerate(summaries[1:], 2):
            diff = [k for k in s if not _same(s[k], summaries[0][k])]
            if diff:
                raise RuntimeError(f"simulated repeat {i} differs from repeat 1 in {', '.join(diff)}")
    result.summary = aggregate(summaries)
    result.summary.update(num_blocks=built.num_blocks, num_swap_blocks=built.num_swap_blocks,
                          block_size=int(cfg.block_size), kv_bytes_per_token=built.model.kv_bytes_per_token,
                          warmup_s=warmup_s, cpu_threads=built.cpu_threads)
    result.config = _to_dict(cfg)
    return result


RUN_SUMMARY_KEYS = ("num_blocks", "num_swap_blocks", "block_size", "kv_bytes_per_token", "warmup_s",
                    "cpu_threads", "repeats")  # added above
SPREAD_KEYS = tuple(f"{k}{suffix}" for k in TIMED_KEYS for suffix in SPREAD_SUFFIXES)


def summary_keys() -> set[str]:
    """Every key of a run's summary (what ``+objective`` may name), known without running anything."""
    import pandas as pd

    from pagedlab.engine.metrics import STEP_COLUMNS
    from pagedlab.engine.recorder import summarize

    steps = pd.DataFrame(columns=[*STEP_COLUMNS, "reserved_slots", "internal_frag"], dtype=float)
    requests = pd.DataFrame(columns=["status", "seq_index", "output_len", "arrival_time", "finish_time", "ttft",
                                     "tpot", "normalized_latency"])
    return {*summarize(steps, requests, "modelled"), *Engine.SUMMARY_KEYS, *RUN_SUMMARY_KEYS, *SPREAD_KEYS}


def _to_dict(cfg: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg) if hasattr(cfg, "keys") else {}
