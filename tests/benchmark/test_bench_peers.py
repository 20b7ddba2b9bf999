"""bench/bench_peers.py: every runtime really runs the shipped agent DAG, with parallel
branches, on the same draws; peers.json has its schema. No duration is asserted."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

pytest.importorskip("langgraph", reason="the [bench] extra: pip install -e '.[bench]'")
pytest.importorskip("pydantic_graph", reason="the [bench] extra: pip install -e '.[bench]'")

from bench.bench_peers import (
    RUNTIMES,
    Action,
    Draws,
    EngineRuntime,
    PydanticGraphRuntime,
    Work,
    dag_of,
    main,
    make_runtimes,
    run_batch,
)
from engine.agents.simulated import SimulatedAgent
from engine.config import Config

Trace = list[tuple[str, str, str, int]]
PEERS = ("langgraph", "pydantic-graph")


def every_action_type(config: Config, repeat: int = 2) -> list[Action]:
    types = sorted(config.actions)
    return [Action(str(i), types[i % len(types)]) for i in range(repeat * len(types))]


def skip_peers_on_trio(name: str, backend: tuple[str, dict[str, Any]]) -> None:
    if name in PEERS and backend[0] != "asyncio":
        pytest.skip(f"{name} runs on asyncio")


def engine_loop(backend: tuple[str, dict[str, Any]]) -> str:
    return str(backend[0])


def check_trace(
    config: Config, actions: Sequence[Action], trace: Trace, *, hedged: bool = False
) -> None:
    """Each agent of each action started exactly once (first attempts), after every one
    of its shipped dependencies finished, and finished; nothing else ran."""
    assert trace, "no agent ran"
    events: dict[tuple[str, str], list[tuple[int, str, int]]] = defaultdict(list)
    for index, (event, key, agent, attempt) in enumerate(trace):
        events[(key, agent)].append((index, event, attempt))
    for action in actions:
        chosen = config.agents_for(action.action_type)
        ran = {agent for key, agent in events if key == action.key}
        assert ran == set(chosen), (action, ran)
        for agent in chosen:
            seen = events[(action.key, agent)]
            starts = [i for i, e, a in seen if e == "start" and a == 1]
            finishes = [i for i, e, _ in seen if e == "finish"]
            assert len(starts) == 1, (action, agent, seen)
            assert finishes, (action, agent, seen)
            if not hedged:
                assert [a for _, _, a in seen] == [1, 1], (action, agent, seen)
            # the shipped DAG: depends_on within the action's agents, not the runner's copy
            for dep in (d for d in config.agents[agent].depends_on if d in chosen):
                dep_finished = min(i for i, e, _ in events[(action.key, dep)] if e == "finish")
                assert dep_finished < starts[0], (action, agent, dep)


@pytest.mark.anyio
@pytest.mark.parametrize("name", RUNTIMES)
async def test_every_runtime_runs_each_agent_once_after_its_dependencies(
    name: str, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    skip_peers_on_trio(name, anyio_backend)
    config = Config()
    actions = every_action_type(config)
    draws = Draws(config, time_scale=1e-4)  # the real draws, tiny
    draws.prepare(actions)
    works = {n: Work(draws, trace=[]) for n in RUNTIMES}
    runtime = make_runtimes(config, works, engine_loop(anyio_backend))[name]
    samples = await run_batch(runtime, actions)
    assert len(samples) == len(actions)
    check_trace(config, actions, works[name].trace or [], hedged=name == "dm-engine-hedged")
    if name != "dm-engine-hedged":
        assert works[name].calls == sum(len(config.agents_for(a.action_type)) for a in actions)


@pytest.mark.anyio
@pytest.mark.parametrize("name", RUNTIMES)
async def test_the_roots_of_an_action_run_in_parallel(
    name: str, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    """Every agent without dependencies waits until all of the action's roots have
    started: a runtime that ran them one after another would never get past the first."""
    skip_peers_on_trio(name, anyio_backend)
    config = Config()
    actions = [a for a in every_action_type(config) if len(roots(config, a)) > 1]
    assert {a.action_type for a in actions} >= {"combat", "roleplay", "rest"}
    started: dict[str, set[str]] = defaultdict(set)
    all_in: dict[str, anyio.Event] = {}
    work = Work(trace=[])

    async def call(key: str, agent: str, attempt: int = 1) -> str:
        action = next(a for a in actions if a.key == key)
        expected = roots(config, action)
        if agent in expected:
            started[key].add(agent)
            event = all_in.setdefault(key, anyio.Event())
            if started[key] == expected:
                event.set()
            with anyio.fail_after(5):  # a deadlock guard, not a duration
                await event.wait()
        return await work(key, agent, attempt)

    calls = dict.fromkeys(RUNTIMES, call)
    runtime = make_runtimes(config, calls, engine_loop(anyio_backend))[name]
    await run_batch(runtime, actions)
    check_trace(config, actions, work.trace or [])
    assert set(all_in) == {a.key for a in actions}


def roots(config: Config, action: Action) -> set[str]:
    return {agent for agent, deps in dag_of(config, action.action_type).items() if not deps}


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["dm-engine", "langgraph"])
async def test_a_node_with_several_dependencies_is_a_join(
    name: str, anyio_backend: tuple[str, dict[str, Any]]
) -> None:
    """Not in the shipped DAG, but configurable: the narrator after the ruling and the
    scene. LangGraph waits on the list of its sources."""
    skip_peers_on_trio(name, anyio_backend)
    base = Config()
    narrator = attrs.evolve(base.agents["narrator"], depends_on=("arbiter", "module_keeper"))
    config = attrs.evolve(base, agents={**base.agents, "narrator": narrator})
    actions = [Action(str(i), "combat") for i in range(4)]
    draws = Draws(config, time_scale=1e-4)
    work = Work(draws, trace=[])
    runtime = make_runtimes(config, dict.fromkeys(RUNTIMES, work), engine_loop(anyio_backend))
    await run_batch(runtime[name], actions)
    check_trace(config, actions, work.trace or [])


def test_pydantic_graph_runner_refuses_several_dependencies() -> None:
    base = Config()
    narrator = attrs.evolve(base.agents["narrator"], depends_on=("arbiter", "module_keeper"))
    config = attrs.evolve(base, agents={**base.agents, "narrator": narrator})
    with pytest.raises(ValueError, match="several"):
        PydanticGraphRuntime(config, Work()).graph("combat")


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_hedges_sleep_their_own_second_draw(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    """With a fixed hedge delay (virtual time: exact), a hedged call's second attempt
    sleeps the attempt-2 draw: it wins exactly when delay + second draw < first draw."""
    base = Config()
    delay = 0.03
    agents = {
        n: attrs.evolve(a, hedge_after=delay) if a.hedge_after != "off" else a
        for n, a in base.agents.items()
    }
    config = attrs.evolve(base, agents=agents)
    actions = [Action(str(i), "combat") for i in range(60)]
    draws = Draws(config, time_scale=0.1)
    draws.prepare(actions)
    work = Work(draws, trace=[])
    runtime = EngineRuntime(config, work, hedged=True)
    await run_batch(runtime, actions)
    trace = work.trace or []
    check_trace(config, actions, trace, hedged=True)
    hedges = {(k, agent) for e, k, agent, attempt in trace if e == "start" and attempt == 2}
    assert hedges, "no hedge was sent"
    finished: dict[tuple[str, str], set[int]] = defaultdict(set)
    for e, k, agent, attempt in trace:
        if e == "finish":
            finished[(k, agent)].add(attempt)
    for key, agent in hedges:
        first, second = draws.latency(key, agent, 1), draws.latency(key, agent, 2)
        assert first > delay
        assert finished[(key, agent)] == ({2} if delay + second < first else {1})


def test_draws_are_the_strategy_comparisons() -> None:
    config = Config()
    draws = Draws(config, time_scale=0.5)
    for agent, spec in config.agents.items():
        if spec.from_retrieval:
            assert draws.latency("7", agent) == 0.0
            continue
        simulated = SimulatedAgent.from_config(agent, config, time_scale=0.5)
        for attempt in (1, 2):
            expected = simulated.latency("7", attempt, uncached_tokens=spec.budget_tokens)
            assert draws.latency("7", agent, attempt) == expected
    critical, barrier = draws.bounds(Action("7", "combat"))
    lat = {a: draws.latency("7", a) for a in config.agents_for("combat")}
    assert critical == max(
        lat["module_keeper"],
        lat["narrator_opening"],
        lat["archivist"] + lat["arbiter"] + lat["narrator"],
    )
    first_level = max(lat["archivist"], lat["module_keeper"], lat["narrator_opening"])
    assert barrier == pytest.approx(first_level + lat["arbiter"] + lat["narrator"])


def test_peers_json_schema(tmp_path: Path) -> None:
    types = ("combat", "question", "rest")
    document = main(
        [
            "--out",
            str(tmp_path),
            "--actions",
            "6",
            "--time-scale",
            "0.0005",
            "--warmup",
            "2",
            "--overhead-actions",
            "12",
            "--rounds",
            "2",
            "--action-types",
            ",".join(types),
        ]
    )
    written = json.loads((tmp_path / "peers.json").read_text())
    assert written == json.loads(json.dumps(document))
    config = Config()
    calls = sum(len(config.agents_for(types[i % 3])) for i in range(6))
    runtimes: Mapping[str, Any] = written["runtimes"]
    assert list(runtimes) == list(RUNTIMES)
    for name, entry in runtimes.items():
        assert entry["loop"] == ("trio" if name.startswith("dm-engine") else "asyncio")
        assert 0 < entry["p50_s"] <= entry["p95_s"] <= entry["p99_s"]
        assert entry["mean_s"] > 0 and entry["actions"] == 6
        assert entry["overhead_us_mean"] > 0 and entry["overhead_us_p95"] > 0
        if name == "dm-engine-hedged":
            assert entry["agent_calls"] == calls + entry["hedges_sent"]
            assert 0 <= entry["hedges_won"] <= entry["hedges_sent"]
        else:
            assert entry["agent_calls"] == calls
    for name, ratios in written["ratios_vs_dm_engine"].items():
        assert set(ratios) == {"p50_s", "p95_s", "p99_s", "overhead_us_mean", "overhead_us_p95"}
        expected = runtimes[name]["p95_s"] / runtimes["dm-engine"]["p95_s"]
        assert ratios["p95_s"] == pytest.approx(expected)
    assert set(written["at_or_below_every_peer"]) == {"dm-engine", "dm-engine-hedged"}
    for bound in ("critical_path", "level_barrier"):
        b = written["bounds"][bound]
        assert 0 < b["p50_s"] <= b["p95_s"] <= b["p99_s"]
    bounds = written["bounds"]
    assert bounds["critical_path"]["mean_s"] <= bounds["level_barrier"]["mean_s"]
    settings = written["settings"]
    assert settings["action_types"] == list(types) and settings["time_scale"] == 0.0005
    assert (settings["scenario"], settings["seed"]) == ("targets", config.simulation.seed)
    versions = written["environment"]["versions"]
    assert {"langgraph", "pydantic-graph", "trio", "anyio"} <= set(versions)
