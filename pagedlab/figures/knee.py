"""Find the knee of a latency-vs-request-rate curve: the highest rate a system sustains.

As the request rate grows, a serving system's normalized latency (end-to-end latency / output tokens) first
grows slowly, then explodes once requests arrive faster than the system finishes them and the queue grows
for the whole trace (the paper's Fig. 12). The knee here is the highest rate whose mean normalized latency
stays at or under a threshold: :func:`find_knee` brackets it by doubling (or halving) the rate from a start,
then bisects the bracket in log space until its ends are within ``rel_tol`` of each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Knee:
    """``rate``: the highest rate found at or under the threshold; ``over``: the lowest found above it (the knee
    lies between); ``points``: every (rate, latency) evaluated, in order of evaluation."""

    rate: float
    over: float
    threshold: float
    points: list[tuple[float, float]] = field(default_factory=list)

    @property
    def evaluations(self) -> int:
        return len(self.points)


def find_knee(latency: Callable[[float], float], threshold: float, start: float, rel_tol: float = 0.05,
              max_evals: int = 20, min_rate: float = 1e-3, max_rate: float = 1e4) -> Knee:
    """The knee of ``latency(rate)`` (a mean normalized latency; NaN counts as over) against ``threshold``.

    Starts at ``start``, doubles while under the threshold (or halves while over) to bracket the knee, then
    bisects geometrically until ``over / rate <= 1 + rel_tol`` or ``max_evals`` evaluations. Raises
    ValueError when even ``min_rate`` is over the threshold; returns ``over = inf`` when ``max_rate`` is under.
    """
    if not (start > 0 and threshold > 0 and rel_tol > 0):
        raise ValueError(f"start={start}, threshold={threshold} and rel_tol={rel_tol} must be > 0")
    points: list[tuple[float, float]] = []

    def under(rate: float) -> bool:
        value = float(latency(rate))
        points.append((rate, value))
        return not math.isnan(value) and value <= threshold

    lo, hi = 0.0, math.inf
    rate = start
    if under(rate):
        lo = rate
        while hi == math.inf and len(points) < max_evals:
            rate = min(rate * 2, max_rate)
            if under(rate):
                lo = rate
                if rate >= max_rate:
                    return Knee(lo, math.inf, threshold, points)
            else:
                hi = rate
    else:
        hi = rate
        while lo == 0.0 and len(points) < max_evals:
            rate = max(rate / 2, min_rate)
            if under(rate):
                lo = rate
            else:
                hi = rate
                if rate <= min_rate:
                    raise ValueError(f"latency is over {threshold} even at {min_rate} requests/s")
    while lo > 0 and hi < math.inf and hi / lo > 1 + rel_tol and len(points) < max_evals:
        mid = math.sqrt(lo * hi)
        if under(mid):
            lo = mid
        else:
            hi = mid
    return Knee(lo, hi, threshold, points)
