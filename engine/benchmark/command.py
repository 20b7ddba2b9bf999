"""``dm-engine bench``: run the suite, print the tables, write results.json and report.html."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import Config
from ..observability.report import bar_chart_svg, write_report
from .levers import LEVERS, run_levers
from .options import environment, with_overrides
from .strategies import STRATEGIES, compare_strategies, run_virtual
from .suite import PerformanceBenchmark

__all__ = ["run_bench_command"]


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


def _lever_table(levers: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    columns = ("lever", "p50", "p95", "p99", "first p50", "first p95", "degr.", "calls", "tokens")
    for col in columns:
        table.add_column(col, justify="left" if col == "lever" else "right")
    for name, _what, _ in LEVERS:
        r = levers[name]
        table.add_row(
            name,
            *(f"{r[k]:.2f}" for k in ("p50", "p95", "p99", "first_token_p50", "first_token_p95")),
            str(r["degraded_actions"]),
            f"{r['extra_calls']:+.0%}",
            f"{r['extra_tokens']:+.0%}",
        )
    return table


def _default_agents(config: Config) -> bool:
    """The levers rebuild the shipped agents: only meaningful when those are configured."""
    return set(config.agents) == set(Config().agents)


def _targets_table(bench: PerformanceBenchmark, document: dict[str, Any]) -> Table:
    table = Table(
        title="targets (player_action and agent_query: event-loop clock; others: real time)"
    )
    for col in ("operation", "pct", "measured", "target", ""):
        table.add_column(col)
    for line in bench.compare_to_targets(document):
        name, pct, rest = line.split(maxsplit=2)
        measured, target = (part.strip() for part in rest.rsplit("  ", 1)[0].split("<="))
        verdict = line.rsplit(maxsplit=1)[-1]
        style = "green" if verdict == "met" else "bold red"
        table.add_row(name, pct, measured, target, f"[{style}]{verdict}[/{style}]")
    return table


def _strategy_chart(strategies: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (
            "Scheduling strategies on the same seeded draws",
            "".join(
                bar_chart_svg(
                    f"player_action {p} by strategy",
                    {name: r[p] for name, r in strategies.items()},
                )
                for p in ("p50", "p95", "p99")
            ),
        )
    ]


def _run_llm(config: Config, args: argparse.Namespace, console: Console) -> int:
    """``--llm``: the script on a real server, both prompt layouts (real time)."""
    from ..errors import EngineError
    from .real_server import llama_server, run_real_server_bench

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    async def main() -> dict[str, Any]:
        def step(name: str, n: int) -> None:
            console.print(f"  {name}" if n == 0 else ".", end="\n" if n == 0 else "")

        if args.llm != "start":
            return await run_real_server_bench(config, args.llm, rounds=args.rounds, progress=step)
        console.print("starting the bundled llama.cpp server (SmolLM2-135M-Instruct) …")
        async with llama_server() as url:
            return await run_real_server_bench(config, url, rounds=args.rounds, progress=step)

    try:
        document = anyio.run(main, backend=args.backend)
    except EngineError as exc:
        console.print(f"[red]{exc}[/red]")
        return 2
    console.print()
    document["environment"] = environment(config, args.backend)
    document["environment"]["clock"] = "real"
    console.print(f"real server {document['server']}, {document['actions']} actions per layout:")
    for layout, figures in document["layouts"].items():
        ops = figures["operations"]
        action, first, call = ops["player_action"], ops["first_token"], ops["call_first_token"]
        tokens = figures["tokens"]
        first_try = figures["structured_first_try"]
        console.print(
            f"  [bold]{layout}[/bold]: player_action p50/p95/p99 "
            f"{action['p50']:.2f} / {action['p95']:.2f} / {action['p99']:.2f} s; first token "
            f"p50/p95 {first['p50']:.2f} / {first['p95']:.2f} s; a model call's first token "
            f"p50 {call['p50']:.2f} s; degraded {figures['degraded_actions']}; tokens "
            f"prompt {tokens['prompt']}, cached {tokens['cached']}, generated "
            f"{tokens['generated']}; structured answers valid on the first try "
            + ("-" if first_try is None else f"{first_try:.0%}")
        )
    console.print(
        "cache-friendly / player's text first, p50: first token of an action "
        f"[bold]{document['first_token_ratio_p50']:.2f}[/bold], first token of a model "
        f"call [bold]{document['call_first_token_ratio_p50']:.2f}[/bold]"
    )
    results_path = out / "results.json"
    results_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {results_path}")
    met = document["targets_met"]
    return 1 if args.fail_on_miss and not met else 0


def run_bench_command(config: Config, args: argparse.Namespace) -> int:
    console = Console()
    if args.iterations < 1:
        console.print(f"[red]--iterations must be >= 1, got {args.iterations}[/red]")
        return 2
    config = with_overrides(config, args.scenario, args.seed)
    if args.load:
        from .load_command import run_load_command

        return run_load_command(config, args)
    if args.llm:
        return _run_llm(config, args, console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = PerformanceBenchmark(config, sessions=args.sessions or 1)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("player actions", total=args.iterations)

        def step(name: str, n: int) -> None:
            if name == "player_action":
                progress.advance(task, n)
            else:
                progress.update(task, description=name)

        if args.real_time:
            document = anyio.run(
                functools.partial(
                    bench.run_benchmarks, args.iterations, strategies=False, progress=step
                ),
                backend=args.backend,
            )
            compared = run_virtual(compare_strategies, config, args.iterations)
            document["strategies"] = {name: r.as_dict() for name, r in compared.items()}
        else:
            document = run_virtual(bench.run_benchmarks, args.iterations, progress=step)
        if args.lever_actions > 0 and _default_agents(config):
            document["levers"] = run_virtual(run_levers, config, args.lever_actions, step)
            document["levers_actions"] = args.lever_actions
    document["environment"] = environment(config, args.backend if args.real_time else "trio")
    document["environment"]["clock"] = "real" if args.real_time else "virtual (trio MockClock)"
    s = document["strategies"]
    document["ratios"] = {
        "eager_vs_critical_path_p95": s["eager"]["p95"] / s["critical_path"]["p95"],
        "level_barrier_vs_eager_p95": s["level_barrier"]["p95"] / s["eager"]["p95"],
        "hedged_vs_eager_p99": s["eager_hedged"]["p99"] / s["eager"]["p99"],
        "hedge_extra_calls": s["eager_hedged"]["agent_calls"] / s["eager"]["agent_calls"] - 1,
        "engine_vs_bare_nursery": document["overhead"]["ratio"],
    }
    ratios = document["ratios"]
    overhead = document["overhead"]

    console.print(_targets_table(bench, document))
    console.print(
        _strategy_table(
            s,
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
    if "levers" in document:
        console.print(
            _lever_table(
                document["levers"],
                f"DAG levers, cumulative: player_action and first_token (s), calls and "
                f"tokens vs today — {args.lever_actions} seeded actions each, whole "
                f"pipeline, scenario {config.simulation.scenario!r}, virtual time",
            )
        )
    console.print(
        f"degraded actions: [bold]{document['degraded_actions']}[/bold] of "
        f"{document['actions']}; tokens: {document['tokens']}"
    )
    results_path = out / "results.json"
    results_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    report_path = write_report(
        out / "report.html",
        bench.report_profiler,
        title=f"dm-engine benchmark — scenario {config.simulation.scenario}",
        slowest=bench.slowest,
        depends_on={name: spec.depends_on for name, spec in config.agents.items()},
        extra_sections=_strategy_chart(s),
    )
    met = document["targets_met"]
    console.print(
        f"targets {'[green]met[/green]' if met else '[bold red]missed[/bold red]'}; "
        f"wrote {results_path} and {report_path}"
    )
    return 1 if args.fail_on_miss and not met else 0
