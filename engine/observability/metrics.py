"""Prometheus metrics of one engine, in their own ``CollectorRegistry``.

Never the process-global registry: two engines in one process (tests, an MCP host
with several games) keep separate metrics. :meth:`MetricsExporter.metrics_text`
returns the text exposition; an optional HTTP endpoint serves it (bound to
127.0.0.1 by default) from ``prometheus_client``'s server thread.

Values read at scrape time (cache statistics, limiter occupancy, sketch
percentiles) are read from the scraping thread: they are snapshots of plain
counters and may be a few operations apart from each other, never torn.
Metric names and meanings: ``docs/monitoring.md``.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, final
from wsgiref.simple_server import WSGIServer

import anyio
import anyio.lowlevel
import attrs
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from .profiler import PerformanceProfiler

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["DEFAULT_BUCKETS", "MetricsExporter"]

#: Histogram buckets (seconds): from a cache lookup (ms) to a degraded action (1 min).
DEFAULT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0,
)  # fmt: skip

_CACHE_COUNTERS = (
    "hits",
    "misses",
    "evictions",
    "expirations",
    "loads",
    "coalesced",
    "load_errors",
)
_CACHE_GAUGES = ("hit_rate", "entries", "size_bytes", "max_size_bytes")


def _label(value: object) -> str:
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def _field(stats: object, name: str) -> float | None:
    value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
    return None if value is None else float(value)


@attrs.define(eq=False)
class _ScrapeCollector(Collector):
    """Reads caches, limiters and the profiler's sketches at scrape time."""

    exporter: MetricsExporter

    def collect(self) -> Iterable[Metric]:
        yield from self._caches()
        yield from self._limiters()
        yield from self._quantiles()

    def _caches(self) -> Iterator[Metric]:
        caches = list(self.exporter._caches.items())
        if not caches:
            return
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for name in _CACHE_COUNTERS:
            families[name] = CounterMetricFamily(
                f"dm_cache_{name}", f"Module cache {name.replace('_', ' ')}", labels=["cache"]
            )
        for name in _CACHE_GAUGES:
            families[name] = GaugeMetricFamily(
                f"dm_cache_{name}", f"Module cache {name.replace('_', ' ')}", labels=["cache"]
            )
        for cache, statistics in caches:
            stats = statistics()
            for name, family in families.items():
                value = _field(stats, name)
                if value is not None:
                    family.add_metric([cache], value)
        yield from families.values()

    def _limiters(self) -> Iterator[Metric]:
        limiters = list(self.exporter._limiters.items())
        if not limiters:
            return
        borrowed = GaugeMetricFamily(
            "dm_limiter_borrowed_tokens", "Limiter tokens in use", labels=["limiter"]
        )
        total = GaugeMetricFamily("dm_limiter_total_tokens", "Limiter capacity", labels=["limiter"])
        for name, occupancy in limiters:
            used, capacity = occupancy()
            borrowed.add_metric([name], float(used))
            total.add_metric([name], float(capacity))
        yield borrowed
        yield total

    def _quantiles(self) -> Iterator[Metric]:
        prof = self.exporter.profiler
        if prof is None:
            return
        quantiles = GaugeMetricFamily(
            "dm_operation_latency_quantile_seconds",
            "Latency percentile from the profiler's sketch (relative error <= 0.5 %)",
            labels=["operation", "quantile"],
        )
        targets = GaugeMetricFamily(
            "dm_operation_latency_target_seconds",
            "Latency target of the operation",
            labels=["operation", "quantile"],
        )
        for operation in prof.operations:
            sketch = prof.sketch(operation)
            if sketch is None or sketch.count == 0:
                continue
            for q in ("0.5", "0.95", "0.99"):
                quantiles.add_metric([operation, q], sketch.quantile(float(q)))
        for operation, target in sorted(prof.targets.items()):
            for q, value in (("0.5", target.p50), ("0.95", target.p95), ("0.99", target.p99)):
                targets.add_metric([operation, q], value)
        yield quantiles
        yield targets


