"""The simulator's cost model: an engine step is the sum of its operators, as kernels run one after another.

Each operator costs ``max(compute time, memory time, KERNEL_FLOOR_S)`` on one GPU of a tensor-parallel
group (every GPU does its shard at the same time):

  per layer:  QKV, O, MLP-in, MLP-out GEMMs   FLOPs over all tokens / peak; weights read once + activations / bw
              norms, q/k positions, activation  elementwise, bytes / bw
              attention, decode                 4 * heads * head_dim * sum(ctx) FLOPs; KV of every context / KV bw
              attention, prefill                4 * heads * head_dim * causal (q, ctx) pairs; KV of the contexts
              KV write                          new tokens' K and V into the cache
              2 all-reduces (num_gpus > 1)      latency + 2 (n-1)/n * tokens * hidden bytes / link bw
  per step:   LM head on the last token of each sequence, a logits gather (num_gpus > 1),
              block copies (one kernel), swaps (one host copy per block, K and V, per layer), the host's
              overhead (fixed, plus per sequence with ``HardwareSpec.seq_overhead_s``).

KV reads are slower when paged, and more so with small blocks: ``paged_kv_overhead(block_size)``. Every
constant, its source, what is ours and the model's limits: docs/cost_model.md.
"""

from __future__ import annotations

from operator import mul

from pagedlab.executors.base import StepInput
from pagedlab.models.presets import GIB, HardwareSpec, ModelSpec

KERNEL_FLOOR_S = 5e-6  # the shortest kernel: launch and tail (Vidur's A100 profile, 1-token norm/rope/act kernels)
PAGED_ANCHOR_BLOCK = 16  # paged KV reads at this block size stream at hardware.bandwidth_efficiency
PAGED_FIXED_OVERHEAD = 0.15  # extra time of a paged KV read over a contiguous one, whatever the block size
PAGED_PER_BLOCK_OVERHEAD = 1.3  # extra time per block visited, in tokens' worth of KV read
PARTS = ("gemm", "elementwise", "attention", "lm_head", "communication", "copies", "swaps", "overhead")


def paged_kv_overhead(block_size: int) -> float:
    """Extra time of reading KV through a block table over reading it contiguously, as a fraction:
    ``PAGED_FIXED_OVERHEAD + PAGED_PER_BLOCK_OVERHEAD / block_size`` (0.23 at block 16, paper Fig. 18a: 20-26 %)."""
    return PAGED_FIXED_OVERHEAD + PAGED_PER_BLOCK_OVERHEAD / block_size


def kv_read_slowdown(block_size: int, paged: bool = True) -> float:
    """KV read time relative to streaming at ``bandwidth_efficiency``: 1 for paged reads at block 16, more for
    smaller blocks, less for larger ones, ``1 / (1 + overhead(16))`` for contiguous KV."""
    anchor = 1 + paged_kv_overhead(PAGED_ANCHOR_BLOCK)
    return (1 + paged_kv_overhead(block_size)) / anchor if paged else 1 / anchor


def kv_replication(model: ModelSpec, num_gpus: int) -> float:
    """How many copies of each KV head the GPUs hold together: 1 while num_gpus <= num_kv_heads (heads are
    split), else num_gpus / num_kv_heads (each GPU keeps a whole head)."""
    return max(1.0, num_gpus / model.num_kv_heads)


def default_kv_budget_bytes(model: ModelSpec, hardware: HardwareSpec, util: float) -> float:
    """The KV budget when the config sets none: ``num_gpus * memory * util - weights`` (weights are split across
    the GPUs), counted in bytes of the model's ``kv_bytes_per_token`` (divided by ``kv_replication``)."""
    total = hardware.num_gpus * hardware.memory_gib * GIB * util - model.weight_bytes
    return total / kv_replication(model, hardware.num_gpus)


def _runs(pairs: list[tuple[int, int]]) -> int:
    """Runs of consecutive (src, dst) pairs: the copies a contiguous layout needs."""
    runs, prev = 0, (-2, -2)
    for src, dst in pairs:
        if src != prev[0] + 1 or dst != prev[1] + 1:
            runs += 1
        prev = (src, dst)
    return runs


