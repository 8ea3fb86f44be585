"""Latency statistics for the lag test: nearest-rank percentiles over a list of samples.

Nearest rank (the smallest sample with at least p% of the samples at or below it) is always an
observed value, so a p99 of 41 ms means some transaction really took 41 ms; with few samples it
moves in steps rather than interpolating between two of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p <= 100) of non-empty ``samples``."""
    if not samples:
        raise ValueError("no samples")
    if not 0 < p <= 100:
        raise ValueError("p must be in (0, 100]")
    ordered = sorted(samples)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class LagSummary:
    """p50, p99 and max of the commit -> visible delays, in milliseconds, and their count."""

    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def summarize_lag(commits: dict[int, float], seen: dict[int, float]) -> LagSummary | None:
    """Delays of the transactions seen in Redis; both maps hold monotonic seconds by id.

    A key seen before its commit returned (the worker can be faster than the writer's round
    trip) counts as 0 ms: it was visible by the time the writer knew it had committed.
    """
    delays = [max(0.0, seen[i] - t) * 1000 for i, t in commits.items() if i in seen]
    if not delays:
        return None
    return LagSummary(
        count=len(delays),
        p50_ms=percentile(delays, 50),
        p99_ms=percentile(delays, 99),
        max_ms=max(delays),
    )
