"""Crash safety of whole player actions: SIGKILL an engine mid-game, then reopen.

A child process opens the engine (default adventure, simulated agents with their
latencies shrunk) and plays actions for three sessions concurrently, printing
``done <session> <turn>`` after each ``player_action`` returns. The parent kills it
with SIGKILL at random points, starts it again (it resumes every session from the
store), and finally checks: the store opens cleanly, every action reported done is
there with its narrative, turn counters equal transcript rows, and no turn is
recorded twice.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import textwrap
from pathlib import Path

import anyio
import crashkit
import pytest

import engine
from engine.state import SessionStore

pytestmark = pytest.mark.slow

SESSIONS = ("alpha", "beta", "gamma")
ACTIONS = ("I search the altar for traps", "I attack the skeleton", "We take a short rest")

CHILD = textwrap.dedent(
    """
    import sys, trio, attrs
    import engine

    async def main(cache, state_path, sessions, actions):
        config = engine.Config()
        config = attrs.evolve(config, module=attrs.evolve(
            config.module, include_srd=False, cache_dir=cache),
            simulation=attrs.evolve(config.simulation, time_scale=0.001))
        actions = actions.split("|")
        async with engine.open_engine(config, state_path=state_path) as dm:
            async def play(sid):
                i = 0
                while True:
                    result = await dm.player_action(sid, actions[i % len(actions)])
                    print(f"done {sid} {result.turn}", flush=True)
                    i += 1
            async with trio.open_nursery() as nursery:
                for sid in sessions.split(","):
                    nursery.start_soon(play, sid)

    trio.run(main, *sys.argv[1:5])
    """
)


def spawn(cache: Path, state: Path) -> subprocess.Popen[str]:
    return crashkit.spawn(CHILD, str(cache), str(state), ",".join(SESSIONS), "|".join(ACTIONS))


def play_and_kill(proc: subprocess.Popen[str], n_lines: int, delay: float) -> set[tuple[str, int]]:
    return set(crashkit.done_lines(crashkit.kill_after(proc, n_lines, delay)))


async def verify(path: Path, done: set[tuple[str, int]]) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    turns = {}
    async with SessionStore.open(path) as store:
        for sid in await store.session_ids():
            state = await store.get_session(sid)
            entries = await store.transcript(sid)
            assert [e.turn for e in entries] == list(range(1, state.turn + 1))
            for entry in entries:  # whole rows: the action, its type and its narrative
                assert entry.action_text in ACTIONS
                assert entry.action_type and entry.narrative.startswith("You ")
                assert set(entry.responses) == set(engine.Config().agents_for(entry.action_type))
            turns[sid] = state.turn
    for sid, turn in done:
        assert turn <= turns.get(sid, 0), f"{sid} turn {turn} was reported done but is lost"
    return turns


def test_player_actions_survive_SIGKILL(tmp_path: Path) -> None:
    cache, state = tmp_path / "cache", tmp_path / "sessions.sqlite"

    async def compile_module() -> None:  # outside the kill loop: a kill is not a compile test
        store = await engine.open_module("default", include_srd=False, cache_dir=cache)
        await store.aclose()

    anyio.run(compile_module)
    rng = random.Random("dm-engine engine crash")
    done: set[tuple[str, int]] = set()
    for _ in range(6):
        now = play_and_kill(spawn(cache, state), rng.randint(1, 12), rng.uniform(0, 0.01))
        assert not now & done, "a turn reported done was recorded again"
        done |= now
        anyio.run(verify, state, done)
    assert len(done) >= 6
