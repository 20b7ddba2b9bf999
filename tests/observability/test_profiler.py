"""PerformanceProfiler: span nesting across tasks, whole-tree sampling, targets."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from engine.config import DEFAULT_TARGETS, LatencyTarget, parse_config
from engine.observability.profiler import (
    PerformanceProfiler,
    Span,
    critical_path,
)


def shape(span: Span) -> tuple[Any, ...]:
    """A span tree as (name, status, sorted children shapes)."""
    return (span.name, span.status, sorted(shape(c) for c in span.children))


@pytest.mark.anyio
async def test_Profiler_spans_nest_across_task_group_children(
    anyio_backend: tuple[str, dict[str, Any]],
) -> None:
    prof = PerformanceProfiler(clock=anyio.current_time)
    roots: list[Span] = []
    prof.add_listener(roots.append)

    async def agent(name: str, delay: float) -> None:
        with prof.trace("agent_query", agent=name) as span:
            assert prof.current_span() is span
            await anyio.sleep(delay)
            with prof.trace("cache_lookup"):
                pass

    with prof.trace("player_action", session="s1") as root:
        with prof.trace("context_building"):
            await anyio.sleep(0.5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent, "archivist", 1.0)
            tg.start_soon(agent, "module_keeper", 2.0)
        async with prof.trace("state_update"):
            await anyio.sleep(0.1)
    assert prof.current_span() is None

    assert roots == [root]
    assert root.attributes == {"session": "s1"}
    assert shape(root) == (
        "player_action",
        "ok",
        sorted(
            [
                ("context_building", "ok", []),
                ("agent_query", "ok", [("cache_lookup", "ok", [])]),
                ("agent_query", "ok", [("cache_lookup", "ok", [])]),
                ("state_update", "ok", []),
            ]
        ),
    )
    agents = {c.attributes["agent"] for c in root.children if c.name == "agent_query"}
    assert agents == {"archivist", "module_keeper"}
    assert prof.count("agent_query") == 2 and prof.count("cache_lookup") == 2
    if anyio_backend[0] == "trio":  # virtual time: exact
        assert root.duration == pytest.approx(2.6)
        assert prof.get_percentile("agent_query", 100) == pytest.approx(2.0)
        path = critical_path(root)
        assert [s.name for s in path] == [
            "player_action",
            "context_building",
            "agent_query",
            "cache_lookup",
            "state_update",
        ]
        assert path[2].attributes["agent"] == "module_keeper"  # the slower sibling


def test_Profiler_spans_nest_in_a_raw_trio_nursery() -> None:
    prof = PerformanceProfiler(clock=trio.current_time)
    seen: dict[str, Span | None] = {}

    async def child(tag: str) -> None:
        seen[tag] = prof.current_span()
        with prof.trace("agent_query", tag=tag):
            await trio.sleep(1)

    async def main() -> Span:
        with prof.trace("player_action") as root:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child, "a")
                nursery.start_soon(child, "b")
        return root

    root = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == {"a": root, "b": root}
    assert sorted(c.attributes["tag"] for c in root.children) == ["a", "b"]
    assert root.duration == 1.0


@pytest.mark.anyio
async def test_Profiler_sibling_tasks_do_not_nest_in_each_other() -> None:
    prof = PerformanceProfiler(clock=anyio.current_time)
    roots: list[Span] = []
    prof.add_listener(roots.append)

    async def action(i: int) -> None:
        with prof.trace("player_action", i=i):
            await anyio.sleep(0.1 * (i + 1))
            with prof.trace("agent_query"):
                await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:  # no span around: each task is a root
        for i in range(3):
            tg.start_soon(action, i)
    assert sorted(r.attributes["i"] for r in roots) == [0, 1, 2]
    assert all(len(r.children) == 1 for r in roots)


@pytest.mark.anyio
async def test_Profiler_status_error_and_cancelled() -> None:
    prof = PerformanceProfiler(clock=anyio.current_time)
    with pytest.raises(KeyError), prof.trace("player_action") as failed:
        raise KeyError("boom")
    assert failed.status == "error"

    with anyio.move_on_after(1.0):
        with prof.trace("player_action") as root, prof.trace("agent_query") as child:
            await anyio.sleep(5)
    assert child.status == "cancelled" and root.status == "cancelled"
    report = prof.get_report()
    assert report["player_action"].errors == 1
    assert report["player_action"].cancelled == 1
    assert report["agent_query"].cancelled == 1
    assert prof.count("player_action") == 2  # every status is a latency sample


def test_Profiler_sampling_keeps_or_drops_whole_trees() -> None:
    prof = PerformanceProfiler(sample_rate=0.3, seed=42)
    roots: list[Span] = []
    prof.add_listener(roots.append)
    for _ in range(1000):
        with prof.trace("player_action"):
            for _ in range(3):
                with prof.trace("agent_query"), prof.trace("cache_lookup"):
                    pass
    kept = prof.count("player_action")
    assert 200 < kept < 400  # seeded: the decision is made per root
    assert len(roots) == kept
    assert prof.count("agent_query") == 3 * kept
    assert prof.count("cache_lookup") == 3 * kept
    assert all(len(r.children) == 3 and len(r.children[0].children) == 1 for r in roots)


def test_Profiler_sample_rate_zero_records_nothing_one_everything() -> None:
    none = PerformanceProfiler(sample_rate=0.0)
    everything = PerformanceProfiler(sample_rate=1.0)
    for prof in (none, everything):
        for _ in range(50):
            with prof.trace("player_action") as span, prof.trace("agent_query"):
                pass
        assert span.status == "ok"
    assert none.operations == [] and none.get_report().operations == {}
    assert everything.count("player_action") == 50 and everything.count("agent_query") == 50
    disabled = PerformanceProfiler(enabled=False)
    with disabled.trace("player_action"):
        disabled.record("agent_query", 1.0)
    assert disabled.operations == []


def test_Profiler_same_seed_same_sampling() -> None:
    def kept(seed: int) -> list[int]:
        prof = PerformanceProfiler(sample_rate=0.5, seed=seed)
        out: list[int] = []
        prof.add_listener(lambda s: out.append(s.attributes["i"]))
        for i in range(100):
            with prof.trace("player_action", i=i):
                pass
        return out

    assert kept(1) == kept(1)
    assert kept(1) != kept(2)


def test_Profiler_report_and_percentiles() -> None:
    prof = PerformanceProfiler()
    for ms in range(1, 101):
        prof.record("state_update", ms / 1000)
    stats = prof.get_report()["state_update"]
    assert stats.count == 100
    assert stats.mean == pytest.approx(0.0505)
    assert (stats.min, stats.max) == (0.001, 0.1)
    assert stats.p50 == pytest.approx(0.050)  # exact at small counts: rank floor(.5*99)
    assert stats.p95 == pytest.approx(0.095) and stats.p99 == pytest.approx(0.099)
    assert stats.target == DEFAULT_TARGETS["state_update"] and stats.met is True
    assert prof.get_percentile("state_update", 95) == stats.p95
    with pytest.raises(KeyError, match="agent_query"):
        prof.get_percentile("agent_query", 95)
    with pytest.raises(ValueError, match="between 0 and 100"):
        prof.get_percentile("state_update", 101)
    with pytest.raises(ValueError, match="finite and >= 0"):
        prof.record("state_update", -1.0)
    prof.record("custom_op", 1.0)
    custom = prof.get_report()["custom_op"]
    assert custom.target is None and custom.met is None


def test_Profiler_bottlenecks_worst_overshoot_first() -> None:
    prof = PerformanceProfiler()
    # agent_query: p99 at 10 s against 5 s (2x), p95 3.3 s vs 3 s (1.1x)
    for _ in range(90):
        prof.record("agent_query", 0.5)
    for _ in range(8):
        prof.record("agent_query", 3.3)
    for _ in range(2):
        prof.record("agent_query", 10.0)
    # cache_lookup: p50 at 0.03 vs 0.005 (6x) is its worst percentile
    for _ in range(10):
        prof.record("cache_lookup", 0.03)
    # state_update: within target
    prof.record("state_update", 0.05)
    # context_building: p99 only, 3.3 vs 3.0 (1.1x)
    for _ in range(98):
        prof.record("context_building", 0.1)
    for _ in range(2):
        prof.record("context_building", 3.3)
    found = prof.bottlenecks()
    assert [(b.operation, b.percentile) for b in found] == [
        ("cache_lookup", "p50"),
        ("agent_query", "p99"),
        ("context_building", "p99"),
    ]
    assert found[0].ratio == pytest.approx(6.0)
    text = prof.identify_bottlenecks()
    assert text[1] == "agent_query: p99 10.000 s > target 5.000 s (2.00x)"
    report = prof.get_report()
    assert report.bottlenecks == tuple(found) and not report.all_met
    assert report["state_update"].met is True and report["agent_query"].met is False


def test_Profiler_targets_merge_with_defaults() -> None:
    prof = PerformanceProfiler({"agent_query": LatencyTarget(2.0, 4.0, 6.0)})
    assert prof.targets["agent_query"] == LatencyTarget(2.0, 4.0, 6.0)
    assert prof.targets["player_action"] == DEFAULT_TARGETS["player_action"]
    assert set(prof.targets) == set(DEFAULT_TARGETS)

    config = parse_config(
        {
            "performance": {
                "targets": {"agent_query": {"p99": 8.0}},
                "profiling": {"sample_rate": 0.25, "enabled": True},
            }
        }
    )
    from_config = PerformanceProfiler.from_config(config, seed=1)
    assert from_config.targets["agent_query"] == LatencyTarget(1.0, 3.0, 8.0)
    assert from_config.targets["cache_lookup"] == DEFAULT_TARGETS["cache_lookup"]
    assert from_config.sample_rate == 0.25
    with pytest.raises(ValueError, match="sample_rate"):
        PerformanceProfiler(sample_rate=1.5)


def test_Profiler_listeners_and_slowest_trace(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    prof = PerformanceProfiler(clock=lambda: now[0])
    got: list[Span] = []
    samples: list[tuple[str, float, str]] = []
    remove = prof.add_listener(got.append)

    def broken(span: Span) -> None:
        raise RuntimeError("listener bug")

    prof.add_listener(broken)
    prof.add_sample_listener(lambda *a: samples.append(a))
    for duration in (1.0, 3.0, 2.0):
        with prof.trace("player_action", d=duration), prof.trace("agent_query"):
            now[0] += duration
    with caplog.at_level(logging.ERROR), prof.trace("player_action"):
        pass
    assert "listener bug" in caplog.text
    assert [s.attributes.get("d") for s in got] == [1.0, 3.0, 2.0, None]  # roots only
    assert samples[:2] == [("agent_query", 1.0, "ok"), ("player_action", 1.0, "ok")]
    slowest = prof.slowest_trace("player_action")
    assert slowest is not None and slowest.attributes["d"] == 3.0
    remove()
    with prof.trace("player_action"):
        pass
    assert len(got) == 4
    d = slowest.to_dict()
    assert d["duration"] == 3.0 and d["children"][0]["offset"] == 0.0


def test_Profiler_span_reentry_is_refused() -> None:
    prof = PerformanceProfiler()
    span = prof.trace("player_action")
    with span:
        pass
    with pytest.raises(TypeError, match="not created by"), span:
        pass


def test_critical_path_walks_back_from_the_end() -> None:
    def sp(name: str, start: float, end: float, *children: Span) -> Span:
        return Span(name, {}, start, end=end, status="ok", children=list(children))

    a = sp("a", 0, 4)  # parallel with b, ends earlier: not critical
    b = sp("b", 0, 5, sp("b1", 0, 1), sp("b2", 1, 5))
    c = sp("c", 5, 6)
    root = sp("root", 0, 6, a, b, c)
    assert [s.name for s in critical_path(root)] == ["root", "b", "b1", "b2", "c"]
