"""The player action end to end, on trio (virtual time) and asyncio."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from gc_watch import engine_cyclic_garbage
from hypothesis import given, settings
from hypothesis import strategies as st
from virtual_clock import run_virtual

import engine
from engine.agents.base import AgentRequest, Status
from engine.config import Config

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modules")


def make_config(module_dir: Path, *, time_scale: float = 1.0, **parallel: Any) -> Config:
    config = Config()
    module = attrs.evolve(
        config.module, include_srd=False, cache_dir=str(module_dir), query_in_thread=False
    )
    par = attrs.evolve(config.performance.parallelization, **parallel)
    perf = attrs.evolve(config.performance, parallelization=par)
    # SQLite on the loop: a worker-thread wait would let the mock clock's autojump
    # advance virtual time mid-action and make the timing assertions flaky
    state = attrs.evolve(config.state, write_in_thread=False)
    sim = attrs.evolve(config.simulation, time_scale=time_scale)
    return attrs.evolve(config, module=module, performance=perf, state=state, simulation=sim)


@attrs.define(eq=False)
class Recorder:
    """An agent that answers after ``delay`` and records what it was given."""

    name: str
    delay: float = 0.125  # short on asyncio's real clock; exact in binary
    fail: bool = False
    calls: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    intervals: list[tuple[str, float, float]] = attrs.field(factory=list)

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        start = anyio.current_time()
        self.calls.append((str(request.context["action"]), dict(inputs)))
        await anyio.sleep(self.delay)
        self.intervals.append((str(request.context["action"]), start, anyio.current_time()))
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        return {
            "text": f"{self.name} on {request.context['action']}",
            "state_changes": {self.name: 1},
        }


def recorders(config: Config, **overrides: Recorder) -> dict[str, Recorder]:
    return {name: overrides.get(name, Recorder(name)) for name in config.agents}


async def test_action_end_to_end_with_simulated_agents(module_dir: Path, tmp_path: Path) -> None:
    # time_scale shrinks the simulated latencies (asyncio runs on the real clock)
    config = make_config(module_dir, time_scale=0.02)
    async with engine.open_engine(config, state_path=tmp_path / "s.sqlite") as dm:
        result = await dm.player_action("s1", "I search the altar for traps")
        second = await dm.player_action("s1", "I attack the skeleton")
        transcript = await dm.store.transcript("s1")
        lookups = dm.profiler.count("cache_lookup")
    # every chunk lookup of the second action's contexts went through the cache
    assert lookups > 0
    assert result.action_type == "exploration" and second.action_type == "combat"
    assert (result.turn, second.turn) == (1, 2)
    assert set(result.responses) == set(config.actions["exploration"])
    assert all(r.status is Status.OK for r in result.responses.values()), result.responses
    assert not result.degraded
    # the narrator used its inputs and its context
    ruling = result.responses["arbiter"].output["text"]
    assert "The rules say" in result.narrative and ruling.split("; ")[-1] in result.narrative
    narrator_titles = result.responses["narrator"].output["sources"]
    assert narrator_titles and narrator_titles[0] in result.narrative
    assert all(result.contexts[n].tokens <= config.agents[n].budget_tokens for n in result.contexts)
    # the span tree: one root with every step under it
    names = [s.name for s in result.span.walk()]
    assert names[0] == "player_action"
    for op in ("classify", "prefetch", "context_building", "agent_query", "state_update"):
        assert op in names
    assert names.count("agent_query") >= 4 and names.count("context_building") == 1
    assert [e.narrative for e in transcript] == [result.narrative, second.narrative]


async def test_an_action_leaves_no_cyclic_garbage(module_dir: Path, tmp_path: Path) -> None:
    """What an action makes is freed by reference counting when it ends: under load
    the cyclic collector's pauses land inside actions, and grow with its garbage."""
    config = make_config(module_dir, time_scale=0.02)
    async with engine.open_engine(config, state_path=tmp_path / "s.sqlite") as dm:
        for text in ("I search the altar for traps", "I attack the skeleton"):
            await dm.player_action("warm", text)  # whatever is made once is made
        with engine_cyclic_garbage() as ours:
            results = [
                await dm.player_action(sid, text)
                for sid in ("s1", "s2")
                for text in ("I search the altar for traps", "I attack the skeleton")
            ]
    assert [r.missing for r in results] == [()] * 4
    assert ours == []


