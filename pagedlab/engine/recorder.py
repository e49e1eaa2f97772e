"""Per-step and per-sequence records, and the run summary, as docs/metrics.md defines them.

Per step (over sequences resident in device memory, after the step's allocations):
T token slots (shared once), A allocated slots, X external fragmentation,
memory_waste = (A - T + X) / (A + X), kv_utilization = T / C. The run's memory_waste is the mean
over decode steps (steps in which at least one sequence decodes). A - T is split into `reserved`
(slots their owner fills later) and `internal_frag` (never filled): a sequence's unfilled tail is
kept only while the sequence holds its blocks, as runs of steps, and is charged to those steps
when the blocks are freed and its final length is known. So memory grows with the run only by one
fixed row per step.

The summary's shares split memory two ways (docs/metrics.md): over A + X, mean over decode steps
(``token_states_share`` ...), and over the whole pool C, mean over the decode steps in which requests
waited (queued or swapped), i.e. while memory was the bottleneck (``pool_token_share`` ..., the
paper's Figure 2: token states, reserved, internal fragmentation, external fragmentation, free).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pagedlab.engine.metrics import ALLOCATED_SHARES, FLOAT_COLUMNS, POOL_SHARES, STEP_COLUMNS
from pagedlab.engine.request import GroupStatus, SequenceGroup


class Recorder:
    """Collects step rows and finished groups during a run; builds DataFrames and the summary."""

    def __init__(self, num_blocks: int, block_size: int, time_source: str) -> None:
        self.capacity = num_blocks * block_size
        self.block_size = block_size
        self.time_source = time_source
        self.num_steps = 0
        self._table = np.zeros((1024, len(STEP_COLUMNS)))  # one float64 row per step, grown by doubling
        self.groups: list[SequenceGroup] = []
        self.reserved = np.zeros(1024, dtype=np.int64)  # per step, charged when a sequence is freed
        # live sequence -> runs [first step, tokens then, capacity, steps] of steps in which its
        # tokens grew by one per step under a fixed capacity
        self._tails: dict[int, list[list[int]]] = {}

    def record_step(self, row: dict[str, Any]) -> dict[str, Any]:
        """Add the step's row (after :meth:`note_tails` for the same step)."""
        a, t, x = row["allocated_slots"], row["token_slots"], row["external_frag"]
        row["memory_waste"] = (a - t + x) / (a + x) if a + x else 0.0
        row["kv_utilization"] = t / self.capacity
        if self.num_steps == len(self._table):
            self._table = np.concatenate([self._table, np.zeros_like(self._table)])
        self._table[self.num_steps] = [row[c] for c in STEP_COLUMNS]
        self.num_steps += 1
        return row

    def note_tails(self, tails: list[tuple[int, int, int]]) -> None:
        """The step's unfilled tails, (seq id, tokens, capacity), taken before anything is freed."""
        i = self.num_steps
        open_tails = self._tails
        for sid, n, cap in tails:
            runs = open_tails.get(sid)
            if runs is None:
                open_tails[sid] = [[i, n, cap, 1]]
                continue
            last = runs[-1]
            if last[2] == cap and last[0] + last[3] == i and last[1] + last[3] == n:
                last[3] += 1
            else:
                runs.append([i, n, cap, 1])

    @property
    def open_tails(self) -> int:
        """Sequences whose unfilled tails await their final length (none once every sequence is freed)."""
        return len(self._tails)

    def close_seq(self, seq_id: int, final_slots: int) -> None:
        """A sequence gave its blocks back holding ``final_slots``: charge its tails' reserved slots."""
        runs = self._tails.pop(seq_id, None)
        if not runs:
            return
        if len(self.reserved) <= self.num_steps:  # the current step's row may not be added yet
            self.reserved = np.concatenate([self.reserved, np.zeros(self.num_steps + 1024, np.int64)])
        for first, n, cap, count in runs:
            filled = n + np.arange(count)
            self.reserved[first:first + count] += np.clip(min(final_slots, cap) - filled, 0, None)

    def record_group(self, group: SequenceGroup) -> None:
        self.groups.append(group)

    # -- after the run ----------------------------------------------------------------------------
    def steps_frame(self) -> pd.DataFrame:
        for sid in list(self._tails):  # still holding blocks (a run cut short): final length is now
            _, n, _, count = self._tails[sid][-1]
            self.close_seq(sid, n + count - 1)
        table = self._table[:self.num_steps]
        steps = pd.DataFrame({c: table[:, j] if c in FLOAT_COLUMNS else table[:, j].astype(np.int64)
                              for j, c in enumerate(STEP_COLUMNS)})
        if len(self.reserved) < len(steps):
            self.reserved = np.concatenate([self.reserved, np.zeros(len(steps), np.int64)])
        reserved = self.reserved[:len(steps)].copy()
        steps["reserved_slots"] = reserved
        steps["internal_frag"] = steps["allocated_slots"] - steps["token_slots"] - reserved
        return steps

    def requests_frame(self) -> pd.DataFrame:
        rows = []
        for g in sorted(self.groups, key=lambda g: g.order):  # in arrival order, not finish order
            req = g.request
            seqs = g.done or g.seqs
            for rank, seq in enumerate(seqs):
                out_len = seq.output_len
                ttft = None if g.first_token_time is None else g.first_token_time - req.arrival_time
                finish = seq.finish_time if seq.finish_time is not None else g.finish_time
                latency = None if finish is None else finish - req.arrival_time
                tpot = None
                if out_len > 1 and finish is not None and g.first_token_time is not None:
                    tpot = (finish - g.first_token_time) / (out_len - 1)
                rows.append({
                    "request_id": req.request_id,
                    "seq_index": rank,
                    "status": g.status.value,
                    "finish_reason": g.reject_reason if g.status is GroupStatus.REJECTED else seq.finish_reason,
                    "prompt_len": req.prompt_len,
                    "output_len": out_len,
                    "max_tokens": req.sampling.max_tokens,
                    "n": req.sampling.n,
                    "beam_width": req.sampling.beam_width,
                    "arrival_time": req.arrival_time,
                    "first_token_time": g.first_token_time,
                    "finish_time": finish,
                    "ttft": ttft,
                    "tpot": tpot,
                    "latency": latency,
                    "normalized_latency": latency / out_len if latency is not None and out_len else None,
                    "num_preemptions": g.num_preemptions,
                    "cumulative_logprob": seq.cum_logprob,
                    "output_token_ids": seq.tokens[seq.prompt_len:],
                })
        df = pd.DataFrame(rows)
        if len(df) and df["request_id"].map(type).nunique() > 1:  # parquet needs one type: ids as text
            df["request_id"] = df["request_id"].astype(str)
        return df


