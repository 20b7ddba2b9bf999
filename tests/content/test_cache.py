"""Unit tests of ModuleCache: size budget, LRU, TTL, single flight, invalidation, stats."""

from __future__ import annotations

import sys
from typing import Any

import anyio
import attrs
import pytest

from engine.config import CacheConfig
from engine.content.cache import CacheStats, ModuleCache, estimate_size
from engine.errors import LoadError


def small(max_bytes: int, ttl: float = 60.0) -> ModuleCache:
    return ModuleCache(max_size_mb=max_bytes / 2**20, ttl_minutes=ttl / 60)


def test_ModuleCache_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="max_size_mb"):
        ModuleCache(max_size_mb=0)
    with pytest.raises(ValueError, match="ttl_minutes"):
        ModuleCache(ttl_minutes=-1)
    cache = ModuleCache.from_config(CacheConfig(max_size_mb=2, ttl_minutes=5))
    assert cache.statistics().max_size_bytes == 2 * 2**20


def test_ModuleCache_outside_an_event_loop() -> None:
    cache = ModuleCache()
    with pytest.raises(RuntimeError, match="event loop"):
        cache.get("k")
    with pytest.raises(RuntimeError, match="event loop"):
        cache.put("k", "v")
    assert cache.invalidate("k") is False
    cache.clear()
    assert cache.statistics().entries == 0


def test_statistics_is_the_name_and_get_stats_its_deprecated_alias() -> None:
    """``statistics()`` as the executor, lazy loader, session store and anyio's
    limiters say; ``get_stats()``, the name docs/api.md used, still answers."""
    cache = ModuleCache(max_size_mb=1)
    with pytest.warns(DeprecationWarning, match=r"get_stats\(\) is deprecated; use .*statistics"):
        old = cache.get_stats()
    assert old == cache.statistics()
    assert (old.entries, old.max_size_bytes) == (0, 2**20)


def test_estimate_size_is_deep_and_counts_shared_objects_once() -> None:
    text = "x" * 1000
    assert estimate_size(text) == sys.getsizeof(text)
    assert estimate_size([text]) == sys.getsizeof([text]) + sys.getsizeof(text)
    assert estimate_size([text, text]) == sys.getsizeof([text, text]) + sys.getsizeof(text)
    nested = {"a": {"b": (text,)}}
    assert estimate_size(nested) > estimate_size(text) + 100

    @attrs.frozen
    class Doc:
        body: str

    assert estimate_size(Doc(text)) >= sys.getsizeof(text)
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert estimate_size(cyclic) == sys.getsizeof(cyclic)


@pytest.mark.anyio
async def test_ModuleCache_put_get_and_lru_eviction() -> None:
    cache = small(100)
    assert cache.put("a", "A", size=40)
    assert cache.put("b", "B", size=40)
    assert cache.get("a") == "A"  # a is now most recently used
    assert cache.put("c", "C", size=40)  # evicts b, the LRU
    assert cache.get("b") is None
    assert cache.get("a") == "A" and cache.get("c") == "C"
    stats = cache.statistics()
    assert (stats.entries, stats.size_bytes, stats.evictions) == (2, 80, 1)
    assert (stats.hits, stats.misses) == (3, 1) and stats.hit_rate == 0.75


@pytest.mark.anyio
async def test_ModuleCache_refuses_values_larger_than_itself() -> None:
    cache = small(100)
    assert cache.put("a", "old", size=10)
    assert cache.put("a", "huge", size=101) is False
    assert cache.get("a") is None  # nothing stored, the old value is gone too
    assert cache.put("b", "fits", size=100)
    assert cache.statistics().size_bytes == 100
    with pytest.raises(ValueError, match="size"):
        cache.put("c", "v", size=-1)


@pytest.mark.anyio
async def test_ModuleCache_replacing_a_key_adjusts_the_size() -> None:
    cache = small(100)
    cache.put("a", "A", size=60)
    cache.put("a", "A2", size=30)
    cache.put("b", "B", size=70)
    stats = cache.statistics()
    assert (stats.entries, stats.size_bytes, stats.evictions) == (2, 100, 0)


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_ModuleCache_ttl_runs_on_the_loop_clock() -> None:
    cache = small(1000, ttl=10.0)
    cache.put("a", "A", size=1)
    await anyio.sleep(5)
    cache.put("b", "B", size=1)
    await anyio.sleep(4.5)
    assert cache.get("a") == "A"  # reads do not extend the TTL
    await anyio.sleep(0.5)  # t = 10: a expires exactly now
    assert cache.get("a") is None
    stats = cache.statistics()
    assert (stats.entries, stats.expirations) == (1, 1)
    await anyio.sleep(5)
    # b expired at t=15 and is reclaimed by any operation, not only a get of "b"
    assert cache.statistics().entries == 0
    assert cache.statistics().size_bytes == 0


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_ModuleCache_expired_entries_are_reclaimed_by_other_keys() -> None:
    cache = small(1000, ttl=1.0)
    for i in range(10):
        cache.put(f"k{i}", i, size=10)
    await anyio.sleep(2)
    cache.put("fresh", "x", size=10)
    assert len(cache) == 1 and cache.statistics().expirations == 10


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_ModuleCache_single_flight() -> None:
    cache = ModuleCache()
    calls = 0

    async def loader() -> str:
        nonlocal calls
        calls += 1
        await anyio.sleep(1)
        return "value"

    results: list[str] = []

    async def one() -> None:
        results.append(await cache.get_or_load("k", loader))

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert calls == 1 and results == ["value"] * 50
    assert anyio.current_time() == 1.0
    stats = cache.statistics()
    assert (stats.misses, stats.coalesced, stats.loads, stats.hits) == (50, 49, 1, 0)
    assert await cache.get_or_load("k", loader) == "value"
    assert cache.statistics().hits == 1


