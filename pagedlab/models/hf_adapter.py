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
last token reaches `lm_head`. Checked with transformers 5.24 and 5.17: only the `input_ids` /
`position_ids` / `use_cache` model kwargs are used, which both accept.

`model.forward=compact` (the default, `auto`, picks it for Llama, Qwen2 and Mistral): the same layers
run as a short list of tensor ops over the flattened batch, with q/k/v and gate/up each fused into one
matmul, `F.rms_norm`, one RoPE over q and k together, and the paged kernel called directly. It uses
the HF modules' own weights (the fused matrices are views, nothing is copied), HF's rotary module for
cos/sin (so RoPE scaling variants are HF's), and asks the HF layers once, through the attention
interface, which scale and sliding window each layer passes. Tiny models are dispatch-bound on the
CPU, where this is about twice as fast as going through HF's module tree; on a GPU it saves launches.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel

from pagedlab.kernels import AttentionKernel, KVCache, PagedMetadata
from pagedlab.models.dtypes import resolve_dtype
from pagedlab.models.presets import FORWARDS

ATTN_NAME = "pagedlab"
COMPACT_TYPES = ("llama", "qwen2", "mistral")  # pre-norm, RoPE, GQA, SwiGLU: one compact forward


@dataclass
class _Step:
    kv: KVCache
    meta: PagedMetadata
    kernel: AttentionKernel | None
    masks_seen: int = 0  # HF masks handed to us (should stay 0: we build causality ourselves)
    calls: list[dict[str, Any]] = field(default_factory=list)  # filled when kernel is None (a probe)


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
    if step.kernel is None:  # probe: record what this layer passes, attend to nothing
        step.calls.append({"layer": module.layer_idx, "scale": scale, "sliding_window": sliding_window})
        return torch.zeros_like(q).unsqueeze(0), None
    out = step.kernel.attention(q, k, v, step.kv[module.layer_idx], step.meta, scale, sliding_window)
    return out.unsqueeze(0), None


def register() -> None:
    """Register the "pagedlab" attention function with transformers (idempotent)."""
    AttentionInterface.register(ATTN_NAME, paged_attention_forward)


class HFModel:
    """A HF causal LM switched to paged attention; `forward` returns last-token logits."""

    def __init__(self, model: PreTrainedModel, forward: str = "auto") -> None:
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
        if forward not in FORWARDS:
            raise ValueError(f"model.forward={forward!r} is not one of {list(FORWARDS)}")
        kind = cfg.model_type
        if forward == "compact" and kind not in COMPACT_TYPES:
            raise ValueError(f"model.forward=compact supports model types {list(COMPACT_TYPES)}, not {kind!r}; "
                             "use model.forward=hf (or auto)")
        self.compact = CompactForward(self) if forward != "hf" and kind in COMPACT_TYPES else None

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
        forward: str = "auto",
    ) -> HFModel:
        """Load a local folder or hub id (`dtype`: auto / float32 / float16 / bfloat16)."""
        register()
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=resolve_dtype(dtype), attn_implementation=ATTN_NAME
        )
        return cls(model.to(device), forward)

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
        kernel: AttentionKernel,
    ) -> torch.Tensor:
        """Run the flattened batch ([T] ids and positions); returns [num_seqs, vocab] fp32 logits."""
        if self.compact is not None:
            hidden = self.compact(input_ids, positions, kv, meta, kernel)
        else:
            hidden = self.hf_forward(input_ids, positions, _Step(kv, meta, kernel))
        return self.lm_head(hidden.index_select(0, meta.last_rows)).float()

    def hf_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, step: _Step) -> torch.Tensor:
        """The base model's own forward with paged attention: [T] ids -> [T, hidden] final hidden states."""
        token = _STEP.set(step)
        try:
            out = self.base(input_ids=input_ids[None], position_ids=positions[None], use_cache=False)
        finally:
            _STEP.reset(token)
        self.last_masks_seen = step.masks_seen
        return out[0][0]


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several Linear layers that read the same input; the layers' own
    parameters become views of it, so no memory is added."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.detach() if lin.bias is not None
                          else weight.new_zeros(lin.out_features) for lin in linears])
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = torch.nn.Parameter(weight[row : row + n], requires_grad=False)
        if lin.bias is not None:
            lin.bias = torch.nn.Parameter(bias[row : row + n], requires_grad=False)
        row += n
    return weight, bias


@dataclass
class _Layer:
    eps: float
    norm1: torch.Tensor
    qkv: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    norm2: torch.Tensor
    gate_up: tuple[torch.Tensor, torch.Tensor | None]
    down: tuple[torch.Tensor, torch.Tensor | None]
    act: Any
    scale: float
    sliding_window: int | None


class CompactForward:
    """The Llama-family decoder (Llama, Qwen2, Mistral) as a flat list of tensor ops; see the module
    docstring. HF's math on HF's weights; rounding may differ by an ulp (fused matmuls and RMSNorm),
    which matters only in half precision."""

    def __init__(self, hf: HFModel) -> None:
        base = hf.base
        self.embed, self.norm, self.rotary = base.embed_tokens, base.norm, base.rotary_emb
        self.heads, self.kv_heads, self.head_dim = hf.num_heads, hf.num_kv_heads, hf.head_dim
        probe = _Step(None, None, None)  # type: ignore[arg-type]
        with torch.inference_mode():
            one = torch.zeros(1, dtype=torch.long, device=hf.model.device)
            hf.hf_forward(one, one, probe)
        passed = {c["layer"]: c for c in probe.calls}
        self.layers = []
        for i, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                eps=layer.input_layernorm.variance_epsilon,
                norm1=layer.input_layernorm.weight,
                qkv=_fuse([attn.q_proj, attn.k_proj, attn.v_proj]),
                o=(attn.o_proj.weight, attn.o_proj.bias),
                norm2=layer.post_attention_layernorm.weight,
                gate_up=_fuse([mlp.gate_proj, mlp.up_proj]),
                down=(mlp.down_proj.weight, mlp.down_proj.bias),
                act=mlp.act_fn,
                scale=passed[i]["scale"],
                sliding_window=passed[i]["sliding_window"],
            ))

    def _rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin, [T, 1, D]: x * cos + roll(x, D/2) * sin_signed is HF's RoPE."""
        cos, sin = self.rotary(like, positions[None])
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
        half = self.head_dim // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVCache, meta: PagedMetadata,
                 kernel: AttentionKernel) -> torch.Tensor:
        """[T] ids -> [T, hidden] final hidden states."""
        x = self.embed(input_ids)
        t, hidden = x.shape
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        cos, sin = self._rope(positions, x)
        for i, layer in enumerate(self.layers):
            y = F.rms_norm(x, (hidden,), layer.norm1, layer.eps)
            qkv = F.linear(y, *layer.qkv)
            qk = qkv[:, : (h + kvh) * d].view(t, h + kvh, d)
            qk = qk * cos + qk.roll(d // 2, -1) * sin
            v = qkv[:, (h + kvh) * d :].view(t, kvh, d)
            o = kernel.attention(qk[:, :h], qk[:, h:], v, kv[i], meta, layer.scale, layer.sliding_window)
            x = x + F.linear(o.view(t, h * d), *layer.o)
            y = F.rms_norm(x, (hidden,), layer.norm2, layer.eps)
            gate, up = F.linear(y, *layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(layer.act(gate) * up, *layer.down)
        return F.rms_norm(x, (hidden,), self.norm.weight, self.norm.variance_epsilon)
