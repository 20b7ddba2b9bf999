"""Scheduling strategies compared on the same seeded latency draws.

* ``sequential`` — one agent at a time, in topological order;
* ``level_barrier`` — every topological level gathered before the next starts (the
  previous design, and LangGraph's superstep);
* ``eager`` — :class:`ParallelAgentExecutor`, no hedging;
* ``eager_hedged`` — the same with hedged requests;
* ``critical_path`` — not a schedule but the bound: the longest dependency chain of
  the drawn latencies, what unlimited concurrency could at best achieve.

Run under trio's ``MockClock(autojump_threshold=0)`` the latencies are exact virtual
times, so the comparison is free of noise and costs only CPU time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, final

import anyio
import attrs

from ..agents.base import Agent, AgentRequest
from ..agents.simulated import SimulatedAgent
from ..config import Config
from ..quantiles import percentile
from ..scheduling.dag import RequestGraph
from ..scheduling.executor import ParallelAgentExecutor
from ..scheduling.hedging import HedgePolicy

__all__ = [
    "STRATEGIES",
    "CountingAgent",
    "StrategyResult",
    "action_requests",
    "compare_strategies",
    "measure_overhead",
    "summarize",
]

STRATEGIES = ("sequential", "level_barrier", "eager", "eager_hedged", "critical_path")


def summarize(samples: Sequence[float]) -> tuple[float, float, float, float]:
    """(p50, p95, p99, mean) of ``samples`` (zeros for none); nearest-rank
    percentiles (``engine.quantiles``)."""
    ordered = sorted(samples)
    mean = sum(ordered) / len(ordered) if ordered else 0.0
    return percentile(ordered, 50), percentile(ordered, 95), percentile(ordered, 99), mean


@attrs.frozen
class StrategyResult:
    """Player-action latency percentiles of one strategy, in seconds."""

    name: str
    p50: float
    p95: float
    p99: float
    mean: float
    agent_calls: int
    actions: int

    @classmethod
    def of(cls, name: str, latencies: Sequence[float], calls: int) -> StrategyResult:
        return cls(name, *summarize(latencies), calls, len(latencies))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "p50": self.p50,
            "p95": self.p95,
            "p99": self.p99,
            "mean": self.mean,
            "agent_calls": self.agent_calls,
        }


@final
@attrs.define(eq=False)
class CountingAgent:
    """Wraps an agent and counts its calls (hedges included)."""

    inner: Agent
    calls: int = 0

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        self.calls += 1
        return await self.inner.run(request, inputs)


def action_requests(config: Config, action_type: str, key: str) -> list[AgentRequest]:
    """The agent DAG of ``action_type`` for one action whose draws are keyed by ``key``."""
    names = config.agents_for(action_type)
    chosen = set(names)
    return [
        AgentRequest(
            id=name,
            agent=name,
            context={"draw_key": key, "action": "benchmark"},
            depends_on=tuple(d for d in config.agents[name].depends_on if d in chosen),
        )
        for name in names
    ]


async def _sequential(requests: Sequence[AgentRequest], agents: Mapping[str, Agent]) -> None:
    graph = RequestGraph.build(requests)
    outputs: dict[str, Any] = {}
    for level in graph.levels:
        for i in level:
            r = graph.requests[i]
            outputs[r.id] = await agents[r.agent].run(r, {d: outputs[d] for d in r.depends_on})


async def _level_barrier(requests: Sequence[AgentRequest], agents: Mapping[str, Agent]) -> None:
    graph = RequestGraph.build(requests)
    outputs: dict[str, Any] = {}

    async def one(r: AgentRequest) -> None:
        outputs[r.id] = await agents[r.agent].run(r, {d: outputs[d] for d in r.depends_on})

    for level in graph.levels:
        async with anyio.create_task_group() as tg:
            for i in level:
                tg.start_soon(one, graph.requests[i])


def _critical_path(
    requests: Sequence[AgentRequest], agents: Mapping[str, SimulatedAgent | None]
) -> float:
    graph = RequestGraph.build(requests)
    finish: dict[int, float] = {}
    for level in graph.levels:
        for i in level:
            r = graph.requests[i]
            start = max((finish[p] for p in graph.parents[i]), default=0.0)
            agent = agents[r.agent]
            took = 0.0  # None: answered from retrieval, no model call
            if agent is not None:
                took = agent.latency(
                    str(r.context["draw_key"]), uncached_tokens=agent.fixed_prompt_tokens or 0
                )
            finish[i] = start + took
    return max(finish.values(), default=0.0)


async def compare_strategies(
    config: Config,
    actions: int,
    *,
    action_type: str = "combat",
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, StrategyResult]:
    """Replay ``actions`` seeded actions through every strategy (virtual time).

    Must run under a virtual clock (trio ``MockClock``) to be cheap; under a real
    clock it works but takes the real latencies.
    """
    simulated: dict[str, SimulatedAgent | None] = {
        name: None
        if spec.from_retrieval  # answers from retrieval: no model call
        else attrs.evolve(
            SimulatedAgent.from_config(name, config),
            fixed_prompt_tokens=spec.budget_tokens,  # a full context
        )
        for name, spec in config.agents.items()
    }
    results: dict[str, StrategyResult] = {}
    for name in STRATEGIES:
        latencies: list[float] = []
        if name == "critical_path":
            for i in range(actions):
                requests = action_requests(config, action_type, str(i))
                latencies.append(_critical_path(requests, simulated))
            results[name] = StrategyResult.of(name, latencies, 0)
            continue
        counting = {
            n: CountingAgent(a if a is not None else _ZeroLatencyAgent())
            for n, a in simulated.items()
        }
        run = _strategy(name, config, counting)
        for i in range(actions):
            requests = action_requests(config, action_type, str(i))
            t0 = anyio.current_time()
            await run(requests)
            latencies.append(anyio.current_time() - t0)
            if progress is not None and i % 100 == 99:
                progress(name, 100)
        calls = sum(a.calls for n, a in counting.items() if simulated[n] is not None)
        results[name] = StrategyResult.of(name, latencies, calls)
    return results


def _strategy(
    name: str, config: Config, agents: Mapping[str, Agent]
) -> Callable[[Sequence[AgentRequest]], Awaitable[Any]]:
    if name == "sequential":
        return lambda requests: _sequential(requests, agents)
    if name == "level_barrier":
        return lambda requests: _level_barrier(requests, agents)
    executor = ParallelAgentExecutor(
        agents,
        config.performance.parallelization.max_concurrent_agents,
        # no timeouts: the comparison is about scheduling, not degradation
        agent_timeout=1e9,
        hedging=HedgePolicy.from_config(config) if name == "eager_hedged" else None,
    )
    return executor.execute_parallel


def run_virtual(fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on trio with an autojumping mock clock (virtual time)."""

    async def main() -> Any:
        return await fn(*args, **kwargs)

    import trio.testing  # imports pytest: only when a virtual-time run is asked for

    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@final
