"""Race hammering of ModuleCache: random concurrent schedules vs a sequential model.

Each example draws a schedule of operations at distinct integer virtual times
(get, put, get_or_load with slow/failing loaders, invalidate, invalidate_pattern,
clear, cancellation of several loads at once, gaps longer than the TTL). Loaders
finish at unique fractional times, so the run is a well-defined sequence of
events, which a plain sequential model replays. Every observable result, every
loader call and the final state and stats must match; invariants are checked
after every operation. The same schedule runs on trio (MockClock) and on asyncio
(tests/virtual_clock.py's virtual-time event loop).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtual_clock import run_virtual

from engine.content.cache import ModuleCache, estimate_size

BUDGET = 200  # bytes
TTL = 7.5  # seconds (dyadic: every time in these tests is exact in binary floating point)
KEYS = ("module:m:a", "module:m:b", "module:x:c")
PATTERN = "module:m:*"


# --------------------------------------------------------------------------- schedule


@attrs.frozen
class Op:
    kind: str  # get put load invalidate pattern clear cancel
    t: float
    key: str = ""
    value: str = ""
    size: int = 0
    dur: float = 0.0
    fail: bool = False
    targets: tuple[int, ...] = ()


class Boom(Exception):
    def __init__(self, idx: int) -> None:
        super().__init__(idx)
        self.idx = idx


@st.composite
def schedules(draw: st.DrawFn) -> list[Op]:
    n = draw(st.integers(1, 24))
    ops: list[Op] = []
    t = 0.0
    loads: list[int] = []
    for i in range(n):
        t += draw(st.sampled_from([1.0, 1.0, 2.0, 3.0, 8.0]))
        kinds = ["get", "put", "load", "load", "load", "invalidate", "pattern", "clear"]
        if loads:
            kinds += ["cancel", "cancel"]
        kind = draw(st.sampled_from(kinds))
        key = draw(st.sampled_from(KEYS))
        if kind == "put":
            size = draw(st.sampled_from([0, 40, 50, 90, 100, 150, BUDGET, BUDGET + 1]))
            ops.append(Op("put", t, key, value=f"P{i}", size=size))
        elif kind == "load":
            k = draw(st.integers(0, 4))
            dur = k + 0.5 + i / 64  # unique fractional finishing times
            value = f"L{i}" + "y" * draw(st.sampled_from([0, 20, 60]))
            ops.append(Op("load", t, key, value=value, dur=dur, fail=draw(st.booleans())))
            loads.append(i)
        elif kind == "cancel":
            targets = draw(st.lists(st.sampled_from(loads), min_size=1, max_size=3, unique=True))
            ops.append(Op("cancel", t, targets=tuple(targets)))
        else:
            ops.append(Op(kind, t, key))
    return ops


# --------------------------------------------------------------------------- the real run


async def run_real(
    ops: list[Op],
) -> tuple[dict[int, Any], list[tuple[float, int]], ModuleCache, list[Any]]:
    cache = ModuleCache(max_size_mb=BUDGET / 2**20, ttl_minutes=TTL / 60)
    outcomes: dict[int, Any] = {}
    calls: list[tuple[float, int]] = []
    scopes: dict[int, anyio.CancelScope] = {}
    lookups = 0
    final: list[Any] = []

    def check_invariants() -> None:
        stats = cache.statistics()  # sweeps expired entries first
        now = anyio.current_time()
        assert stats.size_bytes <= stats.max_size_bytes == BUDGET
        assert stats.size_bytes == sum(e.size for e in cache._lru.values())
        assert set(cache._lru) == set(cache._by_expiry)
        assert all(e.expires > now for e in cache._lru.values()), "expired entry kept"
        assert stats.hits + stats.misses == lookups
        assert stats.coalesced <= stats.misses and stats.load_errors <= stats.loads
        assert stats.entries == len(cache._lru)

    async def run_op(i: int, op: Op) -> None:
        nonlocal lookups
        await anyio.sleep_until(op.t)
        if op.kind == "get":
            lookups += 1
            outcomes[i] = cache.get(op.key)
        elif op.kind == "put":
            outcomes[i] = cache.put(op.key, op.value, op.size)
        elif op.kind == "invalidate":
            outcomes[i] = cache.invalidate(op.key)
        elif op.kind == "pattern":
            outcomes[i] = cache.invalidate_pattern(PATTERN)
        elif op.kind == "clear":
            cache.clear()
        elif op.kind == "cancel":
            for j in op.targets:
                scopes[j].cancel()
        elif op.kind == "load":

            async def loader() -> str:
                calls.append((anyio.current_time(), i))
                await anyio.sleep(op.dur)
                if op.fail:
                    raise Boom(i)
                return op.value

            with anyio.CancelScope() as scope:
                scopes[i] = scope
                check_invariants()
                lookups += 1
                try:
                    outcomes[i] = ("value", await cache.get_or_load(op.key, loader))
                except Boom as exc:
                    outcomes[i] = ("error", exc.idx)
                check_invariants()
            if scope.cancelled_caught:
                outcomes[i] = ("cancelled",)
        check_invariants()

    with anyio.fail_after(10_000):  # nobody hangs
        async with anyio.create_task_group() as tg:
            for i, op in enumerate(ops):
                tg.start_soon(run_op, i, op)
    check_invariants()
    assert not cache._flights, "a flight outlived every caller"
    final.append(anyio.current_time())
    return outcomes, calls, cache, final


# --------------------------------------------------------------------------- the model


@attrs.define(eq=False)
class MFlight:
    key: str
    runner: int
    waiters: list[int]
    stale: bool = False
    done: bool = False


@attrs.define
class Model:
    """The cache's specification, as a sequential discrete-event simulation."""

    ops: list[Op]
    entries: OrderedDict[str, tuple[Any, int, float]] = attrs.Factory(OrderedDict)
    flights: dict[str, MFlight] = attrs.Factory(dict)
    outcomes: dict[int, Any] = attrs.Factory(dict)
    calls: list[tuple[float, int]] = attrs.Factory(list)
    active: dict[int, MFlight] = attrs.Factory(dict)  # load op -> flight it waits on
    events: list[tuple[float, int, MFlight, int]] = attrs.Factory(list)
    stats: dict[str, int] = attrs.Factory(
        lambda: dict.fromkeys(
            ["hits", "misses", "evictions", "expirations", "loads", "coalesced", "load_errors"], 0
        )
    )

    def sweep(self, now: float) -> None:
        for key, (_v, _s, expires) in list(self.entries.items()):
            if expires <= now:
                del self.entries[key]
                self.stats["expirations"] += 1

    def size(self) -> int:
        return sum(s for _v, s, _e in self.entries.values())

    def store(self, key: str, value: Any, size: int, now: float) -> bool:
        self.sweep(now)
        self.entries.pop(key, None)
        if size > BUDGET:
            return False
        while self.size() + size > BUDGET:
            self.entries.popitem(last=False)
            self.stats["evictions"] += 1
        self.entries[key] = (value, size, now + TTL)
        return True

    def supersede(self, key: str) -> None:
        flight = self.flights.pop(key, None)
        if flight is not None:
            flight.stale = True

    def start_loader(self, flight: MFlight, idx: int, now: float) -> None:
        flight.runner = idx
        self.stats["loads"] += 1
        self.calls.append((now, idx))
        heapq.heappush(self.events, (now + self.ops[idx].dur, idx, flight, idx))

    def complete(self, flight: MFlight, idx: int, now: float) -> None:
        if flight.done or flight.runner != idx:
            return  # that loader was cancelled
        flight.done = True
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        op = self.ops[idx]
        if op.fail:
            self.stats["load_errors"] += 1
            result: Any = ("error", idx)
        else:
            result = ("value", op.value)
            if not flight.stale:
                self.store(flight.key, op.value, estimate_size(op.value), now)
        for j in [flight.runner, *flight.waiters]:
            self.outcomes[j] = result
            del self.active[j]

    def cancel(self, targets: tuple[int, ...], now: float) -> None:
        """Cancel several loads at one instant: all of them leave before any take-over."""
        orphaned: list[MFlight] = []
        for j in targets:
            flight = self.active.pop(j, None)
            if flight is None:
                continue  # already finished (or a hit)
            self.outcomes[j] = ("cancelled",)
            if j in flight.waiters:
                flight.waiters.remove(j)
            else:
                orphaned.append(flight)
        for flight in orphaned:
            if flight.waiters:
                self.start_loader(flight, flight.waiters.pop(0), now)
            else:
                flight.done = True
                if self.flights.get(flight.key) is flight:
                    del self.flights[flight.key]

    def apply(self, i: int, op: Op) -> None:
        now = op.t
        self.sweep(now)
        if op.kind == "get":
            if op.key in self.entries:
                self.entries.move_to_end(op.key)
                self.stats["hits"] += 1
                self.outcomes[i] = self.entries[op.key][0]
            else:
                self.stats["misses"] += 1
                self.outcomes[i] = None
        elif op.kind == "put":
            self.supersede(op.key)
            self.outcomes[i] = self.store(op.key, op.value, op.size, now)
        elif op.kind == "invalidate":
            self.supersede(op.key)
            self.outcomes[i] = self.entries.pop(op.key, None) is not None
        elif op.kind == "pattern":
            for key in [k for k in self.flights if k.startswith("module:m:")]:
                self.supersede(key)
            doomed = [k for k in self.entries if k.startswith("module:m:")]
            for key in doomed:
                del self.entries[key]
            self.outcomes[i] = len(doomed)
        elif op.kind == "clear":
            for key in list(self.flights):
                self.supersede(key)
            self.entries.clear()
        elif op.kind == "cancel":
            self.cancel(op.targets, now)
        elif op.kind == "load":
            if op.key in self.entries:
                self.entries.move_to_end(op.key)
                self.stats["hits"] += 1
                self.outcomes[i] = ("value", self.entries[op.key][0])
                return
            self.stats["misses"] += 1
            flight = self.flights.get(op.key)
            if flight is None:
                flight = self.flights[op.key] = MFlight(op.key, i, [])
                self.active[i] = flight
                self.start_loader(flight, i, now)
            else:
                self.stats["coalesced"] += 1
                flight.waiters.append(i)
                self.active[i] = flight

    def run(self, end: float) -> None:
        for i, op in enumerate(self.ops):
            while self.events and self.events[0][0] < op.t:
                t, _, flight, idx = heapq.heappop(self.events)
                self.complete(flight, idx, t)
            self.apply(i, op)
        while self.events:
            t, _, flight, idx = heapq.heappop(self.events)
            self.complete(flight, idx, t)
        self.sweep(end)


