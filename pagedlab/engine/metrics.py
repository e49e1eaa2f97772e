"""Metric names, in one place: the step table's columns, the summary keys shown in tables, and the
headline set. Definitions and units are in docs/metrics.md (a test checks it lists every name)."""

from __future__ import annotations

STEP_COLUMNS = [
    "step", "time", "step_time", "batch_size", "num_prefill_seqs", "num_decode_seqs", "num_tokens",
    "num_waiting", "num_running", "num_swapped", "free_blocks", "used_blocks", "cached_blocks",
    "token_slots", "allocated_slots", "external_frag", "logical_blocks", "memory_waste",
    "kv_utilization", "num_preempted", "cow_copies", "fork_copies", "swap_out_blocks",
    "swap_in_blocks", "swap_fallbacks", "recomputed_tokens", "chunked_tokens", "prefix_hit_tokens",
]
FLOAT_COLUMNS = {"time", "step_time", "memory_waste", "kv_utilization"}  # the other step columns are counts

# where the memory goes, as shares of the slots allocated plus counted external fragmentation (A + X), mean
# over decode steps; they sum to 1 (token_states_share == 1 - memory_waste)
ALLOCATED_SHARES = ["token_states_share", "reserved_share", "internal_frag_share", "external_frag_share"]
# the paper's Figure 2: where the whole KV pool (C slots) goes, mean over the decode steps in which requests
# waited for room; they sum to 1. The paper's fourth bar, "external fragmentation & others", is
# pool_external_frag_share + pool_free_share.
POOL_SHARES = ["pool_token_share", "pool_reserved_share", "pool_internal_frag_share",
               "pool_external_frag_share", "pool_free_share"]

# summary keys printed after a run and in comparison tables, in this order
METRICS = [
    "memory_waste", "pool_token_share", "kv_utilization_mean", "kv_utilization_max", "batch_size_mean",
    "batch_size_max", "throughput_tok_s", "requests_per_s", "ttft_p50", "ttft_p99", "tpot_p50",
    "normalized_latency_mean", "num_preemptions", "recomputed_tokens", "swapped_out_blocks", "swapped_in_blocks",
    "cow_copies", "sharing_saving", "prefix_hit_rate", "num_rejected", "num_finished", "time_source",
]
# the few a sweep's table and a RunResult's repr show
HEADLINE = ["memory_waste", "kv_utilization_mean", "batch_size_mean", "throughput_tok_s", "num_preemptions",
            "sharing_saving", "num_finished", "num_rejected", "time_source"]
