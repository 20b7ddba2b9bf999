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
@pytest.mark.virtual_clock
async def test_Profiler_spans_nest_across_task_group_children() -> None:
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
    # virtual time on both backends: exact
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
    assert stats.p50 == pytest.approx(0.050)  # exact at small counts: nearest rank ceil(.5*100)
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


# The default agent DAG (engine/config.py): what the hosted actions below ran.
DEPENDS_ON = {
    "archivist": (),
    "module_keeper": (),
    "narrator_opening": (),
    "arbiter": ("archivist",),
    "narrator": ("arbiter",),
}


def _action(*agents: tuple[str, int, float, float, str], end: float) -> Span:
    """A player_action as the pipeline records it: classify, prefetch and context
    building, then one agent_query span per attempt, then the state update."""

    def sp(name: str, start: float, stop: float, status: str = "ok", **attrs: Any) -> Span:
        return Span(name, attrs, start, end=stop, status=status)

    children = [sp("classify", 0.0, 0.0001), sp("prefetch", 0.0001, 0.0002)]
    children.append(sp("context_building", 0.0002, 0.05))
    for agent, attempt, start, stop, status in agents:
        children.append(sp("agent_query", start, stop, status, agent=agent, attempt=attempt))
    children.append(sp("state_update", end - 0.1, end))
    return Span("player_action", {}, 0.0, end=end, status="ok", children=children)


def _labels(path: list[Span]) -> list[str]:
    return [
        f"{s.attributes['agent']}#{s.attributes['attempt']}" if "agent" in s.attributes else s.name
        for s in path[1:]
    ]


@pytest.mark.parametrize("first_attempt", [("error", 2.8), ("cancelled", 3.25)])
@pytest.mark.parametrize("depends_on", [None, DEPENDS_ON], ids=["inferred", "configured"])
def test_critical_path_of_a_hedged_agent_is_its_winning_attempt_from_its_readiness(
    first_attempt: tuple[str, float], depends_on: dict[str, tuple[str, ...]] | None
) -> None:
    """The hosted run: the arbiter's first attempt stalled, its hedge went out after
    the hedge delay (2.5 s) and won; the module keeper finished at 2.4 s, just before
    the hedge started, but nothing waited for it. (Before the fix the path ran
    through the module keeper when the first attempt failed after the hedge went
    out, and through the losing attempt when it was cancelled.)"""
    status, first_end = first_attempt
    root = _action(
        ("archivist", 1, 0.05, 0.051, "ok"),
        ("module_keeper", 1, 0.051, 2.4, "ok"),
        ("narrator_opening", 1, 0.052, 1.1, "ok"),
        ("arbiter", 1, 0.053, first_end, status),
        ("arbiter", 2, 2.5, 3.2, "ok"),
        ("narrator", 1, 3.3, 5.9, "ok"),
        end=6.0,
    )
    path = critical_path(root, depends_on)
    assert _labels(path) == [
        "classify",
        "prefetch",
        "context_building",
        "archivist#1",
        "arbiter#2",
        "narrator#1",
        "state_update",
    ]


@pytest.mark.parametrize("depends_on", [None, DEPENDS_ON], ids=["inferred", "configured"])
def test_critical_path_through_a_narrator_whose_hedge_won_the_stream(
    depends_on: dict[str, tuple[str, ...]] | None,
) -> None:
    """Seen in a simulated hosted run: the narrator's hedge (sent 0.67 s after it was
    ready) wrote first; the narrator opening ended 27 ms before the hedge started."""
    root = _action(
        ("archivist", 1, 0.05, 0.051, "ok"),
        ("narrator_opening", 1, 0.052, 1.721, "ok"),
        ("module_keeper", 1, 0.052, 1.264, "ok"),
        ("arbiter", 1, 0.053, 1.074, "ok"),
        ("narrator_opening", 2, 0.775, 1.158, "cancelled"),
        ("narrator", 1, 1.075, 2.384, "cancelled"),
        ("narrator", 2, 1.748, 3.259, "ok"),
        end=3.36,
    )
    assert _labels(critical_path(root, depends_on)) == [
        "classify",
        "prefetch",
        "context_building",
        "archivist#1",
        "arbiter#1",
        "narrator#2",
        "state_update",
    ]


def test_critical_path_follows_the_configured_dependencies() -> None:
    """A roleplay action (no arbiter): the narrator waits for nobody, but the
    archivist happened to end as it started. From the timing alone the archivist
    looks like its predecessor; with the configured DAG it is not."""
    root = _action(
        ("archivist", 1, 0.05, 0.05, "ok"),
        ("narrator", 1, 0.05, 1.8, "ok"),
        ("narrator", 2, 0.7, 1.8, "cancelled"),  # lost a photo finish
        ("module_keeper", 1, 0.05, 1.3, "ok"),
        end=2.0,
    )
    inferred = _labels(critical_path(root))
    assert inferred == [
        "classify",
        "prefetch",
        "context_building",
        "archivist#1",
        "narrator#1",
        "state_update",
    ]
    configured = _labels(critical_path(root, DEPENDS_ON))
    assert configured == ["classify", "prefetch", "context_building", "narrator#1", "state_update"]


def test_critical_path_of_an_agent_whose_attempts_all_failed_ends_with_the_last() -> None:
    root = _action(
        ("arbiter", 1, 0.05, 2.0, "error"),
        ("arbiter", 2, 1.0, 2.5, "error"),
        end=2.6,
    )
    assert _labels(critical_path(root, DEPENDS_ON)) == [
        "classify",
        "prefetch",
        "context_building",
        "arbiter#2",
        "state_update",
    ]
