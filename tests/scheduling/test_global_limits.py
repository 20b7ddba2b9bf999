"""RedisLimiter against a real redis-server (tests/servers.py), on trio and asyncio.

The server is real, so these tests run on the real clock (no MockClock); time bounds
come from Redis's own clock (the scripts' ``TIME``) where they matter, and every
test stays within a few seconds (leases of about a second).
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import coredis
import crashkit
import pytest
import servers

from engine.errors import EngineError
from engine.scheduling import global_limits
from engine.scheduling.global_limits import (
    GlobalLimitError,
    GlobalLimitUnavailable,
    Lease,
    RedisLimiter,
    scrub_url,
)

pytestmark = pytest.mark.anyio

#: The session's redis-server fixture. Drop this line once tests/conftest.py imports it
#: (``from servers import redis_url``), or this module gets a server of its own.


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both backends on their real clocks (the conftest's MockClock cannot drive Redis)."""
    return str(request.param)


def fresh_name() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def redis_now(client: coredis.Redis[bytes]) -> float:
    """Redis's clock (coredis 6.9's ``time()`` divides the microseconds by 1000)."""
    seconds, micros = await client.register_script("return redis.call('TIME')")()
    return int(seconds) + int(micros) / 1e6


def kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=10)


# ---------------------------------------------------------------------- basics


async def test_slot_holds_one_lease_and_releases_it(redis_url: str) -> None:
    async with RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=2) as limiter:
        assert await limiter.held_globally() == 0
        async with limiter.slot() as lease:
            assert isinstance(lease, Lease) and lease.id is not None
            assert lease.admitted_at == pytest.approx(time.time(), abs=5.0)  # Redis's clock
            assert await limiter.held_globally() == 1
            assert limiter.statistics().held == 1
        assert await limiter.held_globally() == 0
        stats = limiter.statistics()
        assert (stats.held, stats.acquired, stats.waited, stats.errors) == (0, 1, 0, 0)


async def test_leaving_a_slot_does_not_wait_for_redis(redis_url: str) -> None:
    """The release is sent and the caller goes on: no round trip, not even a
    schedule point. The limiter's own next call sees the slot free (Redis runs a
    connection's commands in order), and so does anyone once Redis has read it."""
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async with coredis.Redis.from_url(redis_url) as probe:
        async with RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=1) as limiter:
            async with anyio.create_task_group() as tg:
                async with limiter.slot():
                    tg.start_soon(other)
                ran.append("left the slot")
            assert ran == ["left the slot", "other"]
            assert limiter.statistics().held == 0
            assert await limiter.held_globally() == 0
            assert await probe.zcard(limiter._keys[0]) == 0
            async with limiter.slot():
                pass
            # once the limiter is closed, no lease it held is left behind
        assert await probe.zcard(limiter._keys[0]) == 0


async def test_scripts_flushed_from_redis_are_loaded_again(redis_url: str) -> None:
    """Admission runs by EVALSHA; a restarted or flushed Redis lacks the script, and
    it is loaded again (once) instead of failing. A release sends its script's text."""
    async with (
        coredis.Redis.from_url(redis_url) as probe,
        RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=1) as limiter,
    ):
        async with limiter.slot():
            await probe.script_flush()
        assert await limiter.held_globally() == 0  # the release ran all the same
        await probe.script_flush()
        async with limiter.slot():  # the admission reloads its script
            assert await limiter.held_globally() == 1
        assert await limiter.held_globally() == 0
        stats = limiter.statistics()
        assert (stats.acquired, stats.errors) == (2, 0)


async def test_a_dropped_connection_is_replaced(redis_url: str) -> None:
    """The limiter reuses one connection for its calls; when Redis drops it (here
    ``CLIENT KILL``, as on a Redis restart or an idle timeout) the next call takes a new
    one from the pool."""
    async with (
        coredis.Redis.from_url(redis_url) as probe,
        RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=1) as limiter,
    ):
        async with limiter.slot():
            pass
        killed = await probe.client_kill(type_=coredis.PureToken.NORMAL, skipme=True)
        assert killed
        await anyio.sleep(0.1)  # the limiter's reader sees the connection closed
        for _ in range(3):
            async with limiter.slot():
                assert await limiter.held_globally() == 1
        assert await limiter.held_globally() == 0
        assert limiter.statistics().errors == 0


