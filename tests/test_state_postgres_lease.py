"""Session leases on the PostgreSQL store: one session's actions never interleave
across engine processes (here: across stores, each its own connection, as two
processes would be; and a real child process SIGKILLed while it holds a lease).

Real clock, trio and asyncio; short leases (1-2 s) where expiry is the point.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import crashkit
import pg_server
import pytest
from pg_server import PASSWORD_ENV, PostgresServer

import engine
from engine.config import Config
from engine.errors import SessionError
from engine.state import PostgresSessionStore

pytestmark = pytest.mark.anyio

# the server fixtures (bound here, not imported: test parameters would shadow an import)
postgres_server = pg_server.postgres_server
pg_url = pg_server.pg_url


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock: leases expire on the server's clock."""
    return str(request.param)


def _action(text: str, **changes: Any) -> dict[str, Any]:
    return {
        "action_text": text,
        "action_type": "exploration",
        "narrative": f"You {text.lower()}.",
        "state_changes": changes,
        "responses": {},
    }


@asynccontextmanager
async def _stores(
    server: PostgresServer, url: str, n: int, **options: Any
) -> AsyncIterator[list[PostgresSessionStore]]:
    """``n`` stores on one schema: ``n`` connections, as ``n`` engine processes."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                PostgresSessionStore.open(url, password=server.password, **options)
            )
            for _ in range(n)
        ]


def _lease_times(server: PostgresServer, url: str) -> tuple[Any, Any]:
    """The server's clock now, and when the one lease in the table expires."""
    with server.connect(url) as conn:
        row = conn.execute("SELECT clock_timestamp(), expires_at FROM session_leases").fetchone()
    assert row is not None
    return row[0], row[1]


def _leases(server: PostgresServer, url: str) -> list[tuple[str, str]]:
    with server.connect(url) as conn:
        rows = conn.execute("SELECT session_id, holder FROM session_leases ORDER BY 1").fetchall()
    return [(str(r[0]), str(r[1])) for r in rows]


@pytest.mark.parametrize("reread", ["ensure_session", "find_session"])
async def test_actions_under_leases_never_interleave_lose_or_share_a_turn(
    postgres_server: PostgresServer, pg_url: str, reread: str
) -> None:
    """Two stores x three tasks act on two sessions at once, like engines: take the
    lease, read the turn, think, record with ``turn_expected``. Nothing overlaps.
    ``find_session`` (the engine's reread) uses the row read with the take: it must
    hold every action the other store recorded before."""
    rng = random.Random(7)
    sessions = ("s1", "s2")
    per_task = 6
    spans: dict[str, list[tuple[float, float, str]]] = {sid: [] for sid in sessions}
    async with _stores(postgres_server, pg_url, 2) as stores:

        async def engine_task(store: PostgresSessionStore, who: str, sid: str) -> None:
            for i in range(per_task):
                async with store.session_lease(sid):
                    entered = time.monotonic()
                    if reread == "ensure_session":
                        turn = (await store.ensure_session(sid)).turn  # reread: shared store
                    else:
                        found = await store.find_session(sid)
                        turn = 0 if found is None else found.turn
                    await anyio.sleep(rng.uniform(0, 0.004))  # the agents think
                    new = await store.record_action(
                        sid, turn_expected=turn, **_action(f"{who} {i}", last=f"{who} {i}")
                    )
                    assert new == turn + 1
                    spans[sid].append((entered, time.monotonic(), f"{who} {i}"))

        async with anyio.create_task_group() as tg:
            for s, store in enumerate(stores):
                for t in range(3):
                    for sid in sessions:
                        tg.start_soon(engine_task, store, f"store{s}/task{t}", sid)
        for sid in sessions:
            ordered = sorted(spans[sid])
            for (_, left, a), (right, _, b) in itertools.pairwise(ordered):
                assert left <= right, f"{a} and {b} held the lease of {sid} together"
            entries = await stores[0].transcript(sid)
            assert [e.turn for e in entries] == list(range(1, 6 * per_task + 1))
            assert [e.action_text for e in entries] == [text for _, _, text in ordered]
            assert (await stores[1].get_session(sid)).state == {"last": ordered[-1][2]}
    assert _leases(postgres_server, pg_url) == []  # every lease was given back


