"""``dm-engine bench``: run the suite, print the tables, write results.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
from importlib.metadata import version
from pathlib import Path
from typing import Any

import attrs
import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import Config
from .strategies import STRATEGIES, compare_strategies, measure_overhead, run_virtual

__all__ = ["environment", "run_bench_command", "with_overrides"]


def with_overrides(config: Config, scenario: str | None, seed: int | None) -> Config:
    sim = config.simulation
    sim = attrs.evolve(
        sim, scenario=scenario or sim.scenario, seed=sim.seed if seed is None else seed
    )
    return attrs.evolve(config, simulation=sim)


def environment(config: Config, backend: str) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "trio": version("trio"),
        "anyio": version("anyio"),
        "backend": backend,
        "cpu_count": os.cpu_count(),
        "seed": config.simulation.seed,
        "scenario": config.simulation.scenario,
        "platform": platform.platform(),
    }


def _strategy_table(results: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("strategy", "p50 s", "p95 s", "p99 s", "agent calls", "p99 vs eager"):
        table.add_column(col, justify="right" if col != "strategy" else "left")
    eager_p99 = results["eager"]["p99"]
    for name in STRATEGIES:
        r = results[name]
        table.add_row(
            name,
            f"{r['p50']:.3f}",
            f"{r['p95']:.3f}",
            f"{r['p99']:.3f}",
            str(r["agent_calls"]) if name != "critical_path" else "-",
            f"{r['p99'] / eager_p99:.3f}x",
        )
    return table


def run_bench_command(config: Config, args: argparse.Namespace) -> int:
    console = Console()
    if args.iterations < 1:
        console.print(f"[red]--iterations must be >= 1, got {args.iterations}[/red]")
        return 2
    config = with_overrides(config, args.scenario, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"environment": environment(config, args.backend)}

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        total = args.iterations * (len(STRATEGIES) - 1)
        task = progress.add_task("strategies (virtual time)", total=total)

        def step(_name: str, n: int) -> None:
            progress.advance(task, n)

        strategies = run_virtual(compare_strategies, config, args.iterations, progress=step)
        progress.update(task, completed=total)
        task2 = progress.add_task("engine overhead (real time)", total=1)
        overhead = trio.run(measure_overhead, config)
        progress.update(task2, completed=1)

    results["strategies"] = {name: r.as_dict() for name, r in strategies.items()}
    results["overhead"] = overhead
    s = results["strategies"]
    ratios = {
        "eager_vs_critical_path_p95": s["eager"]["p95"] / s["critical_path"]["p95"],
        "level_barrier_vs_eager_p95": s["level_barrier"]["p95"] / s["eager"]["p95"],
        "hedged_vs_eager_p99": s["eager_hedged"]["p99"] / s["eager"]["p99"],
        "hedge_extra_calls": s["eager_hedged"]["agent_calls"] / s["eager"]["agent_calls"] - 1,
    }
    results["ratios"] = ratios

    console.print(
        _strategy_table(
            results["strategies"],
            f"player-action latency by strategy — {args.iterations} seeded actions, "
            f"scenario {config.simulation.scenario!r}, virtual time",
        )
    )
    console.print(
        f"eager / critical path (p95): [bold]{ratios['eager_vs_critical_path_p95']:.3f}[/bold]   "
        f"level barrier / eager (p95): [bold]{ratios['level_barrier_vs_eager_p95']:.3f}[/bold]   "
        f"hedged / eager (p99): [bold]{ratios['hedged_vs_eager_p99']:.3f}[/bold] "
        f"for {ratios['hedge_extra_calls']:+.1%} agent calls"
    )
    console.print(
        f"executor overhead per action (real time, zero-latency agents): "
        f"engine {overhead['engine_us_per_action']:.1f} µs vs bare nursery "
        f"{overhead['bare_nursery_us_per_action']:.1f} µs = [bold]{overhead['ratio']:.2f}x[/bold]"
    )
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path}")
    return 0