@final
@attrs.define(eq=False, repr=False)
class MetricsExporter:
    """The engine's Prometheus metrics and their optional HTTP endpoint.

    Args:
        profiler: observe its samples (latency histograms, counters by status) while
            the exporter is open, and expose its sketch percentiles and targets.
        host, port: the HTTP endpoint; ``port=None`` serves none, ``0`` picks a
            free port (see :attr:`port_bound`).
        buckets: latency histogram buckets in seconds.
    """

    profiler: PerformanceProfiler | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    buckets: tuple[float, ...] = DEFAULT_BUCKETS

    registry: CollectorRegistry = attrs.field(init=False)
    _latency: Histogram = attrs.field(init=False)
    _operations: Counter = attrs.field(init=False)
    _hedges_sent: Counter = attrs.field(init=False)
    _hedges_won: Counter = attrs.field(init=False)
    _agent_failures: Counter = attrs.field(init=False)
    _prompt_tokens: Counter = attrs.field(init=False)
    _output_tokens: Counter = attrs.field(init=False)
    _children: dict[tuple[str, str], tuple[Any, Any]] = attrs.field(factory=dict, init=False)
    _caches: dict[str, Callable[[], object]] = attrs.field(factory=dict, init=False)
    _limiters: dict[str, Callable[[], tuple[float, float]]] = attrs.field(factory=dict, init=False)
    _server: tuple[WSGIServer, threading.Thread] | None = attrs.field(default=None, init=False)
    _unsubscribe: Callable[[], None] | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self._latency = Histogram(
            "dm_operation_latency_seconds",
            "Latency of profiled operations",
            ["operation"],
            buckets=self.buckets,
            registry=reg,
        )
        self._operations = Counter(
            "dm_operations", "Profiled operations by final status", ["operation", "status"],
            registry=reg,
        )  # fmt: skip
        self._hedges_sent = Counter(
            "dm_hedges_sent", "Hedged (second) agent attempts sent", ["agent"], registry=reg
        )
        self._hedges_won = Counter(
            "dm_hedges_won", "Hedged attempts that answered first", ["agent"], registry=reg
        )
        self._agent_failures = Counter(
            "dm_agent_failures",
            "Agent requests that did not end OK, by status",
            ["agent", "status"],
            registry=reg,
        )
        self._prompt_tokens = Counter(
            "dm_agent_prompt_tokens",
            "Prompt tokens of agent calls; cache = cached (served from the server's prompt "
            "cache) or uncached (prefilled)",
            ["agent", "cache"],
            registry=reg,
        )
        self._output_tokens = Counter(
            "dm_agent_output_tokens", "Tokens generated by agent calls", ["agent"], registry=reg
        )
        reg.register(_ScrapeCollector(self))

    def __repr__(self) -> str:
        return f"MetricsExporter(port_bound={self.port_bound})"

    @classmethod
    def from_config(
        cls, config: Config, profiler: PerformanceProfiler | None = None
    ) -> MetricsExporter | None:
        """The exporter of ``[performance.monitoring]``: None when metrics are disabled;
        no HTTP endpoint when ``metrics_port`` is 0."""
        mon = config.performance.monitoring
        if not mon.metrics_enabled:
            return None
        return cls(profiler, mon.metrics_host, mon.metrics_port or None)

    # ------------------------------------------------------------------ recording

    def observe(self, operation: str, seconds: float, status: str = "ok") -> None:
        """Count one finished operation (the profiler's sample listener)."""
        key = (operation, status)
        children = self._children.get(key)
        if children is None:
            children = (self._latency.labels(operation), self._operations.labels(*key))
            self._children[key] = children
        children[0].observe(seconds)
        children[1].inc()

    def hedge_sent(self, agent: str) -> None:
        self._hedges_sent.labels(agent).inc()

    def hedge_won(self, agent: str) -> None:
        self._hedges_won.labels(agent).inc()

    def agent_tokens(self, agent: str, usage: Mapping[str, Any]) -> None:
        """Count one call's tokens from its ``usage`` (fields the server left out are
        skipped; ``cached_tokens`` is part of ``input_tokens``)."""
        prompt, cached, output = (
            usage.get(k) for k in ("input_tokens", "cached_tokens", "output_tokens")
        )
        cached_n = cached if isinstance(cached, int) and cached > 0 else 0
        if isinstance(prompt, int) and prompt > 0:
            self._prompt_tokens.labels(agent, "uncached").inc(max(prompt - cached_n, 0))
        if cached_n:
            self._prompt_tokens.labels(agent, "cached").inc(cached_n)
        if isinstance(output, int) and output > 0:
            self._output_tokens.labels(agent).inc(output)

    def agent_failed(self, agent: str, status: object) -> None:
        """Count a request of ``agent`` that ended with ``status`` (a Status or str)."""
        self._agent_failures.labels(agent, _label(status)).inc()

    def watch_cache(self, name: str, statistics: Callable[[], object]) -> None:
        """Expose ``statistics()`` (e.g. ``cache.statistics``) at every scrape."""
        self._caches[name] = statistics

    def watch_limiter(self, name: str, occupancy: Callable[[], tuple[float, float]]) -> None:
        """Expose ``occupancy() -> (borrowed, total)`` at every scrape, e.g.
        ``lambda: (limiter.borrowed_tokens, limiter.total_tokens)``."""
        self._limiters[name] = occupancy

    def metrics_text(self) -> str:
        """The Prometheus text exposition of every metric of this engine."""
        return generate_latest(self.registry).decode("utf-8")

    # ------------------------------------------------------------------ lifecycle

    @property
    def port_bound(self) -> int | None:
        """The endpoint's actual port while it serves, else None."""
        return None if self._server is None else int(self._server[0].server_port)

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (defaults: the fields; port 0
        picks a free one). Returns the bound port.

        Raises:
            RuntimeError: already serving.
            OSError: the address cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError(f"already serving on port {self.port_bound}")
        port = self.port if port is None else port
        self._server = start_http_server(
            0 if port is None else port, addr=host or self.host, registry=self.registry
        )
        await anyio.lowlevel.checkpoint()
        return int(self._server[0].server_port)

    async def stop(self) -> None:
        """Stop the HTTP endpoint (if serving) and wait for its thread to end."""
        server = self._server
        self._server = None
        if server is None:
            return
        httpd, thread = server

        def shutdown() -> None:
            httpd.shutdown()
            httpd.server_close()
            thread.join()

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(shutdown)

    async def __aenter__(self) -> MetricsExporter:
        """Subscribe to the profiler; serve HTTP if ``port`` is not None."""
        if self.profiler is not None and self._unsubscribe is None:
            self._unsubscribe = self.profiler.add_sample_listener(self.observe)
        if self.port is not None:
            try:
                await self.start()
            except BaseException:
                self._detach()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._detach()
        await self.stop()

    def _detach(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
