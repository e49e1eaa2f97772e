"""``python -m pagedlab.figures figNN [--small] [--today] [--out DIR]``: one paper figure (see the package doc)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pagedlab.figures import DEFAULT_OUT, FIGURES, run_figure


def main(argv: list[str] | None = None) -> int:
    listing = "\n".join(f"  {name:8} {what}" + ("" if today else " (no --today)")
                        for name, (_, what, today) in FIGURES.items())
    ap = argparse.ArgumentParser(prog="python -m pagedlab.figures", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Reproduce a figure of the PagedAttention paper on the simulator.",
                                 epilog=f"figures:\n{listing}\n  all      every figure in turn")
    ap.add_argument("figure", choices=[*FIGURES, "all"])
    ap.add_argument("--small", action="store_true", help="a reduced size for tests (seconds)")
    ap.add_argument("--today", action="store_true",
                    help="today's scale (Llama 3 8B on an H100-80GB, ours) instead of the paper's")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    for name in names:
        if args.today and not FIGURES[name][2]:
            print(f"{name}: no --today variant, skipped")
            continue
        t0 = time.perf_counter()
        run_figure(name, small=args.small, today=args.today, out=args.out)
        print(f"{name}: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