def pool_split(steps: pd.DataFrame, capacity: int) -> pd.DataFrame:
    """Per step, the whole pool of ``capacity`` slots split into token slots, reserved slots, internal
    fragmentation, external fragmentation (counted X, at most the free slots) and the remaining free
    slots; one column per :data:`POOL_SHARES` key, in slots, summing to ``capacity``."""
    a, t, x = steps["allocated_slots"], steps["token_slots"], steps["external_frag"]
    free = capacity - a
    ext = np.minimum(x, free)
    return pd.DataFrame(dict(zip(POOL_SHARES, (t, steps["reserved_slots"], steps["internal_frag"], ext,
                                              free - ext))))


def summarize(steps: pd.DataFrame, requests: pd.DataFrame, time_source: str,
              capacity: int | None = None) -> dict[str, Any]:
    """The run summary: the keys listed in docs/metrics.md. ``capacity``: the pool's slots C (the pool
    shares are NaN without it)."""
    decode = steps[steps["num_decode_seqs"] > 0]
    if decode.empty:
        decode = steps
    done = requests[requests["status"] == GroupStatus.FINISHED.value] if len(requests) else requests
    first_rows = done[done["seq_index"] == 0] if len(done) else done
    generated = int(done["output_len"].sum()) if len(done) else 0
    start = float(requests["arrival_time"].min()) if len(requests) else 0.0
    end = float(done["finish_time"].max()) if len(done) else 0.0
    makespan = max(end - start, 1e-12)
    denom = (decode["allocated_slots"] + decode["external_frag"]).replace(0, np.nan)

    def pct(col: str, q: float) -> float:
        vals = first_rows[col].dropna() if len(first_rows) else []
        return float(np.percentile(vals, q)) if len(vals) else float("nan")

    def mean_share(col: pd.Series) -> float:
        share = (col / denom).dropna()
        return float(share.mean()) if len(share) else 0.0

    logical = decode["logical_blocks"].sum()
    if capacity and len(decode):
        loaded = decode[(decode["num_waiting"] + decode["num_swapped"]) > 0]  # requests waited for room
        pool = pool_split(loaded if len(loaded) else decode, capacity).mean() / capacity
        pool_shares = {k: float(pool[k]) for k in POOL_SHARES}
    else:
        pool_shares = dict.fromkeys(POOL_SHARES, float("nan") if not capacity else 0.0)
    rejected = requests[requests["status"] == GroupStatus.REJECTED.value] if len(requests) else requests
    return {
        "memory_waste": float(decode["memory_waste"].mean()) if len(decode) else 0.0,
        **dict(zip(ALLOCATED_SHARES, (mean_share(decode[c]) for c in (
            "token_slots", "reserved_slots", "internal_frag", "external_frag")))),
        **pool_shares,
        "kv_utilization_mean": float(steps["kv_utilization"].mean()) if len(steps) else 0.0,
        "kv_utilization_max": float(steps["kv_utilization"].max()) if len(steps) else 0.0,
        "batch_size_mean": float(steps["batch_size"].mean()) if len(steps) else 0.0,
        "batch_size_max": int(steps["batch_size"].max()) if len(steps) else 0,
        "throughput_tok_s": generated / makespan if generated else 0.0,
        "requests_per_s": len(first_rows) / makespan if generated else 0.0,
        "ttft_p50": pct("ttft", 50),
        "ttft_p99": pct("ttft", 99),
        "tpot_p50": pct("tpot", 50),
        "normalized_latency_mean": float(first_rows["normalized_latency"].mean()) if len(first_rows) else 0.0,
        "num_preemptions": int(steps["num_preempted"].sum()),
        "recomputed_tokens": int(steps["recomputed_tokens"].sum()),
        "chunked_prefill_tokens": int(steps["chunked_tokens"].sum()),
        "swapped_out_blocks": int(steps["swap_out_blocks"].sum()),
        "swapped_in_blocks": int(steps["swap_in_blocks"].sum()),
        "swap_fallbacks": int(steps["swap_fallbacks"].sum()),
        "cow_copies": int(steps["cow_copies"].sum()),
        "fork_copies": int(steps["fork_copies"].sum()),
        "sharing_saving": float(1 - decode["used_blocks"].sum() / logical) if logical else 0.0,
        "prefix_hit_tokens": int(steps["prefix_hit_tokens"].sum()),
        "num_rejected": int((rejected["seq_index"] == 0).sum()) if len(rejected) else 0,
        "num_finished": len(first_rows),
        "num_rejected_seqs": len(rejected),
        "num_finished_seqs": len(done),
        "generated_tokens": generated,
        "num_steps": len(steps),
        "makespan_s": makespan if generated else 0.0,
        "time_source": time_source,
    }