async def test_the_take_brings_the_session_row_for_the_holders_first_read(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """Taking a lease reads the session in the same round trip; the holder's first
    ``find_session`` uses that row (no round trip of its own), and it is current. A
    second read asks the server; a row the holder did not read ends with its lease."""
    async with _stores(postgres_server, pg_url, 2) as (a, b):
        async with b.session_lease("s"):
            assert await b.find_session("s") is None  # not created yet
            await b.record_action("s", turn_expected=0, **_action("b", hp=1))
        sent = a._lane.pipelines
        async with a.session_lease("s"):
            assert a._lane.pipelines == sent + 1  # the take and the read together
            found = await a.find_session("s")
            assert a._lane.pipelines == sent + 1  # no round trip
            assert found is not None and (found.turn, found.state) == (1, {"hp": 1})
            await a.record_action("s", turn_expected=1, **_action("a", hp=2))
            again = await a.find_session("s")
            assert a._lane.pipelines == sent + 2
            assert again is not None and (again.turn, again.state) == (2, {"hp": 2})
        async with a.session_lease("t"):
            pass  # its row (no session yet) was read, never used
        async with b.session_lease("t"):
            await b.record_action("t", turn_expected=0, **_action("b", hp=5))
        found = await a.find_session("t")  # outside a lease: read now, on the server
        assert found is not None and (found.turn, found.state) == (1, {"hp": 5})
        assert a._found == {} and b._found == {}


async def test_without_leases_turn_expected_still_fences_stale_writers(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """No lease: two stores read the same turn; exactly one of them records it."""
    async with _stores(postgres_server, pg_url, 2) as (a, b):
        await a.ensure_session("s")
        outcomes: list[Any] = []

        async def act(store: PostgresSessionStore, who: str) -> None:
            try:
                outcomes.append(await store.record_action("s", turn_expected=0, **_action(who)))
            except SessionError as exc:
                outcomes.append(str(exc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(act, a, "a")
            tg.start_soon(act, b, "b")
        assert sorted(outcomes, key=str) == [
            1,
            "session 's' is at turn 1, not 0: another action was recorded in between",
        ]
        assert await a.count_actions("s") == 1


async def test_a_lease_is_given_back_on_error_and_on_cancellation(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    async with _stores(postgres_server, pg_url, 2) as (a, b):
        with pytest.raises(ValueError, match="the agents broke"):  # as itself, not in a group
            async with a.session_lease("s"):
                raise ValueError("the agents broke")
        with anyio.move_on_after(0.2) as scope:
            async with a.session_lease("s"):
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert _leases(postgres_server, pg_url) == []
        with anyio.fail_after(1):  # at once, not after the 30 s expiry
            async with b.session_lease("s"):
                assert [sid for sid, _ in _leases(postgres_server, pg_url)] == ["s"]


async def test_a_held_lease_is_renewed_and_other_sessions_are_free(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    async with _stores(postgres_server, pg_url, 2, lease_seconds=1.0) as (a, b):
        async with a.session_lease("s"):
            with anyio.fail_after(1):
                async with b.session_lease("other"):  # another session: not blocked
                    pass
            with anyio.move_on_after(2.5) as waited:  # 2.5 lease lifetimes
                async with b.session_lease("s"):
                    pytest.fail("took a lease that its holder renews")  # pragma: no cover
            assert waited.cancelled_caught
            assert [sid for sid, _ in _leases(postgres_server, pg_url)] == ["s"]
        with anyio.fail_after(1):
            async with b.session_lease("s"):
                pass
    assert _leases(postgres_server, pg_url) == []


async def test_a_lost_lease_cancels_its_holder(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """Renewals failed long enough for another engine to take the lease (simulated by
    rewriting the row): the holder's block is cancelled and SessionError raised."""
    async with _stores(postgres_server, pg_url, 1, lease_seconds=1.0) as (store,):
        with pytest.raises(SessionError, match="lease on session 's' was lost"):
            async with store.session_lease("s"):
                with postgres_server.connect(pg_url) as conn:
                    conn.execute(
                        "UPDATE session_leases SET holder = 'thief',"
                        " expires_at = clock_timestamp() + interval '1 hour'"
                    )
                await anyio.sleep_forever()  # only the lost lease ends it (its next renewal)
        assert _leases(postgres_server, pg_url) == [("s", "thief")]  # not given back: not ours


async def test_a_cancelled_waiter_leaves_nothing_behind(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    async with _stores(postgres_server, pg_url, 2) as (a, b):
        async with a.session_lease("s"):
            with anyio.move_on_after(0.3):
                async with b.session_lease("s"):
                    pytest.fail("took a held lease")  # pragma: no cover
            holders = _leases(postgres_server, pg_url)
            assert len(holders) == 1 and holders[0][1].split(":")[1] == str(os.getpid())
        assert _leases(postgres_server, pg_url) == []


async def _until(condition: Any) -> None:
    for _ in range(100_000):
        if condition():
            return
        await anyio.sleep(0.001)
    pytest.fail("the condition never held")  # pragma: no cover


async def test_a_take_cancelled_in_flight_gives_back_the_lease_it_took(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """A caller cancelled while its take is on the server, sent in another caller's
    pipeline: the take runs to its end and takes the lease (here a dead holder's
    expired one, once another transaction's row lock is gone), and the store gives
    it back at once instead of leaving it to block the session until it expires."""
    async with _stores(postgres_server, pg_url, 2) as (a, b):
        lane = a._lane
        ((pid,),) = (await lane.execute("pid", b"SELECT pg_backend_pid()", ())).rows
        taker = anyio.CancelScope()
        entered: list[bool] = []

        async def take() -> None:
            with taker:
                async with a.session_lease("s"):
                    entered.append(True)  # pragma: no cover - it never gets here

        gated = b"SELECT pg_advisory_lock(4242), pg_advisory_unlock(4242)"
        with postgres_server.connect(pg_url) as admin, postgres_server.connect(pg_url) as gate:
            admin.execute(
                "INSERT INTO session_leases VALUES ('s', 'dead', now() - interval '1 min')"
            )
            admin.execute("BEGIN")
            admin.execute("SELECT 1 FROM session_leases WHERE session_id = 's' FOR UPDATE")
            gate.execute("SELECT pg_advisory_lock(4242)")
            async with anyio.create_task_group() as tg:
                sent = lane.pipelines
                tg.start_soon(lane.execute, "gated", gated, ())
                await _until(lambda: lane.pipelines == sent + 1)  # sent, held at the gate
                tg.start_soon(lane.execute, "first", b"SELECT 1", ())  # leads the next one
                await _until(lambda: len(lane._queue) == 1)
                tg.start_soon(take)
                await _until(lambda: len(lane._queue) == 3)  # "first", the take, the read
                gate.execute("SELECT pg_advisory_unlock(4242)")  # the next pipeline goes
                await anyio.to_thread.run_sync(  # the take waits for the row's lock
                    postgres_server.wait_for_backend,
                    int(str(pid)),
                    "wait_event_type = 'Lock' AND wait_event IN ('transactionid', 'tuple')",
                )
                taker.cancel()
                await anyio.sleep(0.05)  # the taker now waits, shielded, for the outcome
                admin.execute("COMMIT")  # the take goes on: the expired lease is taken
        assert taker.cancelled_caught and not entered
        assert _leases(postgres_server, pg_url) == []  # given back, not left to expire
        with anyio.fail_after(1):  # at once, not after the 30 s expiry
            async with b.session_lease("s"):
                pass


# Takes the lease of session "s" (lease_seconds from argv), prints "leased", holds it.
HOLDER = textwrap.dedent(
    f"""
    import os, sys, anyio
    from engine.state import PostgresSessionStore

    async def main(url, seconds):
        async with PostgresSessionStore.open(
            url, password=os.environ[{PASSWORD_ENV!r}], lease_seconds=seconds
        ) as store:
            async with store.session_lease("s"):
                await store.ensure_session("s")
                await store.record_action(
                    "s", action_text="I hold the door", action_type="exploration",
                    narrative="You hold it.", state_changes={{}}, responses={{}},
                )
                print("leased", flush=True)
                await anyio.sleep_forever()

    anyio.run(main, sys.argv[1], float(sys.argv[2]))
    """
)


async def test_a_killed_holder_blocks_the_session_only_until_its_lease_expires(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    lease = 1.5
    proc = crashkit.spawn(HOLDER, pg_url, str(lease))  # the env has the password variable
    try:
        assert proc.stdout is not None
        line = await anyio.to_thread.run_sync(proc.stdout.readline)
        assert line.strip() == "leased", line or proc.communicate()[1]
        ((_, holder),) = _leases(postgres_server, pg_url)
        assert f":{proc.pid}:" in holder
        async with _stores(postgres_server, pg_url, 1, lease_seconds=lease) as (store,):
            with anyio.move_on_after(2 * lease) as waited:  # alive: it renews, we wait
                async with store.session_lease("s"):
                    pytest.fail("took the lease of a live holder")  # pragma: no cover
            assert waited.cancelled_caught
            os.kill(proc.pid, signal.SIGKILL)  # no cleanup: the lease row stays
            killed_at, expires_at = _lease_times(postgres_server, pg_url)
            await anyio.to_thread.run_sync(proc.wait)
            async with store.session_lease("s"):
                now, our_expiry = _lease_times(postgres_server, pg_url)
                state = await store.ensure_session("s")
                assert (
                    await store.record_action(
                        "s", turn_expected=state.turn, **_action("I step through")
                    )
                    == 2
                )
    finally:
        if proc.poll() is None:  # pragma: no cover - the test failed above
            proc.kill()
        proc.communicate()
    # on the server's clock: the dead holder's lease ran out at most `lease` after the
    # kill; ours was taken no earlier than that, and by a poll soon after (they are
    # at most ~0.1 s apart: a lease's length is a generous bound)
    span = datetime.timedelta(seconds=lease)
    assert killed_at < expires_at <= killed_at + span
    assert expires_at <= our_expiry - span <= now < expires_at + span


async def test_two_engines_play_the_same_sessions(
    postgres_server: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    config = Config()
    config = attrs.evolve(
        config,
        module=attrs.evolve(config.module, include_srd=False, cache_dir=str(tmp_path)),
        state=attrs.evolve(config.state, url=pg_url, password_env=PASSWORD_ENV),
        simulation=attrs.evolve(config.simulation, time_scale=0.001),
    )
    # two engines on one store, as two processes would be (the pipeline's per-session lock
    # and in-memory turns are per engine: only the lease and rereading keep them apart)
    async with (
        engine.open_engine(config) as a,
        engine.open_engine(config) as b,
    ):
        # in turn: each engine must see the other's turns (no stale in-memory turn)
        for dm, turn in ((a, 1), (b, 2), (a, 3), (b, 4)):
            assert (await dm.player_action("s", "I search the altar for traps")).turn == turn
        # at once: the lease serializes them, no action fails or shares a turn
        turns: list[int] = []

        async def play(dm: Any, text: str) -> None:
            turns.append((await dm.player_action("t", text)).turn)

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(play, a, f"I attack the goblin ({n})")
                tg.start_soon(play, b, f"I attack the orc ({n})")
        assert sorted(turns) == list(range(1, 9))
        entries = await a.store.transcript("t")
        assert [e.turn for e in entries] == list(range(1, 9))
        assert len({e.action_text for e in entries}) == 8
