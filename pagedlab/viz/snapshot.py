"""The block pool and every sequence's block table at one engine step, and an opt-in recorder.

A :class:`BlockSnapshot` is taken from a live :class:`~pagedlab.engine.engine.Engine` through the
block manager's public queries (``seq_ids``, ``block_table``, ``host_block_table``, ``num_tokens``,
``ref_count``, ``free_blocks_in_eviction_order``, ``block_hash``) and the scheduler's queues. It is
plain data: drawing it (:mod:`pagedlab.viz.blocks`) needs no engine.

Recording is opt-in. :class:`BlockTableRecorder` is an ``on_step`` callback::

    built = pagedlab.experiment.build(cfg)
    rec = BlockTableRecorder(built.engine, every=1, max_steps=100)
    result = built.engine.run(built.requests, on_step=rec)
    rec.snapshots  # one BlockSnapshot per recorded step

A run without a recorder pays nothing. With one, each recorded step costs O(num_blocks + table
entries); steps skipped by ``every`` or past ``max_steps`` cost a counter. To know the step's
copy-on-write, swap and fork copies the recorder also keeps a reference to the scheduler's output
of each step (it wraps ``engine.scheduler.schedule`` on that instance; :meth:`detach` undoes it).
:func:`record_run` does all of it from a config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FREE, CACHED, USED = "free", "cached", "used"


@dataclass(frozen=True)
class SeqSnapshot:
    """One live sequence: where its tokens' KV is."""

    request_id: Any
    seq_index: int  # position of the sequence in its request's group (sample or beam number), from 0
    seq_id: int
    num_tokens: int  # token slots the sequence holds
    block_table: tuple[int, ...]  # device blocks; for a swapped sequence, host blocks
    swapped: bool = False  # its KV is in host swap space (block_table lists host blocks)
    reservation: tuple[int, int] | None = None  # contiguous allocators: (first block, blocks) reserved

    @property
    def label(self) -> str:
        return f"req {self.request_id} · s{self.seq_index}"


@dataclass
class BlockSnapshot:
    """The block pool and block tables after one engine step.

    Per device block: ``ref_counts[b]`` (block-table entries pointing at it) and ``states[b]``, one of
    ``"free"``, ``"cached"`` (unreferenced, kept by the prefix cache's LRU, reusable by a hit) or
    ``"used"`` (referenced, or reserved by a contiguous allocator). Copies are (source, destination)
    block pairs: ``cow_copies`` ordered by this step's appends into shared blocks, ``fork_copies``
    ordered by this step's forks under a copying policy (``cow=false``, contiguous; copied at the
    start of the next step), ``swap_out`` (device, host) and ``swap_in`` (host, device).
    """

    step: int
    num_blocks: int
    block_size: int
    seqs: list[SeqSnapshot]
    ref_counts: list[int]
    states: list[str]
    time: float = 0.0
    cow_copies: list[tuple[int, int]] = field(default_factory=list)
    fork_copies: list[tuple[int, int]] = field(default_factory=list)
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0
    waiting: list[Any] = field(default_factory=list)  # request ids in the waiting queue
    swapped: list[Any] = field(default_factory=list)  # request ids of the groups in swap space
    num_swap_blocks: int = 0
    host_ref_counts: dict[int, int] = field(default_factory=dict)  # host block -> host-table entries
    allocator: str = "paged"
    context: dict[str, Any] = field(default_factory=dict)  # config and summary keys, for titles
    row: dict[str, Any] = field(default_factory=dict)  # the engine's step row (taken before the forward
    # pass: its block counts can differ from this snapshot's, taken after the step's frees and forks)

    # -- queries ----------------------------------------------------------------------------------
    @property
    def resident(self) -> list[SeqSnapshot]:
        return [s for s in self.seqs if not s.swapped]

    @property
    def on_host(self) -> list[SeqSnapshot]:
        return [s for s in self.seqs if s.swapped]

    def blocks_in(self, state: str) -> list[int]:
        return [b for b, s in enumerate(self.states) if s == state]

    @property
    def shared_blocks(self) -> list[int]:
        """Device blocks referenced by more than one block-table entry."""
        return [b for b, r in enumerate(self.ref_counts) if r > 1]

    def table_ref_counts(self) -> list[int]:
        """Reference counts recomputed from the resident block tables (equal to ``ref_counts`` for the
        paged allocators; contiguous reservations past a table are not counted)."""
        ref = [0] * self.num_blocks
        for s in self.resident:
            for b in s.block_table:
                ref[b] += 1
        return ref

    def fill(self) -> list[int]:
        """Token slots filled in each device block (0 for free, cached-but-unknown and reserved blocks)."""
        out = [0] * self.num_blocks
        bs = self.block_size
        for s in self.resident:
            for i, b in enumerate(s.block_table):
                out[b] = max(out[b], min(bs, s.num_tokens - i * bs))
        return out

    def owners(self) -> dict[int, list[SeqSnapshot]]:
        """Device block -> the resident sequences whose tables hold it."""
        out: dict[int, list[SeqSnapshot]] = {}
        for s in self.resident:
            for b in s.block_table:
                out.setdefault(b, []).append(s)
        return out

    def summary(self) -> dict[str, int]:
        return {
            "used": self.states.count(USED), "cached": self.states.count(CACHED), "free": self.states.count(FREE),
            "shared": len(self.shared_blocks), "sequences": len(self.resident), "swapped_seqs": len(self.on_host),
            "cow_copies": len(self.cow_copies), "fork_copies": len(self.fork_copies),
        }

    def __repr__(self) -> str:
        s = self.summary()
        return (f"BlockSnapshot(step={self.step}, {s['used']} used / {s['cached']} cached / {s['free']} free of "
                f"{self.num_blocks} blocks x {self.block_size} tokens, {s['shared']} shared, {s['sequences']} "
                f"resident + {s['swapped_seqs']} swapped sequences, {s['cow_copies']} CoW copies)")


