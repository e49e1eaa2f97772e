"""TorchExecutor on hand-built batches vs the HF model's own full forward (tiny fp32 models)."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedlab.executors.base import ModelInput, StepInput
from pagedlab.executors.torch_executor import TorchExecutor, num_blocks_from_budget, resolve_device
from pagedlab.kernels import get_kernel
from pagedlab.models.tiny import save_tiny_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_tiny_model(root / "llama", "llama", seed=1),
        "qwen2": save_tiny_model(root / "qwen2", "qwen2", seed=2),
        "mistral": save_tiny_model(root / "mistral", "mistral", seed=3, sliding_window=6),
    }


class Batcher:
    """A throwaway block allocator (shuffled free list) building ModelInputs like the engine."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.bs = block_size
        self.tokens: dict[int, list[int]] = {}
        self.tables: dict[int, list[int]] = {}

    def share(self, seq: int, parent: int, num_tokens: int) -> None:
        """`seq` starts with `parent`'s first num_tokens (whole blocks) already cached."""
        assert num_tokens % self.bs == 0
        self.tokens[seq] = list(self.tokens[parent][:num_tokens])
        self.tables[seq] = list(self.tables[parent][: num_tokens // self.bs])

    def step(self, work: dict[int, list[int]]) -> ModelInput:
        mi = ModelInput([], [], [], [], [], [], [])
        for seq, new in work.items():
            toks, table = self.tokens.setdefault(seq, []), self.tables.setdefault(seq, [])
            for t in new:
                p = len(toks)
                if p // self.bs == len(table):
                    table.append(self.free.pop())
                toks.append(t)
                mi.input_ids.append(t)
                mi.positions.append(p)
                mi.slot_mapping.append(table[p // self.bs] * self.bs + p % self.bs)
            mi.seq_ids.append(seq)
            mi.query_lens.append(len(new))
            mi.context_lens.append(len(toks))
            mi.block_tables.append(table)
        mi.num_prefill_tokens = sum(q for q in mi.query_lens if q > 1)
        return mi


def reference_logits(ref, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return ref(torch.tensor([tokens])).logits[0, -1].float()


def run_schedule(executor, ref, block_size, seed=0):
    """Prefill, chunked prefill, a prefix-cache hit and decodes, checked against HF every step."""
    rng = random.Random(seed)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, 1000) for _ in range(n)]

    b = Batcher(executor.num_blocks, block_size, seed)
    schedule = [
        {0: toks(9), 1: toks(20)},
        {0: toks(1), 2: toks(3), 1: toks(1)},
        {2: toks(2), 0: toks(1), 1: toks(1)},
        {3: "share", 1: toks(1), 2: toks(1)},
        {0: toks(1), 1: toks(1), 2: toks(1), 3: toks(1)},
    ]
    share = 16 // block_size * block_size
    for work in schedule:
        if work.get(3) == "share":
            b.share(3, 1, share)
            work[3] = toks(4)
        mi = b.step(work)
        out = executor.execute(StepInput(mi))
        assert out.logits.shape == (mi.num_seqs, 1024) and out.logits.dtype == torch.float32
        assert out.time_s > 0
        if executor.model.compact is None:
            assert executor.model.last_masks_seen == 0
        ref_logits = torch.stack([reference_logits(ref, b.tokens[s]) for s in mi.seq_ids])
        torch.testing.assert_close(out.logits.cpu(), ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("forward", ["compact", "hf"])
@pytest.mark.parametrize("kernel", ["torch_gather", "triton"])
@pytest.mark.parametrize("block_size", [1, 8, 16])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_matches_hf_forward(model_dirs, kind, block_size, kernel, forward):
    if kernel == "triton" and block_size == 1:
        block_size = 4  # block size 1 is a gather-only case; keeps the interpreter quick
    path = str(model_dirs[kind])
    ex = TorchExecutor(path, num_blocks=64, block_size=block_size, kernel=get_kernel(kernel), device="auto",
                       forward=forward)
    assert (ex.model.compact is not None) == (forward == "compact")
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    run_schedule(ex, ref, block_size)


@pytest.mark.parametrize("forward", ["compact", "hf"])
@pytest.mark.parametrize("kernel", ["torch_gather", "triton"])
def test_sliding_window_model(model_dirs, kernel, forward):
    path = str(model_dirs["mistral"])
    ex = TorchExecutor(path, num_blocks=64, block_size=4, kernel=get_kernel(kernel), device="cpu", forward=forward)
    if forward == "compact":
        assert [layer.sliding_window for layer in ex.model.compact.layers] == [6] * 4
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    run_schedule(ex, ref, 4, seed=5)


def test_cow_copies_and_swap_roundtrip(model_dirs):
    ex = TorchExecutor(str(model_dirs["llama"]), num_blocks=12, block_size=4, num_swap_blocks=5, device="cpu")
    pool = ex.kv.pool
    pool.copy_(torch.randn_like(pool))
    before = pool.clone()
    empty = ModelInput([], [], [], [], [], [], [])
    out = ex.execute(StepInput(empty, fork_copies=[(0, 5)], cow_copies=[(1, 6), (2, 7)]))
    assert out.logits.shape == (0, 1024)
    for src, dst in [(0, 5), (1, 6), (2, 7)]:
        assert torch.equal(pool[:, :, dst], before[:, :, src])
    ex.execute(StepInput(empty, swap_out=[(3, 4), (8, 0)]))
    pool[:, :, [3, 8]] = 0
    ex.execute(StepInput(empty, swap_in=[(4, 9), (0, 10)]))
    assert torch.equal(pool[:, :, 9], before[:, :, 3]) and torch.equal(pool[:, :, 10], before[:, :, 8])


def test_budget_and_sizes():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    ex = TorchExecutor(None, block_size=16, device="cpu")  # tiny llama, CPU default budget
    assert ex.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4
    assert ex.num_blocks == (1 << 28) // (16 * ex.kv_bytes_per_token)
    assert num_blocks_from_budget(10_000, 4, 100) == 25
    assert TorchExecutor.num_blocks_from_budget(10_099, 4, 100) == 25
    assert ex.kv[0].shape == (2, ex.num_blocks, 16, 2, 32)
    with pytest.raises(ValueError, match="holds no block"):
        TorchExecutor(None, block_size=16, budget_bytes=10, device="cpu")


GATHER = {"_target_": "pagedlab.kernels.torch_gather.TorchGatherKernel", "name": "torch_gather"}
TRITON = {"_target_": "pagedlab.kernels.triton_backend.TritonKernel", "name": "triton"}


def test_torch_backend(model_dirs):
    from omegaconf import OmegaConf

    from pagedlab.engine.sampler import LogitsSampler
    from pagedlab.executors.torch_executor import TorchBackend
    from pagedlab.kernels.torch_gather import TorchGatherKernel

    cfg = OmegaConf.create({"device": "cpu", "seed": 0, "kernel": GATHER,
                            "model": {"name": "hf", "name_or_path": str(model_dirs["qwen2"]), "dtype": "auto"},
                            "kv_cache": {"cpu_budget_gib": 0.01, "gpu_memory_utilization": 0.9}})
    backend = TorchBackend(cfg)
    assert backend.spec.kv_bytes_per_token == 2 * 4 * 2 * 32 * 4 and backend.spec.vocab_size == 1024
    assert backend.default_budget_bytes == 0.01 * 2**30 and backend.eos_token_id == 2
    assert backend.budget_what == "kv_cache.cpu_budget_gib" and isinstance(backend.kernel, TorchGatherKernel)
    ex = backend.make_executor(10, 8, 2)
    assert ex.num_blocks == 10 and ex.kv.host.shape[2] == 2 and ex.model.device.type == "cpu"
    assert ex.kernel is backend.kernel and ex.model is backend.model  # loaded once, shared
    assert isinstance(backend.make_sampler(3), LogitsSampler) and backend.make_sampler(3).base_seed == 3
    with pytest.raises(ValueError, match="name_or_path"):
        TorchBackend(OmegaConf.create({"model": {"name": "llama_7b"}}))


def test_torch_backend_builds_the_configured_kernel(model_dirs):
    from omegaconf import OmegaConf

    from pagedlab.config import ConfigError
    from pagedlab.executors.torch_executor import TorchBackend

    base = {"device": "cpu", "model": {"name": "hf", "name_or_path": str(model_dirs["llama"]), "dtype": "float32"}}
    backend = TorchBackend(OmegaConf.create({**base, "kernel": {**TRITON, "num_splits": 3}}))
    assert backend.kernel.name == "triton" and backend.kernel.num_splits == 3
    assert backend.make_executor(8, 4, 0).kernel is backend.kernel
    with pytest.raises(ConfigError, match=r"kernel\.num_splits=0 is not allowed: expected an integer >= 1"):
        TorchBackend(OmegaConf.create({**base, "kernel": {**TRITON, "num_splits": 0}}))
    with pytest.raises(ValueError, match="Triton's interpreter has no bfloat16"):
        TorchBackend(OmegaConf.create({**base, "model": {**base["model"], "dtype": "bfloat16"}, "kernel": TRITON}))


def test_compact_forward_shares_weights_and_refuses_other_model_types(model_dirs):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pagedlab.models.hf_adapter import HFModel

    hf = AutoModelForCausalLM.from_pretrained(str(model_dirs["qwen2"]))
    before = sum(p.numel() for p in hf.parameters())
    model = HFModel(hf, "compact")
    layer, attn = model.compact.layers[0], hf.model.layers[0].self_attn
    assert layer.qkv[0].data_ptr() == attn.q_proj.weight.data_ptr()  # q/k/v are views of the fused matrix
    assert layer.qkv[1] is not None and layer.qkv[1].data_ptr() == attn.q_proj.bias.data_ptr()  # Qwen2's bias
    assert sum(p.numel() for p in hf.parameters()) == before
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert HFModel(gpt2).compact is None  # auto: transformers' own modules
    with pytest.raises(ValueError, match="model.forward=compact supports .* not 'gpt2'"):
        HFModel(gpt2, "compact")
    with pytest.raises(ValueError, match="model.forward='fast' is not one of"):
        HFModel(hf, "fast")


def test_every_dtype_spelling_the_config_allows_resolves():
    """`model.dtype=fp32` (or bf16, fp16) passes the config's rules, so the torch path must take it too."""
    from pagedlab.models.hf_adapter import resolve_dtype
    from pagedlab.models.presets import DTYPE_BYTES

    for name, size in DTYPE_BYTES.items():
        assert resolve_dtype(name).itemsize == size
