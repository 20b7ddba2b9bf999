"""``dm-engine mcp``: the engine behind an MCP server on stdio, driven by the SDK's own
client (``stdio_client`` + ``ClientSession``) against the real command in a subprocess.

The server runs the default adventure with simulated agents, scaled down by
``[simulation] time_scale``. A subprocess runs in real time, so these tests run on
trio and asyncio on their real clocks (the SDK's client is anyio-based; the
conftest's MockClock would jump over the waits on the pipes); none asserts a duration.
The lone-surrogate case runs in process: the SDK's client cannot even serialize such
text to JSON, so it can only reach the tool without the stdio transport.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import attrs
import pytest
from mcp.client.client import Client
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult, TextContent

from engine.cli import main
from engine.config import Config
from engine.mcp_server import build_server
from engine.runtime import open_engine

pytestmark = pytest.mark.anyio

SEARCH = "I search the altar for traps"  # exploration: two narrating agents
ATTACK = "I attack the goblin"  # combat
FAST = "time_scale = 0.05"  # [simulation]: an action takes about 0.1 s
# Questions have one narrating agent, the narrator; in this scenario it writes its first
# words at once, then talks for 70 tokens x 0.02 s x 0.5 = 0.7 s before it is done.
SLOW_NARRATION = """scenario = "slow_narration"
time_scale = 0.5