async def _contend(limiters: list[RedisLimiter], tasks: int, rounds: int) -> tuple[int, int]:
    """``tasks`` workers per limiter, each holding a slot ``rounds`` times: the most
    holders at once (counted here) and the most leases Redis counted meanwhile."""
    inside = peak = 0
    seen_globally: list[int] = []

    async def worker(limiter: RedisLimiter) -> None:
        nonlocal inside, peak
        for _ in range(rounds):
            async with limiter.slot():
                inside += 1
                peak = max(peak, inside)
                seen_globally.append(await limiter.held_globally())
                await anyio.sleep(0.01)
                inside -= 1

    async with anyio.create_task_group() as tg:
        for limiter in limiters:
            for _ in range(tasks):
                tg.start_soon(worker, limiter)
    return peak, max(seen_globally)


async def test_never_more_than_n_holders_across_limiters(redis_url: str) -> None:
    """Four limiters (four clients, as four processes would have) and 4x N contenders."""
    name, n, rounds = fresh_name(), 3, 6

    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=n) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=n) as b,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=n) as c,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=n) as d,
    ):
        limiters = [a, b, c, d]
        peak, most_leases = await _contend(limiters, n, rounds)  # 4n contenders, n slots
        assert peak == n
        assert most_leases <= n
        assert sum(x.statistics().acquired for x in limiters) == 4 * n * rounds
        assert sum(x.statistics().waited for x in limiters) > 0
        # each count runs after its own limiter's releases (one connection, in order):
        # once every limiter has answered, all of them have reached Redis
        counts = [await x.held_globally() for x in limiters]
        assert counts[-1] == 0


async def _until(condition: Callable[[], bool]) -> None:
    """Poll (real time, bounded) until ``condition()`` holds."""
    for _ in range(2000):
        if condition():
            return
        await anyio.sleep(0.005)
    pytest.fail("the condition never held")  # pragma: no cover


async def test_callers_finding_nobody_waiting_ask_redis_at_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With slots free, concurrent callers of one process are admitted together (their
    admissions in flight at once), not one round trip after another."""
    original = RedisLimiter._try_admit
    in_flight = most = 0

    async def counted(self: RedisLimiter, *args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await original(self, *args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(RedisLimiter, "_try_admit", counted)
    async with RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=10) as limiter:
        entered = anyio.Event()
        inside = 0

        async def hold() -> None:
            nonlocal inside
            async with limiter.slot():
                inside += 1
                if inside == 10:
                    entered.set()
                await entered.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(hold)
        stats = limiter.statistics()
        assert (most, stats.acquired, stats.waited) == (10, 10, 0)


async def test_a_refused_newcomer_takes_no_place_in_the_queue_of_heads(redis_url: str) -> None:
    """Callers refused at once wait in their process's queue, whose head alone holds a
    place in Redis's queue of heads; then they are served in turn."""
    name = fresh_name()
    queue_key = f"dm-engine:limits:{{{name}}}:queue"
    async with (
        coredis.Redis.from_url(redis_url) as probe,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=2) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=2) as b,
    ):
        release = anyio.Event()
        served = 0

        async def hold(limiter: RedisLimiter, until: anyio.Event | None) -> None:
            nonlocal served
            async with limiter.slot():
                served += 1
                if until is not None:
                    await until.wait()

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(hold, a, release)
            await _until(lambda: a.statistics().held == 2)
            for _ in range(5):
                tg.start_soon(hold, b, None)
            await _until(lambda: b.statistics().full >= 5)  # each was refused at least once
            assert await probe.zcard(queue_key) == 1  # b's head only
            release.set()
        assert served == 7
        assert await probe.zcard(queue_key) == 0


CHILD_LOAD = """
import sys, trio, coredis
from engine.scheduling.global_limits import RedisLimiter

async def main(url, name, processes, tasks, rounds):
    peak = 0
    inside, ready = f"{name}:inside", f"{name}:ready"
    async with coredis.Redis.from_url(url) as probe, RedisLimiter.connect(
        url, name=name, max_concurrent=2
    ) as limiter:
        await probe.incr(ready)
        while int(await probe.get(ready)) < processes:  # start together
            await trio.sleep(0.005)

        async def worker():
            nonlocal peak
            for _ in range(rounds):
                async with limiter.slot():
                    peak = max(peak, await probe.incr(inside))
                    await trio.sleep(0.01)
                    await probe.decr(inside)

        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker)
    print("peak", peak, limiter.statistics().acquired, flush=True)

trio.run(main, sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))
"""


