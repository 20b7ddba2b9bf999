"""MetricsExporter: its own registry, scraped as text and over HTTP on 127.0.0.1."""

from __future__ import annotations

import re
from typing import Any

import anyio
import attrs
import httpx
import pytest
from prometheus_client import REGISTRY

from engine.agents.base import Status
from engine.config import parse_config
from engine.observability.metrics import MetricsExporter
from engine.observability.profiler import PerformanceProfiler

# No client timeout: under trio's autojump clock a timeout would fire in virtual time
# while the (real) HTTP round trip is in flight.


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a text exposition (labels matched exactly)."""
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if found == labels:
            return float(m.group(3))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


@attrs.frozen
class FakeStats:
    hits: int = 8
    misses: int = 2
    hit_rate: float = 0.8
    evictions: int = 1
    expirations: int = 0
    loads: int = 2
    coalesced: int = 3
    load_errors: int = 0
    entries: int = 5
    size_bytes: int = 1234
    max_size_bytes: int = 50_000_000


def exercise(prof: PerformanceProfiler, exporter: MetricsExporter) -> None:
    with prof.trace("player_action"):
        for _ in range(3):
            with prof.trace("agent_query", agent="narrator"):
                pass
    with pytest.raises(RuntimeError), prof.trace("state_update"):
        raise RuntimeError("disk full")
    prof.record("context_building", 0.7)
    exporter.hedge_sent("narrator")
    exporter.hedge_sent("narrator")
    exporter.hedge_won("narrator")
    exporter.agent_failed("arbiter", Status.TIMEOUT)
    exporter.agent_failed("arbiter", "error")


@pytest.mark.anyio
async def test_MetricsExporter_text_has_every_family() -> None:
    now = [0.0]
    prof = PerformanceProfiler(clock=lambda: now[0])
    async with MetricsExporter(prof) as exporter:
        assert exporter.port_bound is None  # no endpoint asked for
        exercise(prof, exporter)
        exporter.watch_cache("module", FakeStats)
        exporter.watch_limiter("agents", lambda: (3, 4))
        text = exporter.metrics_text()
    assert sample(text, "dm_operation_latency_seconds_count", operation="agent_query") == 3
    assert (
        sample(text, "dm_operation_latency_seconds_bucket", operation="context_building", le="0.5")
        == 0
    )
    assert (
        sample(text, "dm_operation_latency_seconds_bucket", operation="context_building", le="1.0")
        == 1
    )
    assert sample(text, "dm_operations_total", operation="state_update", status="error") == 1
    assert sample(text, "dm_operations_total", operation="player_action", status="ok") == 1
    assert sample(text, "dm_hedges_sent_total", agent="narrator") == 2
    assert sample(text, "dm_hedges_won_total", agent="narrator") == 1
    assert sample(text, "dm_agent_failures_total", agent="arbiter", status="timeout") == 1
    assert sample(text, "dm_agent_failures_total", agent="arbiter", status="error") == 1
    assert sample(text, "dm_cache_hits_total", cache="module") == 8
    assert sample(text, "dm_cache_hit_rate", cache="module") == 0.8
    assert sample(text, "dm_cache_size_bytes", cache="module") == 1234
    assert sample(text, "dm_limiter_borrowed_tokens", limiter="agents") == 3
    assert sample(text, "dm_limiter_total_tokens", limiter="agents") == 4
    assert sample(
        text, "dm_operation_latency_quantile_seconds", operation="context_building", quantile="0.95"
    ) == pytest.approx(0.7)
    assert (
        sample(
            text, "dm_operation_latency_target_seconds", operation="agent_query", quantile="0.99"
        )
        == 5.0
    )
    # after close the profiler is no longer observed
    prof.record("context_building", 0.7)
    again = exporter.metrics_text()
    assert sample(again, "dm_operation_latency_seconds_count", operation="context_building") == 1


def test_MetricsExporter_registries_are_private() -> None:
    a, b = MetricsExporter(), MetricsExporter()  # same names: no duplicate error
    a.hedge_sent("narrator")
    assert sample(a.metrics_text(), "dm_hedges_sent_total", agent="narrator") == 1
    assert "dm_hedges_sent_total{" not in b.metrics_text()
    assert REGISTRY.get_sample_value("dm_hedges_sent_total", {"agent": "narrator"}) is None


@pytest.mark.anyio
async def test_MetricsExporter_http_endpoint_is_scraped() -> None:
    prof = PerformanceProfiler()
    exporter = MetricsExporter(prof, port=0)
    async with exporter:
        port = exporter.port_bound
        assert port is not None and port > 0
        exercise(prof, exporter)
        exporter.watch_limiter("agents", lambda: (1, 4))
        async with httpx.AsyncClient(timeout=None) as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        assert sample(text, "dm_operation_latency_seconds_count", operation="agent_query") == 3
        assert sample(text, "dm_limiter_borrowed_tokens", limiter="agents") == 1
        assert sample(text, "dm_hedges_won_total", agent="narrator") == 1
    assert exporter.port_bound is None
    async with httpx.AsyncClient(timeout=None) as client:  # the endpoint is gone
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/metrics")


@pytest.mark.anyio
async def test_MetricsExporter_explicit_start_stop() -> None:
    exporter = MetricsExporter()
    port = await exporter.start(port=0)
    try:
        with pytest.raises(RuntimeError, match="already serving"):
            await exporter.start(port=0)
        async with httpx.AsyncClient(timeout=None) as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert "dm_operation_latency_seconds" in response.text
    finally:
        await exporter.stop()
    await exporter.stop()  # idempotent


def test_MetricsExporter_from_config() -> None:
    assert (
        MetricsExporter.from_config(
            parse_config({"performance": {"monitoring": {"metrics_enabled": False}}})
        )
        is None
    )
    plain = MetricsExporter.from_config(parse_config({}))
    assert plain is not None and plain.port is None and plain.host == "127.0.0.1"
    served: Any = MetricsExporter.from_config(
        parse_config({"performance": {"monitoring": {"metrics_port": 9464}}})
    )
    assert served.port == 9464
    _ = anyio  # anyio is the runner of the async tests above


def test_agent_tokens_split_cached_from_prefilled_prompt_tokens() -> None:
    metrics = MetricsExporter()
    metrics.agent_tokens(
        "narrator", {"input_tokens": 1000, "cached_tokens": 640, "output_tokens": 70}
    )
    metrics.agent_tokens(
        "narrator", {"input_tokens": 200, "cached_tokens": None, "output_tokens": 5}
    )
    metrics.agent_tokens("arbiter", {"input_tokens": None, "cached_tokens": None})  # unreported
    text = metrics.metrics_text()
    assert sample(text, "dm_agent_prompt_tokens_total", agent="narrator", cache="uncached") == 560
    assert sample(text, "dm_agent_prompt_tokens_total", agent="narrator", cache="cached") == 640
    assert sample(text, "dm_agent_output_tokens_total", agent="narrator") == 75
    assert "arbiter" not in text