class CostModel:
    """Step time of ``model`` on ``hardware``; the per-layer and per-step constants are computed once here."""

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, block_size: int, paged: bool = True) -> None:
        self.model, self.hw, self.block_size, self.paged = model, hardware, block_size, paged
        m, n, s = model, hardware.num_gpus, model.dtype_bytes
        h, d = m.hidden_size, m.head_dim
        heads, kv_heads = m.num_heads / n, m.num_kv_heads * kv_replication(m, n) / n  # per GPU
        inter, vocab = m.intermediate_size / n, m.vocab_size / n
        self.layers = m.num_layers
        self.peak = hardware.peak_tflops * 1e12 * hardware.compute_efficiency
        self.bw = hardware.hbm_gb_s * 1e9 * hardware.bandwidth_efficiency
        self.kv_bw = self.bw / kv_read_slowdown(block_size, paged)
        self.kv_bw_contiguous = self.bw / kv_read_slowdown(block_size, False)
        # GEMMs of one layer: (FLOPs per token, weight bytes, activation bytes per token)
        qkv, mlp_in = (heads + 2 * kv_heads) * d, (2 if m.gated_mlp else 1) * inter
        self.gemms = [(2 * h * k, h * k * s, (h + k) * s) for k in (qkv, heads * d, mlp_in, inter)]
        # elementwise kernels of one layer, bytes per token: 2 norms (with the residual add), q/k positions, act
        self.elementwise = [4 * h * s, 4 * h * s, 2 * (heads + kv_heads) * d * s,
                            (3 if m.gated_mlp else 2) * inter * s]
        self.kv_token_bytes = 2 * kv_heads * d * s  # K and V of one token in one layer, per GPU
        self.attn_flops = 4 * heads * d  # per (query, key) pair in one layer: QK^T and PV
        self.lm_head = (2 * h * vocab, h * vocab * s, vocab * s)  # FLOPs per seq, weight bytes, logits per seq
        self.block_bytes = block_size * self.layers * self.kv_token_bytes  # one block, all layers, per GPU
        self.copies_per_block = 2 * self.layers  # one host copy per block for K and for V, in every layer
        self.tp = n > 1
        link = hardware.interconnect_gb_s * 1e9 * hardware.interconnect_efficiency
        if self.tp and link <= 0:
            raise ValueError(f"hardware={hardware.name} has num_gpus={n} but no interconnect_gb_s")
        self.allreduce_per_token = 2 * (n - 1) / n * h * s / link if self.tp else 0.0  # ring all-reduce
        self.gather_per_seq = (n - 1) / n * m.vocab_size * s / link if self.tp else 0.0  # logits to one GPU
        self.pcie = hardware.pcie_gb_s * 1e9

    def _op(self, flops: float, nbytes: float, bw: float) -> float:
        return max(flops / self.peak, nbytes / bw, KERNEL_FLOOR_S)

    def parts(self, step: StepInput) -> tuple[float, ...]:
        """The step's time by part, in the order of ``PARTS``."""
        mi, hw, floor = step.model_input, self.hw, KERNEL_FLOOR_S
        paged = self.paged and not step.contiguous_kv  # a contiguous allocator's KV reads as one run
        kv_bw = self.kv_bw if paged else self.kv_bw_contiguous
        gemm = elementwise = attention = lm_head = comm = 0.0
        num_seqs = len(mi.query_lens)
        if num_seqs:
            tokens, peak, bw, kv = mi.num_tokens, self.peak, self.bw, self.kv_token_bytes
            for flops, weights, act in self.gemms:
                gemm += max(flops * tokens / peak, (weights + act * tokens) / bw, floor)
            for nbytes in self.elementwise:
                elementwise += max(nbytes * tokens / bw, floor)
            ctx = sum(mi.context_lens)
            if tokens > num_seqs:  # some sequence has more than one new token: prefill (or a re-prefill chunk)
                prefill = [(q, c) for q, c in zip(mi.query_lens, mi.context_lens) if q > 1]
                prefill_ctx = sum(c for _, c in prefill)
                pairs = sum(map(mul, *zip(*prefill))) - sum(q * (q - 1) for q, _ in prefill) // 2  # causal
                attention += self._op(self.attn_flops * pairs, kv * prefill_ctx, kv_bw)
                ctx -= prefill_ctx
            if ctx:  # decode: every sequence reads its whole context once
                attention += self._op(self.attn_flops * ctx, kv * ctx, kv_bw)
            attention += max(2 * kv * tokens / bw, floor)  # new K and V into their slots
            gemm, elementwise, attention = gemm * self.layers, elementwise * self.layers, attention * self.layers
            flops, weights, logits = self.lm_head
            lm_head = self._op(flops * num_seqs, weights + logits * num_seqs, bw)
            if self.tp:
                latency = hw.collective_latency_s
                comm = 2 * self.layers * (latency + self.allreduce_per_token * tokens)
                comm += latency + self.gather_per_seq * num_seqs
        copies = len(step.cow_copies) + len(step.fork_copies)
        copy_time = max(2 * copies * self.block_bytes / self.bw, floor) if copies else 0.0
        blocks = len(step.swap_in) + len(step.swap_out)
        swap_time = 0.0
        if blocks:
            calls = blocks if paged else _runs(step.swap_out) + _runs(step.swap_in)
            swap_time = calls * self.copies_per_block * hw.pcie_copy_latency_s + blocks * self.block_bytes / self.pcie
        overhead = hw.step_overhead_s + hw.seq_overhead_s * num_seqs  # the host's share of the step
        return gemm, elementwise, attention, lm_head, comm, copy_time, swap_time, overhead

    def breakdown(self, step: StepInput) -> dict[str, float]:
        """The step's time by part (seconds), e.g. ``{"gemm": ..., "attention": ..., ...}``."""
        return dict(zip(PARTS, self.parts(step)))

    def step_time(self, step: StepInput) -> float:
        return sum(self.parts(step))
