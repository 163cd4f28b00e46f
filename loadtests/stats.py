"""Percentiles of the load tests: over raw samples (the benchmarks) and over Locust's histograms (its SLO gate).

They are two rules, not one written twice: raw samples interpolate between ranks, while the SLO gate
must give the numbers Locust's own reports give for the same run, so it follows Locust's rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def histogram_percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The ``q`` (0..1, as Locust takes it) percentile of a ``{value: count}`` histogram by Locust's rule: the
    largest value with at most ``int(total * q)`` samples below it; None if empty."""
    total = sum(histogram.values())
    if not total:
        return None
    allowed_above = int(total * q)
    seen = 0
    for value in sorted(histogram, reverse=True):
        seen += histogram[value]
        if total - seen <= allowed_above:
            break
    return value
