"""bench/bench_scale.py: the scaling goal read off repeated runs (medians, the
1-process frontier, interpolation and bounds), and its command line's checks."""

from __future__ import annotations

import argparse
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.bench_scale import (
    GOAL,
    Point,
    _count,
    _plan,
    _summary,
    frontier,
    medians,
    read_goal,
)


def point(n: int, throughput: float, p95: float, rate: float = 0.0) -> Point:
    return Point(rate, n, 1, throughput, p95)


def test_medians_group_runs_by_plan_entry_in_first_order() -> None:
    runs = [
        (120.0, 1, 90.0, 0.010),
        (240.0, 2, 180.0, 0.030),
        (120.0, 1, 88.0, 0.050),
        (240.0, 2, 179.0, 0.014),
        (120.0, 1, 89.0, 0.007),
    ]
    assert medians(runs) == [
        Point(120.0, 1, 3, 89.0, 0.010),  # throughput and p95 each their own median
        Point(240.0, 2, 2, 179.5, 0.022),
    ]


def test_the_frontier_drops_points_beaten_at_a_lower_p95() -> None:
    a = point(1, 90.0, 0.008)
    b = point(1, 135.0, 0.011)
    beaten = point(1, 130.0, 0.020)  # less throughput than b at a higher p95
    c = point(1, 180.0, 0.034)
    assert frontier([c, beaten, a, b]) == [a, b, c]


def test_the_goal_is_interpolated_between_the_frontier_points_around_the_p95() -> None:
    one = [point(1, 100.0, 0.010), point(1, 150.0, 0.020), point(1, 130.0, 0.030)]
    two = point(2, 240.0, 0.015)
    (reading,) = read_goal([*one, two])
    assert reading.bound == "="
    assert reading.one == pytest.approx(125.0)  # halfway from 100 to 150
    assert reading.ratio == pytest.approx(240.0 / 125.0)
    assert reading.met is True
    (missed,) = read_goal([*one, point(2, 200.0, 0.015)])
    assert missed.met is False  # 1.6 x


def test_outside_the_curve_the_ratio_is_a_bound() -> None:
    one = [point(1, 100.0, 0.010), point(1, 150.0, 0.020)]
    below, beyond = read_goal([*one, point(2, 180.0, 0.005), point(2, 240.0, 0.050)])
    # below every 1-process p95: 1 process does at most 100/s there
    assert (below.bound, below.one) == (">=", 100.0)
    assert below.met is True  # at least 1.8 x
    # beyond them: 1 process does at least 150/s there
    assert (beyond.bound, beyond.one) == ("<=", 150.0)
    assert beyond.met is False  # at most 1.6 x
    undecided = read_goal([*one, point(2, 150.0, 0.005), point(2, 300.0, 0.050)])
    assert [r.met for r in undecided] == [None, None]  # >= 1.5 x, <= 2 x


def test_no_reading_without_both_curves() -> None:
    assert read_goal([point(2, 180.0, 0.010)]) == []
    assert read_goal([point(1, 90.0, 0.010)]) == []
    lines = _summary([Point(120.0, 1, 2, 90.0, 0.0105)])
    assert lines == [
        "medians:",
        "  120/s offered, 1 process (2 runs): 90.0 actions/s, overhead p95 10.50 ms",
    ]


def test_the_summary_says_the_verdict_of_each_point() -> None:
    points = [Point(120.0, 1, 3, 100.0, 0.010), Point(180.0, 1, 3, 150.0, 0.020)]
    points += [Point(240.0, 2, 3, 250.0, 0.015), Point(360.0, 2, 3, 240.0, 0.030)]
    lines = _summary(points)
    assert lines[-3] == f"goal: 2 processes >= {GOAL:g} x 1 process at the same overhead p95"
    assert lines[-2].endswith("1 process 125.0/s (interpolated): ratio = 2.00: met")
    assert lines[-1].endswith(
        "1 process 150.0/s (beyond the 1-process curve: its highest point): ratio <= 1.60: missed"
    )


finite = st.floats(min_value=1.0, max_value=1000.0, allow_nan=False)
p95s = st.floats(min_value=0.001, max_value=1.0, allow_nan=False)


@given(st.lists(st.tuples(finite, p95s), min_size=1, max_size=12), finite, p95s)
def test_the_reading_matches_the_best_one_process_run_around_it(
    ones: list[tuple[float, float]], two_throughput: float, two_p95: float
) -> None:
    """Against a model: the frontier is increasing in both; the 1-process throughput
    read at a p95 lies between the best throughput of the runs at a p95 no higher and
    the best of all runs (the frontier's next point), and equals the former at a
    frontier point's own p95."""
    points = [point(1, t, p) for t, p in ones]
    curve = frontier(points)
    assert all(a.p95 < b.p95 and a.throughput < b.throughput for a, b in itertools.pairwise(curve))
    for p in points:  # every run is on or under the frontier
        assert any(f.p95 <= p.p95 and f.throughput >= p.throughput for f in curve)
    (reading,) = read_goal([*points, point(2, two_throughput, two_p95)])
    at_or_below = [p.throughput for p in points if p.p95 <= two_p95]
    if not at_or_below:
        assert reading.bound == ">=" and reading.one == curve[0].throughput
    elif two_p95 >= curve[-1].p95:
        assert reading.bound == "<=" and reading.one == max(t for t, _ in ones)
    else:
        assert reading.bound == "="
        above = min(p.throughput for p in curve if p.p95 > two_p95)
        assert max(at_or_below) <= reading.one + 1e-9
        assert reading.one <= above + 1e-9
        if any(f.p95 == two_p95 for f in curve):
            assert reading.one == pytest.approx(max(at_or_below))


def test_the_command_line_refuses_bad_plans_and_counts() -> None:
    assert _plan("120:1,240:2") == [(120.0, 1), (240.0, 2)]
    for bad in ("120", "x:1", "0:1", "120:0", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=r"RATE:N|rates must"):
            _plan(bad)
    assert _count("3") == 3
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=r"whole number >= 1"):
            _count(bad)