def test_never_more_than_n_holders_across_processes(redis_url: str) -> None:
    """Three real processes, four tasks each, N = 2; holders count themselves in Redis."""
    name, processes, tasks, rounds = fresh_name(), 3, 4, 8
    args = (redis_url, name, str(processes), str(tasks), str(rounds))
    children = [crashkit.spawn(CHILD_LOAD, *args) for _ in range(processes)]
    try:
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            kill(child)
    peaks = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        _, peak, acquired = out.split()
        assert int(acquired) == tasks * rounds
        peaks.append(int(peak))
    assert max(peaks) == 2, peaks  # never 3 holders at once, across the processes


# ---------------------------------------------------------------------- leases


CHILD_HOLD = """
import sys, trio
from engine.scheduling.global_limits import RedisLimiter

async def main(url, name):
    async with RedisLimiter.connect(url, name=name, max_concurrent=1, lease_seconds=1.0) as limiter:
        async with limiter.slot() as lease:
            print("held", lease.id, flush=True)
            await trio.sleep(60)

trio.run(main, sys.argv[1], sys.argv[2])
"""


async def test_a_killed_holders_slot_frees_itself_after_the_lease(redis_url: str) -> None:
    name = fresh_name()
    child = crashkit.spawn(CHILD_HOLD, redis_url, name)
    try:
        assert child.stdout is not None
        line = await anyio.to_thread.run_sync(child.stdout.readline)
        assert line.startswith("held "), child.communicate()[1]
        async with (
            coredis.Redis.from_url(redis_url) as probe,
            RedisLimiter.connect(redis_url, name=name, max_concurrent=1) as limiter,
        ):
            assert await limiter.held_globally() == 1
            await anyio.sleep(1.2)  # past one lease: the living child renews it
            assert await limiter.held_globally() == 1
            os.kill(child.pid, signal.SIGKILL)
            killed_at = await redis_now(probe)
            assert await limiter.held_globally() == 1  # still leased: no renewal yet missed
            with anyio.fail_after(3.0):
                async with limiter.slot() as lease:
                    pass
            freed_after = lease.admitted_at - killed_at  # both on Redis's clock
            # the child renewed at most a third of a lease (0.33 s) before it died
            assert 0.5 < freed_after < 1.0 + 0.5, freed_after
            assert limiter.statistics().reclaimed == 1
    finally:
        kill(child)


async def test_renewal_keeps_a_lease_alive_beyond_its_lifetime(redis_url: str) -> None:
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1, lease_seconds=0.6) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1, lease_seconds=0.6) as b,
    ):
        async with a.slot():
            with anyio.move_on_after(1.5):  # 2.5 leases
                async with b.slot():
                    pytest.fail("admitted while the only slot was held")
            assert await a.held_globally() == 1
        with anyio.fail_after(1.0):
            async with b.slot() as lease:
                assert lease.waited < 0.5
        assert a.statistics().lost == 0
        assert b.statistics().reclaimed == 0  # released, never expired


async def test_a_lease_that_could_not_be_renewed_is_lost_and_counted(redis_url: str) -> None:
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1, lease_seconds=0.3) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1, lease_seconds=0.3) as b,
        coredis.Redis.from_url(redis_url) as probe,
        a.slot(),
    ):
        # another process reclaims it as if ``a`` had stopped renewing: expire it now
        await probe.zadd(a._keys[0], {next(iter(a._leases)): 0})
        async with b.slot():
            assert b.statistics().reclaimed == 1
            await anyio.sleep(0.2)  # a's next renewal finds its lease gone
            assert a.statistics().lost == 1
            assert a.statistics().held == 0
        assert await b.held_globally() == 0  # after b's release, on b's connection
        assert await a.held_globally() == 0


# ---------------------------------------------------------------------- cancellation


