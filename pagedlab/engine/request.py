"""Requests, sampling parameters, and the sequences and groups the engine turns them into."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    n: int = 1  # parallel samples
    beam_width: int = 1  # > 1: beam search
    ignore_eos: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("n", self.n >= 1, ">= 1"),
            ("beam_width", self.beam_width >= 1, ">= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"sampling.{name}={getattr(self, name)!r} is not allowed; must be {allowed}")
        if self.n > 1 and self.beam_width > 1:
            raise ValueError(f"sampling.n={self.n} with sampling.beam_width={self.beam_width}: choose one")

    @property
    def num_seqs(self) -> int:
        """Sequences the group holds while running."""
        return max(self.n, self.beam_width)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def updated(self, **kw: Any) -> SamplingParams:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


@dataclass
class Request:
    """A prompt, its arrival time and how to decode it."""

    request_id: int | str
    prompt_token_ids: list[int]
    arrival_time: float = 0.0
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r}: the prompt is empty; it needs at least one token")
        if not self.arrival_time >= 0:  # also catches NaN
            raise ValueError(f"request {self.request_id!r}: arrival_time={self.arrival_time!r} must be a number >= 0")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def final_len(self) -> int:
        """The longest this request's sequences can get: what oracle reservations assume."""
        return self.prompt_len + self.sampling.max_tokens


class GroupStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"
    REJECTED = "rejected"


class Sequence:
    """One token stream with KV in the cache. `num_computed` tokens already have KV."""

    __slots__ = ("cum_logprob", "finish_reason", "finish_time", "num_computed", "prompt_len", "ready", "seq_id",
                 "tokens")

    def __init__(self, seq_id: int, tokens: list[int], prompt_len: int) -> None:
        self.seq_id = seq_id
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.num_computed = 0
        self.cum_logprob = 0.0
        self.finish_reason: str | None = None
        self.finish_time: float | None = None  # when this sequence ended (its group may go on)
        self.ready = True  # False for forked samples waiting for their first token

    @property
    def output_len(self) -> int:
        return len(self.tokens) - self.prompt_len

    def fork(self, seq_id: int) -> Sequence:
        child = Sequence(seq_id, list(self.tokens), self.prompt_len)
        child.num_computed = self.num_computed
        child.cum_logprob = self.cum_logprob
        return child


class SequenceGroup:
    """A request's live sequences (n samples or beams) plus its timings and counters."""

    def __init__(self, request: Request, first: Sequence) -> None:
        self.request = request
        self.seqs: list[Sequence] = [first]
        self.done: list[Sequence] = []  # finished sequences (beams: finished hypotheses)
        self.status = GroupStatus.WAITING
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.last_resident_step = 0  # step it was last admitted or swapped in (victim=longest_resident)
        self.last_scheduled_step = 0  # step it last ran in (victim=lru)
        self.reject_reason: str | None = None
        self.prefilling = False  # admitted with more tokens than the token budget: prefilled in chunks
        self.order = first.seq_id  # sequence ids grow with arrival: a stable order for tables

    @property
    def request_id(self) -> int | str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def arrival_time(self) -> float:
        return self.request.arrival_time

    @property
    def is_beam(self) -> bool:
        return self.sampling.beam_width > 1

    def seq_ids(self) -> list[int]:
        return [s.seq_id for s in self.seqs]
