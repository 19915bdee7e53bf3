"""The metric types in ironshadow.metrics."""

import math

import pytest

from ironshadow.metrics import Histogram


def test_histogram_buckets_and_cumulative_counts():
    histogram = Histogram((0.01, 0.1, 1.0))
    for value in (0.005, 0.01, 0.05, 0.5, 7.0):
        histogram.observe(value)

    assert histogram.count == 5
    assert histogram.sum == pytest.approx(7.565)
    # A value equal to a bound counts in that bound's bucket, as Prometheus's "le" (less or
    # equal) label defines.
    assert histogram.counts == [2, 1, 1, 1]
    assert histogram.cumulative() == [(0.01, 2), (0.1, 3), (1.0, 4), (math.inf, 5)]


@pytest.mark.parametrize("bounds", [(1.0, 0.5), (1.0, 1.0)])
def test_histogram_rejects_unordered_bounds(bounds):
    with pytest.raises(ValueError, match="strictly ascending"):
        Histogram(bounds)
