"""Property-based: FifoLimiter under random arrivals, holds and cancellations against a
sequential model of a first-come, first-served queue."""

from __future__ import annotations

import heapq

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtual_clock import run_virtual

from engine.scheduling.limits import FifoLimiter

# A client arrives at an even time 2k, holds a granted token for an odd time (releases
# fall on odd times), and may give up waiting at a time ending in .5: no two events tie.
Client = tuple[int, int, float | None]  # (arrival, hold, give up at; None: never)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, list[Client]]:
    total = draw(st.integers(1, 4))
    n = draw(st.integers(1, 25))
    arrivals = sorted(draw(st.sets(st.integers(0, 40), min_size=n, max_size=n)))
    clients = []
    for k in arrivals:
        hold = 2 * draw(st.integers(0, 6)) + 1
        patience = draw(st.one_of(st.none(), st.integers(0, 12)))
        clients.append((2 * k, hold, None if patience is None else 2 * k + patience + 0.5))
    return total, clients


def model(total: int, clients: list[Client]) -> dict[int, float | None]:
    """Grant time of each client (None: gave up first), by a sequential simulation."""
    events: list[tuple[float, int, int]] = []  # (time, kind 0 release / 1 give up / 2 arrive, i)
    for i, (arrive, _, give_up) in enumerate(clients):
        heapq.heappush(events, (arrive, 2, i))
        if give_up is not None:
            heapq.heappush(events, (give_up, 1, i))
    free, queue, granted = total, [], {}
    while events:
        t, kind, i = heapq.heappop(events)
        if kind == 2:
            queue.append(i)
        elif kind == 1:
            if i in queue:
                queue.remove(i)
                granted[i] = None
            continue
        else:
            free += 1
        while free and queue:
            j = queue.pop(0)
            free -= 1
            granted[j] = t
            heapq.heappush(events, (t + clients[j][1], 0, j))
    return granted


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@settings(max_examples=200, deadline=None)
@given(schedules())
def test_fifo_limiter_matches_a_sequential_queue(
    backend: str, schedule: tuple[int, list[Client]]
) -> None:
    total, clients = schedule
    limiter = FifoLimiter(total)

    async def main() -> tuple[dict[int, float | None], int]:
        granted: dict[int, float | None] = {}
        held = peak = 0

        async def client(i: int) -> None:
            nonlocal held, peak
            arrive, hold, give_up = clients[i]
            await anyio.sleep_until(arrive)
            with anyio.CancelScope(deadline=give_up if give_up is not None else float("inf")):
                await limiter.acquire()
                granted[i] = anyio.current_time()
            if i not in granted:
                granted[i] = None
                return
            held += 1
            peak = max(peak, held)
            await anyio.sleep(hold)
            held -= 1
            limiter.release()

        async with anyio.create_task_group() as tg:
            for i in range(len(clients)):
                tg.start_soon(client, i)
        assert (limiter.borrowed, limiter.waiting) == (0, 0)
        return granted, peak

    granted, peak = run_virtual(backend, main)
    assert peak <= total
    assert granted == model(total, clients)
