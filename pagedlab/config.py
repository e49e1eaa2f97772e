"""Config schema (dataclasses in Hydra's ConfigStore), validation and the config dir locator.

Types are checked by OmegaConf while Hydra composes; choices, ranges and cross-field rules are
checked by :func:`validate` (composed config) and :func:`pagedlab.overrides.check_overrides`
(command-line overrides, before Hydra creates any directory); the checks that need the model's
shapes, the KV budget, the device or the trace file are :func:`pagedlab.app.checks.check_plan`. Every message names the field,
the value and what is allowed.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, OmegaConf

from pagedlab.models.presets import DTYPE_BYTES, FORWARDS, HARDWARE_PRESETS, MODEL_PRESETS

VERSION_BASE = "1.3"
GROUPS = ("allocator", "eviction", "kernel", "executor", "model", "hardware", "workload", "sampling", "logger")
# the groups that name a class (``_target_``, see pagedlab/parts.py): free-form, their constructors check them
PART_GROUPS = ("allocator", "eviction", "kernel", "executor", "workload", "logger")
COMPONENTS = ("allocator", "executor", "kernel", "model", "workload")  # W&B tags / job_type
EXTRA_KEYS = ("objective",)  # top-level keys outside the schema that `+key=value` may add (see run.py)

# the components' own tables are the source of truth for the names users may type
HARDWARE, MODELS, DTYPES = tuple(HARDWARE_PRESETS), (*MODEL_PRESETS, "hf"), ("auto", *DTYPE_BYTES)
# pagedlab.engine.scheduler.BATCHING, not imported: that would load the engine before any check
BATCHING = ("mixed", "prefill_first")


class ConfigError(CompactHydraException, ValueError):
    """A config value that is not allowed; Hydra prints just this message. ``problems``: one line each."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


def raise_problems(errors: list[str]) -> None:
    """Raise one ConfigError listing every problem, if there are any."""
    if errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(errors), errors)


def config_dir() -> Path:
    """The config dir: ``pagedlab/conf`` shipped in the wheel, else the repo's ``conf/`` (editable)."""
    pkg = Path(__file__).resolve().parent
    for cand in (pkg / "conf", pkg.parent / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise FileNotFoundError(f"pagedlab config dir not found (looked in {pkg / 'conf'} and {pkg.parent / 'conf'})")


# --------------------------------------------------------------------------- schema
@dataclass
class KVCacheConfig:
    budget_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None
    swap_gib: float = 4.0
    watermark: float = 0.01
    cpu_budget_gib: float = 0.25


@dataclass
class ModelConfig:
    name: str = "tiny_llama"
    name_or_path: str | None = None
    dtype: str = "auto"
    forward: str = "auto"


@dataclass
class HardwareConfig:
    name: str = "a100_40gb"


@dataclass
class SamplingConfig:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    beam_width: int = 1
    max_tokens: int = 64
    ignore_eos: bool = True
    seed: int | None = None
    sampler: Any = None  # a TokenSampler node (``_target_``); null: the executor's own


@dataclass
class ReportConfig:
    """What a sweep's comparison table shows (set by each conf/experiment/*.yaml): ``metrics``, its summary
    columns ([]: the headline set), and ``by``, the keys its rows are grouped by ([]: the swept keys)."""

    metrics: list[str] = field(default_factory=list)
    by: list[str] = field(default_factory=list)


@dataclass
class PagedLabConfig:
    """Top-level schema; each group file merges into its node (typed for model, hardware and sampling;
    free-form for the parts, whose ``_target_`` classes check their own arguments)."""

    allocator: dict[str, Any] = field(default_factory=dict)
    eviction: dict[str, Any] = field(default_factory=dict)
    kernel: dict[str, Any] = field(default_factory=dict)
    executor: dict[str, Any] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    workload: dict[str, Any] = field(default_factory=dict)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    logger: dict[str, Any] = field(default_factory=dict)
    report: ReportConfig = field(default_factory=ReportConfig)  # the sweep table's metrics and keys
    block_size: int = 16
    cow: bool = True
    prefix_cache: bool = False
    seed: int = 0
    device: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    batching: str = "mixed"
    overwrite: bool = False
    warmup_requests: int = 4
    repeats: int = 1
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)


