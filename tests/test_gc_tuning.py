"""The collector's young threshold while engines are open (engine/gc_tuning.py)."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.gc_tuning import young_threshold

BASE = (700, 9, 11)  # the thresholds found: the last two must survive untouched


@pytest.fixture(autouse=True)
def known_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(*BASE)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def test_raised_while_open_and_put_back_after() -> None:
    with young_threshold(50_000):
        assert gc.get_threshold() == (50_000, 9, 11)
    assert gc.get_threshold() == BASE


def test_the_highest_asked_of_the_open_holders_applies() -> None:
    low, high = young_threshold(5_000), young_threshold(20_000)
    low.__enter__()
    high.__enter__()
    assert gc.get_threshold()[0] == 20_000
    high.__exit__(None, None, None)  # overlapping, not nested: the high one leaves first
    assert gc.get_threshold()[0] == 5_000
    low.__exit__(None, None, None)
    assert gc.get_threshold() == BASE


def test_zero_leaves_the_collector_alone() -> None:
    with young_threshold(0):
        assert gc.get_threshold() == BASE
        assert gc.isenabled()
    assert gc.get_threshold() == BASE


def test_put_back_when_the_block_raises() -> None:
    with pytest.raises(RuntimeError), young_threshold(30_000):
        raise RuntimeError("boom")
    assert gc.get_threshold() == BASE


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([1_000, 5_000, 50_000])), max_size=40))
def test_holders_opened_and_closed_in_any_order_match_a_model(
    steps: list[tuple[bool, int]],
) -> None:
    """Random opens and closes (a close takes the oldest open holder of that value);
    after each, the threshold is the model's: the highest open value, else the one
    found. Everything is closed at the end."""
    gc.set_threshold(*BASE)  # hypothesis reruns inside one fixture
    model: Counter[int] = Counter()
    open_: dict[int, list[contextlib.AbstractContextManager[None]]] = {}
    try:
        for opening, value in steps:
            if opening:
                holder = young_threshold(value)
                holder.__enter__()
                open_.setdefault(value, []).append(holder)
                model[value] += 1
            elif open_.get(value):
                open_[value].pop(0).__exit__(None, None, None)
                model[value] -= 1
            expected = max((v for v, n in model.items() if n), default=BASE[0])
            assert gc.get_threshold() == (expected, *BASE[1:])
    finally:
        for holders in open_.values():
            for holder in holders:
                holder.__exit__(None, None, None)
    assert gc.get_threshold() == BASE


def test_threads_opening_and_closing_at_once_leave_the_thresholds_found() -> None:
    start = threading.Barrier(4)
    seen: list[int] = []

    def churn(value: int) -> None:
        start.wait()
        for _ in range(2_000):
            with young_threshold(value):
                seen.append(gc.get_threshold()[0])

    threads = [threading.Thread(target=churn, args=(v,)) for v in (1_000, 2_000, 3_000, 4_000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert gc.get_threshold() == BASE
    # inside a holder the threshold is always one that an open holder asked for
    assert set(seen) <= {1_000, 2_000, 3_000, 4_000}
