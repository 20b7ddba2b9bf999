"""The measured effect of the performance options (docs/performance-tuning.md).

Run: ``.venv/bin/python -m bench.bench_tuning [--iterations N]``

Each variant changes one option of the default configuration and replays the same
seeded actions (virtual time, ``targets`` scenario, 4 concurrent sessions so that
the limiter matters). Cache and lazy-loading variants are measured in real time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import attrs
import trio

from engine.agents.base import AgentRequest
from engine.benchmark.strategies import run_virtual
from engine.benchmark.suite import SCRIPT, PerformanceBenchmark
from engine.config import Config
from engine.runtime import open_engine


def _perf(config: Config, **changes: Any) -> Config:
    perf = config.performance
    for section, values in changes.items():
        perf = attrs.evolve(perf, **{section: attrs.evolve(getattr(perf, section), **values)})
    return attrs.evolve(config, performance=perf)


def actions(config: Config, iterations: int, sessions: int) -> dict[str, float]:
    bench = PerformanceBenchmark(config, sessions=sessions, warmup=0)
    result = run_virtual(bench.benchmark_action_processing, iterations)
    action, query = result["player_action"], result["agent_query"]
    return {
        "p50": action.p50,
        "p95": action.p95,
        "p99": action.p99,
        "agent_calls": query.count,
        "degraded": bench.degraded,
    }


def cold_start(config: Config) -> dict[str, float]:
    """Real time and peak traced memory from opening the engine to the first context."""

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with open_engine(config, state_path=f"{tmp}/s.sqlite") as dm:
                await first_context(dm)

    async def first_context(dm: Any) -> None:
        if not config.performance.lazy_loading.enabled:
            await dm.lazy.ensure_loaded(*dm.lazy.module.section_names())
        request = AgentRequest(id="narrator", agent="narrator", context={"action": SCRIPT[0]})
        await dm.builder.build_context(request, 2000)

    tracemalloc.start()
    t0 = time.perf_counter()
    trio.run(main)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "peak_mb": peak / 2**20}


def context_cost(config: Config, builds: int = 400) -> dict[str, float]:
    """Real time per context build and the cache hit rate, on the scripted actions."""
    stats: dict[str, float] = {}

    async def main() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            async with open_engine(config, state_path=f"{tmp}/s.sqlite") as dm:
                await builds_in(dm)

    async def builds_in(dm: Any) -> None:
        samples = []
        for i in range(builds):
            request = AgentRequest(
                id="archivist", agent="archivist", context={"action": SCRIPT[i % len(SCRIPT)]}
            )
            t0 = time.perf_counter()
            await dm.builder.build_context(request, 1500)
            samples.append(time.perf_counter() - t0)
        samples.sort()
        cache = dm.cache.statistics()
        stats.update(
            p50_ms=samples[len(samples) // 2] * 1e3,
            p95_ms=samples[int(len(samples) * 0.95)] * 1e3,
            hit_rate=cache.hit_rate,
            evictions=cache.evictions,
        )

    trio.run(main)
    return stats


def show(title: str, rows: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}")
    for name, values in rows.items():
        cells = "  ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        print(f"  {name:<28} {cells}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=4)
    args = parser.parse_args()
    base = Config()
    n, s = args.iterations, args.sessions

    variants: dict[str, Callable[[], Config]] = {
        f"max_concurrent_agents = {k}": (
            lambda k=k: _perf(base, parallelization={"max_concurrent_agents": k})
        )
        for k in (1, 2, 4, 8)
    }
    show(
        f"player_action, {n} actions over {s} sessions (virtual time, targets scenario)",
        {name: actions(make(), n, s) for name, make in variants.items()},
    )
    show(
        f"hedging, {n} actions, 1 session (virtual time, hosted scenario)",
        {
            f"hedging.enabled = {on}": actions(
                _perf(
                    attrs.evolve(base, simulation=attrs.evolve(base.simulation, scenario="hosted")),
                    hedging={"enabled": on},
                ),
                n,
                1,
            )
            for on in (False, True)
        },
    )
    show(
        "context building by cache size (real time, 400 builds)",
        {
            f"cache.max_size_mb = {mb}": context_cost(_perf(base, cache={"max_size_mb": mb}))
            for mb in (0.05, 1.0, 50.0)
        },
    )
    show(
        "cold start to the first context (real time, tracemalloc peak)",
        {
            f"lazy_loading.enabled = {on}": cold_start(_perf(base, lazy_loading={"enabled": on}))
            for on in (True, False)
        },
    )


if __name__ == "__main__":
    main()
