"""QuantileSketch: accuracy against exact percentiles, bounded memory, exact merge."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.observability.sketch import QuantileSketch

QS = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)


def exact_index(q: float, n: int) -> int:
    """The engine's convention (engine.quantiles), in exact arithmetic: the sample of
    1-based rank max(1, ceil(q * n)) of ``n``, as a 0-based index."""
    return max(1, math.ceil(Fraction(str(q)) * n)) - 1


def exact_quantile(data: list[float], q: float) -> float:
    return sorted(data)[exact_index(q, len(data))]


def assert_close(sketch: QuantileSketch, data: list[float], qs: tuple[float, ...] = QS) -> None:
    for q in qs:
        exact = exact_quantile(data, q)
        got = sketch.quantile(q)
        if exact == 0.0:
            assert got == 0.0, q
        else:
            assert abs(got - exact) <= sketch.alpha * exact * (1 + 1e-9), (q, got, exact)


def test_sketch_lognormal_within_relative_error() -> None:
    rng = random.Random(20261126)
    data = [rng.lognormvariate(0.0, 1.5) for _ in range(50_000)]
    sketch = QuantileSketch()
    sketch.extend(data)
    assert not sketch.is_exact
    assert sketch.alpha <= 0.01  # the goal: within 1 %
    assert_close(sketch, data)
    assert sketch.count == len(data)
    assert sketch.min == min(data) and sketch.max == max(data)
    assert sketch.mean == pytest.approx(sum(data) / len(data))


def test_sketch_small_counts_are_exact() -> None:
    data = [0.3, 0.1, 0.2, 0.2, 5.0]
    sketch = QuantileSketch()
    sketch.extend(data)
    assert sketch.is_exact
    for q in QS:
        assert sketch.quantile(q) == exact_quantile(data, q)
    assert sketch.cdf() == [(0.1, 0.2), (0.2, 0.6), (0.3, 0.8), (5.0, 1.0)]


def test_sketch_zero_durations_and_empty() -> None:
    sketch = QuantileSketch(exact_limit=0)
    assert math.isnan(sketch.quantile(0.5)) and sketch.cdf() == []
    sketch.extend([0.0] * 90 + [1.0] * 10)
    assert sketch.quantile(0.5) == 0.0
    assert sketch.quantile(0.95) == pytest.approx(1.0, rel=sketch.alpha)
    assert sketch.cdf()[0] == (0.0, 0.9)


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_sketch_rejects_bad_samples(bad: float) -> None:
    sketch = QuantileSketch()
    with pytest.raises(ValueError, match="sample must be"):
        sketch.add(bad)
    assert sketch.count == 0


def test_sketch_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        QuantileSketch(alpha=1.0)
    with pytest.raises(ValueError, match="quantile"):
        QuantileSketch().quantile(1.5)
    with pytest.raises(ValueError, match="cannot merge"):
        QuantileSketch(alpha=0.01).merge(QuantileSketch(alpha=0.02))


samples = st.lists(
    st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e4)), min_size=1, max_size=3000
)


@settings(max_examples=100, deadline=None)
@given(data=samples)
def test_sketch_property_relative_error(data: list[float]) -> None:
    sketch = QuantileSketch(exact_limit=0)  # always the bucketed estimate
    sketch.extend(data)
    assert_close(sketch, data)
    points = sketch.cdf()
    assert points[-1][1] == 1.0
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in itertools.pairwise(points))


@settings(max_examples=100, deadline=None)
@given(left=samples, right=samples, limit=st.sampled_from([0, 5, 128]))
def test_sketch_property_merge_equals_concatenation(
    left: list[float], right: list[float], limit: int
) -> None:
    a, b, both = (QuantileSketch(exact_limit=limit) for _ in range(3))
    a.extend(left)
    b.extend(right)
    both.extend(left + right)
    a.merge(b)
    assert a.count == both.count and a.min == both.min and a.max == both.max
    for q in QS:
        assert a.quantile(q) == both.quantile(q)
    assert_close(a, left + right)


@settings(max_examples=50, deadline=None)
@given(
    exponents=st.lists(st.floats(min_value=-9, max_value=12), min_size=50, max_size=2000),
    cap=st.integers(min_value=16, max_value=256),
)
def test_sketch_property_bucket_cap_keeps_the_tail(exponents: list[float], cap: int) -> None:
    """Whatever the spread, at most ``max_buckets`` are kept; high quantiles stay exact
    to alpha (collapsing only ever merges the lowest buckets)."""
    data = [10.0**e for e in exponents]
    sketch = QuantileSketch(max_buckets=cap, exact_limit=0)
    sketch.extend(data)
    assert sketch.bucket_count <= cap
    ordered = sorted(data)
    # quantiles whose rank lies in the top `cap - 1` distinct buckets are untouched
    for q in (0.99, 1.0):
        rank = exact_index(q, len(data))
        above = {
            math.ceil(math.log(v) / math.log((1 + sketch.alpha) / (1 - sketch.alpha)))
            for v in ordered[rank:]
        }
        if len(above) < cap - 1:
            assert sketch.quantile(q) == pytest.approx(ordered[rank], rel=sketch.alpha)


def test_sketch_ten_million_samples_under_one_megabyte() -> None:
    """Every bucket from 1 µs to 1 h populated, then doubled by self-merges to >10M
    samples: memory stays < 1 MB and quantiles stay within alpha."""
    sketch = QuantileSketch(exact_limit=0)
    gamma = (1 + sketch.alpha) / (1 - sketch.alpha)
    value = 1e-6
    data = []
    while value < 3600.0:
        data.append(value)
        value *= gamma
    sketch.extend(data)
    while sketch.count < 10_000_000:
        copy = QuantileSketch(exact_limit=0)
        copy.merge(sketch)
        sketch.merge(copy)
    assert sketch.count >= 10_000_000
    assert sketch.bucket_count <= len(data) + 1
    assert sketch.memory_bytes() < 1_000_000
    copies = sketch.count // len(data)  # the data, each value repeated `copies` times
    for q in QS:
        exact = data[exact_index(q, sketch.count) // copies]
        assert sketch.quantile(q) == pytest.approx(exact, rel=sketch.alpha)


def test_sketch_full_sketch_under_one_megabyte() -> None:
    """The worst case: more distinct buckets than the cap, each counted ~10M/4096 times."""
    sketch = QuantileSketch(exact_limit=0)
    gamma = (1 + sketch.alpha) / (1 - sketch.alpha)
    sketch.extend(1e-6 * gamma**k for k in range(sketch.max_buckets + 100))
    while sketch.count < 10_000_000:
        copy = QuantileSketch(exact_limit=0)
        copy.merge(sketch)
        sketch.merge(copy)
    assert sketch.bucket_count == sketch.max_buckets
    assert sketch.memory_bytes() < 1_000_000
