"""Token samplers: next tokens from real logits (greedy, temperature / top-k / top-p, beams), or, for
the simulator, from a seeded RNG so that samples diverge and beams really fork and die (beam
candidates from a model of next-token confidence, calibrated in docs/beam_model.md).

Both answer three questions for the scheduler, per step (the :class:`TokenSampler` contract):
`sample(group, row)` one next token; `sample_n(group, row, n)` n tokens from one row (the first
step of parallel sampling); `beam(group, rows, k, first)` the best (parent index, token, score)
continuations over the group's beams, best first (2k of them, so that k survive EOS).
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pagedlab.engine.request import SequenceGroup
from pagedlab.errors import BadArgument

if TYPE_CHECKING:
    import torch

Candidate = tuple[int, int, float]  # (parent beam index, token, cumulative log-prob)


def group_seed(seed: int | None, base_seed: int, request_id: Any) -> int:
    """The request's own seed, or one derived from the run seed and the request id."""
    if seed is not None:
        return int(seed)
    return (base_seed * 1_000_003 + zlib.crc32(str(request_id).encode())) % (2**63)


class TokenSampler(Protocol):
    """Turns a step's logits into next tokens. Rows index the step's scheduled sequences in order."""

    def begin_step(self, logits: Any) -> None:
        """The step's last-token logits, ``[num scheduled sequences, vocab]`` (None for the simulator)."""

    def sample(self, group: SequenceGroup, row: int) -> int:
        """One next token for the sequence at ``row``."""

    def sample_n(self, group: SequenceGroup, row: int, n: int) -> list[int]:
        """``n`` next tokens from one row: the first tokens of a parallel-sampling request."""

    def beam(self, group: SequenceGroup, rows: list[int], k: int, first: bool) -> list[Candidate]:
        """The 2k best (parent beam index, token, cumulative log-prob) over the group's beams, best
        first; with ``first`` only beam 0 is expanded (the others are its copies)."""

    def release(self, group: SequenceGroup) -> None:
        """The group ended: drop its state (per-request RNG)."""


DEFAULT_VOCAB_SIZE = 32000  # a simulator sampler built without the model's vocabulary: ids need only differ
BEAM_UNCERTAINTY = 20.0  # context tokens; calibrated against the paper's Figure 15 (docs/beam_model.md)
_CONFIDENCE_CLIP = 1e-3


