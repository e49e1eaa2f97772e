"""Draw the README's pictures: ``python -m pagedlab.viz.demo OUT_DIR``.

A small simulated run (OPT-13B shapes on an A100-40GB, 6 requests of 3 parallel samples each,
24 KV blocks of 16 tokens) in which samples share their prompt's
blocks, copy the shared last block on write, and a group is swapped out when the cache fills.
Writes ``block_tables.png`` (the step with the most going on), ``block_tables.gif`` (every step),
``timeseries.png`` and ``latency.png`` into OUT_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OVERRIDES = [
    "executor=sim", "model=opt_13b", "hardware=a100_40gb", "logger=none", "workload=uniform",
    "workload.num_requests=6", "workload.prompt_len=[12,40]",
    "workload.output_len=[12,40]", "sampling=parallel", "sampling.n=3", "kv_cache.num_blocks=24",
    "max_model_len=128", "seed=3",
]


def interesting(snapshots: list) -> object:
    """The step to draw: copy-on-write copies and swapped sequences beat sharing beats blocks used."""
    return max(snapshots, key=lambda s: (bool(s.cow_copies) and bool(s.on_host), bool(s.cow_copies),
                                         bool(s.on_host), len(s.shared_blocks), -s.states.count("free")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedlab.viz.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dpi", type=int, default=80, help="GIF resolution (the PNGs use 2 x dpi)")
    parser.add_argument("--max-frames", type=int, default=80)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pagedlab.viz import (
        animate_block_tables,
        draw_block_tables,
        plot_latency,
        plot_timeseries,
        record_run,
        save_gif,
    )

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    result, snaps = record_run(OVERRIDES, every=1, max_steps=args.max_frames)
    print(result)
    snap = interesting(snaps)
    ax = draw_block_tables(snap)
    ax.figure.savefig(out / "block_tables.png", dpi=2 * args.dpi)
    plt.close(ax.figure)
    save_gif(animate_block_tables(snaps, interval=600, dpi=args.dpi), out / "block_tables.gif")
    axes = plot_timeseries(result)
    axes[0].figure.savefig(out / "timeseries.png", dpi=2 * args.dpi)
    plt.close(axes[0].figure)
    axes = plot_latency(result)
    axes[0].figure.savefig(out / "latency.png", dpi=2 * args.dpi)
    plt.close(axes[0].figure)
    for name in ("block_tables.png", "block_tables.gif", "timeseries.png", "latency.png"):
        print(f"{out / name}  ({(out / name).stat().st_size / 1024:.0f} KiB)")
    print(f"block_tables.png shows step {snap.step} of {len(snaps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
