"""``DungeonMaster.stream_action``: the narrative streamed piece by piece, on trio
(virtual time, exact) and asyncio (real time, small delays for ordering only)."""

from __future__ import annotations

import gc
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import engine
from engine.agents.base import AgentRequest, Status
from engine.config import Config
from engine.errors import SessionError
from engine.pipeline import DungeonMaster
from engine.state import SessionStore
from engine.streaming import Narrative

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

pytestmark = pytest.mark.anyio

# "I attack the goblin" is a combat action: archivist, module_keeper, arbiter (after the
# archivist), narrator_opening and narrator (after the arbiter); the last two narrate.
ATTACK = "I attack the goblin"
T = 1 / 16  # a time step: exact in binary, short enough for asyncio's real clock


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("modules")


def make_config(module_dir: Path) -> Config:
    config = Config()
    module = attrs.evolve(
        config.module, include_srd=False, cache_dir=str(module_dir), query_in_thread=False
    )
    # SQLite on the loop: a worker-thread wait would let the mock clock jump mid-action
    state = attrs.evolve(config.state, write_in_thread=False)
    return attrs.evolve(config, module=module, state=state)


@attrs.define(eq=False)
class Recorder:
    """A non-streaming agent: answers after ``delay``; notes calls and cancellations."""

    name: str
    delay: float = T / 2
    fail: bool = False
    calls: list[str] = attrs.field(factory=list)
    cancelled: list[float] = attrs.field(factory=list)
    streamed: list[bool] = attrs.field(factory=list)  # was on_delta set, per call

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        self.calls.append(str(request.context["action"]))
        self.streamed.append(request.on_delta is not None)
        try:
            await anyio.sleep(self.delay)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(anyio.current_time())
            raise
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        return {"text": f"[{self.name}]", "state_changes": {self.name: 1}}


@attrs.define(eq=False)
class Streamer:
    """Writes each ``(seconds after its start, piece)`` of ``script`` to ``on_delta``.

    ``stream=False``: ignores ``on_delta`` (answers whole). ``fail_after=n``: raises
    after writing ``n`` pieces. ``end``: when it returns (default: at its last piece).
    """

    name: str
    script: Sequence[tuple[float, str]]
    stream: bool = True
    fail_after: int | None = None
    end: float | None = None
    starts: list[float] = attrs.field(factory=list)
    written: list[tuple[float, str]] = attrs.field(factory=list)
    cancelled: list[float] = attrs.field(factory=list)
    streamed: list[bool] = attrs.field(factory=list)  # was on_delta set, per call

    @property
    def text(self) -> str:
        return "".join(piece for _, piece in self.script)

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        start = anyio.current_time()
        self.starts.append(start)
        self.streamed.append(request.on_delta is not None)
        try:
            for i, (at, piece) in enumerate(self.script):
                await anyio.sleep_until(start + at)
                if self.fail_after == i:
                    raise RuntimeError(f"{self.name} broke")
                if self.stream and request.on_delta is not None:
                    request.on_delta(piece)
                self.written.append((anyio.current_time(), piece))
            if self.end is not None:
                await anyio.sleep_until(start + self.end)
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(anyio.current_time())
            raise
        if self.fail_after == len(self.script):
            raise RuntimeError(f"{self.name} broke")
        return {"text": self.text, "state_changes": {self.name: 1}}


OPENING = [(T, "You raise"), (2 * T, " your blade.")]
SLOW_OPENING = [(2 * T, "You raise"), (4 * T, " your blade.")]
OUTCOME = [(T, "The goblin"), (2 * T, " staggers"), (3 * T, " back.")]


def agents_with(**narrators: Any) -> dict[str, Any]:
    agents: dict[str, Any] = {
        name: Recorder(name) for name in ("archivist", "module_keeper", "arbiter")
    }
    agents["narrator_opening"] = narrators.get("narrator_opening") or Streamer(
        "narrator_opening", OPENING
    )
    agents["narrator"] = narrators.get("narrator") or Streamer("narrator", OUTCOME)
    return agents


