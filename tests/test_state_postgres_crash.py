"""Crash safety of the PostgreSQL store: SIGKILL engines sharing sessions, then check.

Each round starts TWO child processes on the same three sessions, as two engines
behind a load balancer would be. Each child runs every session's actions the way
the pipeline does on a shared store: take the session's lease, reread its turn,
record with ``turn_expected``, print ``done <session> <turn>`` (flushed) once
``record_action`` returned. The parent SIGKILLs each child after its own random
number of lines plus a random delay (so kills land inside transactions and while
leases are held; a killed holder's lease blocks its session for ``lease_seconds``,
1 s here), then checks with a fresh store: every action reported done is stored
whole, turns are 1..n with state = the transcript's changes, and no turn was
reported by two children or twice (a lost action would be re-recorded and
reported again). ``fsync`` and ``synchronous_commit`` stay on on the server.
"""

from __future__ import annotations

import collections
import random
import subprocess
import textwrap
from typing import Any

import anyio
import crashkit
import pg_server
import pytest
from pg_server import PASSWORD_ENV, PostgresServer
from test_state_crash import SESSIONS, expected, expected_state

from engine.state import PostgresSessionStore

pytestmark = pytest.mark.slow

# the server fixtures (bound here, not imported: test parameters would shadow an import)
postgres_server = pg_server.postgres_server
pg_url = pg_server.pg_url

# ``expected`` is test_state_crash's (the same rows, so either backend's check applies).
CHILD = textwrap.dedent(
    f"""
    import os, sys, trio
    from engine.state import PostgresSessionStore

    def expected(sid, turn):
        return dict(
            action_text=f"{{sid}} action {{turn}}",
            action_type="combat",
            narrative=f"{{sid}}:{{turn}} " * 200,
            state_changes={{f"t{{turn}}": turn, "last": turn, f"gone{{turn - 1}}": None,
                           f"gone{{turn}}": "x" * 50}},
            responses={{"narrator": {{"turn": turn, "words": list(range(turn % 40))}}}},
        )

    async def main(url, sync, count):
        async with PostgresSessionStore.open(
            url, password=os.environ[{PASSWORD_ENV!r}], synchronous=sync, lease_seconds=1.0
        ) as store:
            async def run(sid):
                done = 0
                while count is None or done < count:
                    async with store.session_lease(sid):
                        turn = (await store.ensure_session(sid)).turn
                        new = await store.record_action(sid, turn_expected=turn,
                                                        **expected(sid, turn + 1))
                        assert new == turn + 1, (new, turn)
                        print(f"done {{sid}} {{new}}", flush=True)
                    done += 1
            async with trio.open_nursery() as nursery:
                for sid in sys.argv[3].split(","):
                    nursery.start_soon(run, sid)
        print("finished", flush=True)

    count = None if sys.argv[4] == "-" else int(sys.argv[4])
    trio.run(main, sys.argv[1], sys.argv[2], count)
    """
)


def spawn(url: str, sync: str, count: int | None) -> subprocess.Popen[str]:
    return crashkit.spawn(
        CHILD, url, sync, ",".join(SESSIONS), "-" if count is None else str(count)
    )


async def verify(
    server: PostgresServer, url: str, done: collections.Counter[tuple[str, int]]
) -> dict[str, int]:
    """Open the store and check every session is whole; return the turn per session."""
    turns = {}
    async with PostgresSessionStore.open(url, password=server.password) as store:
        for sid in await store.session_ids():
            state = await store.get_session(sid)
            entries = await store.transcript(sid)
            assert await store.count_actions(sid) == len(entries) == state.turn
            for entry in entries:
                want: dict[str, Any] = expected(sid, entry.turn)
                got = {k: getattr(entry, k) for k in want}
                assert got == want, f"{sid} turn {entry.turn} is not whole"
            assert [e.turn for e in entries] == list(range(1, state.turn + 1))
            assert state.state == expected_state(state.turn)
            turns[sid] = state.turn
    for (sid, turn), times in done.items():
        assert times == 1, f"{sid} turn {turn} was reported done {times} times"
        assert turn <= turns.get(sid, 0), f"{sid} action {turn} was reported done but is lost"
    return turns


@pytest.mark.parametrize("sync", ["FULL", "NORMAL"])
def test_shared_sessions_survive_SIGKILL_of_their_engines(
    postgres_server: PostgresServer, pg_url: str, sync: str
) -> None:
    rng = random.Random(f"dm-engine postgres crash {sync}")
    done: collections.Counter[tuple[str, int]] = collections.Counter()
    for _ in range(6):
        plans = [
            (
                spawn(pg_url, sync, None),
                rng.randint(0, 20),  # 0: killed while importing or connecting
                rng.choice([0.0, rng.uniform(0, 0.002), rng.uniform(0, 0.02)]),
            )
            for _ in range(2)
        ]
        for lines in crashkit.kill_all_after(plans, watchdog=30.0):
            done.update(crashkit.done_lines(lines))
        anyio.run(verify, postgres_server, pg_url, done, backend="trio")
    assert sum(done.values()) > 20  # the kills did not all land before any work

    # after the crashes the store is usable: a child runs to completion (waiting out
    # the leases the killed ones held)
    before = anyio.run(verify, postgres_server, pg_url, done, backend="trio")
    proc = spawn(pg_url, sync, 3)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "finished"
    more = crashkit.done_lines(out.splitlines())
    assert sorted(more) == sorted(
        (sid, before.get(sid, 0) + k) for sid in SESSIONS for k in (1, 2, 3)
    )
    done.update(more)
    after = anyio.run(verify, postgres_server, pg_url, done, backend="trio")
    assert after == {sid: before.get(sid, 0) + 3 for sid in SESSIONS}
