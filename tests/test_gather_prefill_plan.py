"""torch_gather's prefill on CUDA (issue 14, item 5): no SDPA math fallback with an [H, q, ctx] fp32
score matrix. The CUDA branch is chosen by `_prefill_plan`; here it is forced onto CPU tensors (the
device is only mocked) and checked against SDPA on contiguous K/V, with SDPA spied on."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from test_kernels import MIXED_C, MIXED_Q, make_batch, reference

from pagedlab.kernels import torch_gather

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_cpu_keeps_one_packed_gqa_call():
    assert torch_gather._prefill_plan(CPU, 32, 4, 8192, 32768, masked=True) == (False, 8192)
    assert torch_gather._prefill_plan(CPU, 32, 4, 8192, 8192, masked=False) == (False, 8192)


@pytest.mark.parametrize("heads,group", [(32, 1), (32, 4), (64, 8), (28, 7)])
@pytest.mark.parametrize("qlen,ctx", [(8192, 32768), (1, 100_000), (500, 600), (131072, 131072)])
def test_cuda_plan_bounds_the_score_matrix(heads, group, qlen, ctx):
    repeat, rows = torch_gather._prefill_plan(CUDA, heads, group, qlen, ctx, masked=True)
    assert repeat == (group > 1)  # never enable_gqa on CUDA: flash / memory-efficient backends apply
    assert 1 <= rows <= qlen
    assert 4 * heads * rows * ctx <= max(torch_gather.PREFILL_SCORE_BYTES, 4 * heads * ctx)  # one row at least
    assert rows * ctx <= torch_gather.PREFILL_SCORE_BYTES  # the bool mask of a call, too
    assert 4 * heads * qlen * ctx > torch_gather.PREFILL_SCORE_BYTES or rows == qlen  # chunks only if needed
    # causal prefill without a cached prefix: one is_causal call (no mask, no score matrix)
    assert torch_gather._prefill_plan(CUDA, heads, group, qlen, qlen, masked=False) == (group > 1, qlen)


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_cuda_branch_matches_sdpa_and_bounds_each_call(monkeypatch, group, window):
    calls = []

    def sdpa(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        if q.shape[1] == 2 * group and q.shape[2] > 1:  # prefill: [1, heads, rows, D]; decode: [B, kv_heads, group, D]
            calls.append((q.shape, k.shape, None if attn_mask is None else attn_mask.shape, enable_gqa))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)

    plan = torch_gather._prefill_plan
    monkeypatch.setattr(torch_gather, "_prefill_plan", lambda device, *a, **kw: plan(CUDA, *a, **kw))
    monkeypatch.setattr(torch_gather, "F", types.SimpleNamespace(scaled_dot_product_attention=sdpa))
    bound = 4 * 2 * group * 8 * 100  # 8 query rows over ctx 100: chunks the 40-row prefill over 100 tokens
    monkeypatch.setattr(torch_gather, "PREFILL_SCORE_BYTES", bound)
    kv, meta, q, k, v, full_k, full_v = make_batch(MIXED_Q, MIXED_C, 16, 2, group, 64)
    out = torch_gather.attention(q, k, v, kv, meta, 64**-0.5, window)
    torch.testing.assert_close(out, reference(q, full_k, full_v, MIXED_Q, 64**-0.5, window), atol=2e-5, rtol=2e-4)
    assert calls
    heads = 2 * group
    for qs, ks, mask, gqa in calls:
        assert not gqa and ks[1] == heads  # K/V heads repeated, enable_gqa never used
        if mask is not None:
            assert 4 * heads * qs[2] * ks[2] <= max(bound, 4 * heads * ks[2])
    assert len(calls) > sum(1 for ql in MIXED_Q if ql > 1)  # the 40-row prefill was cut into chunks