async def test_cancelled_while_waiting_holds_nothing(redis_url: str) -> None:
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1) as b,
    ):
        async with a.slot():
            with anyio.move_on_after(0.2) as scope:
                async with b.slot():
                    pytest.fail("admitted while the only slot was held")
            assert scope.cancelled_caught
            stats = b.statistics()
            assert (stats.held, stats.waiting, stats.acquired) == (0, 0, 0)
            assert stats.full > 0 and stats.wait_seconds >= 0.2
            assert await b.held_globally() == 1
        assert await a.held_globally() == 0  # after a's release, on a's connection
        assert await b.held_globally() == 0
        async with b.slot():  # and b can still get in
            assert await b.held_globally() == 1


async def test_cancelled_after_the_script_admitted_releases(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The script added the lease, then the caller was cancelled before it returned."""
    original = RedisLimiter._try_admit
    scope = anyio.CancelScope()

    async def admit_then_cancel(
        self: RedisLimiter, lease_id: str | None, tokens: int, *, queue: bool
    ) -> Any:
        attempt = await original(self, lease_id, tokens, queue=queue)
        assert attempt.admitted and await self.held_globally() == 1
        scope.cancel()
        await anyio.lowlevel.checkpoint()  # raises the cancellation here
        pytest.fail("not cancelled")

    async with RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=1) as limiter:
        monkeypatch.setattr(RedisLimiter, "_try_admit", admit_then_cancel)
        with scope:
            async with limiter.slot():
                pytest.fail("entered a cancelled slot")
        monkeypatch.undo()
        assert scope.cancelled_caught
        assert await limiter.held_globally() == 0
        assert limiter.statistics().held == 0
        async with limiter.slot():  # the slot is free again
            pass


@pytest.mark.parametrize("spares", [0, 1], ids=["admitted", "from a spare"])
async def test_cancelled_in_the_instant_of_admission_does_not_enter(
    redis_url: str, monkeypatch: pytest.MonkeyPatch, spares: int
) -> None:
    """The caller's scope is cancelled while the (shielded) admission runs, or as a
    spare is taken; the admission returns without a checkpoint: the block must not
    run, and the lease is released (or kept as a spare)."""
    scope = anyio.CancelScope()
    async with RedisLimiter.connect(
        redis_url, name=fresh_name(), max_concurrent=2, spare_leases=spares
    ) as limiter:
        if spares:
            async with limiter.slot():  # a call came: the keeper admits a spare
                pass
            for _ in range(500):  # the keeper admits it in the background
                if limiter.statistics().spares:
                    break
                await anyio.sleep(0.01)
            else:
                pytest.fail("no spare was admitted")
            original_take = RedisLimiter._want_spares

            def cancel_on_take(self: RedisLimiter) -> None:
                scope.cancel()
                original_take(self)

            monkeypatch.setattr(RedisLimiter, "_want_spares", cancel_on_take)
        else:
            original_admit = RedisLimiter._try_admit

            async def admit_and_cancel(
                self: RedisLimiter, lease_id: str | None, tokens: int, *, queue: bool
            ) -> Any:
                scope.cancel()
                return await original_admit(self, lease_id, tokens, queue=queue)

            monkeypatch.setattr(RedisLimiter, "_try_admit", admit_and_cancel)
        with scope:
            async with limiter.slot():
                pytest.fail("entered the block of a cancelled caller")
        monkeypatch.undo()
        assert scope.cancelled_caught
        stats = limiter.statistics()
        assert stats.held == stats.spares and stats.waiting == 0  # no call holds one
        for _ in range(500):  # Redis agrees, once the keeper's top-up is in
            if await limiter.held_globally() == limiter.statistics().held:
                break
            await anyio.sleep(0.01)
        else:
            pytest.fail("Redis counts leases this limiter does not hold")


async def test_cancelling_the_whole_block_releases_everything(redis_url: str) -> None:
    name = fresh_name()
    entered = 0
    with anyio.move_on_after(0.3) as scope:
        async with RedisLimiter.connect(redis_url, name=name, max_concurrent=3) as limiter:

            async def hold() -> None:
                nonlocal entered
                async with limiter.slot():
                    entered += 1
                    await anyio.sleep_forever()

            async with anyio.create_task_group() as tg:
                for _ in range(5):  # 3 hold a slot, 2 wait
                    tg.start_soon(hold)
    assert scope.cancelled_caught and entered == 3
    async with RedisLimiter.connect(redis_url, name=name, max_concurrent=3) as other:
        assert await other.held_globally() == 0


@pytest.mark.parametrize("spares", [0, 1], ids=["no spares", "a keeps a spare"])
async def test_cancellation_at_any_moment_leaks_nothing(redis_url: str, spares: int) -> None:
    """Cancel contended acquisitions at assorted moments, in and around the script
    (and, with a spare, while spares are taken and topped up)."""
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=2, spare_leases=spares) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=2) as b,
    ):

        async def contender(limiter: RedisLimiter, delay: float) -> None:
            with anyio.move_on_after(delay):
                async with limiter.slot():
                    await anyio.sleep(0.002)

        async with anyio.create_task_group() as tg:
            for i in range(120):
                tg.start_soon(contender, a if i % 2 else b, (i % 12) * 0.0004)
                if i % 6 == 5:
                    await anyio.sleep(0.001)
        await _until(lambda: a.statistics().held == 0)  # a spare goes back once idle
        assert a.statistics().held == b.statistics().held == 0
        assert a.statistics().waiting == b.statistics().waiting == 0
    # closing releases what a limiter holds (a spare admitted late, say): a lease left
    # in Redis now is one that no limiter knew of
    async with RedisLimiter.connect(redis_url, name=name, max_concurrent=2) as probe:
        assert await probe.held_globally() == 0


# ---------------------------------------------------------------------- rates


async def _admissions(
    limiters: list[RedisLimiter], per_limiter: int, window: float, tokens: int = 0
) -> list[float]:
    """Redis-clock admission times of contenders hammering ``limiters`` for ``window`` s."""
    admitted: list[float] = []

    async def hammer(limiter: RedisLimiter) -> None:
        while True:
            async with limiter.slot(tokens) as lease:
                admitted.append(lease.admitted_at)

    with anyio.move_on_after(window):
        async with anyio.create_task_group() as tg:
            for limiter in limiters:
                for _ in range(per_limiter):
                    tg.start_soon(hammer, limiter)
    return sorted(admitted)


async def test_request_rate_is_never_exceeded(redis_url: str) -> None:
    """600/min with a burst of 1: admissions are >= 100 ms apart on Redis's clock."""
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, requests_per_minute=600, requests_burst=1) as a,
        RedisLimiter.connect(redis_url, name=name, requests_per_minute=600, requests_burst=1) as b,
    ):
        times = await _admissions([a, b], per_limiter=3, window=1.0)
        gaps = [t2 - t1 for t1, t2 in itertools.pairwise(times)]
        assert min(gaps) >= 0.1 - 1e-6, gaps
        span = times[-1] - times[0]
        assert len(times) <= 1 + span / 0.1 + 1e-6
        assert len(times) >= 5  # and it does admit (about 10 in the second)
        assert a.statistics().rate_limited + b.statistics().rate_limited > 0