# --------------------------------------------------------------------------- the property


def check_schedule(backend: str, ops: list[Op]) -> None:
    outcomes, calls, cache, (end,) = run_virtual(backend, run_real, ops)
    model = Model(ops)
    model.run(end)
    for i, op in enumerate(ops):
        if op.kind not in ("clear", "cancel"):
            assert outcomes[i] == model.outcomes[i], f"op {i} {op}"
    assert calls == model.calls, "loader calls differ (one call per flight)"
    assert [(k, e.value) for k, e in cache._lru.items()] == [
        (k, v) for k, (v, _s, _e) in model.entries.items()
    ]
    stats = attrs.asdict(cache.statistics())
    for name, value in model.stats.items():
        assert stats[name] == value, name
    assert stats["entries"] == len(model.entries)
    assert stats["size_bytes"] == model.size()


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=schedules())
def test_ModuleCache_concurrent_schedule_matches_sequential_model(
    backend: str, ops: list[Op]
) -> None:
    check_schedule(backend, ops)


def test_ModuleCache_model_handles_takeover_after_double_cancel() -> None:
    """A pinned schedule: runner and first waiter cancelled at once, second takes over."""
    ops = [
        Op("load", 1.0, KEYS[0], value="L0", dur=4.5),
        Op("load", 2.0, KEYS[0], value="L1", dur=1.5 + 1 / 64),
        Op("load", 3.0, KEYS[0], value="L2", dur=2.5 + 2 / 64),
        Op("cancel", 4.0, targets=(0, 1)),
    ]
    for backend in ("trio", "asyncio"):
        outcomes, calls, cache, _ = run_virtual(backend, run_real, ops)
        assert outcomes[0] == outcomes[1] == ("cancelled",)
        assert outcomes[2] == ("value", "L2")
        assert calls == [(1.0, 0), (4.0, 2)]
        assert cache.statistics().coalesced == 2
