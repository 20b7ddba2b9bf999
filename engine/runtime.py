"""``open_engine``: build every part from the configuration and own their lifetimes.

Everything with a lifetime — the module store, the lazy loader's nursery, the
session store, the shared HTTP client, the span log's writer, the metrics endpoint,
the nursery of streamed actions — is entered on one ``AsyncExitStack`` and closed in
reverse order when the ``async with`` ends, also when it ends by cancellation or an
error. An error raised inside the block (or by one part) leaves it as itself, not
wrapped in an exception group by the nurseries it crossed.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import httpx

from .agents.base import Agent
from .agents.http import make_http_agent
from .agents.prompt_cache import PromptCacheModel
from .agents.retrieval import RetrievalFirstAgent
from .agents.simulated import SimulatedAgent
from .config import Config
from .content.cache import ModuleCache
from .content.context import OptimizedContextBuilder
from .content.lazy import LazyLoadManager
from .content.store import from_config as open_configured_module
from .errors import lone_error
from .gc_tuning import young_threshold
from .observability.metrics import MetricsExporter
from .observability.profiler import PerformanceProfiler
from .observability.spanlog import SpanLog
from .pipeline import DungeonMaster, TracedAgent
from .scheduling.executor import ParallelAgentExecutor
from .scheduling.limits import GloballyLimitedAgent, ServerLimitedAgent
from .state import open_session_store

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = ["open_engine"]


@contextlib.asynccontextmanager
async def open_engine(
    config: Config | None = None,
    *,
    agents: Mapping[str, Agent] | None = None,
    module: Any = None,
    state_path: str | os.PathLike[str] | None = None,
    profiler: PerformanceProfiler | None = None,
) -> AsyncIterator[DungeonMaster]:
    """Open the whole engine; ``async with open_engine(config) as dm: ...``.

    Args:
        config: the configuration (default: the built-in defaults).
        agents: agent objects by name, replacing those built from ``[agents.*]``
            (each still traced and scheduled); names must match the config.
        module: an already-open module to use instead of ``[module]`` (not closed
            by the engine): the module protocol of docs/api.md plus the context
            builder's search API (``ContextSource``), as ``ModuleStore`` has.
        state_path: the session store file, instead of ``[state] path``.
        profiler: a profiler to record into (default: one from the config, on the
            event loop's clock, so virtual-time runs record virtual latencies).

    While the engine is open, the garbage collector's young threshold is
    ``[performance.gc] young_threshold`` (0: left alone); the thresholds found come
    back when the last open engine closes (:mod:`engine.gc_tuning`).
    """
    config = config or Config()
    try:
        async with _open(config, agents, module, state_path, profiler) as dm:
            yield dm
    except BaseExceptionGroup as group:
        lone = lone_error(group)
        if lone is None:
            raise
        raise lone from None


@contextlib.asynccontextmanager
async def _open(
    config: Config,
    agents: Mapping[str, Agent] | None,
    module: Any,
    state_path: str | os.PathLike[str] | None,
    profiler: PerformanceProfiler | None,
) -> AsyncIterator[DungeonMaster]:
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(young_threshold(config.performance.gc.young_threshold))
        if profiler is None:
            profiler = PerformanceProfiler.from_config(config, clock=anyio.current_time)
        if module is None:
            store = await open_configured_module(config.module)
            stack.push_async_callback(store.aclose)
            module = store
        cache = ModuleCache.from_config(config.performance.cache)
        lazy = LazyLoadManager.from_config(module, config.performance.lazy_loading, cache)
        await stack.enter_async_context(lazy)
        await _warm_up(config, lazy)
        builder = OptimizedContextBuilder(
            module,
            cache=cache,
            lazy=lazy,
            priorities=config.performance.lazy_loading.priorities,
            on_lookup=lambda seconds: profiler.record("cache_lookup", seconds),
        )
        if agents is None:
            agents = await _build_agents(config, stack)
        agents = await _globally_limited(config, stack, agents)
        metrics = MetricsExporter.from_config(config, profiler)
        on_usage = metrics.agent_tokens if metrics is not None else None
        traced = {
            name: TracedAgent(name, agent, profiler, on_usage) for name, agent in agents.items()
        }

        executor = ParallelAgentExecutor.from_config(
            traced, config, on_response=_failure_counter(metrics)
        )
        await stack.enter_async_context(executor.serving())  # one hedge timer for all
        if metrics is not None:
            await stack.enter_async_context(metrics)
            metrics.watch_cache("module", cache.statistics)
            metrics.watch_limiter("agents", _occupancy(executor))
        span_log = SpanLog.from_config(config, profiler)
        if span_log is not None:
            await stack.enter_async_context(span_log)

        # [state] url: PostgreSQL, else SQLite (state_path: SQLite in that file)
        session_store = await stack.enter_async_context(
            open_session_store(config.state, config.module.cache_dir, path=state_path)
        )
        streams = await stack.enter_async_context(anyio.create_task_group())
        yield DungeonMaster(
            config,
            profiler,
            builder,
            lazy,
            executor,
            session_store,
            cache,
            metrics,
            tasks=streams,
        )


async def _warm_up(config: Config, lazy: LazyLoadManager) -> None:
    """``[performance.lazy_loading] enabled = false`` loads every section now;
    ``[performance.cache] preload_enabled`` starts background loads of the most
    urgent section of every action type (the engine does not wait for them)."""
    loading = config.performance.lazy_loading
    if not loading.enabled:
        await lazy.ensure_loaded(*lazy.module.section_names())
        return
    if config.performance.cache.preload_enabled and loading.background_load:
        known = set(lazy.module.section_names())
        urgent = dict.fromkeys(s[0] for s in loading.priorities.values() if s and s[0] in known)
        for section in urgent:
            lazy.load_background(section)


async def _build_agents(config: Config, stack: contextlib.AsyncExitStack) -> dict[str, Agent]:
    """The agents of ``[agents.*]``: simulated ones share one simulated prompt cache;
    HTTP ones share one client and queue per server (``[servers.*] max_concurrent``);
    ``from_retrieval`` ones answer from their context first."""
    agents: dict[str, Agent] = {}
    client: httpx.AsyncClient | None = None
    prompt_cache = PromptCacheModel.from_model(config.latency_model())
    limiters: dict[str, anyio.CapacityLimiter] = {}
    caches: dict[str, PromptCacheModel] = {}  # what a one-slot server holds (estimates)
    layout = config.performance.prompts.layout
    for name, agent_config in config.agents.items():
        agent: Agent
        if agent_config.backend == "simulated":
            scale = config.simulation.time_scale
            agent = SimulatedAgent.from_config(name, config, scale, prompt_cache)
        else:
            if client is None:
                # enough connections for every agent call plus its hedge
                slots = 2 * config.performance.parallelization.max_concurrent_agents
                limits = httpx.Limits(max_connections=slots, max_keepalive_connections=slots)
                client = await stack.enter_async_context(httpx.AsyncClient(limits=limits))
            server = config.server_of(name)
            shared = agent_config.server
            if shared and shared not in limiters:  # a shared server: its own limiter
                limiters[shared] = anyio.CapacityLimiter(server.max_concurrent)
                caches[shared] = PromptCacheModel.one_slot()
            agent = make_http_agent(
                name,
                agent_config,
                client,
                server=server,
                layout=layout,
                cache_model=caches.get(shared) if shared else None,
            )
            if shared:
                agent = ServerLimitedAgent(agent, limiters[shared])
        if agent_config.from_retrieval:
            agent = RetrievalFirstAgent(agent)
        agents[name] = agent
    return agents


async def _globally_limited(
    config: Config, stack: contextlib.AsyncExitStack, agents: Mapping[str, Agent]
) -> Mapping[str, Agent]:
    """With ``redis_url``, every model call holds a slot of the limiter that all engine
    processes share (a retrieval answer calls no model, so only its fallback does)."""
    par = config.performance.parallelization
    if not par.redis_url:
        return agents
    from .scheduling.global_limits import RedisLimiter  # coredis: only when used

    limiter = await stack.enter_async_context(
        RedisLimiter.connect(
            par.redis_url,
            max_concurrent=par.global_max_concurrent_agents or None,
            requests_per_minute=par.global_requests_per_minute or None,
            tokens_per_minute=par.global_tokens_per_minute or None,
            lease_seconds=par.global_lease_seconds,
            spare_leases=par.global_spare_leases,
        )
    )
    limited: dict[str, Agent] = {}
    for name, agent in agents.items():
        spec = config.agents.get(name)
        tokens = spec.budget_tokens + spec.max_tokens if spec is not None else 0
        if isinstance(agent, RetrievalFirstAgent):
            limited[name] = RetrievalFirstAgent(GloballyLimitedAgent(agent.inner, limiter, tokens))
        else:
            limited[name] = GloballyLimitedAgent(agent, limiter, tokens)
    return limited


def _occupancy(executor: ParallelAgentExecutor) -> Any:
    def read() -> tuple[float, float]:
        stats = executor.statistics()
        return float(stats.borrowed_tokens), float(stats.total_tokens)

    return read


def _failure_counter(metrics: MetricsExporter | None) -> Any:
    if metrics is None:
        return None

    def count(response: Any) -> None:
        if not response.ok:
            metrics.agent_failed(response.agent, response.status)
        if response.hedged:
            metrics.hedge_sent(response.agent)
            if response.hedge_won:
                metrics.hedge_won(response.agent)

    return count