GROUP_SCHEMAS: dict[str, type] = {g: typing.get_type_hints(PagedLabConfig)[g] for g in GROUPS if g not in PART_GROUPS}


def register() -> None:
    """Store the schemas as root configs (so they are not listed as groups): ``pagedlab_schema``
    (top level, first in config.yaml's defaults) and ``<group>_schema`` for each typed group node
    (model, hardware, sampling), which a user's own group file can extend with
    ``defaults: [/model_schema@_here_, _self_]``. The part groups are free-form (their classes check them)."""
    cs = ConfigStore.instance()
    cs.store(name="pagedlab_schema", node=PagedLabConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(name=f"{group}_schema", node=schema)


register()


# --------------------------------------------------------------------------- rules
Rule = tuple[Callable[[Any], bool], str]


def _one_of(*names: str) -> Rule:
    return (lambda v: v in names), "one of " + ", ".join(names)


def _int_range(lo: int, hi: float = math.inf, optional: bool = False) -> Rule:
    text = f"an integer in {lo}..{hi}" if hi != math.inf else f"an integer >= {lo}"
    return (lambda v: (optional and v is None) or (v is not None and lo <= v <= hi)), text + (
        " or null" if optional else "")


def _frac(lo_open: bool = True) -> Rule:
    if lo_open:
        return (lambda v: 0 < v <= 1), "a number in (0, 1]"
    return (lambda v: 0 <= v < 1), "a number in [0, 1)"


def _positive(optional: bool = False, zero: bool = False) -> Rule:
    text = ("a number >= 0" if zero else "a number > 0") + (" or null" if optional else "")
    return (lambda v: (optional and v is None) or (v is not None and (v >= 0 if zero else v > 0))), text


def _length_range(v: Any) -> bool:
    return len(v) == 2 and 1 <= v[0] <= v[1]


RULES: dict[str, Rule] = {
    "block_size": _int_range(1, 256),
    "seed": _int_range(0, 2**63 - 1),
    "workload.seed": _int_range(0, 2**63 - 1, optional=True),
    "sampling.seed": _int_range(0, 2**63 - 1, optional=True),
    "device": ((lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())),
               "auto, cpu, cuda or cuda:N"),
    "max_num_seqs": _int_range(1),
    "max_num_batched_tokens": _int_range(1),
    "max_model_len": _int_range(1),
    "batching": _one_of(*BATCHING),
    "warmup_requests": _int_range(0),
    "repeats": _int_range(1),
    "kv_cache.budget_gib": _positive(optional=True),
    "kv_cache.gpu_memory_utilization": _frac(),
    "kv_cache.num_blocks": _int_range(1, optional=True),
    "kv_cache.swap_gib": _positive(zero=True),
    "kv_cache.watermark": _frac(lo_open=False),
    "kv_cache.cpu_budget_gib": _positive(),
    "hardware.name": _one_of(*HARDWARE),
    "model.name": _one_of(*MODELS),
    "model.dtype": _one_of(*DTYPES),
    "model.forward": _one_of(*FORWARDS),
    "workload.num_requests": _int_range(1, optional=True),  # null: a trace's every row (synthetic ones refuse it)
    "workload.request_rate": _positive(optional=True),
    "workload.prompt_len": (_length_range, "[lo, hi] with 1 <= lo <= hi"),
    "workload.output_len": (_length_range, "[lo, hi] with 1 <= lo <= hi"),
    "workload.n": _int_range(1, optional=True),
    "workload.beam_width": _int_range(1, optional=True),
    "workload.shared_prefix_len": _int_range(0),
    "sampling.temperature": _positive(zero=True),
    "sampling.top_p": _frac(),
    "sampling.top_k": _int_range(0),
    "sampling.n": _int_range(1),
    "sampling.beam_width": _int_range(1),
    "sampling.max_tokens": _int_range(1),
    "logger.mode": _one_of("offline", "online", "disabled"),
    "logger.log_every": _int_range(1),
}


def not_allowed(key: str, value: Any, allowed: str) -> str:
    return f"{key}={show_value(value)} is not allowed: expected {allowed}"