@pytest.mark.parametrize("action_type", ["combat", "roleplay", "question", "rest", "system"])
async def test_dag_per_action_type_matches_config(
    module_dir: Path, tmp_path: Path, action_type: str
) -> None:
    texts = {
        "combat": "I attack the goblin",
        "roleplay": "I ask the innkeeper about the chapel",
        "question": "How does grappling work?",
        "rest": "We take a long rest",
        "system": "/save",
    }
    config = make_config(module_dir)
    agents = recorders(config)
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        result = await dm.player_action("s", texts[action_type])
    assert result.action_type == action_type
    expected = config.actions[action_type]
    assert list(result.responses) == list(expected)
    called = {name for name, a in agents.items() if a.calls}
    assert called == set(expected)
    for name in expected:
        deps = [d for d in config.agents[name].depends_on if d in expected]
        (_, inputs) = agents[name].calls[0]
        assert sorted(inputs) == sorted(deps)
        for d in deps:
            assert inputs[d]["text"] == f"{d} on {texts[action_type]}"


@pytest.mark.virtual_clock
async def test_degrades_within_the_deadline(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir)
    agents = recorders(config, arbiter=Recorder("arbiter", delay=1000.0))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        t0 = anyio.current_time()
        result = await dm.player_action("s", "I search the altar for traps")
        elapsed = anyio.current_time() - t0
        metrics = dm.executor  # keep the engine open while reading its state
        assert metrics.statistics().borrowed_tokens == 0
    deadline = config.performance.parallelization.action_deadline_seconds
    assert elapsed <= deadline
    assert result.responses["arbiter"].status is Status.TIMEOUT
    assert result.responses["narrator"].status is Status.SKIPPED
    assert result.degraded
    assert any("rules arbiter did not answer in time" in m for m in result.missing)
    assert any("narrator" in m for m in result.missing)
    # what succeeded is still told
    assert "archivist on I search" in result.narrative
    statuses = {
        s.attributes.get("agent"): s.status for s in result.span.walk() if s.name == "agent_query"
    }
    assert statuses["arbiter"] == "cancelled"
    assert result.span.attributes["degraded"] is True


async def test_failure_is_counted_in_metrics(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir)
    agents = recorders(config, archivist=Recorder("archivist", delay=0.01, fail=True))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        result = await dm.player_action("s", "I attack the goblin")
        assert result.responses["archivist"].status is Status.ERROR
        assert result.responses["arbiter"].status is Status.SKIPPED
        assert result.responses["narrator"].status is Status.SKIPPED
        text = dm.metrics.metrics_text() if dm.metrics is not None else ""
    assert 'dm_agent_failures_total{agent="archivist",status="error"} 1.0' in text