[scenarios.slow_narration]
ttft_median_seconds = 0.05
ttft_sigma = 0.0
inter_token_seconds = 0.02
"""
WATCHDOG = 60.0  # seconds: a hung server fails the test instead of hanging it


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Both backends on their real clocks: the server is a real process."""
    return str(request.param)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One compiled module for every server of this file."""
    return tmp_path_factory.mktemp("mcp-modules")


def write_config(folder: Path, module_dir: Path, simulation: str = FAST) -> Path:
    """A configuration: the bundled adventure only, a fresh session store in ``folder``,
    ``simulation`` as the ``[simulation]`` table (and what follows it)."""
    path = folder / "config.toml"
    path.write_text(
        f'[module]\ninclude_srd = false\ncache_dir = "{module_dir}"\n'
        f'[state]\npath = "{folder / "sessions.sqlite"}"\n'
        f"[simulation]\n{simulation}\n"
    )
    return path


@contextlib.asynccontextmanager
async def connect(config: Path) -> AsyncIterator[ClientSession]:
    """``dm-engine --config CONFIG mcp`` in a subprocess, as an initialized session."""
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "engine.cli", "--config", str(config), "mcp"],
        cwd=str(config.parent),
    )
    with (config.parent / "server.log").open("w") as errlog:
        async with (
            stdio_client(server, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            yield session


@attrs.define(eq=False)
class Progress:
    """The progress notifications of one request: ``(progress, message)``."""

    got: list[tuple[float, str]] = attrs.field(factory=list)
    told: int = 0  # characters received
    _wanted: tuple[int, anyio.Event] | None = None

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        assert total is None and message
        self.got.append((progress, message))
        self.told += len(message)
        if self._wanted is not None and self.told >= self._wanted[0]:
            self._wanted[1].set()

    async def until(self, length: int) -> None:
        """The SDK runs progress callbacks in tasks of their own: they may come after
        the result. Wait until the pieces add up to ``length`` characters."""
        if self.told < length:
            self._wanted = (length, anyio.Event())
            await self._wanted[1].wait()

    def text(self) -> str:
        """The pieces in progress order, joined; each progress counts the characters
        up to and including its piece."""
        ordered = sorted(self.got)
        told = 0
        for progress, message in ordered:
            told += len(message)
            assert progress == told
        return "".join(m for _, m in ordered)


def narrative(result: CallToolResult) -> str:
    assert not result.is_error, result.content
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


def error_text(result: CallToolResult) -> str:
    assert result.is_error
    [block] = result.content
    assert isinstance(block, TextContent)
    return block.text


async def act(session: ClientSession, session_id: str, text: str) -> CallToolResult:
    return await session.call_tool("player_action", {"session_id": session_id, "text": text})


async def test_lists_its_tools_with_their_schemas(tmp_path: Path, module_dir: Path) -> None:
    with anyio.fail_after(WATCHDOG):
        async with connect(write_config(tmp_path, module_dir)) as session:
            tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == {"player_action", "transcript", "performance_report"}
    play = tools["player_action"]
    assert sorted(play.input_schema["required"]) == ["session_id", "text"]
    assert play.output_schema is not None
    assert {"turn", "action_type", "missing", "degraded"} <= set(play.output_schema["properties"])
    assert tools["transcript"].input_schema["required"] == ["session_id"]
    assert "last" in tools["transcript"].input_schema["properties"]
    assert tools["performance_report"].input_schema.get("required", []) == []


async def test_two_sessions_play_at_once_and_stream_their_narratives(
    tmp_path: Path, module_dir: Path
) -> None:
    results: dict[str, CallToolResult] = {}
    progress = {"ann": Progress(), "bob": Progress()}
    texts = {"ann": SEARCH, "bob": ATTACK}
    with anyio.fail_after(WATCHDOG):
        async with connect(write_config(tmp_path, module_dir)) as session:

            async def play(session_id: str) -> None:
                results[session_id] = await session.call_tool(
                    "player_action",
                    {"session_id": session_id, "text": texts[session_id]},
                    progress_callback=progress[session_id],
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(play, "ann")
                tg.start_soon(play, "bob")
            for session_id, result in results.items():
                await progress[session_id].until(len(narrative(result)))
            again = await act(session, "ann", "I open the reliquary")

    for session_id, action_type in (("ann", "exploration"), ("bob", "combat")):
        result = results[session_id]
        told = narrative(result)
        assert told and progress[session_id].text() == told
        outcome = result.structured_content
        assert outcome is not None
        assert outcome["session_id"] == session_id and outcome["turn"] == 1
        assert outcome["action_type"] == action_type
        assert outcome["degraded"] == bool(outcome["missing"])
        assert all(isinstance(line, str) and line for line in outcome["missing"])
    assert again.structured_content is not None and again.structured_content["turn"] == 2
    assert narrative(again)


async def test_a_cancelled_request_records_nothing(tmp_path: Path, module_dir: Path) -> None:
    """The client cancels the request at its first narrative piece: the action is
    cancelled (its narrator goes on talking for 0.7 s, the cancellation is a round trip
    on a pipe), nothing is recorded, and the server goes on: the session's next action
    gets the turn the cancelled one would have had."""
    config = write_config(tmp_path, module_dir, SLOW_NARRATION)
    with anyio.fail_after(WATCHDOG):
        async with connect(config) as session:
            first = await act(session, "s", "Who is Sister Maud?")
            pieces: list[str] = []
            with anyio.CancelScope() as scope:

                async def cancel_at_first_piece(
                    progress: float, total: float | None, message: str | None
                ) -> None:
                    pieces.append(message or "")
                    scope.cancel()

                await session.call_tool(
                    "player_action",
                    {"session_id": "s", "text": "How does grappling work?"},
                    progress_callback=cancel_at_first_piece,
                )
            assert scope.cancelled_caught and pieces
            after = await act(session, "s", "What do I know about the Ember Vault?")
            stored = await session.call_tool("transcript", {"session_id": "s"})
            report = await session.call_tool("performance_report", {})

    assert first.structured_content is not None and first.structured_content["turn"] == 1
    assert after.structured_content is not None and after.structured_content["turn"] == 2
    assert stored.structured_content is not None
    turns = stored.structured_content["turns"]
    assert [(t["turn"], t["action"]) for t in turns] == [
        (1, "Who is Sister Maud?"),
        (2, "What do I know about the Ember Vault?"),
    ]
    assert turns[1]["narrative"] == narrative(after)
    assert report.structured_content is not None
    actions = report.structured_content["operations"]["player_action"]
    assert actions["cancelled"] == 1 and actions["count"] == 3


async def test_transcript_and_performance_report(tmp_path: Path, module_dir: Path) -> None:
    texts = ["I look around the nave", SEARCH, "I open the reliquary"]
    with anyio.fail_after(WATCHDOG):
        async with connect(write_config(tmp_path, module_dir)) as session:
            empty = await session.call_tool("performance_report", {})
            told = [narrative(await act(session, "s", text)) for text in texts]
            recent = await session.call_tool("transcript", {"session_id": "s", "last": 2})
            whole = await session.call_tool("transcript", {"session_id": "s"})
            report = await session.call_tool("performance_report", {})

    assert not empty.is_error and empty.structured_content is not None
    assert empty.structured_content["operations"] == {}
    assert recent.structured_content is not None
    assert recent.structured_content["session_id"] == "s"
    assert recent.structured_content["turns"] == [
        {"turn": 2, "action": SEARCH, "action_type": "exploration", "narrative": told[1]},
        {"turn": 3, "action": texts[2], "action_type": "exploration", "narrative": told[2]},
    ]
    listing = narrative(recent)
    assert f"> {SEARCH}" in listing and told[2] in listing and texts[0] not in listing
    assert whole.structured_content is not None
    assert [t["turn"] for t in whole.structured_content["turns"]] == [1, 2, 3]

    figures = report.structured_content
    assert figures is not None
    actions = figures["operations"]["player_action"]
    assert actions["count"] == 3 and actions["cancelled"] == 0
    assert actions["p50"] <= actions["p95"] <= actions["p99"]
    assert set(actions["target"]) == {"p50", "p95", "p99"}
    assert actions["met"] == all(actions[p] <= actions["target"][p] for p in actions["target"])
    assert {"agent_query", "context_building", "state_update"} <= set(figures["operations"])
    assert figures["all_met"] == (figures["bottlenecks"] == [])
    text = narrative(report)
    assert "player_action: n=3" in text and "target" in text


async def test_bad_input_is_a_tool_error_with_the_engines_message(
    tmp_path: Path, module_dir: Path
) -> None:
    cases = [
        ({"session_id": "s", "text": "   "}, "the action text is empty"),
        ({"session_id": "  ", "text": "I look"}, "session id must not be empty"),
        ({"session_id": "x" * 201, "text": "I look"}, "the limit is 200"),
        ({"session_id": "s", "text": "x" * 2001}, "the limit is 2000"),
        ({"session_id": "s", "text": "I look\x00"}, "NUL character"),
        ({"session_id": "s"}, "text"),  # the SDK's argument validation
    ]
    with anyio.fail_after(WATCHDOG):
        async with connect(write_config(tmp_path, module_dir)) as session:
            errors = [await session.call_tool("player_action", args) for args, _ in cases]
            unknown = await session.call_tool("transcript", {"session_id": "nobody"})
            good = await act(session, "s", "I look around the nave")
    for result, (_, message) in zip(errors, cases, strict=True):
        assert message in error_text(result)
        assert result.structured_content is None
    assert "unknown session 'nobody'" in error_text(unknown)
    # nothing was recorded by the rejected actions
    assert good.structured_content is not None and good.structured_content["turn"] == 1


async def test_text_the_store_cannot_encode_is_a_tool_error(tmp_path: Path) -> None:
    """A lone surrogate (through the SDK's in-memory transport: JSON cannot carry it)."""
    config = Config()
    module = attrs.evolve(config.module, include_srd=False, cache_dir=str(tmp_path))
    config = attrs.evolve(config, module=module)
    async with (
        open_engine(config, state_path=tmp_path / "sessions.sqlite") as dm,
        Client(build_server(dm)) as client,
    ):
        bad_text = await client.call_tool("player_action", {"session_id": "s", "text": "I \ud800"})
        bad_id = await client.call_tool("player_action", {"session_id": "s\udfff", "text": "I"})
        report = await client.call_tool("performance_report", {})
    assert "the action text cannot be stored" in error_text(bad_text)
    assert "lone surrogate" in error_text(bad_id)
    assert not report.is_error


def test_without_the_sdk_it_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in sys.modules if n == "mcp" or n.startswith("mcp.")] or ["mcp"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "engine.mcp_server", raising=False)
    config = tmp_path / "config.toml"
    config.write_text("")
    assert main(["--config", str(config), "mcp"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        "dm-engine mcp needs the MCP SDK (mcp 2.x): pip install 'dm-engine[mcp]'"
    ]


def test_an_engine_that_cannot_open_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[module]\nname = "{tmp_path / "missing"}"\ninclude_srd = false\n')
    assert main(["--config", str(config), "mcp"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dm-engine mcp: ")
