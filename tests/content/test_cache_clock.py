"""The cache's TTL runs on the running event loop's clock (what ``anyio.current_time()``
returns), found through sniffio and the loop's public API, also when one cache is
used from trio, then asyncio, then trio again in the same thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import anyio
import pytest
import trio.testing

from engine.content.cache import ModuleCache


class _ShiftedLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose clock a test moves forward (``shift``)."""

    shift = 0.0

    def time(self) -> float:
        return super().time() + self.shift


def _trio_run(cache: ModuleCache, key: str) -> None:
    async def main() -> None:
        cache.put(key, "v", size=1)
        await trio.sleep(59.9)  # virtual seconds: the MockClock jumps
        assert cache.get(key) == "v"
        assert anyio.current_time() == pytest.approx(59.9)
        await trio.sleep(0.2)
        assert cache.get(key) is None  # 60 s after the put, on trio's clock

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def _asyncio_run(cache: ModuleCache, key: str) -> None:
    loop = _ShiftedLoop()

    async def main() -> None:
        cache.put(key, "v", size=1)
        loop.shift += 59.0
        assert cache.get(key) == "v"
        loop.shift += 2.0
        assert cache.get(key) is None  # 61 s later on this loop's clock, ~0 s real

    anyio.run(main, backend="asyncio", backend_options={"loop_factory": lambda: loop})


def test_ttl_follows_the_running_loop_across_backends() -> None:
    cache = ModuleCache(ttl_minutes=1)
    _trio_run(cache, "first trio")
    _asyncio_run(cache, "asyncio")
    _trio_run(cache, "second trio")
    _asyncio_run(cache, "asyncio again")
    assert cache.statistics().expirations == 4


def _get_in_a_thread(cache: ModuleCache, key: str) -> list[RuntimeError]:
    """``cache.get(key)`` from a new thread (no event loop there): what it raised."""
    errors: list[RuntimeError] = []

    def in_thread() -> None:
        try:
            cache.get(key)
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    return errors


def test_a_thread_without_a_loop_gets_the_explanatory_error() -> None:
    cache = ModuleCache()
    errors: list[BaseException] = []

    async def main() -> None:
        cache.put("k", "v", size=1)  # the trio clock is the one in use now

        errors.extend(_get_in_a_thread(cache, "k"))
        assert cache.get("k") == "v"  # and the loop's own thread still reads it

    trio.run(main)
    (error,) = errors
    assert "ModuleCache needs a running event loop (trio or asyncio)" in str(error)


def test_a_stdlib_loop_is_read_through_time_monotonic(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a stdlib loop (``time()`` not overridden) a hit reads ``time.monotonic()``
    without finding the loop; the TTL still expires on it, and a trio run in between
    and a thread outside the loop still get their own clock and the explanatory error."""
    import engine.content.cache as cache_module

    cache = ModuleCache(ttl_minutes=1)
    jump = [0.0]
    monkeypatch.setattr(cache_module, "monotonic", lambda: asyncio_now[0]() + jump[0])
    asyncio_now: list[Callable[[], float]] = []
    errors: list[BaseException] = []

    async def main() -> None:
        asyncio_now[:] = [asyncio.get_running_loop().time]
        jump[0] = 0.0
        cache.put("k", "v", size=1)
        assert cache.get("k") == "v"  # also notes this loop as a monotonic one
        jump[0] = 59.0
        assert cache.get("k") == "v"
        jump[0] = 61.0  # only get's direct read moves: the loop's own time() does not
        assert cache.get("k") is None

        errors.extend(_get_in_a_thread(cache, "k"))

    asyncio.run(main())
    _trio_run(cache, "trio between")
    asyncio.run(main())  # a second stdlib loop takes the first one's place
    assert cache.statistics().expirations == 3
    assert len(errors) == 2
    assert all("needs a running event loop" in str(e) for e in errors)