@attrs.define(eq=False)
class _ZeroLatencyAgent:
    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        await anyio.lowlevel.checkpoint()
        return request.id


async def _bare_nursery(requests: Sequence[AgentRequest], agents: Mapping[str, Agent]) -> None:
    """The least code that runs the DAG: a nursery and one event per request."""
    done = {r.id: anyio.Event() for r in requests}
    outputs: dict[str, Any] = {}

    async def one(r: AgentRequest) -> None:
        for d in r.depends_on:
            await done[d].wait()
        outputs[r.id] = await agents[r.agent].run(r, {d: outputs[d] for d in r.depends_on})
        done[r.id].set()

    async with anyio.create_task_group() as tg:
        for r in requests:
            tg.start_soon(one, r)


async def measure_overhead(
    config: Config, actions: int = 2000, rounds: int = 5
) -> dict[str, float]:
    """Real-time cost per action (µs) of the executor vs a bare nursery, zero-latency agents.

    Both run the same coroutines in the same process, alternating, best of
    ``rounds`` (the minimum is the least noisy estimate of a cost).
    """
    agents: dict[str, Agent] = {name: _ZeroLatencyAgent() for name in config.agents}
    executor = ParallelAgentExecutor(
        agents, config.performance.parallelization.max_concurrent_agents, 60.0
    )
    requests = action_requests(config, "combat", "overhead")

    async def engine_run() -> None:
        for _ in range(actions):
            await executor.execute_parallel(requests)

    async def bare_run() -> None:
        for _ in range(actions):
            await _bare_nursery(requests, agents)

    best = {"engine": float("inf"), "bare": float("inf")}
    await engine_run()  # warm-up
    await bare_run()
    for _ in range(rounds):
        for name, fn in (("engine", engine_run), ("bare", bare_run)):
            t0 = time.perf_counter()
            await fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / actions * 1e6)
    return {
        "engine_us_per_action": best["engine"],
        "bare_nursery_us_per_action": best["bare"],
        "ratio": best["engine"] / best["bare"],
    }