class SimSampler:
    """Token choices without a model: uniform random tokens from a per-request seeded RNG.

    Beam candidates come from a model of the next-token distribution (docs/beam_model.md): each beam's
    top 2k token probabilities are a stick-breaking draw whose pieces are Beta(c, 1 - c), sorted, with
    confidence c = L / (L + ``beam_uncertainty``) at context length L (prompt + generated tokens); the
    candidates are ranked by cumulative log-prob, as real beam search ranks them. A small
    ``beam_uncertainty`` makes the model sure of its next token, so every beam keeps its own
    continuation and beam trees stay apart; a large one makes the best beams' runners-up beat the
    weaker beams, so survivors concentrate on few parents and trees merge (sharing toward 1 - 1/k).

    Built by the simulator with the model's ``vocab_size``, or as ``sampling.sampler`` (``seed`` is the
    run's seed, ``vocab_size`` the model's when the engine passes it)."""

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE, base_seed: int = 0, *, seed: int | None = None,
                 beam_uncertainty: float = BEAM_UNCERTAINTY) -> None:
        if isinstance(beam_uncertainty, bool) or not isinstance(beam_uncertainty, (int, float)) or not (
                0 < beam_uncertainty < math.inf):
            raise BadArgument("beam_uncertainty", beam_uncertainty,
                              "a number of context tokens > 0 (docs/beam_model.md)")
        self.vocab_size = int(vocab_size)
        self.base_seed = int(seed) if seed is not None else base_seed
        self.beam_uncertainty = float(beam_uncertainty)
        self._rngs: dict[Any, np.random.Generator] = {}

    def _rng(self, group: SequenceGroup) -> np.random.Generator:
        rng = self._rngs.get(group.request_id)
        if rng is None:
            seed = group_seed(group.sampling.seed, self.base_seed, group.request_id)
            rng = self._rngs[group.request_id] = np.random.default_rng(seed)
        return rng

    def begin_step(self, logits: Any) -> None:
        pass

    def sample(self, group: SequenceGroup, row: int) -> int:
        return int(self._rng(group).integers(self.vocab_size))

    def sample_n(self, group: SequenceGroup, row: int, n: int) -> list[int]:
        return self._rng(group).integers(self.vocab_size, size=n).tolist()

    def confidence(self, context_len: int) -> float:
        """The model's confidence c at a context of ``context_len`` tokens: L / (L + beam_uncertainty)."""
        c = context_len / (context_len + self.beam_uncertainty)
        return min(max(c, _CONFIDENCE_CLIP), 1 - _CONFIDENCE_CLIP)

    def beam(self, group: SequenceGroup, rows: list[int], k: int, first: bool) -> list[Candidate]:
        rng = self._rng(group)
        beams = group.seqs[: 1 if first else len(rows)]
        n = 2 * k
        c = self.confidence(len(beams[0].tokens))
        shares = rng.beta(c, 1 - c, size=(len(beams), n))  # stick-breaking: each token, a share of the rest
        left = np.cumprod(np.concatenate([np.ones((len(beams), 1)), 1 - shares[:, :-1]], axis=1), axis=1)
        probs = -np.sort(-(shares * left), axis=1)  # each beam's top-n next-token probabilities, best first
        cum = np.array([s.cum_logprob for s in beams])
        scores = (np.log(np.maximum(probs, 1e-300)) + cum[:, None]).ravel()
        top = np.argsort(-scores, kind="stable")[:n]
        tokens = rng.integers(self.vocab_size, size=n)
        return [(int(i) // n, int(t), float(scores[i])) for i, t in zip(top, tokens)]

    def release(self, group: SequenceGroup) -> None:
        self._rngs.pop(group.request_id, None)


class LogitsSampler:
    """Token choices from a step's last-token logits ([num_seqs, vocab], fp32)."""

    def __init__(self, base_seed: int = 0) -> None:
        self.base_seed = base_seed
        self._gens: dict[Any, torch.Generator] = {}
        self.logits: torch.Tensor | None = None
        self._argmax: list[int] = []

    def begin_step(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self._argmax = logits.argmax(dim=-1).tolist()  # one vectorised pass serves every greedy row

    def _gen(self, group: SequenceGroup) -> torch.Generator:
        import torch

        gen = self._gens.get(group.request_id)
        if gen is None:
            gen = torch.Generator(device=self.logits.device)
            gen.manual_seed(group_seed(group.sampling.seed, self.base_seed, group.request_id))
            self._gens[group.request_id] = gen
        return gen

    def _probs(self, group: SequenceGroup, row: int) -> torch.Tensor:
        import torch

        p = group.sampling
        logits = self.logits[row] / p.temperature
        if p.top_k > 0 and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > p.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(0, order[drop], float("-inf"))
        return logits.softmax(-1)

    def sample(self, group: SequenceGroup, row: int) -> int:
        if group.sampling.greedy:
            return self._argmax[row]
        return int(self._probs(group, row).multinomial(1, generator=self._gen(group)))

    def sample_n(self, group: SequenceGroup, row: int, n: int) -> list[int]:
        if group.sampling.greedy:
            return [self._argmax[row]] * n
        return self._probs(group, row).multinomial(n, replacement=True, generator=self._gen(group)).tolist()

    def beam(self, group: SequenceGroup, rows: list[int], k: int, first: bool) -> list[Candidate]:
        """The 2k best (beam, token) pairs by cumulative log-prob, as Hugging Face's beam search
        ranks them; on the first step only beam 0 is expanded (the others are its copies)."""
        import torch

        rows = rows[:1] if first else rows
        logprobs = torch.log_softmax(self.logits[rows].float(), dim=-1)
        cum = torch.tensor([s.cum_logprob for s in group.seqs[: len(rows)]], dtype=logprobs.dtype,
                           device=logprobs.device)
        scores = (logprobs + cum[:, None]).flatten()
        top = torch.topk(scores, min(2 * k, scores.numel()))
        vocab = logprobs.shape[-1]
        return [(int(i) // vocab, int(i) % vocab, float(v)) for v, i in zip(top.values, top.indices)]

    def release(self, group: SequenceGroup) -> None:
        self._gens.pop(group.request_id, None)
