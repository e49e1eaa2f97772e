"""Append-slot throughput of the block manager (the decode hot path), side by side per policy.

    python -m pagedlab.bench.kv [--num-seqs 256] [--steps 2000] [--block-size 16] [--allocator paged]

Each case admits ``num_seqs`` sequences with short prompts into a cache sized so nothing runs
out, then times ``steps`` calls of ``append_slots`` over all of them with ``time.perf_counter``
(best of ``--repeats``). The chosen allocator is reported first; the other allocators, the
prefix-cached paged manager and copy-on-write forked pairs (every sequence's first append copies
its shared last block) follow for comparison.
"""

from __future__ import annotations

import argparse
import time

from pagedlab.kv import ALLOCATORS, BlockManager


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def bench_append(
    allocator: str,
    num_seqs: int,
    steps: int,
    block_size: int,
    *,
    forked: bool = False,
    prefix_cache: bool = False,
) -> tuple[float, int]:
    """Seconds for ``steps`` append_slots calls over ``num_seqs`` sequences, and CoW copies made."""
    prompt_len = 7
    final_len = prompt_len + steps
    max_model_len = _next_pow2(final_len)
    per_seq = -(-max_model_len // block_size) + 1
    bm = BlockManager(
        num_seqs * per_seq + 8,
        block_size,
        allocator=allocator,
        prefix_cache=prefix_cache,
        max_model_len=max_model_len,
    )
    seq_ids = list(range(num_seqs))
    parents = seq_ids[::2] if forked else seq_ids
    for sid in parents:
        bm.allocate(sid, [sid % 100 + 1] * prompt_len, final_len)
        if forked:
            bm.fork(sid, sid + 1)
    tokens = [1] * num_seqs
    append = bm.append_slots
    t0 = time.perf_counter()
    for _ in range(steps):
        append(seq_ids, tokens)
    elapsed = time.perf_counter() - t0
    return elapsed, bm.stats().cow_copies


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--allocator", choices=ALLOCATORS, default="paged")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timed runs per case")
    args = ap.parse_args(argv)
    n, steps, bs = args.num_seqs, args.steps, args.block_size
    cases: list[tuple[str, str, dict]] = [(args.allocator, args.allocator, {})]
    cases += [(a, a, {}) for a in ALLOCATORS if a != args.allocator]
    cases += [("paged+prefix_cache", "paged", {"prefix_cache": True})]
    cases += [("paged cow-forked pairs", "paged", {"forked": True})]
    slots = n * steps
    print(f"append_slots: {n} seqs x {steps} steps, block_size {bs}, best of {args.repeats}")
    print(f"{'case':<26}{'slots/s':>14}{'ns/slot':>10}{'vs first':>10}{'cow copies':>12}")
    first = None
    for label, allocator, kw in cases:
        runs = [bench_append(allocator, n, steps, bs, **kw) for _ in range(max(1, args.repeats))]
        elapsed, copies = min(runs)
        rate = slots / elapsed
        first = first or rate
        print(f"{label:<26}{rate:>14,.0f}{1e9 / rate:>10.1f}{rate / first:>10.2f}{copies:>12}")


if __name__ == "__main__":
    main()
