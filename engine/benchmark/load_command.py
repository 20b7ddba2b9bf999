"""``dm-engine bench --load``: run the load test, print its table, write load.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import Config
from .load import LoadResult, run_load_test
from .options import add_figures, environment, figures_table, with_overrides

__all__ = ["DEFAULT_SESSIONS", "load_table", "run_load_command"]

DEFAULT_SESSIONS = 1000
#: engine overhead p95 goal per action, seconds (issue 8)
OVERHEAD_P95_GOAL = 0.005


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def load_table(result: LoadResult) -> Table:
    """Per-operation and per-action figures of a load run, in milliseconds."""
    table = figures_table(
        f"load test — {result.sessions} sessions x {result.actions_per_session} actions, "
        f"{result.backend}, time scale {result.time_scale:g}, think time "
        f"{result.think_time:g} s (real time, ms)"
    )
    for name, figures in result.operations.items():
        add_figures(table, name, figures)
    table.add_section()
    add_figures(table, "engine overhead / action", result.overhead, "bold")
    add_figures(table, "  of which before the agents", result.before_agents)
    add_figures(table, "  of which the state update", result.state_write)
    add_figures(table, "agent critical path / action", result.agent_critical_path)
    add_figures(table, "agent wake-up lag / call", result.agent_lag)
    return table


def _summary(result: LoadResult) -> list[str]:
    mib = 1024 * 1024
    goal_met = result.overhead.p95 < OVERHEAD_P95_GOAL
    verdict = "[green]met[/green]" if goal_met else "[red]missed[/red]"
    loss = "[green]none[/green]" if result.no_loss else "[red]LOST OR OUT OF ORDER[/red]"
    lines = [
        f"throughput: [bold]{result.throughput:.1f}[/bold] actions/s over "
        f"{result.wall_seconds:.1f} s; peak RSS {result.peak_rss_bytes / mib:.0f} MiB "
        f"({result.rss_before_bytes / mib:.0f} MiB before the load)",
        f"actions: {result.expected_actions} expected, {result.completed_actions} completed, "
        f"{result.failed_actions} failed, {result.stored_actions} stored, "
        f"lost {result.lost_actions}, sessions out of order {result.mismatched_sessions}; "
        f"loss: {loss}; degraded (an agent part missing): {result.degraded_actions}",
        f"engine overhead p95 {_ms(result.overhead.p95)} ms vs goal "
        f"{_ms(OVERHEAD_P95_GOAL)} ms: {verdict}",
        f"agent limiter: max_concurrent_agents raised from "
        f"{result.configured_max_concurrent_agents} to {result.max_concurrent_agents} "
        "(4 per session: one engine serving many players needs a limiter sized to its "
        "LLM capacity)",
    ]
    lines.extend(f"[red]error:[/red] {e}" for e in result.errors)
    return lines


def run_load_command(config: Config, args: argparse.Namespace) -> int:
    """Run the load test for ``args`` and report.

    Returns 1 when an action was lost or recorded out of order, or (with
    ``args.fail_on_miss``) when the overhead goal is missed; else 0.

    Reads ``args.sessions`` (None: 1000), ``args.backend``, ``args.out``,
    ``args.seed``, ``args.scenario`` and, when present, ``args.actions``,
    ``args.time_scale`` and ``args.think_time``.
    """
    if getattr(args, "processes", None) is not None:  # N engine processes: processes.py
        from .processes import run_processes_command

        return run_processes_command(args, OVERHEAD_P95_GOAL)
    console = Console()
    sessions = DEFAULT_SESSIONS if args.sessions is None else int(args.sessions)
    actions = int(getattr(args, "actions", None) or 5)
    time_scale = float(getattr(args, "time_scale", None) or 0.02)
    think = getattr(args, "think_time", None)
    think_time = 10.0 if think is None else float(think)
    if sessions < 1:
        console.print(f"[red]--sessions must be >= 1, got {sessions}[/red]")
        return 2
    config = with_overrides(config, args.scenario, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(f"{sessions} sessions (real time)", total=sessions * actions)

        def step(n: int) -> None:
            bar.advance(task, n)

        async def main() -> LoadResult:
            return await run_load_test(
                config,
                sessions=sessions,
                actions_per_session=actions,
                time_scale=time_scale,
                think_time=think_time,
                progress=step,
            )

        result = anyio.run(main, backend=args.backend)

    console.print(load_table(result))
    for line in _summary(result):
        console.print(line)
    payload: dict[str, Any] = {
        "environment": environment(config, args.backend),
        "load": result.as_dict(),
        "overhead_goal_p95": OVERHEAD_P95_GOAL,
        "overhead_goal_met": result.overhead.p95 < OVERHEAD_P95_GOAL,
    }
    path = out / "load.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path}")
    if not result.no_loss:
        return 1
    if getattr(args, "fail_on_miss", False) and not payload["overhead_goal_met"]:
        return 1
    return 0