def _groups(scheduler: Any) -> list[Any]:
    return [*scheduler.running, *scheduler.swapped]


def take_snapshot(engine: Any, row: Mapping[str, Any] | None = None, sched_out: Any = None,
                  context: Mapping[str, Any] | None = None) -> BlockSnapshot:
    """A :class:`BlockSnapshot` of ``engine`` now. ``row`` is the step row ``on_step`` got; ``sched_out``
    the step's ``SchedulerOutput`` (for its copies; without it they are left empty)."""
    bm, scheduler = engine.bm, engine.scheduler
    nb, bs = bm.num_blocks, bm.block_size
    where: dict[int, tuple[Any, int, int]] = {}  # seq id -> (request id, index in group, group rank)
    for rank, group in enumerate(sorted(_groups(scheduler), key=lambda g: g.order)):
        for i, seq in enumerate(group.seqs):
            where[seq.seq_id] = (group.request_id, i, rank)
    reservation = getattr(bm, "reservation", None)  # contiguous allocators only
    seqs = []
    for sid in bm.seq_ids():
        rid, idx, _ = where.get(sid, (None, 0, 0))
        swapped = bm.is_swapped(sid)
        table = bm.host_block_table(sid) if swapped else bm.block_table(sid)
        res = None
        if reservation is not None and not swapped:
            start, length = reservation(sid)
            res = (start, length) if start is not None else None
        seqs.append(SeqSnapshot(rid, idx, sid, bm.num_tokens(sid), tuple(table), swapped, res))
    # arrival order of the groups, then sample / beam order; a sequence of no group (never expected) last
    seqs.sort(key=lambda s: (where.get(s.seq_id, (None, 0, len(where)))[2], s.seq_index, s.seq_id))

    available = bm.free_blocks_in_eviction_order()
    states = [USED] * nb
    for b in available:
        states[b] = CACHED if bm.block_hash(b) is not None else FREE
    if not getattr(bm, "contiguous_kv", False):  # paged: ask the pool
        ref = [bm.ref_count(b) for b in range(nb)]
    else:  # contiguous: nothing is shared; count table entries (ref_count scans every table per block)
        ref = [0] * nb
        for s in seqs:
            if not s.swapped:
                for b in s.block_table:
                    ref[b] += 1
    host_ref: dict[int, int] = {}
    for s in seqs:
        if s.swapped:
            for h in s.block_table:
                host_ref[h] = host_ref.get(h, 0) + 1
    row = dict(row or {})
    out = sched_out
    return BlockSnapshot(
        step=int(row.get("step", scheduler.step_index)),
        num_blocks=nb,
        block_size=bs,
        seqs=seqs,
        ref_counts=ref,
        states=states,
        time=float(row.get("time", getattr(engine, "clock", 0.0))),
        cow_copies=list(out.cow_copies) if out is not None else [],
        fork_copies=list(scheduler.pending_fork_copies),
        swap_out=list(out.swap_out) if out is not None else [],
        swap_in=list(out.swap_in) if out is not None else [],
        num_preempted=int(row.get("num_preempted", out.num_preempted if out is not None else 0)),
        waiting=[g.request_id for g in scheduler.waiting],
        swapped=[g.request_id for g in scheduler.swapped],
        num_swap_blocks=int(getattr(bm, "num_swap_blocks", 0)),
        host_ref_counts=host_ref,
        allocator=str(getattr(bm, "allocator", "paged")),
        context={"num_blocks": nb, "block_size": bs, **dict(context or {})},
        row=row,
    )


