"""Checks of a composed config that need more than its schema: the model's shapes (a preset, or a
checkpoint's config.json), the hardware, the KV budget, the device, the kernel and the workload's
requests. :func:`check_plan` runs them all; the CLI's preflight, :func:`pagedlab.compose` and every
point of :func:`pagedlab.sweep` call it before any work. Loads no weights and uses no network.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from pagedlab.config import ConfigError, effective_sampling, raise_problems, validate
from pagedlab.experiment import simulated
from pagedlab.kv import ContiguousBlockManager


def _label(cfg: DictConfig, group: str) -> str:
    """A part's label for messages: its ``name``, else its ``_target_``."""
    node = cfg[group]
    return str(node.get("name") or node.get("_target_"))


def check_plan(cfg: DictConfig) -> None:
    """Everything checked before work: :func:`validate`, then the rules that need the model's shapes
    (preset or the checkpoint's config.json), the hardware, the KV budget, the device, the kernel and
    the workload's requests. Raises ConfigError listing every problem; loads no weights, uses no network."""
    validate(cfg)
    errors: list[str] = _parallel_seq_problems(cfg) + _objective_problems(cfg) + _report_problems(cfg)
    kv = _part_problems(cfg, errors)
    if errors:
        raise_problems(errors)  # the rules below assume the parts can be built
    sim = simulated(cfg)
    spec = _model_problems(cfg, sim, errors)
    if spec is not None and sim:
        _fit_problems(cfg, spec, errors)
    device = _device_problems(cfg, errors) if not sim else None
    _kernel_problems(cfg, spec, device, errors)
    if spec is not None and not errors:
        _budget_problems(cfg, spec, device, sim, isinstance(kv, ContiguousBlockManager), errors)
    if spec is not None and "path" in cfg.workload:
        _trace_problems(cfg, spec, errors)
    raise_problems(errors)


NOMINAL_BLOCKS = 1024  # the allocator is built to check its arguments; the real count needs the model


def _part_problems(cfg: DictConfig, errors: list[str]) -> Any:
    """Build the light parts as the run will (allocator at a nominal size, preemption, workload, sampler)
    and import the heavy ones (executor backend, logger), so bad arguments fail here, naming the field.
    Returns the nominal allocator (None if it could not be built)."""
    from pagedlab.errors import BadArgument
    from pagedlab.experiment import kv_runtime_args
    from pagedlab.parts import instantiate_part, locate, part_kwargs

    built = {}
    parts: list[tuple[str, Any, dict]] = [
        ("allocator", cfg.allocator, kv_runtime_args(cfg, cfg.kv_cache.num_blocks or NOMINAL_BLOCKS, 0)),
        ("eviction", cfg.eviction, {}), ("workload", cfg.workload, {})]
    if cfg.sampling.get("sampler") is not None:
        parts.append(("sampling.sampler", cfg.sampling.sampler, {"seed": 0}))
    for group, node, runtime in parts:
        try:
            built[group] = instantiate_part(node, group, **runtime)
        except ConfigError as exc:
            errors.extend(exc.problems)
    for group in ("executor", "logger"):
        try:
            check = getattr(locate(cfg[group], group), "check_arguments", None)
            if check is not None:  # a heavy part may check its own arguments without being built
                check(**part_kwargs(cfg[group]))
        except ConfigError as exc:
            errors.extend(exc.problems)
        except BadArgument as exc:
            errors.append(f"{group}.{exc}")
    return built.get("allocator")


def _objective_problems(cfg: DictConfig) -> list[str]:
    """``+objective=METRIC`` must name a numeric summary key (checked before the run, not after)."""
    from pagedlab.experiment import summary_keys

    objective = cfg.get("objective")
    keys = sorted(summary_keys() - {"time_source"})
    if objective is None or objective in keys:
        return []
    return [f"objective={objective} is not allowed: expected a numeric summary key, one of {', '.join(keys)}"]