@pytest.mark.anyio
async def test_ModuleCache_failure_reaches_every_waiter_and_is_not_cached() -> None:
    cache = ModuleCache()
    calls = 0

    async def failing() -> str:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.01)
        raise OSError("disk")

    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await cache.get_or_load("k", failing)
        except OSError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(one)
    assert calls == 1 and len(errors) == 5
    assert "k" not in cache
    assert cache.statistics().load_errors == 1

    async def ok() -> str:
        return "fine"

    assert await cache.get_or_load("k", ok) == "fine"


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_ModuleCache_cancelled_loader_is_taken_over() -> None:
    cache = ModuleCache()
    started: list[tuple[str, float]] = []

    def make(name: str) -> Any:
        async def loader() -> str:
            started.append((name, anyio.current_time()))
            await anyio.sleep(2)
            return name

        return loader

    got: list[str] = []

    async def waiter() -> None:
        got.append(await cache.get_or_load("k", make("waiter")))

    async with anyio.create_task_group() as tg:
        with anyio.move_on_after(1) as scope:
            tg.start_soon(waiter)
            await cache.get_or_load("k", make("runner"))
        assert scope.cancelled_caught
    assert started == [("runner", 0.0), ("waiter", 1.0)]
    assert got == ["waiter"] and cache.get("k") == "waiter"
    assert cache.statistics().loads == 2


@pytest.mark.anyio
async def test_ModuleCache_last_caller_cancelled_leaves_no_flight() -> None:
    cache = ModuleCache()

    async def slow() -> str:
        await anyio.sleep(10)
        return "never"

    with anyio.move_on_after(0.01):
        await cache.get_or_load("k", slow)
    assert cache._flights == {} and "k" not in cache


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["invalidate", "pattern", "clear", "put"])
async def test_ModuleCache_invalidate_during_load_wins(how: str) -> None:
    cache = ModuleCache()
    gate = anyio.Event()

    async def loader() -> str:
        await gate.wait()
        return "stale"

    got: list[str] = []

    async def one() -> None:
        got.append(await cache.get_or_load("module:m:npcs", loader))

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
        await anyio.wait_all_tasks_blocked()
        if how == "invalidate":
            assert cache.invalidate("module:m:npcs") is False
        elif how == "pattern":
            assert cache.invalidate_pattern("module:m:*") == 0
        elif how == "clear":
            cache.clear()
        else:
            cache.put("module:m:npcs", "fresh")
        gate.set()
    assert got == ["stale", "stale"]  # waiters get the result ...
    assert cache.get("module:m:npcs") == ("fresh" if how == "put" else None)  # ... not stored


@pytest.mark.anyio
async def test_ModuleCache_invalidate_pattern_is_a_glob() -> None:
    cache = ModuleCache()
    for key in ["module:lmop:npcs", "module:lmop:npcs:3", "module:srd:spells", "other"]:
        cache.put(key, key)
    assert cache.invalidate_pattern("module:lmop:*") == 2
    assert cache.invalidate("other") is True and cache.invalidate("other") is False
    assert cache.get("module:srd:spells") == "module:srd:spells"


@pytest.mark.anyio
async def test_ModuleCache_clear_keeps_stats() -> None:
    cache = ModuleCache()
    cache.put("a", "A")
    cache.get("a")
    cache.get("b")
    cache.clear()
    stats = cache.statistics()
    assert isinstance(stats, CacheStats)
    assert (stats.hits, stats.misses, stats.entries, stats.size_bytes) == (1, 1, 0, 0)


class Module:
    name = "m"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running = 0
        self.max_running = 0

    def section_names(self) -> list[str]:
        return ["a", "b", "c", "d", "e"]

    async def load_section(self, name: str) -> str:
        if name == "bad":
            raise OSError("no such section")
        self.started.append(name)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await anyio.sleep(0.01)
        finally:
            self.running -= 1
        return name.upper()


@pytest.mark.anyio
async def test_ModuleCache_preload_in_priority_order_under_a_limit() -> None:
    cache = ModuleCache()
    module = Module()
    cache.put("module:m:c", "cached")
    loaded = await cache.preload(module, ["e", "module:m:d", "c", "a", "b"], max_concurrent=2)
    assert loaded == 4
    assert module.started == ["e", "d", "a", "b"]  # priority order, c skipped
    assert module.max_running == 2
    assert cache.get("module:m:d") == "D" and cache.get("module:m:c") == "cached"
    assert await cache.preload(module, ["a", "b"]) == 0


@pytest.mark.anyio
async def test_ModuleCache_preload_reports_failures_after_loading_the_rest() -> None:
    cache = ModuleCache()
    module = Module()
    with pytest.raises(LoadError) as info:
        await cache.preload(module, ["a", "bad", "b"])
    assert info.value.section == "bad" and isinstance(info.value.__cause__, OSError)
    assert "module:m:a" in cache and "module:m:b" in cache
