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
    """Token choices from a step's last-token logits ([num_seqs, vocab], fp32), on the logits' device.

    Batched: `plan_step` (the engine calls it after `begin_step`) computes every choice of the step at once,
    greedy rows, random rows (temperature, top-k, top-p) and beam groups, in a few batched device ops, and
    brings them to the host in one transfer; `sample` / `sample_n` / `beam` then read them. Called without a
    plan (or for a call the plan did not foresee) they compute the same choices for their own rows.

    Random draws are Gumbel-max (exponential race, ``argmax(probs / q)`` with ``q ~ Exp(1)``: a sample of
    ``probs``, with no host sync, unlike ``torch.multinomial``). Each draw's noise comes from a generator
    seeded with the request's seed (`group_seed`) and the number of draws the request has taken so far, so
    a request's tokens depend on nothing else in its batch, and a draw planned for a group that is then
    not sampled (preempted after the forward) is simply made again at its next step.
    """

    def __init__(self, base_seed: int = 0) -> None:
        self.base_seed = base_seed
        self._draws: dict[Any, int] = {}  # request id -> draws taken so far
        self.logits: torch.Tensor | None = None
        self._argmax: list[int] | None = None
        self._planned: dict[tuple, Any] = {}  # ("sample"|"n"|"beam", request id, row, draw index) -> result
        self._gens: dict[Any, torch.Generator] = {}  # device -> the generator reseeded for each draw
        self.transfers = 0  # device-to-host transfers of choices so far (tests: one per planned step)

    def begin_step(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self._argmax = None
        self._planned = {}

    # -- planning -------------------------------------------------------------------------------------
    def plan_step(self, sched: Any) -> None:
        """Every choice the scheduler's update will ask for this step (``sched``: the SchedulerOutput;
        rows and kinds as `SequenceLifecycle.update` derives them), computed together."""
        from pagedlab.engine.request import GroupStatus

        greedy, draws, beams = False, [], []
        row, chunk_end = 0, sched.chunk_end
        for group, seqs in sched.scheduled:
            rows = list(range(row, row + len(seqs)))
            row += len(seqs)
            if group.status is not GroupStatus.RUNNING or (
                    chunk_end and any(s.seq_id in chunk_end for s in seqs)):  # nothing to sample
                continue
            if group.is_beam:
                beams.append((group, rows, group.sampling.beam_width, any(not s.ready for s in group.seqs)))
            elif group.sampling.greedy:
                greedy = True
            elif len(seqs) < len(group.seqs):
                draws.append((group, rows[0], len(group.seqs), self._draws.get(group.request_id, 0)))
            else:
                first = self._draws.get(group.request_id, 0)
                draws += [(group, r, 0, first + j) for j, r in enumerate(rows)]
        if greedy or draws or beams:
            self._compute(greedy, draws, beams)

    def _compute(self, greedy: bool, draws: list[tuple], beams: list[tuple]) -> None:
        """Batched choices, one transfer. ``draws``: (group, row, n or 0 for one token, draw index);
        ``beams``: (group, rows, k, first)."""
        import torch

        logits = self.logits
        parts = []
        if greedy:
            parts.append(logits.argmax(dim=-1))
        if draws:
            parts.append(self._draw(draws))
        if beams:
            idx, vals = self._beam_scores(beams)
            parts += [idx.flatten(), vals.flatten().view(torch.int32).long()]
        host = torch.cat(parts).tolist() if len(parts) > 1 else parts[0].tolist()  # the step's one transfer
        self.transfers += 1
        at = 0
        if greedy:
            self._argmax, at = host[: logits.shape[0]], logits.shape[0]
        for group, row, n, index in draws:
            k = max(n, 1)
            self._planned[("n" if n else "sample", group.request_id, row, index)] = host[at : at + k]
            at += k
        if beams:
            width = (len(host) - at) // 2
            top_idx, bits = host[at : at + width], host[at + width :]
            vals = np.asarray(bits, dtype=np.int64).astype(np.int32).view(np.float32).tolist()
            vocab, per = logits.shape[-1], width // len(beams)
            for b, (group, rows, k, first) in enumerate(beams):
                nrows = 1 if first else len(rows)
                keep = min(2 * k, nrows * vocab)
                ii, vv = top_idx[b * per : b * per + keep], vals[b * per : b * per + keep]
                self._planned[("beam", group.request_id, tuple(rows), first)] = [
                    (i // vocab, i % vocab, v) for i, v in zip(ii, vv)]

    def _generator(self) -> torch.Generator:
        import torch

        gen = self._gens.get(self.logits.device)
        if gen is None:
            gen = self._gens[self.logits.device] = torch.Generator(device=self.logits.device)
        return gen

    def _draw(self, draws: list[tuple]) -> torch.Tensor:
        """Tokens of every draw, [sum of max(n, 1)] int64 on the device."""
        import torch

        from pagedlab.kernels.metadata import to_device

        logits, dev = self.logits, self.logits.device
        vocab = logits.shape[-1]
        rows = [row for _, row, _, _ in draws]
        temp = [g.sampling.temperature for g, *_ in draws]
        top_k = [g.sampling.top_k if 0 < g.sampling.top_k < vocab else vocab for g, *_ in draws]
        top_p = [g.sampling.top_p for g, *_ in draws]
        params = to_device(temp + top_k + top_p, torch.float32, dev).view(3, -1)
        x = logits.index_select(0, to_device(rows, torch.long, dev)).float() / params[0, :, None]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            srt, order = torch.sort(x, dim=-1, descending=True)
            kth = srt.gather(1, params[1].long()[:, None] - 1)
            srt = srt.masked_fill(srt < kth, float("-inf"))  # top-k, ties to the k-th kept
            p = srt.softmax(-1)
            drop = (p.cumsum(-1) - p > params[2, :, None]) & (params[2, :, None] < 1.0)  # smallest set >= top_p
            x = torch.empty_like(x).scatter_(1, order, srt.masked_fill(drop, float("-inf")))
        probs = x.softmax(-1)
        counts = [max(n, 1) for _, _, n, _ in draws]
        q = torch.empty(sum(counts), vocab, dtype=probs.dtype, device=dev)
        gen, at = self._generator(), 0
        for (group, _, _, index), k in zip(draws, counts):
            gen.manual_seed(_draw_seed(group_seed(group.sampling.seed, self.base_seed, group.request_id), index))
            q[at : at + k].exponential_(generator=gen)
            at += k
        if any(k > 1 for k in counts):
            probs = probs.repeat_interleave(to_device(counts, torch.long, dev), dim=0, output_size=sum(counts))
        return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)

    def _beam_scores(self, beams: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top 2k (flat index over rows x vocab, cumulative log-prob) per beam group, all groups in one
        topk over [groups, max rows x vocab] (missing rows score -inf): [groups, 2 max k] each."""
        import torch

        from pagedlab.kernels.metadata import to_device

        logits, dev = self.logits, self.logits.device
        vocab = logits.shape[-1]
        width = max(1 if first else len(rows) for _, rows, _, first in beams)
        idx: list[int] = []
        cum: list[float] = []
        for group, rows, _, first in beams:
            rows = rows[:1] if first else rows
            idx += rows + [rows[0]] * (width - len(rows))
            cum += [s.cum_logprob for s in group.seqs[: len(rows)]] + [float("-inf")] * (width - len(rows))
        logprobs = torch.log_softmax(logits.index_select(0, to_device(idx, torch.long, dev)).float(), dim=-1)
        cum_t = to_device(cum, logprobs.dtype, dev).view(-1, width, 1)
        scores = logprobs.view(len(beams), width, vocab) + cum_t
        k2 = min(2 * max(k for _, _, k, _ in beams), width * vocab)
        top = torch.topk(scores.view(len(beams), width * vocab), k2)
        return top.indices, top.values

    # -- the TokenSampler calls -------------------------------------------------------------------------
    def _take(self, group: SequenceGroup, n: int, row: int) -> list[int]:
        """The planned draw of `group` at `row` (computed now if unplanned); counts it as taken."""
        index = self._draws.get(group.request_id, 0)
        key = ("n" if n else "sample", group.request_id, row, index)
        if key not in self._planned:
            self._compute(False, [(group, row, n, index)], [])
        self._draws[group.request_id] = index + 1
        return self._planned.pop(key)

    def _greedy(self, row: int) -> int:
        if self._argmax is None:
            self._compute(True, [], [])
        return self._argmax[row]

    def sample(self, group: SequenceGroup, row: int) -> int:
        if group.sampling.greedy:
            return self._greedy(row)
        return self._take(group, 0, row)[0]

    def sample_n(self, group: SequenceGroup, row: int, n: int) -> list[int]:
        if group.sampling.greedy:
            return [self._greedy(row)] * n
        return self._take(group, n, row)

    def beam(self, group: SequenceGroup, rows: list[int], k: int, first: bool) -> list[Candidate]:
        """The 2k best (beam, token) pairs by cumulative log-prob, as Hugging Face's beam search
        ranks them; on the first step only beam 0 is expanded (the others are its copies)."""
        key = ("beam", group.request_id, tuple(rows), first)
        if key not in self._planned:
            self._compute(False, [], [(group, rows, k, first)])
        return self._planned.pop(key)

    def release(self, group: SequenceGroup) -> None:
        self._draws.pop(group.request_id, None)


def _draw_seed(seed: int, index: int) -> int:
    """The generator seed of a request's `index`-th draw (splitmix64 of the two)."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
