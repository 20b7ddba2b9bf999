"""One percentile convention (nearest rank, engine/quantiles.py), and every exact
percentile of the engine uses it: the benchmark summaries, the load-test figures,
the hedge delay of ``"p95"`` agents and the quantile sketch in its exact mode."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from engine.benchmark.load import Figures
from engine.benchmark.strategies import summarize
from engine.observability.sketch import QuantileSketch
from engine.quantiles import nearest_rank, percentile, quantile
from engine.scheduling.hedging import HedgePolicy


def test_nearest_rank_matches_exact_arithmetic() -> None:
    """ceil(q * n) in floating point would be off where q * n is an integer that the
    float product misses (0.07 * 100 = 7.000000000000001): compare with fractions."""
    for k in range(1001):
        q = k / 1000
        exact_q = Fraction(k, 1000)
        for n in (*range(1, 260), 999, 1000, 1001, 10_000, 123_457):
            expected = max(1, math.ceil(exact_q * n)) - 1
            assert nearest_rank(q, n) == expected, (q, n)


def test_the_convention_on_small_sets() -> None:
    hundred = [float(i) for i in range(1, 101)]
    assert [percentile(hundred, p) for p in (0, 1, 50, 95, 99, 100)] == [1, 1, 50, 95, 99, 100]
    ten = [float(i) for i in range(1, 11)]
    # nearest rank: p50 of 10 is the 5th, p95 and p99 the largest (no interpolation)
    assert [quantile(ten, q) for q in (0.5, 0.9, 0.95, 0.99)] == [5, 9, 10, 10]
    assert quantile([], 0.5) == 0.0 and quantile([3.0], 0.99) == 3.0


@pytest.mark.parametrize("q", [-0.1, 1.1, math.nan])
def test_out_of_range_quantile_is_refused(q: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        nearest_rank(q, 5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        quantile([], q)


def test_no_samples_has_no_rank() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        nearest_rank(0.5, 0)


@pytest.mark.parametrize("n", [16, 32, 48, 64, 80, 96, 112, 128])
def test_every_exact_percentile_agrees(n: int) -> None:
    """The same samples through each consumer give the same p50/p95/p99."""
    samples = [float((i * 37) % n + 1) / 8 for i in range(n)]  # 1/8 .. n/8, shuffled
    ordered = sorted(samples)
    expected = {p: ordered[nearest_rank(p / 100, n)] for p in (50, 95, 99)}

    p50, p95, p99, _mean = summarize(samples)
    assert {50: p50, 95: p95, 99: p99} == expected

    figures = Figures.of(samples)
    assert {50: figures.p50, 95: figures.p95, 99: figures.p99} == expected

    sketch = QuantileSketch()  # exact up to 128 samples
    sketch.extend(samples)
    assert sketch.is_exact
    assert {p: sketch.quantile(p / 100) for p in (50, 95, 99)} == expected

    # the hedge delay of a "p95" agent: its running p95 (refreshed every 16 samples)
    policy = HedgePolicy(hedge_after={"a": "p95"}, min_samples=1)
    for seconds in samples:
        policy.observe("a", seconds)
    assert policy.delay_for("a") == expected[95]
