"""The asyncio virtual clock (tests/virtual_clock.py) behaves like trio's autojump MockClock.

Every test runs on trio (MockClock) and on asyncio (VirtualTimeLoop), with the same assertions.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import anyio
import pytest
from virtual_clock import VirtualTimeLoop

pytestmark = [pytest.mark.anyio, pytest.mark.virtual_clock]


async def test_a_long_sleep_takes_exactly_its_virtual_time(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    if anyio_backend[0] == "asyncio":
        assert isinstance(asyncio.get_running_loop(), VirtualTimeLoop)
    t0 = anyio.current_time()
    await anyio.sleep(1000)
    assert anyio.current_time() - t0 == 1000
    await anyio.sleep(0.1)
    await anyio.sleep(0.2)
    assert anyio.current_time() - t0 == 1000 + 0.1 + 0.2  # each jump lands on the deadline


async def test_timers_fire_in_deadline_order_at_their_times() -> None:
    t0 = anyio.current_time()
    fired: list[tuple[str, float]] = []

    async def sleeper(name: str, delay: float) -> None:
        await anyio.sleep(delay)
        fired.append((name, anyio.current_time() - t0))

    async with anyio.create_task_group() as tg:
        for name, delay in [("c", 30.0), ("a", 0.5), ("d", 3600.0 * 48), ("b", 2.0)]:
            tg.start_soon(sleeper, name, delay)
    assert fired == [("a", 0.5), ("b", 2.0), ("c", 30.0), ("d", 3600.0 * 48)]


async def test_fail_after_fires_at_the_exact_virtual_deadline() -> None:
    t0 = anyio.current_time()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(7.25):
            await anyio.sleep(100)
    assert anyio.current_time() - t0 == 7.25


async def test_a_cancelled_timer_does_not_move_the_clock() -> None:
    t0 = anyio.current_time()
    with anyio.move_on_after(1):
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.sleep, 500)  # cancelled at 1: its timer must not be jumped to
            await anyio.sleep(5)
    assert anyio.current_time() - t0 == 1
    await anyio.sleep(2)
    assert anyio.current_time() - t0 == 3


async def test_ready_io_is_served_before_any_jump() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.send(b"x")
        t0 = anyio.current_time()
        with anyio.fail_after(1000):  # a pending timer: the loop must poll the socket first
            await anyio.wait_readable(a)
        assert a.recv(1) == b"x"
        assert anyio.current_time() == t0
