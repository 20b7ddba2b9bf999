"""``dm-engine play``: the default adventure with simulated agents, in the terminal.

Each action prints the narrative as it is written (streamed piece by piece), then a
compact waterfall of the action's spans, so the player sees where the time went (the
agents, not the engine).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterable, Mapping

import anyio
import attrs
import trio
from rich.console import Console
from rich.text import Text

from .config import Config
from .errors import EngineError
from .observability.profiler import Span, critical_path
from .pipeline import ActionResult, DungeonMaster
from .runtime import open_engine

__all__ = ["render_waterfall", "run_play_command"]

_LABEL = 30
_FIGURES = 14


def render_waterfall(
    root: Span, width: int = 40, depends_on: Mapping[str, Iterable[str]] | None = None
) -> Text:
    """One line per span: indented name, a bar placed on the action's timeline, duration.

    Spans on the critical path are drawn in red (``depends_on``: the configured agent
    dependencies, which the path then follows).
    """
    total = root.duration or 0.0
    on_path = {id(s) for s in critical_path(root, depends_on)}
    text = Text()

    def line(span: Span, depth: int) -> None:
        start = (span.start - root.start) / total if total else 0.0
        length = (span.duration or 0.0) / total if total else 0.0
        lead = int(start * width)
        bar = max(1, round(length * width))
        label = span.name + (f" {span.attributes['agent']}" if "agent" in span.attributes else "")
        if span.attributes.get("attempt", 1) != 1:
            label += " (hedge)"
        text.append(f"{'  ' * depth}{label:<{_LABEL - 2 * depth}.{_LABEL - 2 * depth}} ")
        text.append(" " * lead)
        text.append("█" * bar, style="red" if id(span) in on_path else "blue")
        text.append(" " * max(0, width - lead - bar))
        status = "" if span.status == "ok" else f" {span.status}"
        text.append(f"{(span.duration or 0.0) * 1e3:9.1f} ms{status}\n")
        for child in span.children:
            line(child, depth + 1)

    line(root, 0)
    return text


async def _act(console: Console, dm: DungeonMaster, session: str, text: str) -> None:
    """Stream one action's narrative to the terminal, then its turn and waterfall."""
    async with dm.stream_action(session, text) as stream:
        async for piece in stream:
            console.out(piece, end="", highlight=False)
            console.file.flush()
    result: ActionResult = stream.result
    console.out("")
    first = f", first words after {result.first_token:.2f} s" if result.first_token else ""
    console.print(f"[dim]({result.action_type}, turn {result.turn}{first})[/dim]")
    width = max(10, console.width - _LABEL - _FIGURES - 12)
    deps = {name: spec.depends_on for name, spec in dm.config.agents.items()}
    console.print(render_waterfall(result.span, width, deps))


async def _play(config: Config, args: argparse.Namespace, console: Console) -> int:
    async with open_engine(config) as dm:
        if args.text:
            await _act(console, dm, args.session, args.text)
            return 0
        console.print("The Sunken Chapel of Emberfall. Type an action; an empty line quits.")
        while True:
            text = await anyio.to_thread.run_sync(_read_line)
            if not text.strip():
                return 0
            try:
                await _act(console, dm, args.session, text)
            except EngineError as exc:
                console.print(f"[red]{exc}[/red]")


def _read_line() -> str:
    try:
        return input("> ")
    except EOFError:
        return ""


def run_play_command(config: Config, args: argparse.Namespace) -> int:
    console = Console()
    try:  # --time-scale is [simulation] time_scale
        sim = attrs.evolve(config.simulation, time_scale=args.time_scale)
    except ValueError as exc:
        console.print(f"[red]--time-scale {args.time_scale!r}: {exc}[/red]")
        return 2
    config = attrs.evolve(config, simulation=sim)
    if isinstance(sys.stdin, io.TextIOWrapper):
        # undecodable input bytes become lone surrogates, which the engine rejects with
        # a clear line, instead of ending the session with a UnicodeDecodeError
        sys.stdin.reconfigure(errors="surrogateescape")
    try:
        code: int = trio.run(_play, config, args, console)
    except EngineError as exc:
        console.print(f"[red]{exc}[/red]")
        return 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return code
