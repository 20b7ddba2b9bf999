"""Property-based: random DAGs, latencies, failures and limits against a sequential model."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtual_clock import run_virtual

from engine.agents.base import AgentRequest, Status
from engine.scheduling.executor import ParallelAgentExecutor
from engine.scheduling.hedging import HedgePolicy

from .helpers import ScriptedAgent


@st.composite
def dags(draw: st.DrawFn) -> tuple[list[AgentRequest], dict[str, int], frozenset[str]]:
    n = draw(st.integers(1, 30))
    requests = []
    for i in range(n):
        deps = draw(st.sets(st.integers(0, i - 1), max_size=3)) if i else set()
        requests.append(
            AgentRequest(id=f"n{i}", agent="a", depends_on=tuple(f"n{d}" for d in sorted(deps)))
        )
    order = draw(st.permutations(requests))  # list order must not matter
    latency = {r.id: draw(st.integers(0, 10)) for r in requests}
    fail = draw(st.sets(st.sampled_from([r.id for r in requests]), max_size=3))
    return list(order), latency, frozenset(fail)


def transitive_dependents(requests: list[AgentRequest], roots: set[str]) -> set[str]:
    out: set[str] = set()
    changed = True
    while changed:
        changed = False
        for r in requests:
            if r.id not in out and any(d in roots or d in out for d in r.depends_on):
                out.add(r.id)
                changed = True
    return out


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@settings(max_examples=150, deadline=None)
@given(dags(), st.one_of(st.none(), st.integers(1, 4)))
def test_random_dags_match_model(backend: str, dag: Any, limit: int | None) -> None:
    requests, latency, fail = dag
    agent = ScriptedAgent(latency, fail=fail)
    ex = ParallelAgentExecutor({"a": agent}, max_concurrent=limit or 1000, agent_timeout=1e6)

    async def main() -> tuple[float, list[Any]]:
        t0 = anyio.current_time()
        responses = await ex.execute_parallel(requests)
        return t0, responses

    t0, responses = run_virtual(backend, main)
    by_id = {r.id: r for r in requests}

    # results in request order
    assert [r.request_id for r in responses] == [r.id for r in requests]
    status = {r.request_id: r.status for r in responses}

    # failures skip exactly the transitive dependents (of the failed ones that ran)
    failed = {rid for rid, s in status.items() if s is Status.ERROR}
    assert failed <= fail
    skipped = {rid for rid, s in status.items() if s is Status.SKIPPED}
    assert skipped == transitive_dependents(requests, failed)
    assert all(s in (Status.OK, Status.ERROR, Status.SKIPPED) for s in status.values())
    assert set(agent.starts) == {r.id for r in requests} - skipped

    # nobody starts before all of its dependencies finished
    for rid, starts in agent.starts.items():
        for dep in by_id[rid].depends_on:
            assert agent.ends[dep] <= starts[0]

    # concurrency never exceeds the limit
    assert agent.peak <= (limit or 1000)
    assert ex.statistics().borrowed_tokens == 0

    if limit is None:
        # eager: each request starts exactly when its last dependency finished,
        # so finish times are the critical path of the latencies
        finish: dict[str, float] = {}
        for r in sorted(requests, key=lambda r: int(r.id[1:])):
            if r.id in skipped:
                continue
            start = max((finish[d] for d in r.depends_on), default=0.0)
            assert agent.starts[r.id][0] - t0 == start
            finish[r.id] = start + latency[r.id]
        ok_makespan = max((finish[r] for r in finish), default=0.0)
        assert max(resp.queued + resp.duration for resp in responses) <= ok_makespan + 1e-9
        if not fail:
            assert max(agent.ends[r] for r in agent.ends) - t0 == ok_makespan


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@settings(max_examples=100, deadline=None)
@given(dags(), st.integers(1, 4), st.integers(0, 40), st.booleans(), st.booleans())
def test_cancellation_at_random_points_releases_everything(
    backend: str, dag: Any, limit: int, cut: int, hedge: bool, serving: bool
) -> None:
    requests, latency, fail = dag
    agent = ScriptedAgent(latency, fail=fail)
    # hedged: every call after the first earns a hedge, sent 1.5 after an attempt starts
    policy = HedgePolicy({"a": 1.5}, budget_fraction=1.0) if hedge else None
    ex = ParallelAgentExecutor(
        {"a": agent}, max_concurrent=limit, agent_timeout=1e6, hedging=policy
    )

    async def main() -> None:
        # serving: the hedges on the executor's shared timer, which outlives the cut
        async with ex.serving() if serving else contextlib.nullcontext():
            with anyio.move_on_after(cut / 4):
                await ex.execute_parallel(requests)
            await anyio.wait_all_tasks_blocked()
            stats = ex.statistics()
            assert stats.borrowed_tokens == 0 and stats.waiting == 0
            assert agent.running == 0

    run_virtual(backend, main)