def _report_problems(cfg: DictConfig) -> list[str]:
    """``report.metrics`` must be summary keys, ``report.by`` group names or config keys."""
    import difflib

    from omegaconf import OmegaConf

    from pagedlab.config import GROUPS
    from pagedlab.experiment import summary_keys

    report = cfg.get("report")
    if report is None:
        return []
    errors = []
    keys = summary_keys()
    for m in report.get("metrics") or []:
        if m not in keys:
            close = difflib.get_close_matches(m, sorted(keys), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; summary keys: {', '.join(sorted(keys))}"
            errors.append(f"report.metrics: {m} is not allowed: expected a summary key{hint}")
    for k in report.get("by") or []:
        if k not in (*GROUPS, "experiment") and OmegaConf.select(cfg, k, default="<missing>") == "<missing>":
            errors.append(f"report.by: {k} is not allowed: expected a group ({', '.join(GROUPS)}) or a config key "
                          f"such as block_size or workload.request_rate")
    return errors


def _parallel_seq_problems(cfg: DictConfig) -> list[str]:
    """A synthetic request's sequences (max(n, beam_width)) must fit in max_num_seqs. Traces are
    skipped: their rows may set their own n, and the engine rejects such requests with a reason."""
    if "path" in cfg.workload:
        return []
    errors = []
    for name in ("n", "beam_width"):
        key, value = effective_sampling(cfg, name)
        if isinstance(value, int) and value > cfg.max_num_seqs:
            errors.append(f"{key}={value} is not allowed with max_num_seqs={cfg.max_num_seqs}: each request runs "
                          f"{value} sequences at once, so none could ever be scheduled; expected max_num_seqs >= "
                          f"{value} or a smaller {name}")
    return errors


def _model_problems(cfg: DictConfig, sim: bool, errors: list[str]) -> Any:
    """The model's ModelSpec (no weights), or None after adding why it cannot be had."""
    from pagedlab.experiment import model_shapes
    from pagedlab.models.presets import hf_config_file

    m = cfg.model
    path = m.name_or_path
    if m.name != "hf" and not sim and not path and not m.name.startswith("tiny_"):
        errors.append(f"model={m.name} is not allowed with executor={_label(cfg, 'executor')} and "
                      "model.name_or_path=null: the preset has shapes but no weights; expected executor=sim, or "
                      "model.name_or_path=<checkpoint>")
        return None
    if (m.name == "hf" or (path and not sim)) and hf_config_file(str(path)) is None:
        errors.append(f"model.name_or_path={path} is not allowed: expected a local folder with a config.json or "
                      "a Hugging Face model id already in the local cache (nothing is downloaded here; "
                      "fetch it first, e.g. `hf download ID`)")
        return None
    try:
        return model_shapes(cfg)
    except Exception as exc:  # noqa: BLE001 - an unreadable or unsupported config.json
        errors.append(f"model.name_or_path={path} is not allowed: its config.json cannot be read as a causal LM "
                      f"({type(exc).__name__}: {exc})")
        return None


def _fit_problems(cfg: DictConfig, spec: Any, errors: list[str]) -> None:
    from pagedlab.models.presets import GIB, hardware_spec

    hw = hardware_spec(cfg.hardware.name)
    util = cfg.kv_cache.gpu_memory_utilization
    usable = hw.total_memory_gib * GIB * util
    if spec.weight_bytes > usable:
        errors.append(f"model={cfg.model.name} is not allowed with hardware={hw.name}: its weights take "
                      f"{spec.weight_bytes / GIB:.1f} GiB ({spec.dtype}) but {hw.total_memory_gib:g} GiB "
                      f"({hw.num_gpus} GPU(s)) x kv_cache.gpu_memory_utilization={util:g} = {usable / GIB:.1f} GiB; expected a larger "
                      f"hardware, a smaller model or a smaller model.dtype")


def _device_problems(cfg: DictConfig, errors: list[str]) -> str:
    """The device type the torch executor will use ("cpu" or "cuda"); adds a problem if it has none."""
    import torch

    device = cfg.device
    available = torch.cuda.is_available()
    if device == "auto":
        return "cuda" if available else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if available else 0
        index = int(device[5:]) if ":" in device else 0
        if index >= count:
            have = f"{count} CUDA device(s): cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            errors.append(f"device={device} is not allowed: this machine has {have}; expected "
                          f"{'device=cpu or device=auto' if not count else 'one of those, cpu or auto'}")
        return "cuda"
    return "cpu"


