"""Synthetic workloads: request lengths drawn from fitted distributions, arrivals at once or Poisson.

`sharegpt_like` and `alpaca_like` draw prompt and output lengths from log-normal distributions whose
means match the statistics published in the vLLM paper (SOSP 2023, Fig. 11): ShareGPT mean prompt
161 / output 338 tokens, Alpaca 19 / 58. The spread (sigma of the underlying normal) is our choice
to match the long tail of ShareGPT conversations and the short, tight Alpaca instructions; lengths
are clipped to at least one token, and outputs cut so that prompt + output <= max_model_len (as the
paper's benchmark drops longer pairs). `uniform` draws integers uniformly from [lo, hi] ranges,
`fixed` uses the range's lower ends.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pagedlab.engine.request import Request, SamplingParams
from pagedlab.errors import BadArgument, one_of


@dataclass(frozen=True)
class LengthModel:
    """Log-normal prompt and output lengths with the given means and log-space sigmas."""

    prompt_mean: float
    output_mean: float
    prompt_sigma: float
    output_sigma: float

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        def lognormal(mean: float, sigma: float) -> np.ndarray:
            return rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, n)

        return lognormal(self.prompt_mean, self.prompt_sigma), lognormal(self.output_mean, self.output_sigma)


LENGTH_MODELS = {
    "sharegpt_like": LengthModel(161, 338, 1.0, 0.75),
    "alpaca_like": LengthModel(19, 58, 0.6, 0.7),
}


def draw_lengths(name: str, num: int, rng: np.random.Generator, prompt_len: tuple[int, int],
                 output_len: tuple[int, int], max_model_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths for `num` requests of workload `name`."""
    if name in LENGTH_MODELS:
        p, o = LENGTH_MODELS[name].draw(rng, num)
    elif name == "uniform":
        p = rng.integers(prompt_len[0], prompt_len[1] + 1, num)
        o = rng.integers(output_len[0], output_len[1] + 1, num)
    elif name == "fixed":
        p, o = np.full(num, prompt_len[0]), np.full(num, output_len[0])
    else:
        raise ValueError(f"workload.name={name!r} is not a synthetic workload")
    p = np.clip(np.rint(p), 1, max_model_len - 1).astype(int)
    o = np.clip(np.rint(o), 1, None).astype(int)
    return p, np.minimum(o, max_model_len - p)


def arrival_times(num: int, rate: float | None, rng: np.random.Generator) -> np.ndarray:
    """All at t=0 when rate is None or inf, else a Poisson process of `rate` requests/s."""
    if rate is None or math.isinf(rate):
        return np.zeros(num)
    if rate <= 0:
        raise ValueError(f"workload.request_rate={rate!r} is not allowed; must be > 0, or null/inf for all at once")
    return np.cumsum(rng.exponential(1.0 / rate, num))


def synthetic_requests(name: str, num: int, *, seed: int, vocab_size: int, defaults: SamplingParams,
                       prompt_len: tuple[int, int] = (16, 128), output_len: tuple[int, int] = (16, 128),
                       request_rate: float | None = None, shared_prefix_len: int = 0,
                       max_model_len: int = 2048) -> list[Request]:
    """`num` requests with random prompt tokens; each request's max_tokens is its drawn output length. The
    ``shared_prefix_len``-token system prompt is part of each drawn prompt length: a prompt is the system
    prompt then ``max(p - shared_prefix_len, 1)`` tokens of its own."""
    rng = np.random.default_rng(seed)
    prompts, outputs = draw_lengths(name, num, rng, prompt_len, output_len, max_model_len)
    arrivals = arrival_times(num, request_rate, rng)
    prefix = rng.integers(0, vocab_size, shared_prefix_len).tolist()
    return [
        Request(i, prefix + rng.integers(0, vocab_size, max(int(p) - shared_prefix_len, 1)).tolist(),
                float(t), defaults.updated(max_tokens=max(int(o), 1)))
        for i, (p, o, t) in enumerate(zip(prompts, outputs, arrivals))
    ]


LENGTHS = (*LENGTH_MODELS, "uniform", "fixed")


class SyntheticWorkload:
    """``workload=uniform|fixed|sharegpt_like|alpaca_like``: ``num_requests`` requests whose lengths come
    from ``lengths`` (see the module docstring), arriving at once or as a Poisson process of
    ``request_rate`` requests/s; ``seed`` (None: the run's), ``n`` / ``beam_width`` (None: the sampling
    group's) and a ``shared_prefix_len``-token system prompt common to all."""

    def __init__(self, lengths: str = "uniform", num_requests: int = 32, request_rate: float | None = None,
                 seed: int | None = None, prompt_len: Sequence[int] = (16, 128),
                 output_len: Sequence[int] = (16, 128), n: int | None = None, beam_width: int | None = None,
                 shared_prefix_len: int = 0) -> None:
        self.lengths = one_of("lengths", lengths, LENGTHS)
        if isinstance(num_requests, bool) or not isinstance(num_requests, int) or num_requests < 1:
            raise BadArgument("num_requests", num_requests, "an integer >= 1")
        self.num_requests, self.request_rate, self.seed = num_requests, request_rate, seed
        self.prompt_len, self.output_len = (int(prompt_len[0]), int(prompt_len[1])), (int(output_len[0]), int(output_len[1]))
        self.n, self.beam_width, self.shared_prefix_len = n, beam_width, int(shared_prefix_len)

    def requests(self, *, vocab_size: int, max_model_len: int, defaults: SamplingParams, seed: int) -> list[Request]:
        return synthetic_requests(
            self.lengths, self.num_requests, seed=seed if self.seed is None else self.seed, vocab_size=vocab_size,
            defaults=defaults.updated(n=self.n, beam_width=self.beam_width), prompt_len=self.prompt_len,
            output_len=self.output_len, request_rate=self.request_rate, shared_prefix_len=self.shared_prefix_len,
            max_model_len=max_model_len)