async def test_request_burst_then_rate(redis_url: str) -> None:
    """A burst of 5 goes at once; any window of W seconds admits at most 5 + 10 W."""
    async with RedisLimiter.connect(
        redis_url, name=fresh_name(), requests_per_minute=600, requests_burst=5
    ) as limiter:
        times = await _admissions([limiter], per_limiter=8, window=0.8)
        assert times[4] - times[0] < 0.05  # the burst
        for i in range(len(times)):
            for j in range(i, len(times)):
                assert j - i + 1 <= 5 + (times[j] - times[i]) * 10 + 1e-6


async def test_token_rate_counts_each_calls_cost(redis_url: str) -> None:
    """60 000 tokens/min (1 per ms), burst 100, calls of 50 tokens: <= 100 + 1000 W."""
    async with RedisLimiter.connect(
        redis_url, name=fresh_name(), tokens_per_minute=60_000, tokens_burst=100
    ) as limiter:
        times = await _admissions([limiter], per_limiter=4, window=0.8, tokens=50)
        assert len(times) >= 6
        for i in range(len(times)):
            for j in range(i, len(times)):
                assert 50 * (j - i + 1) <= 100 + (times[j] - times[i]) * 1000 + 1e-6


async def test_a_call_costing_more_than_the_burst_waits_for_its_debt(redis_url: str) -> None:
    async with RedisLimiter.connect(
        redis_url, name=fresh_name(), tokens_per_minute=60_000, tokens_burst=100
    ) as limiter:
        async with limiter.slot(300) as first:  # admitted at once: the bucket is full
            assert first.waited < 0.05
        async with limiter.slot(10) as second:  # waits for the 300-token debt
            pass
        # 300 tokens at 1 per ms, less the 90 ms the burst lends a 10-token call
        assert second.admitted_at - first.admitted_at >= 0.3 - 0.09 - 1e-6


