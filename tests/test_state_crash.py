"""Crash safety of the session store: SIGKILL a writer at random points, then reopen.

A child process records actions for several sessions concurrently and prints
``done <session> <turn>`` (flushed) after each ``record_action`` returns. The parent
kills it with SIGKILL after a random number of those lines (plus a random sub-
millisecond-to-millisecond delay, so kills also land inside transactions), repeats,
and then checks that every action reported done is stored whole.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import anyio
import crashkit
import pytest

from engine.state import SessionStore

pytestmark = pytest.mark.slow

SESSIONS = ("alpha", "beta", "gamma")

# The child: resumes every session from its stored turn (turn_expected guards against
# a lost action being silently re-recorded), records actions until killed or, with a
# count, records that many more per session and exits 0.
CHILD = textwrap.dedent(
    """
    import sys, trio
    from engine.state import SessionStore

    def expected(sid, turn):
        return dict(
            action_text=f"{sid} action {turn}",
            action_type="combat",
            narrative=f"{sid}:{turn} " * 200,
            state_changes={f"t{turn}": turn, "last": turn, f"gone{turn - 1}": None,
                           f"gone{turn}": "x" * 50},
            responses={"narrator": {"turn": turn, "words": list(range(turn % 40))}},
        )

    async def main(path, sync, count):
        async with SessionStore.open(path, synchronous=sync) as store:
            async def run(sid):
                turn = (await store.ensure_session(sid)).turn
                stop = None if count is None else turn + count
                while stop is None or turn < stop:
                    new = await store.record_action(sid, turn_expected=turn,
                                                    **expected(sid, turn + 1))
                    assert new == turn + 1, (new, turn)
                    print(f"done {sid} {new}", flush=True)
                    turn = new
            async with trio.open_nursery() as nursery:
                for sid in sys.argv[3].split(","):
                    nursery.start_soon(run, sid)
        print("finished", flush=True)

    count = None if sys.argv[4] == "-" else int(sys.argv[4])
    trio.run(main, sys.argv[1], sys.argv[2], count)
    """
)


def expected(sid: str, turn: int) -> dict[str, Any]:
    """What the child records as ``sid``'s action ``turn`` (mirror of CHILD)."""
    return {
        "action_text": f"{sid} action {turn}",
        "action_type": "combat",
        "narrative": f"{sid}:{turn} " * 200,
        "state_changes": {
            f"t{turn}": turn,
            "last": turn,
            f"gone{turn - 1}": None,
            f"gone{turn}": "x" * 50,
        },
        "responses": {"narrator": {"turn": turn, "words": list(range(turn % 40))}},
    }


def expected_state(turns: int) -> dict[str, Any]:
    state: dict[str, Any] = {f"t{t}": t for t in range(1, turns + 1)}
    if turns:
        state |= {"last": turns, f"gone{turns}": "x" * 50}
    return state


def spawn(path: Path, sync: str, count: int | None) -> subprocess.Popen[str]:
    args = [str(path), sync, ",".join(SESSIONS), "-" if count is None else str(count)]
    return crashkit.spawn(CHILD, *args)


async def verify(path: Path, done: set[tuple[str, int]]) -> dict[str, int]:
    """Open the store and check every session is whole; return the turn per session."""
    turns = {}
    async with SessionStore.open(path) as store:
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            conn.close()
        for sid in await store.session_ids():
            state = await store.get_session(sid)
            entries = await store.transcript(sid)
            assert await store.count_actions(sid) == len(entries) == state.turn
            for entry in entries:
                want = expected(sid, entry.turn)
                got = {k: getattr(entry, k) for k in want}
                assert got == want, f"{sid} turn {entry.turn} is not whole"
            assert [e.turn for e in entries] == list(range(1, state.turn + 1))
            assert state.state == expected_state(state.turn)
            turns[sid] = state.turn
    for sid, turn in done:
        assert turn <= turns.get(sid, 0), f"{sid} action {turn} was reported done but is lost"
    return turns


@pytest.mark.parametrize("sync", ["FULL", "NORMAL"])
def test_SessionStore_survives_SIGKILL_at_random_points(tmp_path: Path, sync: str) -> None:
    rng = random.Random(f"dm-engine crash {sync}")
    path = tmp_path / "sessions.sqlite"
    done: list[tuple[str, int]] = []
    for _ in range(8):
        proc = spawn(path, sync, None)
        n_lines = rng.randint(0, 25)  # 0: killed while importing or opening the store
        delay = rng.choice([0.0, rng.uniform(0, 0.002), rng.uniform(0, 0.02)])
        lines = crashkit.kill_after(proc, n_lines, delay, watchdog=15.0)
        now = crashkit.done_lines(lines)
        # the child resumes from the stored turn: a lost action would be reported twice
        assert not set(now) & set(done), "an action reported done was recorded again"
        done += now
        anyio.run(verify, path, set(done), backend="trio")
    assert len(done) > 20  # the kills did not all land before any work

    # after the crashes the store is usable: a child runs to completion
    before = anyio.run(verify, path, set(done), backend="trio")
    proc = spawn(path, sync, 3)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.splitlines()[-1] == "finished"
    more = crashkit.done_lines(out.splitlines())
    assert sorted(more) == sorted(
        (sid, before.get(sid, 0) + k) for sid in SESSIONS for k in (1, 2, 3)
    )
    after = anyio.run(verify, path, set(done + more), backend="trio")
    assert after == {sid: before.get(sid, 0) + 3 for sid in SESSIONS}
