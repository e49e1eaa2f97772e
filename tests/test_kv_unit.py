"""Unit tests of pagedlab.kv, one behaviour per test, per allocator policy."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pagedlab.kv import AllocStatus, BlockManager, KVCacheError

CONTIGUOUS = ["contiguous_max", "contiguous_pow2", "contiguous_oracle",  # first fit, exact size
              "orca_max", "orca_pow2", "orca_oracle"]  # buddy placement (the paper's Orca)


def bm(num_blocks=16, block_size=4, **kw) -> BlockManager:
    kw.setdefault("max_model_len", 64)
    return BlockManager(num_blocks, block_size, **kw)


def toks(n: int, base: int = 1) -> list[int]:
    return list(range(base, base + n))


def test_no_torch_import():
    code = "import sys, pagedlab.kv; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- paged basics
def test_paged_allocate_append_and_stats():
    m = bm()
    assert m.can_allocate(toks(5), 10) is AllocStatus.OK
    assert m.allocate(1, toks(5), 10) == 0
    assert m.block_table(1) == [0, 1]
    assert m.num_tokens(1) == 5
    assert m.append_slots([1], [9]) == []
    assert m.num_tokens(1) == 6 and m.block_table(1) == [0, 1]
    for t in range(3):
        m.append_slots([1], [t])
    assert m.block_table(1) == [0, 1, 2] and m.num_tokens(1) == 9
    s = m.stats()
    assert (s.used_blocks, s.free_blocks, s.token_slots, s.allocated_slots) == (3, 13, 9, 12)
    assert s.logical_blocks == 3 and s.largest_free_run == 13
    wb = m.waste_breakdown({1: 10})
    assert (wb.token_slots, wb.reserved, wb.internal_frag, wb.allocated) == (9, 1, 2, 12)
    assert m.unfilled_tails() == [(1, 9, 12)]
    m.check_invariants()
    m.free(1)
    assert m.stats().free_blocks == 16
    m.check_invariants()


@pytest.mark.parametrize(
    "order, expected",
    [("lifo", [0, 1, 3]), ("fifo", [3, 4, 5])],
)
def test_paged_free_order(order, expected):
    m = bm(num_blocks=8, order=order)
    m.allocate(1, toks(8), 8)  # blocks 0, 1
    m.allocate(2, toks(4), 4)  # block 2
    m.free(1)  # released tail first: 1 then 0
    m.allocate(3, toks(12), 12)
    assert m.block_table(3) == expected
    m.check_invariants()


def test_fresh_pool_hands_out_low_ids_in_both_orders():
    for order in ("lifo", "fifo"):
        m = bm(order=order)
        m.allocate(1, toks(12), 12)
        assert m.block_table(1) == [0, 1, 2]


# ---------------------------------------------------------------- contiguous
@pytest.mark.parametrize(
    "allocator, final_len, blocks",
    [
        ("contiguous_max", 5, 16),  # max_model_len 64 / block 4
        ("contiguous_pow2", 5, 2),  # prompt 3 + pow2(output 2) = 5 slots
        ("contiguous_pow2", 9, 3),  # 3 + pow2(6) = 11 slots
        ("contiguous_pow2", 40, 16),  # 3 + pow2(37) = 67 slots, capped at max_model_len 64
        ("contiguous_oracle", 5, 2),
        ("contiguous_oracle", 9, 3),
        ("orca_max", 5, 16),  # 64 slots = 16 blocks, a power of two already
        ("orca_pow2", 9, 4),  # 11 slots = 3 blocks -> buddy block of 4
        ("orca_pow2", 20, 16),  # 3 + pow2(17) = 35 slots = 9 blocks -> 16
        ("orca_oracle", 5, 2),  # 5 slots = 2 blocks
        ("orca_oracle", 9, 4),  # 9 slots = 3 blocks -> 4: the rounding is internal fragmentation
    ],
)
def test_contiguous_reservation_sizes(allocator, final_len, blocks):
    m = bm(num_blocks=32, allocator=allocator)
    m.allocate(1, toks(3), final_len)
    s = m.stats()
    assert s.used_blocks == blocks and s.logical_blocks == blocks
    assert s.allocated_slots == blocks * 4 and s.token_slots == 3
    assert m.block_table(1) == [0]  # the table covers the filled blocks only
    assert m.unfilled_tails() == [(1, 3, blocks * 4)]
    wb = m.waste_breakdown({1: final_len})
    assert wb.reserved == final_len - 3
    assert wb.internal_frag == blocks * 4 - final_len
    m.check_invariants()


def test_pow2_capped_by_max_model_len():
    m = bm(num_blocks=32, allocator="contiguous_pow2", max_model_len=40)
    m.allocate(1, toks(3), 36)  # 3 + pow2(33) = 67 capped to 40 slots = 10 blocks
    assert m.stats().used_blocks == 10
    m.allocate(2, toks(3), 35)  # 3 + pow2(32) = 35 slots = 9 blocks
    assert m.stats().used_blocks == 19


def test_contiguous_first_fit_and_external_fragmentation():
    m = bm(num_blocks=10, allocator="contiguous_oracle")
    for sid in range(5):
        m.allocate(sid, toks(8), 8)  # 2 blocks each: [0,1] [2,3] [4,5] [6,7] [8,9]
    m.free(1)
    m.free(3)  # free runs [2,3] and [6,7]: 4 blocks free, largest run 2
    assert m.stats().free_blocks == 4 and m.stats().largest_free_run == 2
    assert m.take_external_frag() == 0
    assert m.can_allocate(toks(12), 12) is AllocStatus.LATER
    assert m.take_external_frag() == 4 * 4  # free slots seen at the failure
    assert m.take_external_frag() == 0  # reset
    with pytest.raises(KVCacheError, match="contiguous run of 3 blocks"):
        m.allocate(9, toks(12), 12)
    assert m.take_external_frag() == 16
    m.check_invariants()
    m.allocate(10, toks(4), 8)  # first fit: the lowest run
    assert m.block_table(10) == [2]
    m.free(2)  # [4,5] joins [6,7] -> run of 4
    assert m.stats().largest_free_run == 4
    m.allocate(11, toks(4), 16)
    assert m.block_table(11) == [4]
    m.check_invariants()


def test_contiguous_growth_in_place_then_blocked():
    m = bm(num_blocks=6, allocator="contiguous_oracle")
    m.allocate(1, toks(4), 4)  # block 0
    m.append_slots([1], [5])  # outgrows: block 1 is free -> grows in place
    assert m.block_table(1) == [0, 1] and m.stats().used_blocks == 2
    m.allocate(2, toks(4), 4)  # block 2
    for t in range(3):
        m.append_slots([1], [t])
    assert m.num_tokens(1) == 8
    assert not m.can_append([1])  # block 2 belongs to seq 2
    assert m.take_external_frag() == 3 * 4
    with pytest.raises(KVCacheError, match="outgrew"):
        m.append_slots([1], [0])
    assert m.num_tokens(1) == 8
    m.check_invariants()


@pytest.mark.parametrize("allocator", CONTIGUOUS)
def test_contiguous_fork_copies_into_new_reservation(allocator):
    m = bm(num_blocks=40, allocator=allocator)
    m.allocate(1, toks(6), 8)
    copies = m.fork(1, 2)
    assert copies == list(zip(m.block_table(1), m.block_table(2)))
    assert len(copies) == 2
    s = m.stats()
    assert s.used_blocks == 2 * (s.used_blocks // 2) and s.token_slots == 12
    assert s.logical_blocks == s.used_blocks  # contiguous never shares
    m.append_slots([1, 2], [7, 7])
    m.check_invariants()


def test_contiguous_can_allocate_counts_forks():
    m = bm(num_blocks=5, allocator="contiguous_oracle")
    assert m.can_allocate(toks(4), 8, num_seqs=2) is AllocStatus.OK
    assert m.can_allocate(toks(4), 8, num_seqs=3) is AllocStatus.NEVER


# ---------------------------------------------------------------- buddy placement (the paper's Orca)
def test_buddy_runs_split_and_coalesce_over_a_pool_that_is_not_a_power_of_two():
    from pagedlab.kv.allocators import BuddyRuns

    b = BuddyRuns(11)  # 8 + 2 + 1: maximal aligned buddies
    assert b.runs() == [(0, 8), (8, 2), (10, 1)] and b.largest() == 8
    assert b.allocate(1) == 10  # an exact order-0 block exists: no split
    assert b.allocate(3) == 0  # 4 blocks split from the 8: 4-7 stays free
    assert b.runs() == [(4, 4), (8, 2)] and b.free_blocks == 6
    assert b.allocate(1) == 8  # the smallest larger block (2) is split, not the 4
    assert b.runs() == [(4, 4), (9, 1)]
    assert b.fits([4]) and not b.fits([4, 2]) and b.fits([2, 1, 1])
    assert b.allocate(8) is None
    b.free(0, 4)  # merges with 4-7 into the 8
    assert b.runs() == [(0, 8), (9, 1)]
    b.free(8, 1)  # 8 and 9 merge into 8-9; 8-11 would leave the pool, so it stops there
    assert b.runs() == [(0, 8), (8, 2)]
    b.free(10, 1)
    assert b.runs() == [(0, 8), (8, 2), (10, 1)] and b.free_blocks == 11


def test_buddy_reservations_are_aligned_powers_of_two_and_free_coalesces():
    m = bm(num_blocks=20, allocator="orca_oracle")  # 16 + 4
    m.allocate(1, toks(4), 12)  # 3 blocks -> 4: the exact-size free buddy at 16
    m.allocate(2, toks(4), 8)  # 2 blocks: split from the 16 -> 0-1, free 2-3, 4-7, 8-15
    m.allocate(3, toks(4), 20)  # 5 blocks -> 8: the free 8-15
    assert [m.reservation(s) for s in (1, 2, 3)] == [(16, 4), (0, 2), (8, 8)]
    assert m.free_runs() == [(2, 2), (4, 4)]
    assert m.stats().used_blocks == 14 and m.stats().logical_blocks == 14
    m.check_invariants()
    for sid in (2, 3, 1):
        m.free(sid)
        m.check_invariants()
    assert m.free_runs() == [(0, 16), (16, 4)]


def test_buddy_rounding_is_internal_fragmentation():
    m = bm(num_blocks=32, allocator="orca_oracle")
    m.allocate(1, toks(10), 20)  # 20 slots = 5 blocks -> a buddy block of 8 blocks = 32 slots
    assert m.unfilled_tails() == [(1, 10, 32)]
    wb = m.waste_breakdown({1: 20})
    assert (wb.token_slots, wb.reserved, wb.internal_frag, wb.allocated) == (10, 10, 12, 32)


def test_buddy_external_fragmentation_and_never():
    m = bm(num_blocks=16, allocator="orca_oracle")
    for sid in range(4):
        m.allocate(sid, toks(16), 16)  # 4 blocks each: 0, 4, 8, 12
    m.free(0)
    m.free(2)  # 8 blocks free, but as two 4s that are not buddies
    assert m.stats().free_blocks == 8 and m.stats().largest_free_run == 4
    assert m.can_allocate(toks(20), 20) is AllocStatus.LATER  # 5 blocks -> 8: no free block of 8
    assert m.take_external_frag() == 8 * 4
    with pytest.raises(KVCacheError, match="contiguous run of 8 blocks"):
        m.allocate(9, toks(20), 20)
    m.check_invariants()
    m2 = bm(num_blocks=12, allocator="orca_oracle")  # 8 + 4: one block of 8 fits, never two
    assert m2.can_allocate(toks(20), 20) is AllocStatus.OK
    assert m2.can_allocate(toks(20), 20, num_seqs=2) is AllocStatus.NEVER
    assert m2.can_allocate(toks(40), 40) is AllocStatus.NEVER  # 10 blocks -> 16 > 12
    _assert_error(m2, lambda: m2.allocate(1, toks(40), 40), "16 blocks", "num_blocks=12")


def test_buddy_growth_doubles_into_a_free_buddy_or_blocks():
    m = bm(num_blocks=8, allocator="orca_oracle")
    m.allocate(1, toks(4), 4)  # block 0 (order 0)
    m.allocate(2, toks(4), 4)  # block 1: seq 1's buddy is taken
    assert not m.can_append([1]) and m.take_external_frag() == 6 * 4
    m.free(2)
    m.append_slots([1], [5])  # outgrows its block: doubles into its free buddy 1
    assert m.reservation(1) == (0, 2) and m.block_table(1) == [0, 1]
    m.check_invariants()
    for t in range(3):
        m.append_slots([1], [t])
    m.append_slots([1], [0])  # full again: doubles into 2-3
    assert m.reservation(1) == (0, 4) and m.stats().used_blocks == 4
    m.allocate(3, toks(4), 4)  # block 4
    m.free(1)
    m.allocate(4, toks(4), 4)  # block 5: seq 3 (block 4) is a lower half whose buddy is taken
    assert not m.can_append([3])
    m.free(3)  # block 4 is free now, but seq 4's block 5 is an upper half: its parent starts below it
    assert not m.can_append([4]) and m.reservation(4) == (5, 1)
    m.check_invariants()


def test_buddy_fork_and_swap_in_take_fresh_buddy_blocks():
    m = bm(num_blocks=24, allocator="orca_pow2", num_swap_blocks=8)  # 16 + 8
    m.allocate(1, toks(5), 9)  # 5 + pow2(4) = 9 slots = 3 blocks -> 4
    assert m.reservation(1) == (16, 4)
    copies = m.fork(1, 2)
    assert m.reservation(2) == (20, 4) and copies == [(16, 20), (17, 21)]
    m.swap_out([1])
    m.allocate(3, toks(4), 8)  # 4 + pow2(4) = 8 slots = 2 blocks, split from the free 16-19
    assert m.reservation(3) == (16, 2)
    back = m.swap_in([1])
    assert m.reservation(1) == (0, 4) and [d for _, d in back] == [0, 1]
    m.check_invariants()


def test_buddy_free_blocks_in_eviction_order():
    m = bm(num_blocks=11, block_size=1, allocator="orca_oracle")  # free buddies 0-7, 8-9, 10
    order = m.free_blocks_in_eviction_order()
    assert order == [10, 8, 9, *range(8)]
    for sid, b in enumerate(order):
        m.allocate(sid, [1], 1)
        assert m.reservation(sid) == (b, 1)  # the order one-block reservations really take them in
    m.check_invariants()


def test_buddy_is_a_placement_argument():
    from pagedlab.kv import ContiguousBlockManager

    m = ContiguousBlockManager(12, 4, reserve="oracle", place="buddy")
    assert m.allocator == "orca_oracle" and m.contiguous_kv
    m.allocate(1, toks(4), 12)
    assert m.reservation(1) == (8, 4)
    assert ContiguousBlockManager(12, 4, reserve="oracle").allocator == "contiguous_oracle"
    assert ContiguousBlockManager(12, 4, allocator="orca_pow2", max_model_len=64)._runs.buddy
    with pytest.raises(KVCacheError, match="first_fit, best_fit, buddy"):
        ContiguousBlockManager(12, 4, reserve="oracle", place="buddies")


def test_reservation_rules_are_the_papers():
    from pagedlab.kv.allocators import reserve_max, reserve_oracle, reserve_pow2, reserve_pow2_total

    assert reserve_max(500, 2048, prompt_len=161) == 2048  # Max: the model's maximum length
    assert reserve_pow2(186, 2048, prompt_len=161) == 161 + 32  # Pow2: output 25 -> 32 positions
    assert reserve_pow2(161 + 338, 2048, prompt_len=161) == 161 + 512
    assert reserve_pow2(1900, 2048, prompt_len=900) == 900 + 1024
    assert reserve_pow2(1700, 2048, prompt_len=1100) == 2048  # 1100 + 1024, capped at the model's limit
    assert reserve_oracle(499, 2048, prompt_len=161) == 499  # Oracle: the true final length
    assert reserve_pow2_total(499, 2048) == 512 == reserve_pow2(499, 2048)  # without a prompt length


# ---------------------------------------------------------------- copy-on-write
def test_cow_fork_shares_and_append_copies_partial_block():
    m = bm()
    m.allocate(1, toks(6), 20)  # blocks [0, 1], block 1 half full
    assert m.fork(1, 2) == []
    assert m.block_table(2) == [0, 1]
    assert (m.ref_count(0), m.ref_count(1), m.ref_count(2)) == (2, 2, 0)
    s = m.stats()
    assert (s.used_blocks, s.logical_blocks, s.token_slots) == (2, 4, 6)
    copies = m.append_slots([1, 2], [7, 8])
    # seq 1 writes into the shared partial block -> copy; seq 2 is then the only holder: in place
    assert copies == [(1, 2)]
    assert m.block_table(1) == [0, 2] and m.block_table(2) == [0, 1]
    assert (m.ref_count(0), m.ref_count(1), m.ref_count(2)) == (2, 1, 1)
    s = m.stats()
    assert s.cow_copies == 1 and s.used_blocks == 3 and s.token_slots == 6 + 2 + 2
    m.check_invariants()


def test_cow_full_last_block_needs_no_copy():
    m = bm()
    m.allocate(1, toks(8), 20)
    m.fork(1, 2)
    assert m.append_slots([1, 2], [1, 2]) == []
    assert m.block_table(1)[:2] == m.block_table(2)[:2] == [0, 1]
    assert m.block_table(1)[2] != m.block_table(2)[2]
    assert m.stats().cow_copies == 0
    m.check_invariants()


def test_cow_shared_block_written_in_place_after_other_owner_freed():
    m = bm()
    m.allocate(1, toks(6), 20)
    m.fork(1, 2)
    m.free(1)
    assert m.append_slots([2], [9]) == []
    assert m.block_table(2) == [0, 1]
    m.check_invariants()


def test_cow_unfilled_tail_listed_once_under_lowest_seq_id():
    m = bm()
    m.allocate(5, toks(6), 20)
    m.fork(5, 3)
    m.fork(5, 9)
    assert m.unfilled_tails() == [(3, 6, 8)]
    wb = m.waste_breakdown({5: 20, 3: 7, 9: 20})
    assert (wb.token_slots, wb.reserved, wb.internal_frag, wb.allocated) == (6, 1, 1, 8)


def test_cow_off_fork_copies_every_block():
    m = bm(cow=False)
    m.allocate(1, toks(6), 20)
    copies = m.fork(1, 2)
    assert copies == [(0, 2), (1, 3)]
    s = m.stats()
    assert (s.used_blocks, s.logical_blocks, s.token_slots) == (4, 4, 12)
    assert m.append_slots([1, 2], [1, 1]) == []
    assert m.stats().cow_copies == 0
    m.check_invariants()


def test_can_allocate_num_seqs_paged():
    cow = bm(num_blocks=4)
    nocow = bm(num_blocks=4, cow=False)
    assert cow.can_allocate(toks(8), 8, num_seqs=2) is AllocStatus.OK
    assert nocow.can_allocate(toks(8), 8, num_seqs=2) is AllocStatus.OK
    assert cow.can_allocate(toks(8), 12, num_seqs=2) is AllocStatus.OK  # 2 shared + 2 own
    assert cow.can_allocate(toks(8), 12, num_seqs=3) is AllocStatus.NEVER  # 2 shared + 3 own > 4
    assert nocow.can_allocate(toks(8), 12, num_seqs=2) is AllocStatus.NEVER


def test_can_allocate_later_and_watermark():
    m = bm(num_blocks=8, watermark_blocks=2)
    assert m.can_allocate(toks(24), 24) is AllocStatus.OK  # 6 blocks, leaves 2
    assert m.can_allocate(toks(25), 25) is AllocStatus.NEVER  # 7 > 8 - watermark
    m.allocate(1, toks(12), 12)
    assert m.can_allocate(toks(16), 16) is AllocStatus.LATER
    m.allocate(2, toks(16), 16)  # allocate itself ignores the watermark
    assert m.stats().free_blocks == 1


def test_can_append_and_out_of_blocks():
    m = bm(num_blocks=2)
    m.allocate(1, toks(4), 8)
    m.allocate(2, toks(4), 8)
    assert not m.can_append([1])
    with pytest.raises(KVCacheError, match="out of blocks"):
        m.append_slots([1, 2], [0, 0])
    assert m.num_tokens(1) == 4 and m.num_tokens(2) == 4
    m.check_invariants()


# ---------------------------------------------------------------- prefix cache
def test_prefix_cache_hit_caps_and_counters():
    m = bm(prefix_cache=True)
    assert m.allocate(1, toks(10), 12) == 0  # blocks [0,1] full + [2]
    assert m.allocate(2, toks(10), 12) == 8  # two full blocks shared
    assert m.block_table(2)[:2] == m.block_table(1)[:2]
    assert m.block_table(2)[2] != m.block_table(1)[2]
    assert m.allocate(3, toks(8), 12) == 4  # capped: (8-1)//4 = 1 block, last token computed
    s = m.stats()
    assert s.prefix_hit_tokens == 12 and s.prefix_query_tokens == 28
    assert s.used_blocks == 3 + 1 + 1
    m.check_invariants()


def test_prefix_cache_registers_blocks_filled_by_append():
    m = bm(prefix_cache=True)
    m.allocate(1, toks(6), 12)
    m.append_slots([1], [7])
    m.append_slots([1], [8])  # block 1 now holds tokens 5..8: registered
    assert m.allocate(2, toks(9), 12) == 8
    assert m.block_table(2)[:2] == m.block_table(1)
    m.check_invariants()


def test_prefix_cache_lru_eviction_and_reuse():
    m = bm(num_blocks=4, prefix_cache=True)
    m.allocate(1, toks(9, base=100), 10)  # blocks 0,1 full + 2
    m.append_slots([1], [0])  # its prefill has run: the registered blocks are confirmed
    assert m.block_hash(0) is not None and m.block_hash(1) is not None and m.block_hash(2) is None
    m.free(1)
    s = m.stats()
    assert s.cached_blocks == 2 and s.free_blocks == 4 and s.used_blocks == 0
    # truly free blocks first (lifo: block 2 was freed first of the three), then cached, tail first
    assert m.free_blocks_in_eviction_order() == [2, 3, 1, 0]
    assert m.allocate(2, toks(9, base=100), 9) == 8  # reuses cached blocks 0,1
    assert m.block_table(2)[:2] == [0, 1]
    assert m.stats().cached_blocks == 0
    m.free(2)
    # a different prompt needing 3 blocks: takes the 2 truly free blocks first, then evicts the
    # LRU-oldest cached block, which is the prompt's tail (freed tail first)
    m.allocate(3, toks(9, base=500), 9)
    assert m.stats().cached_blocks == 1
    m.check_invariants()
    m.free(3)
    assert m.allocate(4, toks(9, base=100), 9) == 4  # the head block survived
    assert m.block_table(4)[0] == 0
    assert m.stats().prefix_hit_tokens == 12
    m.check_invariants()


def test_prefix_cache_evicts_oldest_first():
    m = bm(num_blocks=6, prefix_cache=True)
    m.allocate(1, toks(5, base=10), 6)  # block A full + tail
    m.allocate(2, toks(5, base=50), 6)  # block B full + tail
    m.append_slots([1, 2], [0, 0])
    m.free(1)
    m.free(2)
    assert m.stats().cached_blocks == 2
    m.allocate(3, toks(17, base=900), 17)  # needs 5 blocks: 4 truly free + evicts A (older)
    assert m.stats().cached_blocks == 1
    m.free(3)
    assert m.allocate(4, toks(5, base=50), 5) == 4  # B still cached
    assert m.allocate(5, toks(5, base=10), 5) == 0  # A was evicted
    m.check_invariants()


def test_prefix_blocks_provisional_until_first_append():
    m = bm(prefix_cache=True)
    m.allocate(1, toks(9), 12)
    assert m.allocate(2, toks(9), 12) == 8  # same step: hits the blocks seq 1 is prefilling
    m.free(1)
    m.free(2)  # admission rolled back before any prefill ran: nothing stays cached
    assert m.stats().cached_blocks == 0
    assert all(m.block_hash(b) is None for b in range(16))
    assert m.allocate(3, toks(9), 12) == 0
    m.append_slots([3], [0])
    m.free(3)
    assert m.stats().cached_blocks == 2
    m.check_invariants()


def test_clear_prefix_cache():
    m = bm(prefix_cache=True)
    m.allocate(1, toks(9), 9)
    m.allocate(2, toks(9), 9)
    m.free(1)
    m.clear_prefix_cache()
    assert m.stats().cached_blocks == 0
    m.free(2)
    assert m.stats().cached_blocks == 0 and m.stats().free_blocks == 16
    assert m.allocate(3, toks(9), 9) == 0
    m.check_invariants()


def test_can_allocate_counts_shared_prefix_hits():
    m = bm(num_blocks=5, prefix_cache=True)
    m.allocate(1, toks(9), 9)  # 3 blocks, 2 free
    assert m.can_allocate(toks(9), 9) is AllocStatus.OK  # 2 hits shared, 1 new
    assert m.can_allocate(toks(9, base=50), 9) is AllocStatus.LATER


# ---------------------------------------------------------------- swap
def test_swap_out_in_preserves_sharing():
    m = bm(num_swap_blocks=8)
    m.allocate(1, toks(6), 20)
    m.fork(1, 2)
    m.allocate(3, toks(4), 8)
    assert m.can_swap_out([1, 2])
    out = m.swap_out([1, 2])
    assert [d for d, _ in out] == [0, 1] and len({h for _, h in out}) == 2
    assert m.is_swapped(1) and m.is_swapped(2) and not m.is_swapped(3)
    s = m.stats()
    assert s.swapped_blocks == 2 and s.used_blocks == 1 and s.token_slots == 4 and s.logical_blocks == 1
    with pytest.raises(KVCacheError, match="swapped out"):
        m.block_table(1)
    m.check_invariants()
    assert m.can_swap_in([1, 2])
    back = m.swap_in([1, 2])
    assert len(back) == 2 and [h for h, _ in back] == [h for _, h in out]
    assert m.block_table(1) == m.block_table(2)
    s = m.stats()
    assert s.swapped_blocks == 0 and s.used_blocks == 3 and s.token_slots == 10 and s.logical_blocks == 5
    assert m.append_slots([1, 2], [0, 0]) != []  # still shared: CoW
    m.check_invariants()


def test_swap_block_shared_with_outsider_keeps_device_copy():
    m = bm(num_swap_blocks=8)
    m.allocate(1, toks(6), 20)
    m.fork(1, 2)
    m.swap_out([1])
    assert m.stats().used_blocks == 2  # seq 2 still holds both blocks
    m.swap_in([1])
    assert set(m.block_table(1)).isdisjoint(m.block_table(2))
    m.check_invariants()


def test_swapped_sequence_can_be_freed():
    m = bm(num_swap_blocks=4)
    m.allocate(1, toks(6), 6)
    m.swap_out([1])
    m.free(1)
    assert m.stats().swapped_blocks == 0
    m.check_invariants()


@pytest.mark.parametrize("allocator", CONTIGUOUS)
def test_swap_contiguous_needs_a_run(allocator):
    m = bm(num_blocks=32, allocator=allocator, num_swap_blocks=8, max_model_len=32)
    m.allocate(1, toks(6), 8)
    res = m.stats().used_blocks
    out = m.swap_out([1])
    assert len(out) == 2 and m.stats().used_blocks == 0
    back = m.swap_in([1])
    assert [h for h, _ in back] == [h for _, h in out]
    assert m.stats().used_blocks == res
    m.check_invariants()


def test_swap_prefix_cached_blocks_stay_cached():
    m = bm(prefix_cache=True, num_swap_blocks=8)
    m.allocate(1, toks(9), 12)
    m.append_slots([1], [0])
    m.swap_out([1])
    assert m.stats().cached_blocks == 2
    assert m.allocate(2, toks(9), 9) == 8
    m.swap_in([1])
    m.append_slots([1], [10])
    m.check_invariants()


# ---------------------------------------------------------------- errors
def _assert_error(m: BlockManager, fn, *match: str) -> None:
    before = m.stats()
    with pytest.raises(KVCacheError) as e:
        fn()
    for text in match:
        assert text in str(e.value), (text, str(e.value))
    m.check_invariants()
    assert m.stats() == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_blocks": 4, "block_size": 0}, ["block_size=0", ">= 1"]),
        ({"num_blocks": 0, "block_size": 16}, ["num_blocks=0", ">= 1", "smaller than one block"]),
        ({"num_blocks": 4, "block_size": 4, "allocator": "buddy"}, ["allocator=buddy", "paged", "contiguous_oracle"]),
        ({"num_blocks": 4, "block_size": 4, "order": "random"}, ["order=random", "lifo", "fifo"]),
        ({"num_blocks": 4, "block_size": 4, "allocator": "contiguous_max"}, ["max_model_len"]),
        (
            {"num_blocks": 4, "block_size": 4, "allocator": "contiguous_oracle", "prefix_cache": True},
            ["prefix_cache", "paged"],
        ),
        ({"num_blocks": 4, "block_size": 4, "watermark_blocks": 4}, ["watermark_blocks=4", "num_blocks=4"]),
        ({"num_blocks": 4, "block_size": 4, "num_swap_blocks": -1}, ["num_swap_blocks=-1"]),
        ({"num_blocks": 4, "block_size": 4, "allocator": "contiguous_oracle", "place": "worst"}, ["place=worst",
                                                                                             "first_fit"]),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(KVCacheError) as e:
        BlockManager(**kwargs)
    for text in match:
        assert text in str(e.value)


@pytest.mark.parametrize("allocator", ["paged", *CONTIGUOUS])
def test_sequence_longer_than_cache(allocator):
    is_max = allocator.endswith("_max")
    m = bm(num_blocks=4, allocator=allocator, max_model_len=16 if is_max else None)
    m.allocate(1, toks(2), 4)
    assert m.can_allocate(toks(17), 17) is AllocStatus.NEVER
    limit = "max_model_len=16" if is_max else "num_blocks=4"
    _assert_error(m, lambda: m.allocate(2, toks(17), 17), "17", limit)


def test_final_len_beyond_max_model_len():
    m = bm(max_model_len=10)
    assert m.can_allocate(toks(4), 11) is AllocStatus.NEVER
    _assert_error(m, lambda: m.allocate(1, toks(4), 11), "final_len=11", "max_model_len=10")


@pytest.mark.parametrize("allocator", ["paged", *CONTIGUOUS])
def test_sequence_errors(allocator):
    m = bm(num_blocks=40, allocator=allocator, num_swap_blocks=2)
    m.allocate(1, toks(5), 8)
    m.allocate(2, toks(5), 8)
    _assert_error(m, lambda: m.free(7), "unknown sequence id 7")
    _assert_error(m, lambda: m.append_slots([1, 7], [0, 0]), "unknown sequence id 7")
    _assert_error(m, lambda: m.append_slots([1, 1], [0, 0]), "duplicate", "[1]")
    _assert_error(m, lambda: m.append_slots([1], [0, 0]), "len(token_ids)=2", "len(seq_ids)=1")
    _assert_error(m, lambda: m.allocate(1, toks(3), 3), "sequence id 1 already exists")
    _assert_error(m, lambda: m.fork(1, 2), "child sequence id 2 already exists")
    _assert_error(m, lambda: m.fork(7, 8), "unknown sequence id 7")
    _assert_error(m, lambda: m.allocate(3, [], 3), "empty")
    _assert_error(m, lambda: m.swap_in([1]), "sequence 1 is not swapped out")
    _assert_error(m, lambda: m.swap_out([1, 2]), "swap-out needs 4 host blocks", "num_swap_blocks=2")
    assert not m.can_swap_out([1, 2])
    m.swap_out([1])
    _assert_error(m, lambda: m.append_slots([1], [0]), "sequence 1 is swapped out")
    _assert_error(m, lambda: m.fork(1, 9), "swapped out")
    _assert_error(m, lambda: m.num_tokens(9), "unknown sequence id 9")
    m.free(2)
    m.free(1)
    m.check_invariants()


@pytest.mark.parametrize("allocator", ["paged", "contiguous_oracle"])
def test_swap_in_without_room(allocator):
    m = bm(num_blocks=4, allocator=allocator, num_swap_blocks=4)
    m.allocate(1, toks(8), 8)
    m.swap_out([1])
    m.allocate(2, toks(12), 12)
    assert not m.can_swap_in([1])
    _assert_error(m, lambda: m.swap_in([1]), "swap-in needs 2", "num_blocks=4")
    m.free(2)
    m.swap_in([1])
    m.check_invariants()


def test_swap_in_fragmented_contiguous():
    m = bm(num_blocks=6, allocator="contiguous_oracle", num_swap_blocks=4)
    m.allocate(1, toks(12), 12)  # [0..2]
    m.allocate(2, toks(4), 4)  # [3]
    m.swap_out([1])
    m.allocate(3, toks(4), 4)  # [0]; free: [1,2] and [4,5]
    _assert_error(m, lambda: m.swap_in([1]), "contiguous runs of [3]", "largest free run is 2")
    assert m.take_external_frag() == 16


def test_bench_smoke(capsys):
    from pagedlab.bench.kv import main

    main(["--num-seqs", "4", "--steps", "40", "--block-size", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "slots/s" in out and "contiguous_oracle" in out and "cow-forked" in out


# ---------------------------------------------------------------- parts and accessors
def test_block_manager_builds_the_composed_class():
    from pagedlab.kv.contiguous import ContiguousBlockManager
    from pagedlab.kv.paged import PagedBlockManager
    from pagedlab.kv.prefix_cache import PrefixCacheLayer
    from pagedlab.kv.sharing import CowPagedBlockManager

    assert type(bm()) is CowPagedBlockManager
    assert type(bm(cow=False)) is PagedBlockManager
    assert isinstance(bm(prefix_cache=True), PrefixCacheLayer) and isinstance(bm(prefix_cache=True), BlockManager)
    assert not isinstance(bm(cow=False, prefix_cache=True), CowPagedBlockManager)
    for a in CONTIGUOUS:
        m = bm(allocator=a)
        assert type(m) is ContiguousBlockManager and m.cow is False and m.allocator == a


def test_contiguous_rules_are_arguments():
    from pagedlab.kv.allocators import best_fit
    from pagedlab.kv.contiguous import ContiguousBlockManager

    m = ContiguousBlockManager(12, 4, reserve=lambda final_len, mml: 2 * final_len, place=best_fit)
    m.allocate(1, toks(4), 4)  # 8 slots: blocks 0-1
    m.allocate(2, toks(4), 4)  # blocks 2-3
    m.allocate(3, toks(4), 6)  # 12 slots: blocks 4-6; free run 7-11
    m.free(2)
    assert m.free_runs() == [(2, 2), (7, 5)]
    m.allocate(5, toks(2), 2)  # 1 block (4 slots): best fit takes the 2-block run, not 7-11
    assert m.block_table(5) == [2] and m.reservation(5) == (2, 1)
    m.allocate(6, toks(4), 4)  # 2 blocks: only 7-11 holds them
    assert m.reservation(6) == (7, 2)
    m.check_invariants()
    m2 = BlockManager(12, 4, allocator="contiguous_oracle")
    m2.allocate(1, toks(4), 4)
    m2.allocate(2, toks(4), 4)
    m2.allocate(3, toks(4), 8)
    m2.free(1)  # free runs: 0 and 4-11
    assert m2.free_blocks_in_eviction_order() == [0, *range(4, 12)]
    assert [m2.ref_count(b) for b in range(5)] == [0, 1, 1, 0, 0]  # seq 3 holds only block 2 so far


@pytest.mark.parametrize("order", ["lifo", "fifo"])
def test_free_blocks_in_eviction_order(order):
    m = bm(num_blocks=8, order=order)
    m.allocate(1, toks(8), 8)  # 0, 1
    m.allocate(2, toks(4), 4)  # 2
    m.free(2)
    m.free(1)  # tail first: 1, then 0
    got = m.free_blocks_in_eviction_order()
    assert got == ([0, 1, 2, 3, 4, 5, 6, 7] if order == "lifo" else [3, 4, 5, 6, 7, 2, 1, 0])
    got.clear()  # a copy: the manager is untouched
    got = m.free_blocks_in_eviction_order()
    m.allocate(3, toks(4 * len(got)), 4 * len(got))
    assert m.block_table(3) == got  # the order an allocation really takes them in
    assert m.free_blocks_in_eviction_order() == []


def test_host_accessors():
    m = bm(num_swap_blocks=4)
    m.allocate(1, toks(6), 6)
    m.fork(1, 2)
    m.swap_out([1, 2])
    assert m.host_block_table(1) == m.host_block_table(2)
    assert [m.host_ref_count(h) for h in m.host_block_table(1)] == [2, 2]
    with pytest.raises(KVCacheError, match="not swapped out"):
        m.host_block_table(3)


def test_no_kv_module_over_400_lines():
    from pathlib import Path

    import pagedlab.kv

    for f in Path(pagedlab.kv.__file__).parent.glob("*.py"):
        assert len(f.read_text().splitlines()) <= 400, f.name
