"""``dm-engine mcp``: the engine as an MCP server on stdio (the official ``mcp`` SDK).

One engine (``open_engine`` with the command's configuration; simulated agents run at
``[simulation] time_scale``) lives for the server's lifetime; the server runs on
asyncio, as the SDK does. Its tools:

* ``player_action(session_id, text)``: one action, streamed. The result's text content
  is the narrative; its structured content (``ActionOutcome``) carries the turn, the
  action type and one line per missing part. When the request carries a progress
  token, every narrative piece is sent as it is written in a progress notification:
  ``message`` is the piece and ``progress`` the narrative's length in characters up
  to and including it (strictly increasing), so the messages ordered by progress
  and joined equal the narrative. A cancelled request cancels the action; by the
  engine's streaming contract nothing is then recorded, unless the whole narrative
  had already been handed out (then the turn counts).
* ``transcript(session_id, last)``: the session's last recorded actions, oldest first.
* ``performance_report()``: every operation's percentiles against its targets, and
  the bottlenecks.

Bad input (blank or unstorable text, a bad session id) and an unusable store come
back as tool errors carrying the engine's message (``engine.errors``); the server
goes on serving.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .config import Config
from .errors import EngineError
from .observability.profiler import PerformanceReport
from .pipeline import ActionResult, DungeonMaster
from .runtime import open_engine
from .state import TranscriptEntry

__all__ = [
    "ActionOutcome",
    "PerformanceFigures",
    "TranscriptTurns",
    "build_server",
    "run_mcp_command",
    "serve",
]

SERVER_NAME = "dm-engine"
INSTRUCTIONS = (
    "An AI Dungeon Master running the bundled adventure. Call player_action with the "
    "player's session id and what their character does; the narrative comes back as "
    "text. transcript recalls a session's recent turns; performance_report shows the "
    "engine's latency against its targets."
)

SessionId = Annotated[
    str, Field(description="The player's session; a new id starts a new game at turn 1.")
]


class ActionOutcome(BaseModel):
    """The structured content of ``player_action`` (the narrative is the text content)."""

    session_id: str
    turn: int = Field(description="The turn this action was recorded as (1 = first).")
    action_type: str = Field(description="How the engine classified the action.")
    degraded: bool = Field(description="Whether some agent's part is missing.")
    missing: list[str] = Field(description="One plain line per missing part.")
    first_token_seconds: float | None = Field(
        description="Seconds from the start of the action to its first narrative piece."
    )
    elapsed_seconds: float


class Turn(BaseModel):
    turn: int
    action: str
    action_type: str
    narrative: str


class TranscriptTurns(BaseModel):
    """The structured content of ``transcript``."""

    session_id: str
    turns: list[Turn] = Field(description="The last recorded actions, oldest first.")


class Percentiles(BaseModel):
    p50: float
    p95: float
    p99: float


class Operation(BaseModel):
    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    errors: int
    cancelled: int
    target: Percentiles | None = Field(description="The configured latency target, if any.")
    met: bool | None = Field(description="Every percentile within its target (None: no target).")


class PerformanceFigures(BaseModel):
    """The structured content of ``performance_report`` (seconds)."""

    operations: dict[str, Operation]
    bottlenecks: list[str] = Field(description="Operations over a target, worst first.")
    all_met: bool


def build_server(dm: DungeonMaster) -> MCPServer[Any]:
    """An MCP server whose tools act on ``dm`` (which must outlive it)."""
    server: MCPServer[Any] = MCPServer(SERVER_NAME, instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(
        title="Player action",
        annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False),
    )
    async def player_action(
        session_id: SessionId,
        text: Annotated[str, Field(description="What the player's character does.")],
        ctx: Context[Any, Any],
    ) -> Annotated[CallToolResult, ActionOutcome]:
        """Play one action in a session: the narrative is the text; the turn, action
        type and missing parts are the structured content. With a progress token the
        narrative streams as progress notifications (message: the next piece)."""
        told = 0
        try:
            async with dm.stream_action(session_id, text) as stream:
                async for piece in stream:
                    if piece:
                        told += len(piece)
                        await ctx.report_progress(told, None, piece)
            result = stream.result
        except EngineError as exc:
            raise ToolError(str(exc)) from None
        return CallToolResult(
            content=[TextContent(type="text", text=result.narrative)],
            structured_content=_outcome(result).model_dump(mode="json"),
        )

    @server.tool(title="Session transcript", annotations=ToolAnnotations(read_only_hint=True))
    async def transcript(
        session_id: SessionId,
        last: Annotated[int, Field(ge=1, le=1000, description="How many recent turns.")] = 10,
    ) -> Annotated[CallToolResult, TranscriptTurns]:
        """The session's last recorded actions, oldest first: each turn's action and
        narrative."""
        try:
            entries = await dm.store.transcript(session_id, last)
        except EngineError as exc:
            raise ToolError(str(exc)) from None
        turns = TranscriptTurns(session_id=session_id, turns=[_turn(e) for e in entries])
        return CallToolResult(
            content=[TextContent(type="text", text=_transcript_text(turns))],
            structured_content=turns.model_dump(mode="json"),
        )

    @server.tool(title="Performance report", annotations=ToolAnnotations(read_only_hint=True))
    async def performance_report() -> Annotated[CallToolResult, PerformanceFigures]:
        """The engine's latency since it started: per operation the count and
        p50/p95/p99 against the configured targets, and the bottlenecks."""
        figures = _figures(dm.profiler.get_report())
        return CallToolResult(
            content=[TextContent(type="text", text=_report_text(figures))],
            structured_content=figures.model_dump(mode="json"),
        )

    return server


async def serve(config: Config) -> None:
    """Open the engine, then serve MCP on stdin/stdout until the client closes stdin.

    Raises:
        EngineError: the engine could not be opened (before any MCP traffic).
    """
    async with open_engine(config) as dm:
        await build_server(dm).run_stdio_async()


def run_mcp_command(config: Config) -> int:
    """``dm-engine mcp``: 0 when the client closed the connection; 1 (one line on
    stderr) when the engine could not be opened."""
    try:
        anyio.run(serve, config, backend="asyncio")
    except EngineError as exc:
        print(f"dm-engine mcp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _outcome(result: ActionResult) -> ActionOutcome:
    return ActionOutcome(
        session_id=result.session_id,
        turn=result.turn,
        action_type=result.action_type,
        degraded=result.degraded,
        missing=list(result.missing),
        first_token_seconds=result.first_token,
        elapsed_seconds=result.elapsed,
    )


def _turn(entry: TranscriptEntry) -> Turn:
    return Turn(
        turn=entry.turn,
        action=entry.action_text,
        action_type=entry.action_type,
        narrative=entry.narrative,
    )


def _transcript_text(turns: TranscriptTurns) -> str:
    if not turns.turns:
        return f"Session {turns.session_id!r} has no recorded actions yet."
    return "\n\n".join(
        f"Turn {t.turn} ({t.action_type}): > {t.action}\n{t.narrative}" for t in turns.turns
    )


def _figures(report: PerformanceReport) -> PerformanceFigures:
    operations = {}
    for name, stats in report.operations.items():
        target = stats.target
        operations[name] = Operation(
            count=stats.count,
            mean=stats.mean,
            p50=stats.p50,
            p95=stats.p95,
            p99=stats.p99,
            errors=stats.errors,
            cancelled=stats.cancelled,
            target=None if target is None else Percentiles(**target.as_dict()),
            met=stats.met,
        )
    return PerformanceFigures(
        operations=operations,
        bottlenecks=[str(b) for b in report.bottlenecks],
        all_met=report.all_met,
    )


def _report_text(figures: PerformanceFigures) -> str:
    if not figures.operations:
        return "No actions have been played yet."
    lines = []
    for name, op in figures.operations.items():
        line = f"{name}: n={op.count} p50 {op.p50:.3f} s, p95 {op.p95:.3f} s, p99 {op.p99:.3f} s"
        if op.target is not None:
            t = op.target
            verdict = "met" if op.met else "MISSED"
            line += f" (target {t.p50:.3f} / {t.p95:.3f} / {t.p99:.3f} s: {verdict})"
        lines.append(line)
    if figures.bottlenecks:
        lines.append("Bottlenecks: " + "; ".join(figures.bottlenecks))
    else:
        lines.append("Every target is met.")
    return "\n".join(lines)
