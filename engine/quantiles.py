"""The one percentile convention of the engine: the nearest rank.

The ``q``-quantile (``0 <= q <= 1``) of ``n`` samples is the sample of rank
``max(1, ceil(q * n))`` in ascending order (1-based): the smallest sample such that at
least a fraction ``q`` of the samples are <= it. It is always one of the samples (no
interpolation), ``q = 0`` gives the minimum and ``q = 1`` the maximum; with 100
samples p95 is the 95th smallest, with 10 samples p95 and p99 are the largest.

Every exact percentile uses it: the benchmark summaries and load-test figures
(``percentile``), the hedge delays of ``"p95"`` agents (scheduling/hedging.py), and
the quantile sketch (observability/sketch.py), which is exact with this convention
below its ``exact_limit`` and within its relative error of it above.

This module imports nothing of the engine, so any layer may use it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["nearest_rank", "percentile", "quantile"]

#: ``q * n`` is computed in floating point: 0.07 * 100 is 7.000000000000001, whose
#: ceiling would be 8. Shaving this relative amount first keeps an exact product
#: exact; a genuinely fractional one (its fraction is at least 1/1000 of 1 for any
#: ``q`` given in tenths of a percent) is far above it.
_SLACK = 1e-12


def nearest_rank(q: float, n: int) -> int:
    """The 0-based index of the nearest-rank ``q``-quantile among ``n >= 1`` sorted samples.

    Raises:
        ValueError: ``q`` is outside ``[0, 1]`` (NaN included) or ``n < 1``.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be between 0 and 1, got {q!r}")
    if n < 1:
        raise ValueError(f"need at least one sample, got n={n!r}")
    return min(n, max(1, math.ceil(q * n * (1.0 - _SLACK)))) - 1


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile (``0 <= q <= 1``) of an ascending sequence;
    ``0.0`` for an empty one."""
    if not sorted_values:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q!r}")
        return 0.0
    return sorted_values[nearest_rank(q, len(sorted_values))]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (``0 <= p <= 100``) of an ascending
    sequence; ``0.0`` for an empty one."""
    return quantile(sorted_values, p / 100.0)