async def test_no_limits_means_no_waiting(redis_url: str) -> None:
    async with RedisLimiter.connect(redis_url, name=fresh_name(), tokens_per_minute=0) as limiter:
        async with limiter.slot(10**9) as lease:
            assert lease.id is None and lease.tokens == 10**9
        assert limiter.statistics().acquired == 1


# ---------------------------------------------------------------------- failures


async def test_unreachable_redis_is_a_clear_error_without_the_password() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    with pytest.raises(GlobalLimitUnavailable) as caught:
        async with RedisLimiter.connect(url, max_concurrent=1):
            pytest.fail("connected to nothing")
    message = str(caught.value)
    assert f"redis://***@127.0.0.1:{port}/0" in message and "hunter2" not in message
    assert isinstance(caught.value, EngineError) and isinstance(caught.value, ConnectionError)
    assert caught.value.url == f"redis://***@127.0.0.1:{port}/0"


async def test_redis_going_away_fails_the_call_not_the_holder(tmp_path: Path) -> None:
    with servers.start_redis(tmp_path) as server:
        async with RedisLimiter.connect(
            server, name=fresh_name(), max_concurrent=2, redis_timeout=0.5
        ) as limiter:
            async with limiter.slot():
                server.stop()
                result = "the agent's answer"
            # the failed release did not fail the call; the lease would expire in Redis
            assert result == "the agent's answer" and limiter.statistics().held == 0
            with pytest.raises(GlobalLimitUnavailable, match="cannot reach Redis"):
                async with limiter.slot():
                    pytest.fail("admitted without Redis")
            assert limiter.statistics().errors >= 2
            assert limiter.statistics().waiting == 0
    # leaving the limiter (renewal stopped, client closed) raised nothing


async def test_an_error_in_the_block_leaves_as_itself(redis_url: str) -> None:
    with pytest.raises(KeyError):
        async with (
            RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=1) as lim,
            lim.slot(),
        ):
            raise KeyError("x")
    async with RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=1) as lim:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        async with lim.slot():
            pass


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"url": "http://localhost:6379"}, "not a redis"),
        ({"max_concurrent": -1}, "max_concurrent"),
        ({"max_concurrent": 2.5}, "whole number"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"requests_burst": 0}, "requests_burst"),
        ({"name": "a{b}"}, "name"),
        ({"spare_leases": -1, "max_concurrent": 2}, "spare_leases"),
        ({"spare_leases": 1.5, "max_concurrent": 2}, "spare_leases"),
        ({"spare_leases": 3, "max_concurrent": 2}, "at most max_concurrent"),
        ({"spare_leases": 1}, "at most max_concurrent"),
        ({"spare_leases": 1, "max_concurrent": 2, "requests_per_minute": 60}, "rate"),
        ({"spare_leases": 1, "max_concurrent": 2, "tokens_per_minute": 600}, "rate"),
    ],
)
async def test_bad_arguments_are_refused_before_connecting(
    kwargs: dict[str, Any], match: str
) -> None:
    kwargs = {"url": "redis://127.0.0.1:1/0", **kwargs}
    with pytest.raises(ValueError, match=match):
        async with RedisLimiter.connect(**kwargs):
            pass


def test_scrub_url() -> None:
    assert scrub_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert scrub_url("rediss://user:pw@h/2") == "rediss://***@h/2"
    assert scrub_url("redis://h:6379/0") == "redis://h:6379/0"
    assert (
        scrub_url("unix:///tmp/r.sock?db=1&password=pw") == "unix:///tmp/r.sock?db=1&password=***"
    )
    assert issubclass(GlobalLimitUnavailable, GlobalLimitError)


