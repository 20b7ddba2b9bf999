"""A mergeable log-bucket quantile sketch with a relative-error guarantee.

Values are counted in geometric buckets ``(gamma**(i-1), gamma**i]`` with
``gamma = (1 + alpha) / (1 - alpha)``; a quantile is answered with the bucket's
midpoint ``2 * gamma**i / (gamma + 1)``, which is within ``alpha`` (relative) of every
value in the bucket — the DDSketch construction (Masson et al., VLDB 2019).

Why not the ``ddsketch`` package: it is one more dependency for ~100 lines, its
``add`` is slower on our hot path (``bench/bench_profiler.py`` measures both), it has
no exact mode for small counts, and the HTML report needs the bucket CDF, which
``ddsketch`` only exposes through private attributes.

Guarantees:
  * ``quantile(q)`` is within ``alpha`` relative error of the exact nearest-rank
    quantile (the sample of 1-based rank ``max(1, ceil(q * n))`` in sorted order: the
    engine's one percentile convention, ``engine.quantiles``), and exact while
    ``count <= exact_limit``.
  * Memory is bounded by ``max_buckets`` whatever the number of samples; when a new
    bucket would exceed it, the lowest buckets are collapsed (low quantiles lose
    accuracy first, the tail that latency targets are about never does). With the
    defaults (alpha 0.5 %, 4096 buckets) the cap is only reached by data
    spanning ~17 decades, and a full sketch holds < 1 MB.
  * ``merge`` is exact: merging sketches equals sketching the concatenated data.

Values must be finite and ``>= 0``; values below ``min_value`` count as zero (a
virtual clock gives exact zero durations).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import final

import attrs

from ..quantiles import nearest_rank

__all__ = ["QuantileSketch"]


@final
@attrs.define(eq=False, repr=False)
class QuantileSketch:
    """Counts of samples in log-spaced buckets; see the module docstring.

    Args:
        alpha: relative accuracy, ``0 < alpha < 1``.
        max_buckets: upper bound on stored buckets (bounds the memory).
        exact_limit: keep raw samples (and answer exactly) up to this count.
        min_value: smallest value distinguished from zero.
    """

    alpha: float = attrs.field(default=0.005)
    max_buckets: int = attrs.field(default=4096)
    exact_limit: int = attrs.field(default=128)
    min_value: float = attrs.field(default=1e-9)

    count: int = attrs.field(default=0, init=False)
    sum: float = attrs.field(default=0.0, init=False)
    min: float = attrs.field(default=math.inf, init=False)
    max: float = attrs.field(default=-math.inf, init=False)
    _zero: int = attrs.field(default=0, init=False)
    _counts: dict[int, int] = attrs.field(factory=dict, init=False)
    _floor: int | None = attrs.field(default=None, init=False)  # collapsed below this
    _exact: list[float] | None = attrs.field(factory=list, init=False)
    _gamma: float = attrs.field(default=0.0, init=False)
    _inv_log_gamma: float = attrs.field(default=0.0, init=False)

    def __attrs_post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be between 0 and 1 (exclusive), got {self.alpha!r}")
        if self.max_buckets < 2:
            raise ValueError(f"max_buckets must be >= 2, got {self.max_buckets!r}")
        if self.exact_limit < 0:
            raise ValueError(f"exact_limit must be >= 0, got {self.exact_limit!r}")
        if not self.min_value > 0.0:
            raise ValueError(f"min_value must be > 0, got {self.min_value!r}")
        self._gamma = (1.0 + self.alpha) / (1.0 - self.alpha)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)

    def __repr__(self) -> str:
        return (
            f"QuantileSketch(alpha={self.alpha}, count={self.count}, buckets={len(self._counts)})"
        )

    # ------------------------------------------------------------------ updates

    def add(self, value: float) -> None:
        """Count one sample. O(1); a new bucket past ``max_buckets`` collapses the lowest.

        Raises:
            ValueError: ``value`` is negative, NaN or infinite.
        """
        if value > self.min_value:
            if value == math.inf:
                raise ValueError("a sample must be finite, got inf")
            key = math.ceil(math.log(value) * self._inv_log_gamma)
            counts = self._counts
            if key in counts:
                counts[key] += 1
            else:
                self._insert(key, 1)
        elif value >= 0.0:
            self._zero += 1
        else:
            raise ValueError(f"a sample must be >= 0, got {value!r}")
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        exact = self._exact
        if exact is not None:
            if len(exact) < self.exact_limit:
                exact.append(value)
            else:
                self._exact = None

    def extend(self, values: Iterable[float]) -> None:
        """Add every value of ``values``."""
        for v in values:
            self.add(v)

    def _insert(self, key: int, n: int) -> None:
        counts = self._counts
        floor = self._floor
        if floor is not None and key < floor:
            counts[floor] += n
            return
        counts[key] = n
        if len(counts) > self.max_buckets:
            # collapse the two lowest buckets into the higher one
            low = min(counts)
            moved = counts.pop(low)
            nxt = min(counts)
            counts[nxt] += moved
            self._floor = nxt

    def merge(self, other: QuantileSketch) -> None:
        """Add every sample counted by ``other`` (which must have the same ``alpha``).

        Raises:
            ValueError: the sketches have different ``alpha`` or ``min_value``.
        """
        if other.alpha != self.alpha or other.min_value != self.min_value:
            raise ValueError(
                "cannot merge sketches with different alpha/min_value "
                f"({self.alpha}/{self.min_value} vs {other.alpha}/{other.min_value})"
            )
        if other.count == 0:
            return
        if self._exact is not None and other._exact is not None:
            merged = self._exact + other._exact
            self._exact = merged if len(merged) <= self.exact_limit else None
        else:
            self._exact = None
        if other._floor is not None and (self._floor is None or other._floor > self._floor):
            # keep the coarser floor so the collapse rule stays one rule
            self._collapse_below(other._floor)
        for key, n in sorted(other._counts.items()):
            if key in self._counts:
                self._counts[key] += n
            else:
                self._insert(key, n)
        self._zero += other._zero
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _collapse_below(self, floor: int) -> None:
        moved = 0
        for key in [k for k in self._counts if k < floor]:
            moved += self._counts.pop(key)
        self._counts[floor] = self._counts.get(floor, 0) + moved
        self._floor = floor

    # ------------------------------------------------------------------ queries

    @property
    def mean(self) -> float:
        """The exact mean (``nan`` when empty)."""
        return self.sum / self.count if self.count else math.nan

    @property
    def is_exact(self) -> bool:
        """True while quantiles come from the raw samples."""
        return self._exact is not None

    @property
    def bucket_count(self) -> int:
        return len(self._counts)

    def quantile(self, q: float) -> float:
        """The nearest-rank ``q``-quantile (``0 <= q <= 1``) of the samples (exact, or
        within ``alpha``: see the module docstring); ``nan`` when empty.

        Raises:
            ValueError: ``q`` is outside ``[0, 1]``.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be between 0 and 1, got {q!r}")
        n = self.count
        if n == 0:
            return math.nan
        rank = nearest_rank(q, n)  # 0-based
        if rank == 0:
            return self.min
        if rank == n - 1:
            return self.max
        exact = self._exact
        if exact is not None and len(exact) == n:
            return sorted(exact)[rank]
        if rank < self._zero:
            return 0.0
        seen = self._zero
        # a C-level copy: safe to call from a metrics thread while the loop adds
        items = sorted(self._counts.items())
        for key, c in items:
            seen += c
            if seen > rank:
                estimate = 2.0 * self._gamma**key / (self._gamma + 1.0)
                return min(max(estimate, self.min), self.max)
        return self.max  # pragma: no cover - counts always sum to count

    def cdf(self) -> list[tuple[float, float]]:
        """``(value, fraction of samples <= value)`` points, increasing in both.

        Exact samples give one point per distinct value; otherwise one per bucket
        (its upper bound, clamped to ``max``). Empty sketch: ``[]``.
        """
        n = self.count
        if n == 0:
            return []
        points: list[tuple[float, float]] = []
        exact = self._exact
        if exact is not None and len(exact) == n:
            data = sorted(exact)
            for i, v in enumerate(data):
                if i + 1 < n and data[i + 1] == v:
                    continue
                points.append((v, (i + 1) / n))
            return points
        seen = self._zero
        if seen:
            points.append((0.0, seen / n))
        for key, c in sorted(self._counts.items()):
            seen += c
            points.append((min(self._gamma**key, self.max), seen / n))
        return points

    def memory_bytes(self) -> int:
        """An estimate of the bytes this sketch holds (object, bucket dict, ints, samples)."""
        size = sys.getsizeof(self) + sys.getsizeof(self._counts)
        for key, c in self._counts.items():
            size += sys.getsizeof(key) + sys.getsizeof(c)
        if self._exact is not None:
            size += sys.getsizeof(self._exact) + 24 * len(self._exact)
        return size