def show_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else str(value)


def check_value(key: str, value: Any) -> str | None:
    """The error message for ``key=value`` (already of the field's type), or None if allowed."""
    rule = RULES.get(key)
    if rule is None:
        return None
    ok, allowed = rule
    try:
        good = bool(ok(value))
    except (TypeError, ValueError, AttributeError):
        good = False
    return None if good else not_allowed(key, value, allowed)


def validate(cfg: DictConfig) -> None:
    """Check a composed config before any work; raise ConfigError listing every problem."""
    errors: list[str] = []
    for key in RULES:
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or name not in node or OmegaConf.is_missing(node, name):
            continue  # missing ('???') values are reported below where they matter
        msg = check_value(key, node[name])
        if msg:
            errors.append(msg)
    if cfg.model.name == "hf" and not _is_set(cfg.model, "name_or_path"):
        errors.append("model.name_or_path=null is not allowed with model=hf: expected a Hugging Face "
                      "model id or a local checkpoint folder (model.name_or_path=PATH)")
    errors.extend(_sampling_problems(cfg) + _length_problems(cfg))
    raise_problems(errors)


def _is_set(node: DictConfig, key: str) -> bool:
    return not OmegaConf.is_missing(node, key) and node[key] is not None


def effective_sampling(cfg: DictConfig, name: str) -> tuple[str, Any]:
    """(key, value) of sampling field ``name`` as requests get it: workload.<name> overrides sampling.<name>."""
    w = cfg.workload.get(name)
    return (f"workload.{name}", w) if w is not None else (f"sampling.{name}", cfg.sampling.get(name))


def _sampling_problems(cfg: DictConfig) -> list[str]:
    """n > 1 together with beam_width > 1 (workload.n / workload.beam_width override sampling's)."""
    (nk, n), (bk, b) = effective_sampling(cfg, "n"), effective_sampling(cfg, "beam_width")
    if isinstance(n, int) and isinstance(b, int) and n > 1 and b > 1:
        return [(f"{nk}={n} with {bk}={b} is not allowed: parallel sampling and beam search do not combine; "
                 f"choose one ({nk}=1 or {bk}=1)")]
    return []


def _length_problems(cfg: DictConfig) -> list[str]:
    """Synthetic lengths that would be silently cut to fit max_model_len."""
    w, mml = cfg.workload, cfg.max_model_len
    lengths = w.get("lengths")
    if not isinstance(mml, int) or lengths not in ("uniform", "fixed") or "prompt_len" not in w:
        return []
    i = 1 if lengths == "uniform" else 0
    end = "hi" if i else "lo"
    try:
        p, o = int(w.prompt_len[i]), int(w.output_len[i])
    except (TypeError, ValueError, IndexError):
        return []  # reported by the rules above
    errors = []
    if p + o > mml:
        errors.append(f"workload.prompt_len={show_value(w.prompt_len)} with workload.output_len={show_value(w.output_len)} is "
                      f"not allowed with max_model_len={mml}: workload.lengths={lengths} draws up to {p} + {o} = {p + o} "
                      f"tokens; expected prompt_len {end} + output_len {end} <= max_model_len (lower them or "
                      f"raise max_model_len)")
    spl = w.get("shared_prefix_len")
    if isinstance(spl, int) and spl + 2 > mml:
        errors.append(f"workload.shared_prefix_len={spl} is not allowed with max_model_len={mml}: expected at most "
                      f"{mml - 2} (the prefix, one prompt token and one output token must fit)")
    return errors


def schema_defaults() -> dict[str, Any]:
    """Defaults of the schema as a nested dict (for docs and tests)."""
    return OmegaConf.to_container(OmegaConf.structured(PagedLabConfig))  # type: ignore[return-value]


__all__ = [
    "COMPONENTS",
    "GROUPS",
    "PART_GROUPS",
    "RULES",
    "VERSION_BASE",
    "ConfigError",
    "PagedLabConfig",
    "check_value",
    "config_dir",
    "effective_sampling",
    "raise_problems",
    "register",
    "schema_defaults",
    "validate",
]