async def read_all(dm: DungeonMaster, session: str, text: str) -> tuple[list[str], Any]:
    async with dm.stream_action(session, text) as stream:
        pieces = [piece async for piece in stream]
    return pieces, stream.result


# ----------------------------------------------------------------------- the narrative


async def test_pieces_arrive_in_order_and_join_to_the_narrative(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        pieces, result = await read_all(dm, "s", ATTACK)
        transcript = await dm.store.transcript("s")
    assert pieces == ["You raise", " your blade.", " The goblin", " staggers", " back."]
    assert "".join(pieces) == result.narrative == "You raise your blade. The goblin staggers back."
    assert [e.narrative for e in transcript] == [result.narrative]
    assert result.turn == 1 and not result.degraded
    assert all(r.status is Status.OK for r in result.responses.values())
    # only the narrating agents are asked to stream
    assert {name: a.streamed for name, a in agents.items()} == {
        "archivist": [False],
        "module_keeper": [False],
        "arbiter": [False],
        "narrator_opening": [True],
        "narrator": [True],
    }
    assert result.first_token is not None and result.first_token > 0


async def test_the_opening_comes_first_even_when_the_narrator_writes_first(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    # the narrator (started at T, after archivist and arbiter) is done at 4 T; the
    # opening writes its first piece at 6 T and its last at 8 T
    late_opening = Streamer("narrator_opening", [(6 * T, "You raise"), (8 * T, " your blade.")])
    agents = agents_with(narrator_opening=late_opening)
    received: list[tuple[float, str]] = []
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        t0 = anyio.current_time()
        async with dm.stream_action("s", ATTACK) as stream:
            async for piece in stream:
                received.append((anyio.current_time() - t0, piece))
        result = stream.result
    narrator: Streamer = agents["narrator"]
    assert narrator.written[-1][0] < late_opening.written[0][0]  # the narrator wrote first
    pieces = [p for _, p in received]
    assert pieces == ["You raise", " your blade.", " The goblin", " staggers", " back."]
    assert "".join(pieces) == result.narrative


@pytest.mark.virtual_clock
async def test_a_later_parts_pieces_wait_for_the_earlier_part(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    # opening: pieces at 2 T and 9 T; the narrator (started at T) writes at 2 T..4 T
    opening = Streamer("narrator_opening", [(2 * T, "You raise"), (9 * T, " your blade.")])
    agents = agents_with(narrator_opening=opening)
    received: list[tuple[float, str]] = []
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        async with dm.stream_action("s", ATTACK) as stream:
            async for piece in stream:
                received.append((anyio.current_time(), piece))
        result = stream.result
    start = result.span.start
    assert [(t - start, p) for t, p in received] == [
        (2 * T, "You raise"),
        (9 * T, " your blade."),
        # held back until the opening was done, then all at once
        (9 * T, " The goblin"),
        (9 * T, " staggers"),
        (9 * T, " back."),
    ]
    assert result.first_token == 2 * T


async def test_a_narrating_agent_that_does_not_stream_appears_whole(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    whole = Streamer("narrator_opening", OPENING, stream=False)
    agents = agents_with(narrator_opening=whole)
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        pieces, result = await read_all(dm, "s", ATTACK)
    assert pieces == ["You raise your blade.", " The goblin", " staggers", " back."]
    assert "".join(pieces) == result.narrative == "You raise your blade. The goblin staggers back."


async def test_a_second_part_that_does_not_stream_appears_whole(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with(narrator=Streamer("narrator", OUTCOME, stream=False))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        pieces, result = await read_all(dm, "s", ATTACK)
    assert pieces == ["You raise", " your blade.", " The goblin staggers back."]
    assert "".join(pieces) == result.narrative


@pytest.mark.parametrize("fail_after", [0, 1], ids=["before-writing", "after-one-piece"])
async def test_a_failed_opening_leaves_the_rest_and_the_missing_line(
    module_dir: Path, tmp_path: Path, fail_after: int
) -> None:
    config = make_config(module_dir)
    broken = Streamer("narrator_opening", OPENING, fail_after=fail_after)
    agents = agents_with(narrator_opening=broken)
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        pieces, result = await read_all(dm, "s", ATTACK)
        transcript = await dm.store.transcript("s")
    assert result.responses["narrator_opening"].status is Status.ERROR
    assert result.missing == (
        "The scene-setting lines are missing this turn: the narrator ran into an error.",
    )
    assert result.degraded
    narrative = result.narrative
    assert "".join(pieces) == narrative == transcript[-1].narrative
    # what was written before the failure stays (the player has seen it), then the
    # narrator's part, what the other agents found, and the missing-part line
    told = "You raise The goblin staggers back." if fail_after else "The goblin staggers back."
    assert narrative.startswith(told)
    assert "[archivist]" in narrative and "[arbiter]" in narrative
    assert narrative.endswith(f"\n\n({result.missing[0]})")


async def test_a_failed_narrator_leaves_the_opening_and_the_missing_line(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with()
    agents["arbiter"] = Recorder("arbiter", fail=True)  # the narrator is skipped
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        pieces, result = await read_all(dm, "s", ATTACK)
    assert result.responses["narrator"].status is Status.SKIPPED
    assert agents["narrator"].starts == []
    assert "".join(pieces) == result.narrative
    assert pieces[:2] == ["You raise", " your blade."]
    assert result.narrative.startswith("You raise your blade.")
    assert any("rules arbiter ran into an error" in m for m in result.missing)
    assert any(m.startswith("The narrator could not finish") for m in result.missing)
    assert result.narrative.endswith(")")


async def test_a_narrator_failing_mid_stream_keeps_what_it_wrote(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with(narrator=Streamer("narrator", OUTCOME, fail_after=1))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        pieces, result = await read_all(dm, "s", ATTACK)
        transcript = await dm.store.transcript("s")
    assert result.responses["narrator"].status is Status.ERROR
    assert pieces[:3] == ["You raise", " your blade.", " The goblin"]
    assert "".join(pieces) == result.narrative == transcript[-1].narrative
    assert result.narrative.startswith("You raise your blade. The goblin [archivist]")
    assert result.narrative.endswith(
        "\n\n(The narrator could not finish this turn; here is what the others found.)"
    )


async def test_an_action_without_narrating_agents_streams_its_text_whole(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        pieces, result = await read_all(dm, "s", "/save")  # system: module_keeper only
    assert result.action_type == "system"
    assert pieces == ["[module_keeper]"] == [result.narrative]
    assert result.first_token is not None


# ----------------------------------------------------------------------- leaving early


async def _assert_untouched_and_next_turn_works(
    dm: DungeonMaster, agents: Mapping[str, Any], turn_before: int
) -> None:
    if turn_before == 0:  # a first action that was never recorded leaves no session
        assert await dm.store.find_session("s") is None
    else:
        assert await dm.store.count_actions("s") == turn_before
        assert len(await dm.store.transcript("s")) == turn_before
        assert (await dm.store.get_session("s")).turn == turn_before
    stats = dm.executor.statistics()
    assert stats.borrowed_tokens == 0 and stats.waiting == 0
    assert len(dm._locks) == 0
    # the next action of the session works, with the next turn
    pieces, result = await read_all(dm, "s", "I attack the goblin again")
    assert result.turn == turn_before + 1
    assert "".join(pieces) == result.narrative
    assert await dm.store.count_actions("s") == turn_before + 1


async def test_break_after_the_first_piece_cancels_and_records_nothing(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with(narrator_opening=Streamer("narrator_opening", SLOW_OPENING))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        await read_all(dm, "s", "I look around")  # turn 1
        async with dm.stream_action("s", ATTACK) as stream:
            async for piece in stream:
                assert piece == "You raise"
                break
        with pytest.raises(RuntimeError, match="has not finished"):
            _ = stream.result
        # both narrating agents were running (the narrator writes until 4 T): both
        # saw the cancellation
        assert len(agents["narrator_opening"].cancelled) == 1
        assert len(agents["narrator"].cancelled) == 1
        await _assert_untouched_and_next_turn_works(dm, agents, turn_before=1)


async def test_leaving_before_reading_cancels_and_records_nothing(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        await read_all(dm, "s", "I look around")
        async with dm.stream_action("s", ATTACK) as stream:
            with pytest.raises(RuntimeError, match="has not finished"):
                _ = stream.result
        with pytest.raises(RuntimeError, match="has not finished"):
            _ = stream.result
        await _assert_untouched_and_next_turn_works(dm, agents, turn_before=1)


async def test_an_error_in_the_body_comes_out_as_itself_and_cancels(
    module_dir: Path, tmp_path: Path
) -> None:
    class Oops(Exception):
        pass

    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        await read_all(dm, "s", "I look around")
        with pytest.raises(Oops) as info:
            async with dm.stream_action("s", ATTACK) as stream:
                async for _ in stream:
                    raise Oops("the player's connection broke")
        assert not isinstance(info.value, BaseExceptionGroup)
        assert len(agents["narrator_opening"].cancelled) == 1
        await _assert_untouched_and_next_turn_works(dm, agents, turn_before=1)

    # and through open_engine too: not wrapped by the engine's nurseries
    with pytest.raises(Oops) as info:
        async with (
            engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm,
            dm.stream_action("s", ATTACK) as stream,
        ):
            async for _ in stream:
                raise Oops("again")
    assert type(info.value) is Oops


@pytest.mark.virtual_clock  # its times are checked: asyncio's real clock is too loose
async def test_cancellation_by_move_on_after_cancels_and_records_nothing(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    opening = Streamer("narrator_opening", SLOW_OPENING)
    agents = agents_with(narrator_opening=opening)
    pieces: list[str] = []
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        await read_all(dm, "s", "I look around")
        t0 = anyio.current_time()
        # the opening writes at 2 T and 4 T: leave between
        with anyio.move_on_after(3 * T) as scope:
            async with dm.stream_action("s", ATTACK) as stream:
                async for piece in stream:
                    pieces.append(piece)
        assert scope.cancelled_caught
        assert pieces == ["You raise"]
        assert len(opening.cancelled) == 1
        assert opening.cancelled[0] - t0 < 4 * T  # stopped before its second piece
        assert len(agents["narrator"].cancelled) == 1
        with pytest.raises(RuntimeError, match="has not finished"):
            _ = stream.result
        await _assert_untouched_and_next_turn_works(dm, agents, turn_before=1)


@pytest.mark.virtual_clock
async def test_cancellation_exact_times(module_dir: Path, tmp_path: Path) -> None:
    config = make_config(module_dir)
    agents = agents_with(narrator_opening=Streamer("narrator_opening", SLOW_OPENING))
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        t0 = anyio.current_time()
        with anyio.move_on_after(2.5 * T):
            async with dm.stream_action("s", ATTACK) as stream:
                async for _ in stream:
                    pass
        # every running agent was cancelled at the moment the reader left
        assert agents["narrator_opening"].cancelled == [t0 + 2.5 * T]
        assert agents["narrator"].cancelled == [t0 + 2.5 * T]
        assert agents["narrator"].starts == [t0 + T]  # after archivist and arbiter
        assert agents["narrator"].written == [(t0 + 2 * T, "The goblin")]
        assert anyio.current_time() == t0 + 2.5 * T


async def test_an_action_error_is_raised_by_the_stream_and_by_result(
    module_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:

        async def broken(*args: Any, **kwargs: Any) -> int:
            raise SessionError("the disk is full")

        monkeypatch.setattr(SessionStore, "record_action", broken)
        pieces: list[str] = []
        with pytest.raises(SessionError, match="the disk is full"):
            async with dm.stream_action("s", ATTACK) as stream:
                async for piece in stream:
                    pieces.append(piece)
        # the whole narrative was told before the store refused it
        assert "".join(pieces) == "You raise your blade. The goblin staggers back."
        with pytest.raises(SessionError, match="the disk is full"):
            _ = stream.result
        monkeypatch.undo()
        assert await dm.store.count_actions() == 0
        await _assert_untouched_and_next_turn_works(dm, agents, turn_before=0)


async def test_the_whole_narrative_is_handed_out_before_the_durable_write(
    module_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the tail of the narrative (here all of it: "/save" has no narrating
    agent) was emitted only after the state update, although the action was no longer
    cancellable during it, so a player leaving then had a turn recorded unseen."""
    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        record = SessionStore.record_action

        async def slow_record(self: SessionStore, *args: Any, **kwargs: Any) -> int:
            await anyio.sleep(4 * T)  # a slow disk (write_in_thread = true in production)
            return await record(self, *args, **kwargs)

        monkeypatch.setattr(SessionStore, "record_action", slow_record)
        pieces: list[str] = []
        # The module keeper answers at T/2; the player leaves during the state update,
        # after the whole narrative was handed out: the turn counts, whole.
        with anyio.move_on_after(2 * T) as scope:
            async with dm.stream_action("s", "/save") as stream:
                async for piece in stream:
                    pieces.append(piece)
        assert scope.cancelled_caught
        assert pieces == ["[module_keeper]"]
        monkeypatch.undo()
        (entry,) = await dm.store.transcript("s")
        assert entry.narrative == "".join(pieces)


async def test_break_out_of_the_stream_leaves_nothing_to_finalize(
    module_dir: Path, tmp_path: Path
) -> None:
    # trio warns about an async generator abandoned unexhausted; the stream is a
    # plain async iterator, so the documented ``break`` leaves nothing behind
    config = make_config(module_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with (
            engine.open_engine(config, agents=agents_with(), state_path=tmp_path / "s") as dm,
            dm.stream_action("s", ATTACK) as stream,
        ):
            async for _ in stream:
                break  # as the docstring of stream_action shows
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_blank_text_is_rejected_before_anything_runs(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        for bad in ("", "   ", "x" * (config.state.max_action_chars + 1)):
            with pytest.raises(SessionError):
                async with dm.stream_action("s", bad):
                    pytest.fail("the body must not run")  # pragma: no cover
        assert all(
            not getattr(a, "calls", None) and not getattr(a, "starts", None)
            for a in agents.values()
        )
        assert await dm.store.session_ids() == []  # not even the session was created
        assert dm.profiler.count("player_action") == 0


async def test_stream_action_needs_an_engine_from_open_engine(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    async with engine.open_engine(config, agents=agents_with(), state_path=tmp_path / "s") as dm:
        loose = attrs.evolve(dm, tasks=None)
        with pytest.raises(RuntimeError, match="open_engine"):
            async with loose.stream_action("s", ATTACK):
                pytest.fail("the body must not run")  # pragma: no cover


async def test_an_error_inside_open_engine_comes_out_as_itself(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    with pytest.raises(SessionError) as info:
        async with engine.open_engine(
            config, agents=agents_with(), state_path=tmp_path / "s"
        ) as dm:
            await dm.player_action("s", "   ")
    assert type(info.value) is SessionError
    with pytest.raises(SessionError) as info:
        async with (
            engine.open_engine(config, agents=agents_with(), state_path=tmp_path / "s") as dm,
            dm.stream_action("s", ""),
        ):
            pass  # pragma: no cover
    assert type(info.value) is SessionError


# ----------------------------------------------------------------------- first_token


async def test_first_token_is_recorded_for_streamed_and_plain_actions(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    agents = agents_with()
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        _, streamed = await read_all(dm, "s", ATTACK)
        assert dm.profiler.count("first_token") == 1
        plain = await dm.player_action("s", "I attack the goblin again")
        assert dm.profiler.count("first_token") == 2
        high = dm.profiler.get_percentile("first_token", 100)
        transcript = await dm.store.transcript("s")
    assert plain.turn == 2 and streamed.turn == 1
    assert plain.narrative == "You raise your blade. The goblin staggers back."
    assert [e.narrative for e in transcript] == [streamed.narrative, plain.narrative]
    for result in (streamed, plain):
        assert result.first_token is not None
        assert 0 < result.first_token <= result.elapsed
        assert result.span.attributes["first_token"] == result.first_token
    assert high == pytest.approx(max(streamed.first_token, plain.first_token), rel=0.02)


@pytest.mark.virtual_clock
async def test_first_token_is_the_virtual_time_of_the_first_piece(
    module_dir: Path, tmp_path: Path
) -> None:
    config = make_config(module_dir)
    opening = Streamer("narrator_opening", [(3 * T, "You raise"), (4 * T, " your blade.")])
    agents = agents_with(narrator_opening=opening)
    async with engine.open_engine(config, agents=agents, state_path=tmp_path / "s") as dm:
        t0 = anyio.current_time()
        async with dm.stream_action("s", ATTACK) as stream:
            first_seen = None
            async for _ in stream:
                if first_seen is None:
                    first_seen = anyio.current_time() - t0
        streamed = stream.result
        # player_action (nobody reads the pieces): the opening now writes at T
        opening.script = OPENING
        plain = await dm.player_action("s", "I attack the goblin again")
        p50 = dm.profiler.get_percentile("first_token", 50)
        p100 = dm.profiler.get_percentile("first_token", 100)
        count = dm.profiler.count("first_token")
    assert first_seen == 3 * T
    assert streamed.first_token == 3 * T
    assert opening.written[0][0] - streamed.span.start == 3 * T
    assert plain.first_token == T  # the opening streams its first piece at T
    assert count == 2
    assert p50 == pytest.approx(T, rel=0.01)
    assert p100 == pytest.approx(3 * T, rel=0.01)


# ----------------------------------------------------------------------- the assembler


@st.composite
def narrations(draw: st.DrawFn) -> tuple[list[tuple[list[str], str, int]], list[int]]:
    """Parts (pieces, mode, pieces written before failing) and an interleaving of their
    events: each part writes its pieces in order, then finishes."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        pieces = draw(st.lists(st.text(alphabet=" ab.", max_size=3), max_size=4))
        mode = draw(st.sampled_from(["stream", "whole", "fail"]))
        cut = draw(st.integers(0, len(pieces))) if mode == "fail" else len(pieces)
        parts.append((pieces, mode, cut))
    slots = [
        i
        for i, (_, mode, cut) in enumerate(parts)
        for _ in range(cut + 1 if mode != "whole" else 1)
    ]
    return parts, list(draw(st.permutations(slots)))


@settings(max_examples=300, deadline=None)
@given(narrations())
def test_narrative_tells_parts_in_order_and_joins_to_its_text(
    case: tuple[list[tuple[list[str], str, int]], list[int]],
) -> None:
    parts, order = case
    emitted: list[tuple[int, str]] = []
    now = 0
    story = Narrative(len(parts), lambda piece: emitted.append((now, piece)))
    sinks = [story.sink(i) for i in range(len(parts))]
    progress = [0] * len(parts)
    written_at: list[list[int]] = [[] for _ in parts]
    done_at = [0] * len(parts)
    for now, i in enumerate(order):  # ``now`` is read by the emitter
        pieces, mode, cut = parts[i]
        if mode != "whole" and progress[i] < cut:
            sinks[i](pieces[progress[i]])
            written_at[i].append(now)
            progress[i] += 1
        else:
            story.finish(i, None if mode == "fail" else "".join(pieces))
            done_at[i] = now

    # the model: part i is told once parts 0..i-1 are done, each piece when written
    expected: list[tuple[int, str]] = []
    told = ""
    for i, (pieces, mode, cut) in enumerate(parts):
        ready = max(done_at[:i], default=0)
        if mode == "whole":
            whole = "".join(pieces)
            own = [(done_at[i], whole)] if whole else []
        else:
            own = [(at, p) for at, p in zip(written_at[i], pieces[:cut], strict=True) if p]
        for j, (at, piece) in enumerate(own):
            if j == 0 and told:
                piece = " " + piece.lstrip()
            expected.append((max(at, ready), piece))
            told += piece
    assert emitted == expected
    assert "".join(p for _, p in emitted) == story.text == told
