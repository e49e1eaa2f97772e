"""The PagedAttention paper's reference values: Kwon et al., "Efficient Memory Management for Large Language
Model Serving with PagedAttention", SOSP 2023. Every value names the figure, table or section it comes from;
the figure commands (``python -m pagedlab.figures figNN``) draw and print them beside pagedlab's.

Ranges are (low, high). Where the paper gives a range in its text for a figure whose bars or curves are not
labelled with numbers, only the range is recorded here.
"""

from __future__ import annotations

# Table 1 and §6.1: the served systems (model -> hardware preset here), and the trace lengths.
SYSTEMS = {
    "opt_13b": "a100_40gb",  # 1 x A100 (40 GB)
    "opt_66b": "a100_40gb_x4",  # 4 x A100 (40 GB)
    "opt_175b": "a100_80gb_x8",  # 8 x A100 (80 GB)
}
TABLE1_KV_SLOTS = {"opt_13b": 15_700, "opt_66b": 9_700, "opt_175b": 60_100}  # Table 1, "Max. # KV cache slots"
TRACE_MINUTES = {"opt_13b": 60, "opt_66b": 60, "opt_175b": 15}  # §6.1: 1-hour traces, 15 minutes for OPT-175B
MAX_MODEL_LEN = 2048  # §6.1: Orca (Max) reserves the model's maximum sequence length, 2048 tokens

# Fig. 11: workload means (tokens)
WORKLOAD_MEANS = {"sharegpt_like": {"input": 161, "output": 338}, "alpaca_like": {"input": 19, "output": 58}}

# Fig. 2: share of the KV cache memory holding token states while serving (OPT-13B, one A100-40GB, ShareGPT)
FIG2_TOKEN_SHARE = {"orca_max": 0.204, "orca_pow2": 0.268, "orca_oracle": 0.382, "paged": 0.963}

# §6.2 on Fig. 12 (first row, ShareGPT, OPT-13B / 66B / 175B): vLLM sustains 1.7-2.7x the request rate of
# Orca (Oracle) and 2.7-8x that of Orca (Max) at similar normalized latency. No ratio is given for Orca (Pow2).
FIG12_RATE_RATIO = {"orca_oracle": (1.7, 2.7), "orca_max": (2.7, 8.0)}

# §6.2 on Fig. 13a (OPT-13B, ShareGPT at 2 requests/s): vLLM batches 2.2x the requests of Orca (Oracle), 4.3x
# those of Orca (Max).
FIG13_RATE = 2.0  # requests/s, the caption of Fig. 13a
FIG13_BATCH_RATIO = {"orca_oracle": 2.2, "orca_max": 4.3}

# §6.3 on Fig. 15 (OPT-13B): memory saved by sharing KV blocks, (blocks without sharing - blocks with) / blocks
# without, over parallel sampling n = 2, 4, 6 and beam width 2, 4, 6: the range from the smallest to the largest.
FIG15_SIZES = (2, 4, 6)
FIG15_SAVING = {
    ("parallel", "alpaca_like"): (0.061, 0.098),
    ("parallel", "sharegpt_like"): (0.162, 0.305),
    ("beam", "alpaca_like"): (0.376, 0.552),
    ("beam", "sharegpt_like"): (0.443, 0.663),
}

# §7.1 on Fig. 18a: the PagedAttention kernel's latency is 20-26 % above FasterTransformer's contiguous kernel.
FIG18A_PAGED_OVERHEAD = (0.20, 0.26)

# §7.2 on Fig. 18b (basic sampling at fixed request rates): block sizes 16-128 perform best on ShareGPT; on
# Alpaca 16 and 32 work well and larger blocks are clearly worse; too small a block underuses the GPU.
FIG18B_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FIG18B_BEST_BLOCKS = {"sharegpt_like": (16, 128), "alpaca_like": (16, 32)}

# §7.3 on Fig. 19: swapping is slower than recomputation at small blocks (many small PCIe transfers), while
# recomputation costs the same at every block size; at block sizes 16-64 the two perform comparably end to end.
FIG19_SWAP_SLOWER_AT = (1, 2, 4, 8)
FIG19_COMPARABLE_AT = (16, 32, 64)

SYSTEM_LABELS = {"paged": "vLLM", "orca_oracle": "Orca (Oracle)", "orca_pow2": "Orca (Pow2)", "orca_max": "Orca (Max)"}
MODEL_LABELS = {"opt_13b": "OPT-13B", "opt_66b": "OPT-66B", "opt_175b": "OPT-175B", "llama3_8b": "Llama 3 8B",
                "llama3_70b": "Llama 3 70B"}
HARDWARE_LABELS = {"a100_40gb": "1x A100-40GB", "a100_40gb_x4": "4x A100-40GB", "a100_80gb_x8": "8x A100-80GB",
                   "h100_80gb": "1x H100-80GB", "h200": "1x H200"}
WORKLOAD_LABELS = {"sharegpt_like": "ShareGPT", "alpaca_like": "Alpaca"}
