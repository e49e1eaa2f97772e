"""Record the parent choices of a real beam search, and replay them in the simulator at any scale.

:class:`BeamRecorder` wraps a token sampler (the logits sampler of ``executor=torch`` by default) and
logs, for every beam-search request, which beams each step's survivors descend from.
:class:`ReplayBeamSampler` is a simulator sampler whose beam steps make exactly those choices, so that a
paper-scale simulated run forks and frees blocks as the real model's beam search did.

The file (JSON, ``"format": "pagedlab.beam_parents/1"``)::

    {"format": "pagedlab.beam_parents/1",
     "requests": [{"request_id": "0", "beam_width": 3, "prompt_len": 12,
                   "steps": [[0, 0, 0], [0, 1, 0], [1, 1, 2], ...]}, ...]}

``steps[i][j]`` is the parent of survivor j at generation step i: an index into the previous step's
beams, which are in rank order (0: the best; survivor j is the (j+1)-th best continuation). Step 0
expands the prompt alone, so its parents are all 0. A step lists fewer than ``beam_width`` parents
only when candidates ended with EOS (the survivors are the best candidates that did not).

Replay (docs/beam_model.md): a request whose id is in the file and whose beam width matches replays its
own tree; any other request starts on a tree of its width chosen by its seed. A request with more steps
than its tree continues with the next tree of that width in the file (cyclically) from that tree's step
1 (step 0, the prompt's, would merge every beam into one). Parent indices are ranks, so any recorded step
applies to any k live beams. A short step (EOS in the recording) is padded with its last parent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pagedlab.engine.request import SequenceGroup
from pagedlab.engine.sampler import DEFAULT_VOCAB_SIZE, Candidate, LogitsSampler, SimSampler, TokenSampler
from pagedlab.errors import BadArgument

FORMAT = "pagedlab.beam_parents/1"


class BeamRecorder:
    """A token sampler that passes every call to ``inner`` and logs beam-search parent choices.

    From Python, wrap an engine's sampler before running it::

        rec = BeamRecorder(engine.sampler, eos_token_id=engine.scheduler.eos_token_id)
        engine.sampler = rec
        engine.run(requests)
        rec.save("beams.json")

    or name it as ``sampling.sampler={_target_: pagedlab.engine.beam_replay.BeamRecorder, path: beams.json}``
    (with ``executor=torch``): it then wraps a :class:`LogitsSampler` with the run's seed and rewrites
    ``path`` each time a request ends. ``eos_token_id`` (passed by the engine) tells which candidates end
    as finished hypotheses rather than survive, as the scheduler decides."""

    def __init__(self, inner: TokenSampler | None = None, *, path: str | None = None, seed: int = 0,
                 eos_token_id: int | None = None) -> None:
        self.inner = inner if inner is not None else LogitsSampler(base_seed=seed)
        self.path = Path(path) if path else None
        self.eos_token_id = eos_token_id
        # request id -> {"request_id", "beam_width", "prompt_len", "steps"}
        self.trees: dict[str, dict[str, Any]] = {}

    def begin_step(self, logits: Any) -> None:
        self.inner.begin_step(logits)

    def sample(self, group: SequenceGroup, row: int) -> int:
        return self.inner.sample(group, row)

    def sample_n(self, group: SequenceGroup, row: int, n: int) -> list[int]:
        return self.inner.sample_n(group, row, n)

    def beam(self, group: SequenceGroup, rows: list[int], k: int, first: bool) -> list[Candidate]:
        candidates = self.inner.beam(group, rows, k, first)
        stop_on_eos = not group.sampling.ignore_eos and self.eos_token_id is not None
        parents = [p for p, token, _ in candidates if not (stop_on_eos and token == self.eos_token_id)][:k]
        rid = str(group.request_id)
        tree = self.trees.setdefault(rid, {"request_id": rid, "beam_width": k,
                                           "prompt_len": group.request.prompt_len, "steps": []})
        tree["steps"].append(parents)
        return candidates

    def release(self, group: SequenceGroup) -> None:
        self.inner.release(group)
        if self.path is not None and str(group.request_id) in self.trees:
            self.save(self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "requests": list(self.trees.values())}

    def save(self, path: str | Path) -> Path:
        """Write the recorded trees (atomically: a crash leaves the previous file)."""
        from pagedlab.engine.result import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        atomic_write(path, lambda tmp: tmp.write_text(text))
        return path


def load_beam_trees(path: str | Path) -> list[dict[str, Any]]:
    """The recorded trees of a beam-parents file, checked; BadArgument ``path`` naming the problem."""

    def bad(problem: str) -> BadArgument:
        allowed = f"a beam-parents file ({FORMAT}, written by BeamRecorder): {problem}"
        return BadArgument("path", str(path), allowed)

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise bad(f"cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f'"format" is not "{FORMAT}"')
    trees = data.get("requests")
    if not isinstance(trees, list) or not trees:
        raise bad('"requests" holds no tree')
    for i, tree in enumerate(trees):
        k, steps = (tree.get("beam_width"), tree.get("steps")) if isinstance(tree, dict) else (None, None)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not isinstance(steps, list):
            raise bad(f"request {i} needs an integer beam_width >= 1 and a list of steps")
        for j, step in enumerate(steps):
            if not (isinstance(step, list) and 0 < len(step) <= k
                    and all(isinstance(p, int) and 0 <= p < k for p in step)):
                raise bad(f"request {i} step {j} is {step!r}: expected 1..{k} parent indices in 0..{k - 1}")
    return trees


class ReplayBeamSampler(SimSampler):
    """A simulator sampler whose beam steps replay recorded parent choices (see the module docstring for
    the file and how requests are matched to trees); tokens are the simulator's seeded random ones.

    ``sampling.sampler={_target_: pagedlab.engine.beam_replay.ReplayBeamSampler, path: beams.json}``; the
    engine passes the run's ``seed`` and the model's ``vocab_size``."""

    def __init__(self, path: str, vocab_size: int = DEFAULT_VOCAB_SIZE, base_seed: int = 0, *,
                 seed: int | None = None) -> None:
        super().__init__(vocab_size, base_seed, seed=seed)
        self.path = str(path)
        trees = load_beam_trees(path)
        self._by_id = {str(t.get("request_id")): t for t in trees}
        self._by_width: dict[int, list[dict[str, Any]]] = {}
        for t in trees:
            self._by_width.setdefault(t["beam_width"], []).append(t)
        self._cursor: dict[Any, list[int]] = {}  # request id -> [tree index in its width's list, step]

    def _start(self, group: SequenceGroup, k: int) -> list[int]:
        trees = self._by_width.get(k)
        if not trees:
            raise ValueError(f"{self.path} records no beam search of width {k} (recorded widths: "
                             f"{', '.join(map(str, sorted(self._by_width)))}); record one with BeamRecorder")
        own = self._by_id.get(str(group.request_id))
        if own is not None and own["beam_width"] == k:
            return [next(i for i, t in enumerate(trees) if t is own), 0]
        return [int(self._rng(group).integers(len(trees))), 0]

    def _next_parents(self, group: SequenceGroup, k: int) -> list[int]:
        trees = self._by_width.get(k, [])
        cursor = self._cursor.get(group.request_id)
        if cursor is None:
            cursor = self._cursor[group.request_id] = self._start(group, k)
        for _ in range(len(trees) + 1):
            steps = trees[cursor[0]]["steps"]
            if cursor[1] < len(steps):
                parents = steps[cursor[1]]
                cursor[1] += 1
                return parents + [parents[-1]] * (k - len(parents))
            cursor[0], cursor[1] = (cursor[0] + 1) % len(trees), 1  # the next tree, after its prompt step
        return list(range(k))  # no tree has more than its prompt step: every beam keeps its own continuation

    def beam(self, group: SequenceGroup, rows: list[int], k: int, first: bool) -> list[Candidate]:
        parents = self._next_parents(group, k)
        live = 1 if first else len(rows)
        chosen = [p % live for p in parents] + [p % live for p in parents]  # the survivors, then k runners-up
        tokens = self._rng(group).integers(self.vocab_size, size=len(chosen))
        base = -float(len(group.seqs[0].tokens))  # stand-in scores: only their order matters
        return [(p, int(t), base - r / len(chosen)) for r, (p, t) in enumerate(zip(chosen, tokens))]

    def release(self, group: SequenceGroup) -> None:
        super().release(group)
        self._cursor.pop(group.request_id, None)


__all__ = ["FORMAT", "BeamRecorder", "ReplayBeamSampler", "load_beam_trees"]
