"""Race hammering of LazyLoadManager: ensure_loaded / load_background / cancel / evict /
failures / leaving the ``async with``, interleaved at random under virtual time.

Checked: nobody hangs (``fail_after``), nobody is cancelled who was not, nobody sees
a half-loaded section, ``ensure_loaded`` returns only with every section loaded
(unless evicted meanwhile), a failure is a ``LoadError`` naming a section whose load
failed during the call, the limiter bound holds, a section is not loaded twice
without a reason (eviction, failure, cancellation), and exit leaves nothing running.
Runs on trio (MockClock) and asyncio (virtual-time loop).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtual_clock import run_virtual

from engine.content.cache import ModuleCache
from engine.content.lazy import LazyLoadManager
from engine.errors import LoadError

from .test_lazy import FakeModule

SECTIONS = ("a", "b", "c", "d")


@attrs.frozen
class LOp:
    kind: str  # ensure background cancel evict fail
    t: float
    sections: tuple[str, ...] = ()
    targets: tuple[int, ...] = ()


@attrs.frozen
class Scenario:
    ops: tuple[LOp, ...]
    latency: dict[str, float]
    limit: int
    exit_at: float


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, 20))
    ops: list[LOp] = []
    ensures: list[int] = []
    t = 0.0
    for i in range(n):
        t += draw(st.sampled_from([0.5, 1.0, 1.0, 2.0, 4.0]))
        kinds = ["ensure", "ensure", "background", "background", "evict", "fail"]
        if ensures:
            kinds.append("cancel")
        kind = draw(st.sampled_from(kinds))
        if kind == "ensure":
            secs = draw(st.lists(st.sampled_from(SECTIONS), min_size=1, max_size=3))
            ops.append(LOp(kind, t, tuple(secs)))
            ensures.append(i)
        elif kind == "cancel":
            targets = draw(st.lists(st.sampled_from(ensures), min_size=1, max_size=2, unique=True))
            ops.append(LOp(kind, t, targets=tuple(targets)))
        else:
            ops.append(LOp(kind, t, (draw(st.sampled_from(SECTIONS)),)))
    latency = {s: draw(st.sampled_from([0.25, 1.0, 3.0])) for s in SECTIONS}
    exit_at = draw(st.sampled_from([t / 2 + 0.125, t + 0.25, t + 10.0]))  # never an op time
    return Scenario(tuple(ops), latency, draw(st.integers(1, 3)), exit_at)


async def run_scenario(sc: Scenario) -> None:
    module = FakeModule(sections=SECTIONS)
    module.latency.update(sc.latency)
    cache = ModuleCache(max_size_mb=64, ttl_minutes=10_000)
    lazy = LazyLoadManager(module, cache, max_concurrent_loads=sc.limit)
    evicts: dict[str, list[float]] = {s: [] for s in SECTIONS}
    scopes: dict[int, anyio.CancelScope] = {}
    cancelled_ops: set[int] = set()
    outcomes: dict[int, Any] = {}
    cancels = 0

    def check_loaded(content: Any) -> None:
        assert module.is_complete(content), f"half-loaded or foreign content {content!r}"

    def check_cache() -> None:
        for s in SECTIONS:
            entry = cache._lru.get(f"module:m:{s}")
            if entry is not None:
                check_loaded(entry.value)
        assert module.max_running <= sc.limit

    async def ensure(i: int, op: LOp) -> None:
        t0 = anyio.current_time()
        with anyio.CancelScope() as scope:
            scopes[i] = scope
            try:
                got = await lazy.ensure_loaded(*op.sections)
            except LoadError as exc:
                outcomes[i] = exc
                assert exc.section in op.sections
                assert isinstance(exc.__cause__, OSError) and exc.section in str(exc.__cause__)
                assert any(t0 <= t and s == exc.section for t, s in module.failures), (
                    "LoadError without a failed load during the call"
                )
                return
            outcomes[i] = got
            now = anyio.current_time()
            assert list(got) == list(dict.fromkeys(op.sections))
            for s, content in got.items():
                check_loaded(content)
                evicted = any(t0 <= te <= now for te in evicts[s])
                assert lazy.is_loaded(s) or evicted, f"ensure_loaded returned without {s}"
        if scope.cancelled_caught:
            outcomes[i] = "cancelled"
            assert i in cancelled_ops, "cancelled though nobody cancelled it"

    async def run_op(i: int, op: LOp, tg: anyio.abc.TaskGroup) -> None:
        nonlocal cancels
        await anyio.sleep_until(op.t)
        if op.kind == "ensure":
            await ensure(i, op)
        elif op.kind == "background":
            try:
                lazy.load_background(op.sections[0])
            except RuntimeError:
                assert anyio.current_time() >= sc.exit_at
            else:
                assert anyio.current_time() < sc.exit_at
        elif op.kind == "cancel":
            cancels += len(op.targets)
            for j in op.targets:
                cancelled_ops.add(j)
                scopes[j].cancel()
        elif op.kind == "evict":
            evicts[op.sections[0]].append(anyio.current_time())
            cache.invalidate(f"module:m:{op.sections[0]}")
        elif op.kind == "fail":
            module.fail_next[op.sections[0]] += 1
        check_cache()

    with anyio.fail_after(100_000):  # nobody hangs
        async with anyio.create_task_group() as tg:
            async with lazy:
                for i, op in enumerate(sc.ops):
                    tg.start_soon(run_op, i, op, tg)
                await anyio.sleep_until(sc.exit_at)
            assert lazy.statistics().pending_background == ()  # exit cancelled the rest
    check_cache()
    assert sum(module.running.values()) == 0, "a load outlived every caller"
    assert cache._flights == {}
    calls = Counter(s for _t, s in module.calls)
    fails = Counter(s for _t, s in module.failures)
    for s in SECTIONS:
        bound = 1 + len(evicts[s]) + fails[s] + cancels + 1  # +1: a load cut by the exit
        assert calls[s] <= bound, f"{s} loaded {calls[s]} times (bound {bound}): no single flight"


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sc=scenarios())
def test_LazyLoadManager_random_interleavings_keep_their_promises(
    backend: str, sc: Scenario
) -> None:
    run_virtual(backend, run_scenario, sc)