async def test_bad_text_is_rejected_and_nothing_is_written(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    async with engine.open_engine(
        config, agents=recorders(config), state_path=tmp_path / "s.sqlite"
    ) as dm:
        for bad in ("", "   ", "x" * (config.state.max_action_chars + 1)):
            with pytest.raises(engine.SessionError):
                await dm.player_action("s", bad)
        assert await dm.store.count_actions() == 0
        ok = await dm.player_action("s", "I look around")
        assert ok.turn == 1


@pytest.mark.virtual_clock
async def test_cancelled_action_writes_nothing_and_frees_the_session(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = recorders(config)
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        with anyio.move_on_after(0.2):  # while the arbiter runs
            await dm.player_action("s", "I attack the goblin")
        assert await dm.store.count_actions() == 0
        assert await dm.store.session_ids() == []  # its first record would have made it
        result = await dm.player_action("s", "I attack the goblin again")
        assert result.turn == 1
        assert dm.executor.statistics().borrowed_tokens == 0
        assert len(dm._locks) == 0


async def test_open_engine_closes_cleanly_when_cancelled(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir)
    with anyio.move_on_after(0.5) as scope:
        async with engine.open_engine(config, state_path=tmp_path / "s.sqlite") as dm:
            await dm.player_action("s", "I attack the goblin")
    assert scope.cancelled_caught
    # the store was closed and can be reopened
    async with engine.SessionStore.open(tmp_path / "s.sqlite") as store:
        assert await store.count_actions() == 0


@pytest.mark.parametrize("young", [50_000, 0])
async def test_the_collector_is_tuned_while_the_engine_is_open(
    module_dir: Path, tmp_path: Path, young: int
) -> None:
    config = make_config(module_dir)
    config = attrs.evolve(
        config, performance=attrs.evolve(config.performance, gc=engine.config.GcConfig(young))
    )
    found = gc.get_threshold()
    async with engine.open_engine(config, state_path=tmp_path / "s.sqlite") as dm:
        assert gc.get_threshold() == ((young or found[0]), *found[1:])
        await dm.player_action("s", "I attack the goblin")
    assert gc.get_threshold() == found


@pytest.mark.parametrize(
    ("tokens", "one", "two"),
    [
        # enough tokens for both sessions' 10 calls: two sessions take as long as one,
        # the critical path archivist -> arbiter -> narrator (3 x 0.125 s)
        (10, 3 * 0.125, 3 * 0.125),
        # one token: every call waits for the one before it, whichever session it is
        # of (the engine's one limiter): 5 calls for one action, 10 for two
        (1, 5 * 0.125, 10 * 0.125),
    ],
)
@pytest.mark.virtual_clock
async def test_sessions_run_concurrently(
    module_dir: Path, tmp_path: Path, tokens: int, one: float, two: float
) -> None:
    """A combat action: archivist -> arbiter -> narrator, with module_keeper and
    narrator_opening beside them; every call takes 0.125 s of virtual time. Sessions
    do not wait for each other, and share the engine's agent limiter."""
    config = make_config(module_dir, max_concurrent_agents=tokens)
    agents = recorders(config)
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        t0 = anyio.current_time()
        await dm.player_action("solo", "I attack the goblin")
        assert anyio.current_time() - t0 == one
        t0 = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(dm.player_action, "a", "I attack the goblin")
            tg.start_soon(dm.player_action, "b", "I attack the goblin")
        assert anyio.current_time() - t0 == two
    assert sum(len(agent.calls) for agent in agents.values()) == 3 * 5


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12))
def test_sessions_serialize_and_run_concurrently(
    backend: str, schedule: list[tuple[int, int]]
) -> None:
    """Actions of one session never overlap; all are stored, in turn order."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        config = make_config(Path(tmp))
        agents = recorders(config)

        async def main() -> list[Any]:
            results: list[Any] = []
            async with engine.open_engine(
                config, agents=agents, state_path=Path(tmp) / "s.sqlite"
            ) as dm:
                async with anyio.create_task_group() as tg:
                    for i, (session, delay) in enumerate(schedule):

                        async def act(
                            i: int = i, session: int = session, delay: int = delay
                        ) -> None:
                            await anyio.sleep(delay / 16)
                            results.append(
                                await dm.player_action(f"s{session}", f"I look at thing {i}")
                            )

                        tg.start_soon(act)
                stored = {f"s{s}": await dm.store.transcript(f"s{s}") for s, _ in schedule}
            return [results, stored]

        results, stored = run_virtual(backend, main)

    per_session: dict[str, list[Any]] = {}
    for r in results:
        per_session.setdefault(r.session_id, []).append(r)
    for session, rs in per_session.items():
        spans = sorted((r.span.start, r.span.end) for r in rs)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start  # serialized
        assert sorted(r.turn for r in rs) == list(range(1, len(rs) + 1))
        by_turn = {r.turn: r.text for r in rs}
        assert [e.action_text for e in stored[session]] == [by_turn[t] for t in sorted(by_turn)]
    assert len(results) == len(schedule)


async def test_session_state_carries_over_and_survives_cache_eviction(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)

    @attrs.define(eq=False)
    class SceneKeeper(Recorder):
        async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
            out = await super().run(request, inputs)
            return {**out, "state_changes": {"scene": f"scene after {request.context['action']}"}}

    agents = recorders(config, module_keeper=SceneKeeper("module_keeper"))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        dm.session_cache_size = 1  # every other action rereads the store
        turns = []
        for session, text in [
            ("a", "I look"),
            ("b", "I listen"),
            ("a", "I climb"),
            ("a", "I jump"),
        ]:
            turns.append((await dm.player_action(session, text)).turn)
        assert turns == [1, 1, 2, 3]
        seen = [(action, inputs) for action, inputs in agents["module_keeper"].calls]
        assert [a for a, _ in seen] == ["I look", "I listen", "I climb", "I jump"]
        state = await dm.store.get_session("a")
        assert state.turn == 3 and state.state["scene"] == "scene after I jump"


async def test_the_scene_reaches_the_next_actions_context(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir, time_scale=0.02)
    async with engine.open_engine(config, state_path=tmp_path / "s.sqlite") as dm:
        first = await dm.player_action("s", "I search the altar for traps")
        scene = first.responses["module_keeper"].output["state_changes"]["scene"]
        second = await dm.player_action("s", "I look around")
    assert scene and second.responses["module_keeper"].output["structured"]["location"] == scene


@pytest.mark.virtual_clock
async def test_hedges_are_counted_in_metrics(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir)
    agents_config = dict(config.agents)
    agents_config["archivist"] = attrs.evolve(agents_config["archivist"], hedge_after=0.25)
    perf = attrs.evolve(
        config.performance,
        hedging=attrs.evolve(config.performance.hedging, budget_fraction=1.0),
    )
    config = attrs.evolve(config, agents=agents_config, performance=perf)

    @attrs.define(eq=False)
    class SlowFirstAttempt(Recorder):
        async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
            if request.context.get("attempt", 1) == 1:
                await anyio.sleep(3)  # a straggler: the hedge at 0.25 s answers first
            return await super().run(request, inputs)

    agents = recorders(config, archivist=SlowFirstAttempt("archivist"))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        result = await dm.player_action("s", "I attack the goblin")
        assert dm.metrics is not None
        text = dm.metrics.metrics_text()
    archivist = result.responses["archivist"]
    assert archivist.hedged and archivist.hedge_won and archivist.attempts == 2
    assert archivist.duration == 0.25 + 0.125
    # both attempts are traced in the action's tree (the hedge was sent by the engine's
    # shared timer task, in the request's context)
    attempts = sorted(
        (s.attributes.get("attempt"), s.status)
        for s in result.span.walk()
        if s.name == "agent_query" and s.attributes.get("agent") == "archivist"
    )
    assert attempts == [(1, "cancelled"), (2, "ok")]
    assert 'dm_hedges_sent_total{agent="archivist"} 1.0' in text
    assert 'dm_hedges_won_total{agent="archivist"} 1.0' in text


async def test_lazy_loading_off_loads_every_section_at_start(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    lazy = attrs.evolve(config.performance.lazy_loading, enabled=False)
    config = attrs.evolve(config, performance=attrs.evolve(config.performance, lazy_loading=lazy))
    async with engine.open_engine(
        config, agents=recorders(config), state_path=tmp_path / "s"
    ) as dm:
        sections = dm.lazy.module.section_names()
        assert sections and all(dm.lazy.is_loaded(s) for s in sections)


async def test_preload_starts_the_urgent_sections(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir)
    async with engine.open_engine(
        config, agents=recorders(config), state_path=tmp_path / "s"
    ) as dm:
        known = set(dm.lazy.module.section_names())
        urgent = {s[0] for s in config.performance.lazy_loading.priorities.values() if s} & known
        assert urgent  # the bundled adventure has locations, npcs, encounters
        # started in the background by open_engine: each one loaded or in flight
        pending = set(dm.lazy.statistics().pending_background)
        assert {s for s in urgent if dm.lazy.is_loaded(s)} | pending == urgent
        with anyio.fail_after(5):
            await dm.lazy.ensure_loaded(*urgent)  # joins those loads, starts none
        assert dm.cache.statistics().loads == len(urgent)
        assert not all(dm.lazy.is_loaded(s) for s in known)  # and nothing more


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("I open the \ud800 door", "cannot be stored: .*lone surrogate"),
        ("I open the \x00 door", "cannot be stored: .*NUL character"),
        (42, "must be a str, got int"),
        ("   ", "empty"),
    ],
)
async def test_unusable_text_is_rejected_before_any_agent_runs(
    module_dir: Path, tmp_path: Path, text: Any, message: str
) -> None:
    config = make_config(module_dir)
    agents = recorders(config)
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        with pytest.raises(engine.SessionError, match=message):
            await dm.player_action("s", text)
        assert all(not a.calls for a in agents.values())
        assert (await dm.player_action("s", "I look around")).turn == 1


async def test_the_scene_gives_the_builder_the_npcs_present(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    seen: list[Any] = []

    @attrs.define(eq=False)
    class Keeper:
        async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
            seen.append(request.context.get("npcs_present"))
            return {"text": "scene", "state_changes": {"npcs_present": ["Skrit"]}}

    agents = {**recorders(config), "module_keeper": Keeper()}
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s.sqlite") as dm:
        await dm.player_action("s", "I look around")
        await dm.player_action("s", "I look around again")
    assert seen == [[], ["Skrit"]]


async def test_tokens_are_counted_per_call_and_per_action(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir, time_scale=0.02)
    async with engine.open_engine(config, state_path=tmp_path / "s.sqlite") as dm:
        result = await dm.player_action("s1", "I attack the skeleton")
        text = dm.metrics.metrics_text() if dm.metrics is not None else ""
    spans = [s for s in result.span.walk() if s.name == "agent_query"]
    usages = [s.attributes["usage"] for s in spans]
    assert usages and all(
        {"input_tokens", "cached_tokens", "output_tokens"} <= set(u) for u in usages
    )
    assert result.tokens["prompt"] == sum(u["input_tokens"] for u in usages)
    assert result.tokens["generated"] == sum(u["output_tokens"] for u in usages)
    assert 'dm_agent_prompt_tokens_total{agent="narrator",cache="uncached"}' in text
