"""All transformers-specific glue: load any HF causal LM and run it over pagedlab's paged KV cache.

No modelling code is copied. The adapter registers an attention function under the name
"pagedlab" in transformers' `AttentionInterface` and switches the model to it; HF's own layers
compute projections and RoPE, then call that function with (module, query, key, value, mask, ...).
The function writes the new K/V into the paged pool and attends through the block tables with the
chosen kernel. Per-step metadata (slot mapping, block tables, lengths) travels in a context
variable set for the duration of one forward; the layer index comes from `module.layer_idx`.

The batch is flattened: all scheduled sequences' new tokens form one [1, total_tokens] forward with
per-token positions, no padding. HF's cache is off (`use_cache=False`, no cache object), and since
no mask function is registered for "pagedlab" (`AttentionMaskInterface`), transformers builds no
[T, T] mask (`create_causal_mask` returns None); causality is the kernel's job. Only each sequence's
last token reaches `lm_head`. Checked with transformers 5.24 (and written for 5.17: only the
`input_ids` / `position_ids` / `use_cache` model kwargs are used, which both accept).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel

from pagedlab.kernels import KVCache, PagedMetadata

ATTN_NAME = "pagedlab"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Step:
    kv: KVCache
    meta: PagedMetadata
    kernel: ModuleType
    masks_seen: int = 0  # HF masks handed to us (should stay 0: we build causality ourselves)


_STEP: ContextVar[_Step | None] = ContextVar("pagedlab_step", default=None)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """HF attention-interface function: [1, H, T, D] query, [1, kv_heads, T, D] key/value -> [1, T, H, D]."""
    step = _STEP.get()
    if step is None:
        raise RuntimeError("pagedlab attention was called outside HFModel.forward")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit softcapping is not supported by pagedlab kernels")
    step.masks_seen += attention_mask is not None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = step.kernel.attention(q, k, v, step.kv[module.layer_idx], step.meta, scale, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    """Register the "pagedlab" attention function with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, paged_attention_forward)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """"auto" stays "auto" (the checkpoint's dtype); names map to torch dtypes."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


class HFModel:
    """A HF causal LM switched to paged attention; `forward` returns last-token logits."""

    def __init__(self, model: PreTrainedModel) -> None:
        register()
        try:
            model.set_attn_implementation(ATTN_NAME)
        except (AttributeError, ValueError, KeyError):  # older or unusual model classes
            model.config._attn_implementation = ATTN_NAME
        self.model = model.eval()
        cfg = model.config.get_text_config()
        self.num_layers: int = cfg.num_hidden_layers
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size: int = cfg.vocab_size
        self.base = getattr(model, model.base_model_prefix)
        self.lm_head = model.get_output_embeddings()

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
    ) -> HFModel:
        """Load a local folder or hub id (`dtype`: auto / float32 / float16 / bfloat16)."""
        register()
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), attn_implementation=ATTN_NAME
        )
        return cls(model.to(device))

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv: KVCache,
        meta: PagedMetadata,
        kernel: ModuleType,
    ) -> torch.Tensor:
        """Run the flattened batch ([T] ids and positions); returns [num_seqs, vocab] fp32 logits."""
        step = _Step(kv, meta, kernel)
        token = _STEP.set(step)
        try:
            out = self.base(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            _STEP.reset(token)
        self.last_masks_seen = step.masks_seen
        hidden = out[0][0].index_select(0, meta.last_rows)
        return self.lm_head(hidden).float()