def _kernel_problems(cfg: DictConfig, spec: Any, device: str | None, errors: list[str]) -> None:
    """Asks the kernel (built from ``kernel._target_``; cheap) whether it can run here: with executor=sim
    only the plain-PyTorch one is taken (the simulator runs none); then its package, the model's dtype
    on this device, and its shapes for this model (Triton's tiles on a GPU, the cpu kernel's head size)."""
    from pagedlab.config import ConfigError
    from pagedlab.kernels.torch_gather import TorchGatherKernel
    from pagedlab.parts import instantiate_part

    try:
        kernel = instantiate_part(cfg.kernel, "kernel")
    except ConfigError as exc:
        errors.extend(exc.problems)
        return
    label = f"kernel={cfg.kernel.get('name') or kernel.name}"
    if simulated(cfg):
        if not isinstance(kernel, TorchGatherKernel):
            errors.append(f"{label} is not allowed with executor=sim: the simulator runs no attention kernel; "
                          "expected executor=torch, or kernel=torch_gather")
        return
    if device is None:
        return
    import torch

    dev = torch.device(cfg.device if cfg.device != "auto" else device)
    why = kernel.problem(dev)
    if why:
        errors.append(f"{label} is not allowed: {why}")
        return
    if spec is None:
        return
    from pagedlab.models.dtypes import resolve_dtype

    dtype = resolve_dtype(spec.dtype)
    if not isinstance(dtype, torch.dtype):
        return
    why = kernel.problem(dev, dtype)
    if why:
        shown = cfg.model.dtype if cfg.model.dtype != "auto" else f"auto (the checkpoint's {spec.dtype})"
        where = "the CPU" if dev.type == "cpu" else str(dev)
        errors.append(f"{label} is not allowed with model.dtype={shown} on {where}: {why}")
    elif not errors:
        why = kernel.problem(dev, dtype, spec)
        if why:
            errors.append(f"{label} is not allowed for this model on {'the CPU' if dev.type == 'cpu' else dev}: {why}")


def _budget_problems(cfg: DictConfig, spec: Any, device: str | None, sim: bool, per_seq_reservations: bool,
                     errors: list[str]) -> None:
    """The KV cache must hold one request of max_model_len tokens (per sequence for contiguous allocators)."""
    from pagedlab.experiment import kv_num_blocks, sim_budget
    from pagedlab.models.presets import GIB

    kvt, bs, kv = spec.kv_bytes_per_token, cfg.block_size, cfg.kv_cache
    if sim:
        default, what = sim_budget(cfg, spec)
    elif device == "cpu":
        default, what = kv.cpu_budget_gib * GIB, "kv_cache.cpu_budget_gib"
    else:
        default, what = None, "free device memory x kv_cache.gpu_memory_utilization - weights"
    if kv.num_blocks is not None:
        field_, value = "kv_cache.num_blocks", kv.num_blocks
    elif kv.budget_gib is not None:
        field_, value = "kv_cache.budget_gib", kv.budget_gib
    elif not sim and default is not None:
        field_, value = "kv_cache.cpu_budget_gib", kv.cpu_budget_gib
    elif default is not None:
        field_, value = "kv_cache.budget_gib", f"null (the default: {what} = {default / GIB:.4g} GiB)"
    else:
        return  # sized from free device memory once the model is loaded
    try:
        num_blocks = kv_num_blocks(cfg, kvt, default, what)
    except ValueError:
        num_blocks = 0
    seqs = 1
    if per_seq_reservations:
        n, b = (cfg.workload.get("n") or cfg.sampling.n), (cfg.workload.get("beam_width") or cfg.sampling.beam_width)
        seqs = max(n, b)
    need = seqs * -(-cfg.max_model_len // bs)
    if num_blocks >= need:
        return
    per_seq = f" x {seqs} sequences (each reserves its own space with allocator={_label(cfg, 'allocator')})" \
        if seqs > 1 else ""
    need_gib = need * bs * kvt / GIB
    errors.append(f"{field_}={value} is not allowed: it holds {num_blocks} blocks of {bs} tokens "
                  f"({kvt} bytes per token for model={cfg.model.name}) but one request of max_model_len="
                  f"{cfg.max_model_len} tokens{per_seq} needs {need} blocks = {need_gib:.4g} GiB; expected "
                  f"kv_cache.num_blocks >= {need} or kv_cache.budget_gib >= {need_gib:.4g}, or a smaller "
                  "max_model_len")


def _trace_problems(cfg: DictConfig, spec: Any, errors: list[str]) -> None:
    """Read the trace as the run will (vocab and max_model_len checks live in trace_requests)."""
    from pagedlab.experiment import build_requests

    try:
        build_requests(cfg, spec.vocab_size, cfg.max_model_len)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        msg = str(exc)
        errors.append(msg if "workload.path" in msg else f"workload.path={cfg.workload.path} is not allowed: {msg}")