# ---------------------------------------------------------------------- cost


async def test_cost_per_acquire_release(redis_url: str, anyio_backend: str) -> None:
    """Prints the cost of an uncontended acquire + release (run with ``-s``); no assert.

    ``.venv/bin/python -m pytest tests/scheduling/test_global_limits.py -k cost -s``
    """
    n = 2000

    async def measure(enter: Callable[[], Any]) -> list[float]:
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            async with enter():
                pass
            samples.append((time.perf_counter() - start) * 1000)
        return samples

    local = anyio.CapacityLimiter(4)
    results = {"local CapacityLimiter": await measure(lambda: local)}
    async with RedisLimiter.connect(redis_url, name=fresh_name(), max_concurrent=4) as lim:
        results["RedisLimiter slot"] = await measure(lim.slot)
    async with RedisLimiter.connect(
        redis_url,
        name=fresh_name(),
        max_concurrent=4,
        requests_per_minute=10**9,
        tokens_per_minute=10**12,
    ) as lim:
        results["RedisLimiter slot + rates"] = await measure(lambda: lim.slot(500))
    print(f"\nacquire+release over {n} uncontended calls ({anyio_backend}, loopback):")
    for label, samples in results.items():
        q = statistics.quantiles(samples, n=100)
        print(f"  {label:28s} p50 {q[49]:.4f} ms  p95 {q[94]:.4f} ms")
    assert all(math.isfinite(s) for s in results["RedisLimiter slot"])


async def test_processes_take_turns_for_freed_slots(redis_url: str) -> None:
    """Two limiters (two processes' worth) with backlogs share one slot in turns.

    Each limiter's own release wakes its own next waiter at once; the queue of heads
    in Redis still hands the slot to the other, which asked first.
    """
    name, rounds = fresh_name(), 4
    order: list[str] = []

    async def worker(label: str, limiter: RedisLimiter) -> None:
        for _ in range(rounds):
            async with limiter.slot():
                order.append(label)
                await anyio.sleep(0.01)

    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1) as b,
        anyio.create_task_group() as tg,
    ):
        for _ in range(3):
            tg.start_soon(worker, "a", a)
            tg.start_soon(worker, "b", b)
    both_waiting = order[: min(len(order) - order[::-1].index(x) for x in "ab")]
    runs = [len(list(group)) for _, group in itertools.groupby(both_waiting)]
    assert max(runs) <= 2, "".join(order)


# ---------------------------------------------------------------------- spare leases


async def test_spare_leases_serve_calls_without_waiting_and_go_back_when_idle(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's demand makes the limiter admit spares in the background; the next call
    takes one (no admission of its own); unused ones go back to Redis; closing the
    limiter releases what it still holds."""
    monkeypatch.setattr(global_limits, "_SPARE_IDLE", 0.5)  # a slow machine keeps them
    name = fresh_name()
    async with RedisLimiter.connect(redis_url, name=name, max_concurrent=4) as probe:
        async with RedisLimiter.connect(
            redis_url, name=name, max_concurrent=4, spare_leases=2
        ) as limiter:
            async with limiter.slot():  # no spare yet: admitted as before
                await _until(lambda: limiter.statistics().spares == 2)
                assert await probe.held_globally() == 3  # spares are leases, counted
            assert limiter.statistics().from_spares == 0
            async with limiter.slot() as lease:
                stats = limiter.statistics()
                assert (stats.from_spares, stats.acquired, lease.waited) == (1, 2, 0.0)
                assert lease.admitted_at == pytest.approx(time.time(), abs=5.0)
            # unused for 50 ms, the spares go back: nothing is held any more
            await _until(lambda: limiter.statistics().held == 0)
            assert await limiter.held_globally() == 0
            async with limiter.slot():
                await _until(lambda: limiter.statistics().spares == 2)
        assert await probe.held_globally() == 0  # closed: its spares were released


async def test_idle_spares_go_back_to_another_process_waiting(redis_url: str) -> None:
    """A spare left unused does not keep another process out: it is given back, and
    that process's waiting call gets its slot."""
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=2, spare_leases=1) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=2) as b,
    ):
        async with a.slot():
            await _until(lambda: a.statistics().spares == 1)  # the limit is full now
        async with b.slot():  # the slot a's call left
            with anyio.fail_after(5):
                async with b.slot():  # the slot of a's spare, once given back
                    assert a.statistics().spares == 0
        assert b.statistics().acquired == 2


