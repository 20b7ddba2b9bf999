"""``PerformanceBenchmark``: the engine's own figures, against the targets.

Two kinds of time (docs/benchmarks.md):

* **Agent-latency figures** (``player_action``, ``agent_query``) are read from the
  event loop's clock. Run under trio's ``MockClock(autojump_threshold=0)`` (what
  ``dm-engine bench`` does) they are exact virtual times of the seeded simulated
  latencies; on a real clock they are real.
* **Engine-cost figures** (``context_building``, ``state_update``, ``cache_lookup``)
  are CPU and I/O work, timed with ``time.perf_counter`` around real awaits.

Every benchmark warms up first, awaits the real operation (never a coroutine
creation), and rejects ``iterations < 1``.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, final

import anyio
import attrs

from ..agents.base import AgentRequest
from ..config import Config, LatencyTarget
from ..observability.profiler import PerformanceProfiler, Span
from ..pipeline import ActionResult, DungeonMaster
from ..runtime import open_engine
from .strategies import compare_strategies, measure_overhead, summarize

__all__ = ["SCRIPT", "OperationResult", "PerformanceBenchmark"]

#: The scripted player actions the benchmarks replay (every action type).
SCRIPT = (
    "I search the altar for traps",
    "I attack the nearest skeleton with my mace",
    "I ask Brother Aldous what happened to the chapel",
    "How does grappling work?",
    "We take a short rest in the sacristy",
    "I climb down the flooded stair and look around",
    "I cast fireball at the goblins",
    "What does a dragon's frightful presence do?",
    "I try to persuade the goblin to let us pass",
    "I open the reliquary and inspect the bones",
)

Progress = Callable[[str, int], None]


@attrs.frozen
class OperationResult:
    """Latency percentiles of one operation, in seconds, and the clock they used."""

    operation: str
    count: int
    p50: float
    p95: float
    p99: float
    mean: float
    clock: str  # "event loop" (virtual under a mock clock) or "real"

    @classmethod
    def of(cls, operation: str, samples: Sequence[float], clock: str) -> OperationResult:
        return cls(operation, len(samples), *summarize(samples), clock)

    def met(self, target: LatencyTarget | None) -> bool | None:
        if target is None:
            return None
        return self.p50 <= target.p50 and self.p95 <= target.p95 and self.p99 <= target.p99


def _check_iterations(iterations: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")


@final
@attrs.define(eq=False)
class PerformanceBenchmark:
    """Benchmarks of the whole engine on ``config`` (simulated agents by default).

    Args:
        config: the configuration; its module, agents and targets are used.
        sessions: concurrent sessions in ``benchmark_action_processing``.
        warmup: actions / calls run before measuring.
        state_dir: where the benchmark's session store goes (default: a temp dir).
    """

    config: Config
    sessions: int = 1
    warmup: int = 20
    state_dir: str | None = None
    slowest: Span | None = attrs.field(default=None, init=False)
    degraded: int = attrs.field(default=0, init=False)  # actions with a missing part
    tokens: dict[str, int] = attrs.field(factory=dict, init=False)  # prompt, cached, generated
    agent_calls: int = attrs.field(default=0, init=False)  # attempts, hedges included
    report_profiler: PerformanceProfiler = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if self.sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {self.sessions}")
        # the report's profiler: the samples of the figures below, whatever their clock
        self.report_profiler = PerformanceProfiler(self.config.targets)

    @contextlib.asynccontextmanager
    async def _engine(self) -> AsyncIterator[DungeonMaster]:
        # module queries and state writes on the event loop: a worker-thread wait
        # would let a mock clock's autojump move virtual time mid-action
        config = attrs.evolve(
            self.config,
            module=attrs.evolve(self.config.module, query_in_thread=False),
            state=attrs.evolve(self.config.state, write_in_thread=False),
        )
        with tempfile.TemporaryDirectory(dir=self.state_dir) as tmp:
            async with open_engine(config, state_path=Path(tmp) / "bench.sqlite") as dm:
                yield dm

    # ------------------------------------------------------------------ operations

    async def benchmark_action_processing(
        self, iterations: int, progress: Progress | None = None
    ) -> dict[str, OperationResult]:
        """``iterations`` player actions over ``sessions`` concurrent sessions.

        Returns the ``player_action`` and ``agent_query`` results (event-loop clock).
        """
        _check_iterations(iterations)
        async with self._engine() as dm:
            for i in range(min(self.warmup, iterations)):
                await dm.player_action("warmup", SCRIPT[i % len(SCRIPT)])
            results: list[ActionResult] = []

            async def play(session: int, count: int) -> None:
                for i in range(count):
                    text = SCRIPT[(session + i) % len(SCRIPT)]
                    results.append(await dm.player_action(f"bench-{session}", text))
                    if progress is not None:
                        progress("player_action", 1)

            per_session, extra = divmod(iterations, self.sessions)
            async with anyio.create_task_group() as tg:
                for s in range(self.sessions):
                    tg.start_soon(play, s, per_session + (1 if s < extra else 0))
        actions = [r.span.duration or 0.0 for r in results]
        first_tokens = [r.first_token for r in results if r.first_token is not None]
        queries = [
            s.duration or 0.0 for r in results for s in r.span.walk() if s.name == "agent_query"
        ]
        for seconds in actions:
            self.report_profiler.record("player_action", seconds)
        for seconds in queries:
            self.report_profiler.record("agent_query", seconds)
        for seconds in first_tokens:
            self.report_profiler.record("first_token", seconds)
        self.tokens = {
            key: sum(r.tokens.get(key, 0) for r in results)
            for key in ("prompt", "cached", "generated")
        }
        self.agent_calls = sum(
            r.attempts for res in results for r in res.responses.values() if r.attempts
        )
        self.degraded = sum(1 for r in results if r.degraded)
        if results:
            self.slowest = max(results, key=lambda r: r.span.duration or 0.0).span
        return {
            "player_action": OperationResult.of("player_action", actions, "event loop"),
            "first_token": OperationResult.of("first_token", first_tokens, "event loop"),
            "agent_query": OperationResult.of("agent_query", queries, "event loop"),
        }

    async def benchmark_agent_query(self, iterations: int) -> OperationResult:
        """``iterations`` single agent calls (each configured agent in turn)."""
        _check_iterations(iterations)
        samples: list[float] = []
        async with self._engine() as dm:
            names = list(self.config.agents)
            for i in range(min(self.warmup, iterations) + iterations):
                name = names[i % len(names)]
                request = AgentRequest(
                    id=f"q{i}", agent=name, context={"action": SCRIPT[i % len(SCRIPT)]}
                )
                t0 = anyio.current_time()
                await dm.executor.execute_with_timeout(
                    request, self.config.agents[name].timeout_seconds
                )
                if i >= min(self.warmup, iterations):
                    samples.append(anyio.current_time() - t0)
        return OperationResult.of("agent_query", samples, "event loop")

    async def benchmark_context_building(self, iterations: int) -> OperationResult:
        """``iterations`` context builds (each agent's budget in turn), real time."""
        _check_iterations(iterations)
        samples: list[float] = []
        async with self._engine() as dm:
            names = list(self.config.agents)
            warm = min(self.warmup, iterations)
            for i in range(warm + iterations):
                name = names[i % len(names)]
                request = AgentRequest(
                    id=name,
                    agent=name,
                    context={"action": SCRIPT[i % len(SCRIPT)], "action_type": "exploration"},
                )
                t0 = time.perf_counter()
                await dm.builder.build_context(request, self.config.agents[name].budget_tokens)
                if i >= warm:
                    samples.append(time.perf_counter() - t0)
        for seconds in samples:
            self.report_profiler.record("context_building", seconds)
        return OperationResult.of("context_building", samples, "real")

    async def benchmark_state_update(self, iterations: int) -> OperationResult:
        """``iterations`` durable action records (one transaction each), real time."""
        _check_iterations(iterations)
        samples: list[float] = []
        async with self._engine() as dm:
            await dm.store.ensure_session("state-bench")
            warm = min(self.warmup, iterations)
            for i in range(warm + iterations):
                t0 = time.perf_counter()
                await dm.store.record_action(
                    "state-bench",
                    action_text=SCRIPT[i % len(SCRIPT)],
                    action_type="exploration",
                    narrative="You look around. " * 20,
                    state_changes={"scene": f"room {i % 7}"},
                    responses={"narrator": {"status": "ok", "text": "..."}},
                )
                if i >= warm:
                    samples.append(time.perf_counter() - t0)
        for seconds in samples:
            self.report_profiler.record("state_update", seconds)
        return OperationResult.of("state_update", samples, "real")

    async def benchmark_cache_lookup(self, iterations: int) -> OperationResult:
        """``iterations`` module-cache lookups of section content, real time.

        Half hit a loaded section, half go through ``get_or_load`` of a chunk key
        already present (the context builder's two paths).
        """
        _check_iterations(iterations)
        samples: list[float] = []
        async with self._engine() as dm:
            sections = [
                s for s in ("locations", "npcs", "rules") if s in dm.lazy.module.section_names()
            ]
            await dm.lazy.ensure_loaded(*sections)
            keys = [f"module:{dm.lazy.module.name}:{s}" for s in sections]
            cache = dm.cache

            async def load() -> str:
                return "value"

            await cache.get_or_load("bench:key", load)
            warm = min(self.warmup, iterations)
            for i in range(warm + iterations):
                t0 = time.perf_counter()
                if i % 2:
                    cache.get(keys[i % len(keys)])
                else:
                    await cache.get_or_load("bench:key", load)
                if i >= warm:
                    samples.append(time.perf_counter() - t0)
        for seconds in samples:
            self.report_profiler.record("cache_lookup", seconds)
        return OperationResult.of("cache_lookup", samples, "real")

    # ------------------------------------------------------------------ the suite

    async def run_benchmarks(
        self,
        iterations: int = 2000,
        *,
        strategies: bool = True,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Every benchmark; the ``results.json`` document (docs/benchmarks.md).

        ``strategies`` replays the seeded draws through the scheduling strategies
        (sleeps on the current clock: run it under a mock clock).
        """
        _check_iterations(iterations)
        ops = await self.benchmark_action_processing(iterations, progress)
        small = max(1, min(iterations, 500))
        ops["context_building"] = await self.benchmark_context_building(small)
        ops["state_update"] = await self.benchmark_state_update(small)
        ops["cache_lookup"] = await self.benchmark_cache_lookup(small * 10)
        targets = self.config.targets
        operations: dict[str, Any] = {}
        for name, result in ops.items():
            target = targets.get(name)
            operations[name] = {
                "count": result.count,
                "p50": result.p50,
                "p95": result.p95,
                "p99": result.p99,
                "mean": result.mean,
                "clock": result.clock,
                "target": target.as_dict() if target else None,
                "met": result.met(target),
            }
        operations["player_action"]["degraded"] = self.degraded
        document: dict[str, Any] = {
            "operations": operations,
            "degraded_actions": self.degraded,
            "actions": iterations,
            "agent_calls": self.agent_calls,
            "tokens": self.tokens,
            "targets_met": all(op["met"] is not False for op in operations.values()),
        }
        if strategies:
            compared = await compare_strategies(self.config, iterations)
            document["strategies"] = {name: r.as_dict() for name, r in compared.items()}
        if progress is not None:
            progress("overhead", 1)
        document["overhead"] = await measure_overhead(self.config)
        return document

    def compare_to_targets(self, results: dict[str, Any]) -> list[str]:
        """One line per operation and percentile: the figure, the target, met or missed."""
        lines: list[str] = []
        for name, op in results["operations"].items():
            target = op.get("target")
            if not target:
                continue
            for p in ("p50", "p95", "p99"):
                verdict = "met" if op[p] <= target[p] else "MISSED"
                lines.append(
                    f"{name:<17} {p}  {_fmt(op[p]):>10} <= {_fmt(target[p]):>8}  {verdict}"
                )
        return lines


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"
