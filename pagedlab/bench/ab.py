"""Old against new, side by side in one run: a benchmark of this checkout against a git revision.

    python -m pagedlab.bench.ab --old REV kv  [-- bench args]     # pagedlab.bench.kv: slots/s per case
    python -m pagedlab.bench.ab --old REV sim [-- bench args]     # pagedlab.bench.sim: seq-steps/s per allocator

The revision is exported (``git archive``) to a temp dir; the two versions then run alternately,
``--rounds`` times each in fresh processes (so neither profits from the other's warm caches), and each
case's ratio new / old is the median over rounds with its min-max spread. Ratios, not absolute rates,
are the result: the machine is shared and noisy, so only runs interleaved in one session compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

# how each benchmark's table is read: module, the rate's column name (for the printout), and its place
# among the numbers of a row (a row is a case name, then numbers)
BENCHES = {"kv": ("pagedlab.bench.kv", "slots/s", 0), "sim": ("pagedlab.bench.sim", "seq-steps/s", 3)}


def export_revision(repo: Path, rev: str, dest: Path) -> Path:
    """``git archive REV`` unpacked into ``dest``; returns it."""
    data = subprocess.run(["git", "-C", str(repo), "archive", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_bench(source: Path, module: str, args: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": str(source)}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=source, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{module} failed in {source}:\n{proc.stderr[-2000:]}")
    return proc.stdout


def _number(word: str) -> float | None:
    try:
        return float(word.replace(",", ""))
    except ValueError:
        return None


def parse_rates(text: str, column: str, index: int) -> dict[str, float]:
    """{case: rate} from a benchmark's table: rows after the header that names ``column``, each a case name
    followed by numbers, the rate being the ``index``-th number."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if column in line.split())
    rates = {}
    for line in lines[head + 1:]:
        words = line.split()
        first = next((i for i, w in enumerate(words) if _number(w) is not None), None)
        if not first or len(words) <= first + index:
            continue
        rates[" ".join(words[:first])] = float(_number(words[first + index]) or 0.0)
    return rates


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="git revision to compare against (e.g. HEAD~3, a tag, a sha)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("bench", choices=list(BENCHES))
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed on to the benchmark (after --)")
    args = ap.parse_args(argv)
    module, column, index = BENCHES[args.bench]
    extra = [a for a in args.bench_args if a != "--"]
    new = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="pagedlab-ab-") as tmp:
        old = export_revision(new, args.old, Path(tmp))
        ratios: dict[str, list[float]] = {}
        for r in range(args.rounds):
            old_rates = parse_rates(run_bench(old, module, extra), column, index)
            new_rates = parse_rates(run_bench(new, module, extra), column, index)
            for case, rate in new_rates.items():
                if case in old_rates and old_rates[case] > 0:
                    ratios.setdefault(case, []).append(rate / old_rates[case])
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c} {new_rates[c] / old_rates[c]:.3f}"
                                                             for c in new_rates if c in old_rates), flush=True)
    print(f"\n{module}: new ({new.name}) / old ({args.old}), {args.rounds} interleaved rounds, {column}")
    print(f"{'case':<28}{'median':>8}{'min':>8}{'max':>8}")
    for case, vals in ratios.items():
        print(f"{case:<28}{statistics.median(vals):>8.3f}{min(vals):>8.3f}{max(vals):>8.3f}")


if __name__ == "__main__":
    main()