async def test_spare_leases_never_exceed_the_global_bound(redis_url: str) -> None:
    """Three limiters with spares, 3 x N contenders for N slots: never more than N
    holders, spares included, and every call served."""
    name, n, rounds = fresh_name(), 3, 6
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=n, spare_leases=2) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=n, spare_leases=2) as b,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=n, spare_leases=1) as c,
    ):
        limiters = [a, b, c]
        peak, most_leases = await _contend(limiters, n, rounds)
        assert peak <= n
        assert most_leases <= n
        assert sum(x.statistics().acquired for x in limiters) == 3 * n * rounds


async def test_a_finished_calls_lease_is_kept_as_a_spare_while_nobody_waits(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While Redis last said (within 50 ms) that no process's head waits, a call's lease
    goes back into the spares instead of to Redis: the same leases serve call after
    call. Past that, the lease is released and the keeper asks Redis again."""
    monkeypatch.setattr(global_limits, "_SPARE_IDLE", 0.5)  # a slow machine keeps them
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=4) as probe,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=4, spare_leases=2) as limiter,
    ):
        async with limiter.slot():  # the demand: two spares, and Redis's word
            await _until(lambda: limiter.statistics().spares == 2)
        assert await limiter.held_globally() == 2  # the spares (after its own release)
        ids = []
        for _ in range(6):  # no checkpoint in between: nothing else runs
            async with limiter.slot() as lease:
                ids.append(lease.id)
        stats = limiter.statistics()
        assert (stats.from_spares, stats.kept, stats.spares) == (6, 6, 2)
        assert len(set(ids)) == 2  # two leases served all six calls
        assert await probe.held_globally() == 2  # nothing admitted or released since
        limiter._clear_until = -math.inf  # as 50 ms after Redis's last word
        async with limiter.slot() as lease:
            pass
        assert limiter.statistics().kept == 6  # released, not kept
        await _until(lambda: limiter._clear_until > anyio.current_time())  # asked again
        async with limiter.slot():
            pass
        assert limiter.statistics().kept == 7


async def test_no_lease_is_kept_while_another_process_waits(redis_url: str) -> None:
    """Once Redis says another process's head waits (or this process is refused), a
    finished call's lease goes to Redis, and the waiting process gets it."""
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1, spare_leases=1) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1) as b,
    ):
        async with a.slot():  # the one slot; the keeper learns that nobody waits
            await _until(lambda: a._clear_until > anyio.current_time())
        assert a.statistics().kept == 1  # kept as a spare: a still holds the slot
        got_in = anyio.Event()

        async def b_waits() -> None:
            async with b.slot():
                got_in.set()

        async with anyio.create_task_group() as tg:
            async with a.slot():  # on the kept lease
                tg.start_soon(b_waits)
                await _until(lambda: b.statistics().full >= 1)  # b's head is queued
                assert await a._admit_spares(0) == 0  # Redis's word now: a head waits
            assert (a.statistics().kept, a.statistics().spares) == (1, 0)  # released
            with anyio.fail_after(5):
                await got_in.wait()


async def test_spares_are_not_taken_while_another_process_waits(redis_url: str) -> None:
    """A slot freed while another process's head is queued in Redis is not taken as
    a spare: the spares' admission leaves a slot for every queued head."""
    name = fresh_name()
    async with (
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1, spare_leases=1) as a,
        RedisLimiter.connect(redis_url, name=name, max_concurrent=1) as b,
    ):
        got_in = anyio.Event()

        async def b_waits() -> None:
            async with b.slot():
                got_in.set()

        async with anyio.create_task_group() as tg:
            async with a.slot():
                tg.start_soon(b_waits)
                await _until(lambda: b.statistics().full >= 1)  # b's head is queued
            # the slot is free now, b's head still queued until its next poll
            assert await a._admit_spares(1) == 0
            with anyio.fail_after(5):
                await got_in.wait()
        assert a.statistics().from_spares == 0
