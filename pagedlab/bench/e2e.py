"""End to end: pagedlab's engine (torch executor, each kernel) vs HF `generate()` on the same requests.

    python -m pagedlab.bench.e2e [--model-size tiny|1b] [--num-requests 32] [--kernels torch_gather,triton]
                                 [--device auto] [--block-size 16] [--hf-batch 32] [--workload uniform]
                                 [--repeats 3]

`tiny` is the seeded tiny Llama (fp32, CPU-sized); `1b` a randomly initialised Llama of TinyLlama-1.1B's
shape (22 layers, hidden 2048, 32/4 heads; bf16 on CUDA), saved to a temporary folder and loaded
through `model.name_or_path`. pagedlab runs continuous batching over the paged cache; the baseline
is HF `generate()` with static batches of `--hf-batch` left-padded prompts, each batch decoding to its
longest output. Both count the requested output tokens only. Each side runs once untimed (warm-up,
Triton compilation) first, then `--repeats` interleaved timed runs (best kept: other processes
share the machine). Greedy outputs are compared request by request.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import torch

from pagedlab.models.tiny import build_tiny_model

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
            "initializer_range": 0.02}


def hf_generate(model: Any, requests: list, batch: int, device: torch.device) -> tuple[float, dict]:
    """Static-batch greedy generation; returns (seconds, request_id -> output token ids)."""
    model.generation_config.eos_token_id = None  # None in a passed config falls back to the model's
    gen = copy.deepcopy(model.generation_config)
    gen.do_sample, gen.pad_token_id = False, 0
    outputs, start = {}, time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        width = max(r.prompt_len for r in group)
        ids = torch.tensor([[0] * (width - r.prompt_len) + r.prompt_token_ids for r in group], device=device)
        mask = torch.tensor([[0] * (width - r.prompt_len) + [1] * r.prompt_len for r in group], device=device)
        gen.max_new_tokens = max(r.sampling.max_tokens for r in group)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        for r, row in zip(group, out[:, width:].tolist()):
            outputs[r.request_id] = row[: r.sampling.max_tokens]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", choices=["tiny", "1b"], default="tiny")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--kernels", default=None, help="default: torch_gather,triton on CUDA, torch_gather on the CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--workload", default="uniform")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system; the best is kept")
    a = p.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from pagedlab.app.api import compose
    from pagedlab.executors.torch_executor import resolve_device
    from pagedlab.experiment import build_requests, run_experiment

    device = resolve_device(a.device)
    tmp = tempfile.TemporaryDirectory()
    if a.model_size == "1b":
        if device.type != "cuda":
            raise SystemExit("--model-size 1b needs a CUDA device")
        build_tiny_model("llama", 0, torch.bfloat16, **LLAMA_1B).save_pretrained(tmp.name)
        model_args = ["model=hf", f"model.name_or_path={tmp.name}", "model.dtype=bfloat16"]
    else:
        build_tiny_model("llama", 0).save_pretrained(tmp.name)  # the same weights as model=tiny_llama
        model_args = ["model=tiny_llama"]
    base = ["executor=torch", "logger=none", f"device={device.type}", f"block_size={a.block_size}",
            f"workload={a.workload}", *model_args]

    def overrides(kernel: str, n: int) -> list[str]:
        return [*base, f"kernel={kernel}", f"workload.num_requests={n}"]

    kernels = (a.kernels or ("torch_gather,triton" if device.type == "cuda" else "torch_gather")).split(",")
    cfg = compose(*overrides(kernels[0], a.num_requests))
    hf = AutoModelForCausalLM.from_pretrained(tmp.name, dtype=torch.bfloat16 if a.model_size == "1b" else "auto")
    hf = hf.to(device).eval()
    requests = build_requests(cfg, hf.config.vocab_size, int(cfg.max_model_len))
    tokens = sum(r.sampling.max_tokens for r in requests)
    hf_generate(hf, requests[:2], a.hf_batch, device)  # warm-up
    for kernel in kernels:
        run_experiment(compose(*overrides(kernel, 2)), progress=False)
    best: dict[str, tuple[float, float, dict]] = {}
    for _ in range(a.repeats):  # interleaved, so that load from other processes hits every system alike
        seconds, hf_outs = hf_generate(hf, requests, a.hf_batch, device)
        runs = [("HF generate", tokens / seconds, float(min(a.hf_batch, len(requests))), hf_outs)]
        for kernel in kernels:
            res = run_experiment(compose(*overrides(kernel, a.num_requests)), progress=False)
            outs = {r.request_id: list(r.output_token_ids) for r in res.requests.itertuples()}
            runs.append((f"pagedlab {kernel}", res.summary["throughput_tok_s"], res.summary["batch_size_mean"], outs))
        for name, tps, batch, outs in runs:
            if name not in best or tps > best[name][0]:
                best[name] = (tps, batch, outs)
    hf_tps, _, hf_outs = best["HF generate"]

    print(f"e2e, model {a.model_size} on {device.type}, {a.num_requests} requests ({a.workload}), "
          f"block {a.block_size}, {tokens} output tokens; HF generate static batch {a.hf_batch}")
    print(f"best of {a.repeats} interleaved runs; greedy match = requests whose output equals HF generate's")
    print(f"{'system':24s} {'tok/s':>9} {'x HF':>6} {'batch':>6} {'greedy match':>13}")
    for name, (tps, batch, outs) in best.items():
        same = sum(outs.get(r.request_id) == hf_outs[r.request_id] for r in requests)
        print(f"{name:24s} {tps:9.1f} {tps / hf_tps:6.2f} {batch:6.1f} {same:>6d}/{len(requests)}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
