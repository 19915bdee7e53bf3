"""Small metric types that the engine's parts keep, for the metrics endpoint and benchmarks."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class Histogram:
    """Counts of observed values per bucket, with their sum, as Prometheus histograms keep.

    ``bounds`` are the buckets' upper bounds, ascending. A value above the last one counts only
    in the implicit ``+Inf`` bucket. ``counts[i]`` is the number of values in bucket ``i`` alone,
    not the cumulative count that the Prometheus text format shows.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be strictly ascending, got {list(bounds)}")
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """Return ``(upper bound, values at or below it)`` per bucket, ending with +Inf."""
        total = 0
        result = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            result.append((bound, total))
        return result
