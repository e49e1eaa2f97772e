"""Stateful property tests: random operation sequences against every allocator, cow on and off.

A model of device and host memory replays the copies, swaps and writes the block manager asks
for; after every operation every sequence must read back exactly its own tokens through its block
table, which catches a write into a shared block, a lost copy or a wrong prefix hit. The
manager's own invariants and the accounting identities are checked alongside.
"""

from __future__ import annotations

import unittest

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagedlab.kv import AllocStatus, BlockManager, KVCacheError

# a few base prompts; sequences take prefixes of them so prefix-cache hits happen at many lengths
BASES = [[(c * 7 + i) % 5 for i in range(64)] for c in range(3)]
MAX_MODEL_LEN = 24
NUM_SWAP_BLOCKS = 10

CONFIGS = [
    # (allocator, cow, prefix_cache, order, block_size, num_blocks, watermark)
    ("paged", True, False, "lifo", 2, 16, 0),
    ("paged", True, False, "fifo", 4, 12, 1),
    ("paged", False, False, "lifo", 2, 20, 0),
    ("paged", False, False, "fifo", 1, 24, 0),
    ("paged", True, True, "lifo", 2, 16, 0),
    ("paged", True, True, "fifo", 4, 10, 1),
    ("paged", False, True, "lifo", 2, 18, 0),
    ("contiguous_max", True, False, "lifo", 4, 20, 0),
    ("contiguous_max", False, False, "lifo", 8, 12, 0),
    ("contiguous_pow2", True, False, "lifo", 2, 30, 0),
    ("contiguous_pow2", False, False, "lifo", 4, 16, 1),
    ("contiguous_oracle", True, False, "lifo", 2, 24, 0),
    ("contiguous_oracle", False, False, "fifo", 4, 12, 0),
    # buddy placement (the paper's Orca); pools that are not a power of two
    ("orca_max", True, False, "lifo", 4, 20, 0),
    ("orca_max", False, False, "lifo", 8, 13, 1),
    ("orca_pow2", True, False, "lifo", 2, 30, 0),
    ("orca_pow2", False, False, "fifo", 4, 16, 1),
    ("orca_oracle", True, False, "lifo", 2, 24, 0),
    ("orca_oracle", False, False, "lifo", 2, 11, 0),
]