class BlockTableRecorder:
    """An ``on_step`` callback that keeps a :class:`BlockSnapshot` every ``every`` steps, at most
    ``max_steps`` of them (None: no limit; later steps are not recorded). ``context`` (config and
    summary keys such as ``model.name``, ``workload.num_requests``) goes into every snapshot for the
    figure titles. ``on_step``, if given, is called after recording (to chain another callback)."""

    def __init__(self, engine: Any, every: int = 1, max_steps: int | None = 500,
                 context: Mapping[str, Any] | None = None, on_step: Any = None) -> None:
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps={max_steps} must be >= 0 or None")
        self.engine = engine
        self.every = every
        self.max_steps = max_steps
        self.context = dict(context or {})
        self.chain = on_step
        self.snapshots: list[BlockSnapshot] = []
        self.calls = 0
        self._last_out: Any = None
        scheduler = engine.scheduler
        original = scheduler.schedule

        def schedule() -> Any:
            self._last_out = original()
            return self._last_out

        scheduler.schedule = schedule
        self._wrapped = schedule

    def detach(self) -> None:
        """Stop seeing the scheduler's output (restores ``engine.scheduler.schedule``)."""
        scheduler = self.engine.scheduler
        if scheduler.__dict__.get("schedule") is self._wrapped:
            del scheduler.schedule

    @property
    def full(self) -> bool:
        return self.max_steps is not None and len(self.snapshots) >= self.max_steps

    def __call__(self, row: dict[str, Any]) -> None:
        self.calls += 1
        if (self.calls - 1) % self.every == 0 and not self.full:
            self.snapshots.append(take_snapshot(self.engine, row, self._last_out, self.context))
        self._last_out = None
        if self.chain is not None:
            self.chain(row)


def config_context(cfg: Any) -> dict[str, Any]:
    """Flattened, resolved config (a DictConfig or mapping) for figure titles."""
    from pagedlab.app.results import flatten

    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return flatten(dict(cfg))


def record_run(cfg: Any, every: int = 1, max_steps: int | None = 500) -> tuple[Any, list[BlockSnapshot]]:
    """Run ``cfg`` (a composed config, or overrides for :func:`pagedlab.compose`) once with a
    :class:`BlockTableRecorder`; returns the ``RunResult`` (with ``config`` and the run keys
    ``num_blocks``, ``block_size``, ... in its summary, as :func:`pagedlab.run_experiment` gives)
    and the snapshots. No warm-up and no repeats: this run is for looking at, not for timing."""
    from pagedlab.app.api import compose
    from pagedlab.experiment import build

    if isinstance(cfg, str):
        cfg = compose(cfg)
    elif isinstance(cfg, Sequence):
        cfg = compose(*cfg)
    built = build(cfg)
    context = config_context(cfg)
    run_keys = {"num_blocks": built.num_blocks, "num_swap_blocks": built.num_swap_blocks,
                "block_size": int(cfg.block_size), "kv_bytes_per_token": built.model.kv_bytes_per_token,
                "num_requests": len(built.requests)}
    rec = BlockTableRecorder(built.engine, every=every, max_steps=max_steps, context={**context, **run_keys})
    try:
        result = built.engine.run(built.requests, on_step=rec)
    finally:
        rec.detach()
    result.summary.update(run_keys)
    from omegaconf import OmegaConf

    result.config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return result, rec.snapshots
