"""The load test: no action lost, transcripts in order, the overhead decomposition."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anyio
import attrs
import pytest
import trio
import trio.testing

from engine.benchmark.load import (
    SCRIPT,
    ActionTiming,
    LoadResult,
    action_timing,
    run_load_test,
)
from engine.benchmark.load_command import run_load_command
from engine.classify import classify_action
from engine.config import Config
from engine.observability.profiler import PerformanceProfiler, Span
from engine.state import SessionStore


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modules")


def small_config(module_dir: Path) -> Config:
    """The default adventure without the SRD, compiled into a test folder."""
    config = Config()
    module = attrs.evolve(
        config.module, include_srd=False, cache_dir=str(module_dir), query_in_thread=False
    )
    return attrs.evolve(config, module=module)


def test_script_mixes_the_action_types() -> None:
    types = [classify_action(text) for text in SCRIPT]
    assert {"exploration", "combat", "roleplay", "question", "rest"} <= set(types)
    assert len(SCRIPT) == 8


# ------------------------------------------------------------------ action_timing


def timed_tree(hedge: bool = False) -> Span:
    """A player_action tree with exact virtual times (see the asserts below)."""
    profiler = PerformanceProfiler(clock=trio.current_time)
    root: list[Span] = []

    async def agent(name: str, start: float, end: float, fail: bool = False) -> None:
        await trio.sleep_until(start)
        try:
            with profiler.trace("agent_query", agent=name):
                await trio.sleep_until(end)
                if fail:
                    raise RuntimeError("lost the race")
        except RuntimeError:
            pass

    async def main() -> None:
        t0 = trio.current_time()
        assert t0 == 0
        with profiler.trace("player_action") as span:
            root.append(span)
            async with trio.open_nursery() as nursery:
                if hedge:  # attempt 1 slow and dropped; the hedge from 1.5 wins at 2.5
                    nursery.start_soon(agent, "archivist", 1.0, 2.5, True)
                    nursery.start_soon(agent, "archivist", 1.5, 2.5)
                else:
                    nursery.start_soon(agent, "archivist", 1.0, 3.0)
                nursery.start_soon(agent, "module_keeper", 1.0, 2.0)
                nursery.start_soon(agent, "arbiter", 3.0, 4.0)
                nursery.start_soon(agent, "narrator", 4.5, 6.0)
            with profiler.trace("state_update"):
                await trio.sleep_until(6.5)
            await trio.sleep_until(7.0)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return root[0]


DAG = {
    "archivist": (),
    "module_keeper": (),
    "arbiter": ("archivist",),
    "narrator": ("arbiter", "module_keeper"),
}


def test_action_timing_subtracts_the_agent_critical_path() -> None:
    timing = action_timing(timed_tree(), DAG)
    # critical path: archivist 2 + arbiter 1 + narrator 1.5 (module_keeper is off it)
    assert timing == ActionTiming(
        total=7.0, agents=4.5, overhead=2.5, before_agents=1.0, state_update=0.5
    )


def test_action_timing_hedge_wait_ends_at_the_first_success() -> None:
    timing = action_timing(timed_tree(hedge=True), DAG)
    # the archivist's wait runs from its first attempt (1.0) to the hedge's win (2.5)
    assert timing.agents == 1.5 + 1.0 + 1.5
    assert timing.overhead == 7.0 - 4.0


def test_action_timing_counts_a_skipped_agent_as_no_wait() -> None:
    dag = {**DAG, "ghost": ("narrator",)}  # never ran: no span
    assert action_timing(timed_tree(), dag).agents == 4.5


# ------------------------------------------------------------------ whole runs


async def check_store(path: Path, result: LoadResult) -> None:
    """Independently of the run's own check: every session's transcript holds the
    scripted texts it sent, in order, turns 1..n, and its turn counter is n."""
    n = result.actions_per_session
    async with SessionStore.open(path) as store:
        ids = await store.session_ids()
        assert len(ids) == result.sessions
        assert await store.count_actions() == result.sessions * n
        indexes = set()
        for sid in ids:
            index = int(sid.rsplit("-", 1)[1])
            indexes.add(index)
            transcript = await store.transcript(sid)
            assert [e.turn for e in transcript] == list(range(1, n + 1))
            expected = [SCRIPT[(index + step) % len(SCRIPT)] for step in range(n)]
            assert [e.action_text for e in transcript] == expected
            assert [e.action_type for e in transcript] == [classify_action(t) for t in expected]
            assert all(e.narrative for e in transcript)
            assert (await store.get_session(sid)).turn == n
        assert indexes == set(range(result.sessions))


def check_result(result: LoadResult, sessions: int, actions: int) -> None:
    expected = sessions * actions
    assert result.expected_actions == expected
    assert result.completed_actions == result.stored_actions == expected
    assert result.failed_actions == result.lost_actions == result.mismatched_sessions == 0
    assert result.no_loss and not result.errors
    assert result.max_concurrent_agents == 4 * sessions
    assert result.configured_max_concurrent_agents == 4
    assert result.overhead.count == result.agent_critical_path.count == expected
    for op in ("player_action", "context_building", "agent_query", "state_update"):
        assert op in result.operations
    assert result.operations["player_action"].count == expected
    assert result.overhead.p50 <= result.overhead.p95 <= result.overhead.p99
    assert result.peak_rss_bytes >= result.rss_before_bytes > 0
    data = result.as_dict()
    assert data["no_loss"] is True
    json.dumps(data)  # JSON-ready


@pytest.mark.anyio
async def test_small_load_loses_nothing(module_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    ticks: list[int] = []
    result = await run_load_test(
        small_config(module_dir),
        sessions=5,
        actions_per_session=3,
        time_scale=0.001,
        think_time=0.0,
        state_path=path,
        progress=ticks.append,
    )
    check_result(result, 5, 3)
    assert sum(ticks) == 15
    await check_store(path, result)


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_think_time_paces_the_sessions(module_dir: Path) -> None:
    t0 = anyio.current_time()
    result = await run_load_test(
        small_config(module_dir), sessions=3, actions_per_session=2, think_time=5.0
    )
    check_result(result, 3, 2)
    # virtual time: every session thinks 2.5..7.5 s between its two actions (no upper
    # bound: autojump may also skip ahead while the store's worker thread runs)
    assert anyio.current_time() - t0 >= result.wall_seconds >= 2.5


@pytest.mark.slow
@pytest.mark.anyio
async def test_hundred_sessions_lose_nothing(module_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    result = await run_load_test(
        small_config(module_dir),
        sessions=100,
        actions_per_session=3,
        time_scale=0.001,
        think_time=0.0,
        state_path=path,
    )
    check_result(result, 100, 3)
    await check_store(path, result)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sessions": 0}, "sessions must be >= 1"),
        ({"sessions": 1, "actions_per_session": 0}, "actions_per_session must be >= 1"),
        ({"sessions": 1, "time_scale": 0.0}, "time_scale must be"),
        ({"sessions": 1, "think_time": -1.0}, "think_time must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict[str, float], message: str) -> None:
    async def main() -> None:
        await run_load_test(Config(), **kwargs)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match=message):
        trio.run(main)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
def test_load_command_writes_load_json(module_dir: Path, tmp_path: Path, backend: str) -> None:
    args = argparse.Namespace(
        sessions=3,
        backend=backend,
        out=str(tmp_path / "out"),
        seed=7,
        scenario="hosted",
        actions=2,
        time_scale=0.001,
        think_time=0.0,
        fail_on_miss=False,
    )
    assert run_load_command(small_config(module_dir), args) == 0
    data = json.loads((tmp_path / "out" / "load.json").read_text())
    load = data["load"]
    assert load["backend"] == backend
    assert load["sessions"] == 3 and load["expected_actions"] == load["stored_actions"] == 6
    assert load["lost_actions"] == 0 and load["no_loss"] is True
    assert data["environment"]["seed"] == 7 and data["environment"]["scenario"] == "hosted"
    assert set(load["overhead"]) == {"count", "p50", "p95", "p99", "mean", "max"}
    assert isinstance(data["overhead_goal_met"], bool)