class KVMachine(RuleBasedStateMachine):
    CONFIG: tuple = CONFIGS[0]

    def __init__(self) -> None:
        super().__init__()
        allocator, cow, prefix, order, bs, nb, wm = self.CONFIG
        self.bs = bs
        self.paged = allocator == "paged"
        self.m = BlockManager(
            nb,
            bs,
            allocator=allocator,
            cow=cow,
            prefix_cache=prefix,
            order=order,
            num_swap_blocks=NUM_SWAP_BLOCKS,
            max_model_len=MAX_MODEL_LEN,
            watermark_blocks=wm,
        )
        self.tokens: dict[int, list[int]] = {}  # expected tokens of every live sequence
        self.final: dict[int, int] = {}
        self.base: dict[int, int] = {}
        self.swapped: set[int] = set()
        self.dev: dict[int, int] = {}  # device slot -> token
        self.host: dict[int, int] = {}  # host slot -> token
        self.next_id = 0

    # ------------------------------------------------------------ helpers
    def resident(self) -> list[int]:
        return sorted(s for s in self.tokens if s not in self.swapped)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _copy(self, src_mem: dict, dst_mem: dict, pairs: list[tuple[int, int]]) -> None:
        bs = self.bs
        for src, dst in pairs:
            for i in range(bs):
                v = src_mem.get(src * bs + i)
                if v is None:
                    dst_mem.pop(dst * bs + i, None)
                else:
                    dst_mem[dst * bs + i] = v

    def _write(self, sid: int, pos: int, tok: int) -> None:
        table = self.m.block_table(sid)
        self.dev[table[pos // self.bs] * self.bs + pos % self.bs] = tok

    def _holders(self, block: int) -> int:
        return sum(self.m.block_table(s).count(block) for s in self.resident())

    @staticmethod
    def _subset(data, ids: list[int], everything_if_zero: bool = True) -> list[int]:
        """A non-empty subset of ``ids`` from one drawn bit mask (fast: one draw, not one per id)."""
        mask = data.draw(st.integers(0, 2 ** len(ids) - 1))
        sub = [s for i, s in enumerate(ids) if mask >> i & 1]
        return sub or (ids if everything_if_zero else ids[:1])

    def _expect_error(self, fn) -> None:
        before = self.m.stats()
        try:
            fn()
        except KVCacheError:
            assert self.m.stats() == before
            return
        raise AssertionError("expected KVCacheError")

    def _admit(self, tokens: list[int], final: int, num_seqs: int, base: int) -> None:
        m = self.m
        status = m.can_allocate(tokens, final, num_seqs)
        if status is AllocStatus.NEVER:
            if num_seqs == 1:
                self._expect_error(lambda: m.allocate(self.next_id + 1, tokens, final))
            return
        if status is AllocStatus.LATER:
            return
        sid = self._new_id()
        hit = m.allocate(sid, tokens, final)
        bs = self.bs
        assert hit % bs == 0 and 0 <= hit < len(tokens)
        self.tokens[sid], self.final[sid], self.base[sid] = list(tokens), max(final, len(tokens)), base
        for pos in range(hit, len(tokens)):  # the executor computes only the missed tokens
            self._write(sid, pos, tokens[pos])
        for _ in range(num_seqs - 1):
            self._fork(sid)

    def _fork(self, parent: int) -> None:
        child = self._new_id()
        copies = self.m.fork(parent, child)
        if self.m.cow:
            assert copies == []
        self._copy(self.dev, self.dev, copies)
        self.tokens[child] = list(self.tokens[parent])
        self.final[child] = self.final[parent]
        self.base[child] = self.base[parent]

    # ------------------------------------------------------------ rules
    @rule(
        base=st.integers(0, len(BASES) - 1),
        plen=st.integers(1, 20),
        gen=st.integers(0, 8),
        num_seqs=st.integers(1, 3),
    )
    def allocate(self, base, plen, gen, num_seqs):
        self._admit(BASES[base][:plen], plen + gen, num_seqs, base)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), gen=st.integers(0, 6))
    def readmit(self, data, gen):
        """Admit a copy of a live sequence's tokens (recompute-style): prefix hits on decoded blocks."""
        src = data.draw(st.sampled_from(sorted(self.tokens)))
        toks = self.tokens[src]
        self._admit(list(toks), len(toks) + gen, 1, self.base[src])

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def append(self, data):
        self._append(data)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def append_again(self, data):
        """Decode is the common operation: a second rule makes it drawn more often."""
        self._append(data)

    def _append(self, data):
        m, bs = self.m, self.bs
        sids = self._subset(data, self.resident())
        salt = data.draw(st.integers(-1, 4))  # -1: continue the base prompt (more prefix hits)
        toks = [BASES[self.base[s]][len(self.tokens[s])] if salt < 0 else (salt + s) % 5 for s in sids]
        if not m.can_append(sids):
            self._expect_error(lambda: m.append_slots(sids, toks))
            return
        copies = m.append_slots(sids, toks)
        if not self.paged:
            assert copies == []
        self._copy(self.dev, self.dev, copies)  # copies run before the forward pass writes
        for s, t in zip(sids, toks):
            pos = len(self.tokens[s])
            block = m.block_table(s)[pos // bs]
            assert self._holders(block) == 1, f"seq {s} writes position {pos} into shared block {block}"
            self._write(s, pos, t)
            self.tokens[s].append(t)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.resident()))
        if self.m.can_fork(parent):
            self._fork(parent)
        else:
            self._expect_error(lambda: self.m.fork(parent, self.next_id + 1))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        sid = data.draw(st.sampled_from(sorted(self.tokens)))
        self.m.free(sid)
        for d in (self.tokens, self.final, self.base):
            del d[sid]
        self.swapped.discard(sid)

    @precondition(lambda self: self.resident())
    @rule(data=st.data())
    def swap_out(self, data):
        sids = self._subset(data, self.resident(), everything_if_zero=False)
        if not self.m.can_swap_out(sids):
            self._expect_error(lambda: self.m.swap_out(sids))
            return
        distinct = {b for s in sids for b in self.m.block_table(s)}
        pairs = self.m.swap_out(sids)
        assert sorted(d for d, _ in pairs) == sorted(distinct)  # one host block per device block
        assert len({h for _, h in pairs}) == len(pairs)
        self._copy(self.dev, self.host, pairs)
        self.swapped.update(sids)

    @precondition(lambda self: self.swapped)
    @rule(data=st.data())
    def swap_in(self, data):
        sids = self._subset(data, sorted(self.swapped))
        if not self.m.can_swap_in(sids):
            try:
                pairs = self.m.swap_in(sids)  # may still fit below the watermark
            except KVCacheError:
                return
        else:
            pairs = self.m.swap_in(sids)
        self._copy(self.host, self.dev, pairs)
        self.swapped.difference_update(sids)

    @precondition(lambda self: self.m.prefix_cache)
    @rule()
    def clear_prefix_cache(self):
        self.m.clear_prefix_cache()

    # ------------------------------------------------------------ checks
    @invariant()
    def manager_invariants(self):
        self.m.check_invariants()

    @invariant()
    def every_sequence_reads_back_its_tokens(self):
        m, bs = self.m, self.bs
        for s in self.tokens:
            assert m.num_tokens(s) == len(self.tokens[s])
            assert m.is_swapped(s) == (s in self.swapped)
        for s in self.resident():
            table = m.block_table(s)
            got = [self.dev.get(table[p // bs] * bs + p % bs) for p in range(len(self.tokens[s]))]
            assert got == self.tokens[s], f"seq {s} reads {got}, expected {self.tokens[s]}"

    @invariant()
    def accounting(self):
        m, bs = self.m, self.bs
        st_ = m.stats()
        assert st_.free_blocks + st_.used_blocks == st_.num_blocks
        assert st_.allocated_slots == st_.used_blocks * bs
        slots, blocks, logical = set(), set(), 0
        for s in self.resident():
            table = m.block_table(s)
            blocks.update(table)
            logical += len(table)
            slots.update(table[p // bs] * bs + p % bs for p in range(len(self.tokens[s])))
        assert st_.token_slots == len(slots)
        assert st_.prefix_hit_tokens <= st_.prefix_query_tokens
        if self.paged:
            assert st_.used_blocks == len(blocks) and st_.logical_blocks == logical
            assert m.take_external_frag() == 0
        wb = m.waste_breakdown(self.final)
        assert wb.token_slots + wb.reserved + wb.internal_frag == wb.allocated == st_.allocated_slots
        assert min(wb.reserved, wb.internal_frag) >= 0
        if self.paged:  # independent recount: each physical block once, owner = lowest seq id
            owner: dict[int, tuple[int, int]] = {}
            for s in sorted(self.resident(), reverse=True):
                for i, b in enumerate(m.block_table(s)):
                    owner[b] = (s, i)
            reserved = 0
            for b, (s, i) in owner.items():
                n = len(self.tokens[s])
                reserved += sum(1 for p in range(i * bs, (i + 1) * bs) if n <= p < self.final[s])
            assert wb.reserved == reserved

    def teardown(self):
        for s in list(self.tokens):
            self.m.free(s)
        self.m.clear_prefix_cache()
        s = self.m.stats()
        assert s.free_blocks == s.num_blocks and s.used_blocks == 0 and s.cached_blocks == 0
        assert s.swapped_blocks == 0 and s.token_slots == 0 and s.logical_blocks == 0
        self.m.check_invariants()


_SETTINGS = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _make_case(cfg: tuple) -> type[unittest.TestCase]:
    machine = type(f"KV_{'_'.join(map(str, cfg))}", (KVMachine,), {"CONFIG": cfg})
    case = machine.TestCase
    case.settings = _SETTINGS
    return case


for _cfg in CONFIGS:
    _case = _make_case(_cfg)
    _name = f"TestKV_{_cfg[0]}_cow{int(_cfg[1])}_prefix{int(_cfg[2])}_{_cfg[3]}_bs{_cfg[4]}"
    _case.__name__ = _case.__qualname__ = _name
    globals()[_name] = _case
del _cfg, _case, _name
