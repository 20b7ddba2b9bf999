"""Streaming requests hedged on their time to first piece, and per-server limiters.

A request with ``on_delta`` is raced on its first piece: a hedge goes out only if no
piece has arrived by the hedge delay; the first attempt to write owns the stream (the
other is cancelled at once) and only its pieces reach ``on_delta``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtual_clock import run_virtual

from engine.agents.base import AgentRequest, AgentResponse, Status
from engine.scheduling.executor import ParallelAgentExecutor
from engine.scheduling.hedging import HedgePolicy
from engine.scheduling.limits import ServerLimitedAgent

from .helpers import Boom

# pure-loop: all in virtual time; each test with an execution's own hedge clock and serving
pytestmark = [pytest.mark.anyio, pytest.mark.virtual_clock, pytest.mark.usefixtures("hedge_clock")]


@pytest.fixture
def unit(anyio_backend: tuple[str, dict[str, Any]]) -> float:
    """One time unit: a virtual second (trio's MockClock, asyncio's virtual clock), or 50 ms
    of asyncio's real clock."""
    virtual = anyio_backend[0] == "trio" or "loop_factory" in anyio_backend[1]
    return 1.0 if virtual else 0.05


@attrs.frozen
class Attempt:
    """What one attempt does: its first piece ``first`` after it starts, then one piece
    every ``gap``, and it returns one ``gap`` after its last piece. ``fail_at=i``:
    raises instead of writing piece ``i`` (``i == pieces``: instead of returning)."""

    first: float
    pieces: int = 3
    fail_at: int | None = None


def piece(attempt: int, i: int) -> str:
    return f"a{attempt}.{i}" if i == 0 else f" a{attempt}.{i}"


def text_of(attempt: int, pieces: int) -> str:
    return "".join(piece(attempt, i) for i in range(pieces))


@attrs.define(eq=False)
class Writer:
    """Plays ``script[attempt]`` (attempt 2 is the hedge), in units of ``unit`` seconds."""

    script: Mapping[int, Attempt]
    unit: float = 1.0
    gap: float = 1.0
    starts: dict[int, float] = attrs.field(factory=dict)
    written: dict[int, list[tuple[float, str]]] = attrs.field(factory=dict)
    cancelled: dict[int, float] = attrs.field(factory=dict)
    failed: dict[int, float] = attrs.field(factory=dict)

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        n = int(request.context.get("attempt", 1))
        plan = self.script[n]
        self.starts[n] = anyio.current_time()
        self.written[n] = []
        try:
            await anyio.sleep(plan.first * self.unit)
            for i in range(plan.pieces):
                if i:
                    await anyio.sleep(self.gap * self.unit)
                if plan.fail_at == i:
                    self.failed[n] = anyio.current_time()
                    raise Boom(f"attempt {n} broke before piece {i}")
                assert request.on_delta is not None
                request.on_delta(piece(n, i))
                self.written[n].append((anyio.current_time(), piece(n, i)))
            await anyio.sleep(self.gap * self.unit)
        except anyio.get_cancelled_exc_class():
            self.cancelled[n] = anyio.current_time()
            raise
        if plan.fail_at == plan.pieces:
            self.failed[n] = anyio.current_time()
            raise Boom(f"attempt {n} broke after its last piece")
        return {"text": text_of(n, plan.pieces), "attempt": n}


def hedging_executor(
    agent: Any, delay: float, budget: float = 1.0, **kwargs: Any
) -> ParallelAgentExecutor:
    # every call earns ``budget`` hedges before it may spend one (the budget starts at 0)
    policy = HedgePolicy({"a": delay}, budget_fraction=budget)
    kwargs.setdefault("max_concurrent", 10)
    kwargs.setdefault("agent_timeout", 1000.0)
    return ParallelAgentExecutor({"a": agent}, hedging=policy, **kwargs)


async def run_streaming(
    ex: ParallelAgentExecutor, *, limit: float = 100.0
) -> tuple[AgentResponse, list[tuple[float, str]], float]:
    """One streaming request: its response, the pieces on_delta got (with times), t0."""
    got: list[tuple[float, str]] = []
    t0 = anyio.current_time()
    request = AgentRequest(
        id="a", agent="a", on_delta=lambda p: got.append((anyio.current_time() - t0, p))
    )
    with anyio.fail_after(limit):  # never hangs
        (response,) = await ex.execute_parallel([request])
    return response, got, t0


# ----------------------------------------------------------------------- hedging


async def test_the_hedge_that_writes_first_owns_the_stream(unit: float) -> None:
    # attempt 1 would write at 3; the hedge (sent at 1) writes at 1.5, 2.5, 3.5
    agent = Writer({1: Attempt(first=3), 2: Attempt(first=0.5)}, unit)
    ex = hedging_executor(agent, 1.0 * unit)
    response, got, _ = await run_streaming(ex)
    assert response.status is Status.OK
    assert response.hedged and response.hedge_won and response.attempts == 2
    assert response.output == {"text": "a2.0 a2.1 a2.2", "attempt": 2}
    # only the hedge's pieces reached on_delta, and they are its whole text
    assert [p for _, p in got] == ["a2.0", " a2.1", " a2.2"]
    assert "".join(p for _, p in got) == response.output["text"]
    # attempt 1 was cancelled the moment the hedge wrote, before it wrote anything
    assert set(agent.cancelled) == {1} and agent.written[1] == []
    assert agent.cancelled[1] - agent.starts[1] < 3 * unit
    stats = ex.statistics()
    assert (stats.hedges_sent, stats.hedges_won, stats.borrowed_tokens) == (1, 1, 0)


async def test_the_hedge_that_writes_first_exact_times() -> None:
    agent = Writer({1: Attempt(first=3), 2: Attempt(first=0.5)})
    response, got, t0 = await run_streaming(hedging_executor(agent, 1.0))
    assert agent.starts == {1: t0, 2: t0 + 1.0}
    assert agent.cancelled == {1: t0 + 1.5}
    assert got == [(1.5, "a2.0"), (2.5, " a2.1"), (3.5, " a2.2")]
    assert (response.queued, response.duration) == (0.0, 4.5)


async def test_the_first_attempt_that_writes_before_the_delay_is_not_hedged(
    unit: float,
) -> None:
    # the first piece at 0.5 < the delay of 1; the attempt goes on until 3.5
    agent = Writer({1: Attempt(first=0.5), 2: Attempt(first=0.1)}, unit)
    ex = hedging_executor(agent, 1.0 * unit)
    response, got, _ = await run_streaming(ex)
    assert response.status is Status.OK
    assert not response.hedged and response.attempts == 1
    assert response.output["text"] == "a1.0 a1.1 a1.2" == "".join(p for _, p in got)
    assert set(agent.starts) == {1} and agent.cancelled == {}
    # not for want of budget: the call earned a hedge it did not spend
    assert ex.hedging is not None and ex.hedging.statistics().tokens == 1.0
    assert ex.statistics().hedges_sent == 0


async def test_a_late_first_attempt_is_hedged_but_keeps_the_stream_if_it_writes_first(
    unit: float,
) -> None:
    # hedge sent at 1 writes at 3; attempt 1 writes at 2 and owns the stream
    agent = Writer({1: Attempt(first=2), 2: Attempt(first=2)}, unit)
    ex = hedging_executor(agent, 1.0 * unit)
    response, got, _ = await run_streaming(ex)
    assert response.ok and response.hedged and not response.hedge_won
    assert [p for _, p in got] == ["a1.0", " a1.1", " a1.2"]
    assert set(agent.cancelled) == {2} and agent.written[2] == []
    assert ex.statistics().hedges_won == 0


async def test_without_budget_no_hedge_is_sent(unit: float) -> None:
    agent = Writer({1: Attempt(first=3), 2: Attempt(first=0.5)}, unit)
    ex = hedging_executor(agent, 1.0 * unit, budget=0.5)
    response, got, _ = await run_streaming(ex)  # 0.5 hedges earned: not enough
    assert not response.hedged and [p for _, p in got] == ["a1.0", " a1.1", " a1.2"]
    agent.written.clear()
    response, got, _ = await run_streaming(ex)  # 1.0 earned: the second call hedges
    assert response.hedged and response.hedge_won
    assert [p for _, p in got] == ["a2.0", " a2.1", " a2.2"]


@pytest.mark.parametrize("fail_at", [1, 3], ids=["mid-stream", "after-last-piece"])
async def test_an_owner_that_fails_ends_the_request_with_an_error(
    unit: float, fail_at: int
) -> None:
    # attempt 1 owns the stream from 0.5, then breaks; no hedge is left to finish it
    agent = Writer({1: Attempt(first=0.5, fail_at=fail_at), 2: Attempt(first=0.1)}, unit)
    response, got, _ = await run_streaming(hedging_executor(agent, 1.0 * unit))
    assert response.status is Status.ERROR and "Boom" in (response.error or "")
    assert response.output is None and not response.hedged
    assert [p for _, p in got] == [piece(1, i) for i in range(fail_at)]


async def test_a_hedge_that_owns_the_stream_and_fails_ends_the_request(unit: float) -> None:
    # the hedge writes at 1.5 and breaks at 2.5; attempt 1 (writing at 5) was
    # cancelled at 1.5, so nothing is left to wait for
    agent = Writer({1: Attempt(first=5), 2: Attempt(first=0.5, fail_at=1)}, unit)
    ex = hedging_executor(agent, 1.0 * unit)
    response, got, _ = await run_streaming(ex, limit=4 * unit)
    assert response.status is Status.ERROR
    assert response.hedged and not response.hedge_won
    assert [p for _, p in got] == ["a2.0"]
    assert set(agent.cancelled) == {1} and agent.written[1] == []
    assert ex.statistics().borrowed_tokens == 0


async def test_a_failing_owner_exact_times() -> None:
    agent = Writer({1: Attempt(first=5), 2: Attempt(first=0.5, fail_at=1)})
    response, _, t0 = await run_streaming(hedging_executor(agent, 1.0))
    assert agent.cancelled == {1: t0 + 1.5} and agent.failed == {2: t0 + 2.5}
    assert response.duration == 2.5 and anyio.current_time() == t0 + 2.5


async def test_a_first_attempt_failing_silently_leaves_the_stream_to_the_hedge(
    unit: float,
) -> None:
    # attempt 1 breaks at 2 without writing; the hedge (sent at 1) writes at 2.5
    agent = Writer({1: Attempt(first=2, fail_at=0), 2: Attempt(first=1.5)}, unit)
    response, got, _ = await run_streaming(hedging_executor(agent, 1.0 * unit))
    assert response.ok and response.hedge_won
    assert "".join(p for _, p in got) == response.output["text"] == "a2.0 a2.1 a2.2"


async def test_a_hedge_started_in_the_same_instant_the_first_attempt_writes_is_cancelled() -> None:
    # attempt 1 writes its first piece exactly at the hedge delay. trio runs the tasks
    # woken at one instant in random order: the executor either sees the piece first
    # (no hedge) or sends the hedge and the piece arrives before the hedge's task has
    # taken its first step. Either way the hedge must not outlive that piece. asyncio
    # (virtual clock) runs them in FIFO order: the hedge is sent in every run.
    outcomes = []
    for _ in range(30):
        agent = Writer({1: Attempt(first=1.0), 2: Attempt(first=5)})
        response, got, t0 = await run_streaming(hedging_executor(agent, 1.0))
        assert [p for _, p in got] == ["a1.0", " a1.1", " a1.2"]
        assert response.ok and not response.hedge_won
        if response.hedged:
            outcomes.append(agent.cancelled[2] - t0)
    assert outcomes  # the hedge was sent in some runs (probability 1 - 2**-30)
    assert set(outcomes) == {1.0}  # cancelled when attempt 1 wrote, not at its end (4.0)


async def test_a_dependent_hedged_in_the_same_instant_it_writes_is_cancelled() -> None:
    # as above, for a request that becomes ready after a root that is never hedged:
    # the hedge clock is started for it, still before its first attempt starts
    outcomes = []
    for _ in range(30):
        writer = Writer({1: Attempt(first=1.0), 2: Attempt(first=5)})
        ex = ParallelAgentExecutor(
            {"root": Busy(0.5, 1.0, []), "a": writer},
            hedging=HedgePolicy({"a": 1.0}, budget_fraction=1.0),
            max_concurrent=10,
            agent_timeout=1000.0,
        )
        got: list[str] = []
        requests = [
            AgentRequest(id="root", agent="root"),
            AgentRequest(id="a", agent="a", depends_on=("root",), on_delta=got.append),
        ]
        with anyio.fail_after(100):
            _, response = await ex.execute_parallel(requests)
        assert got == ["a1.0", " a1.1", " a1.2"]
        assert response.ok and not response.hedge_won
        if response.hedged:
            outcomes.append(writer.cancelled[2] - writer.starts[1])
    assert outcomes  # the hedge was sent in some runs (probability 1 - 2**-30)
    assert set(outcomes) == {1.0}  # cancelled when attempt 1 wrote, not at its end (4.0)


async def test_the_p95_delay_of_a_streaming_agent_is_its_time_to_first_piece() -> None:
    policy = HedgePolicy({"a": "p95"}, min_samples=1)
    ex = ParallelAgentExecutor({"a": Writer({1: Attempt(first=0.5)})}, hedging=policy)
    response, _, _ = await run_streaming(ex)
    assert response.duration == 3.5  # the call took 3.5 s...
    assert policy.delay_for("a") == 0.5  # ...but its first piece came at 0.5


async def test_an_agent_with_a_p95_of_zero_is_never_hedged() -> None:
    policy = HedgePolicy({"a": "p95"}, min_samples=1)
    policy.observe("a", 0.0)
    assert policy.delay_for("a") is None
    from_source = HedgePolicy({"a": "p95"}, p95_source=lambda agent: 0.0)
    assert from_source.delay_for("a") is None
    assert HedgePolicy({"a": "p95"}, p95_source=lambda agent: 0.25).delay_for("a") == 0.25


# ------------------------------------------------------------- against a model


@st.composite
def attempts(draw: st.DrawFn) -> Attempt:
    # times in halves plus an offset (1/8 for attempt 1, 3/8 for the hedge, sent at 1):
    # no two events of different attempts, nor the hedge delay, ever coincide
    pieces = draw(st.integers(1, 4))
    return Attempt(
        first=draw(st.integers(0, 10)) / 2,
        pieces=pieces,
        fail_at=draw(st.one_of(st.none(), st.integers(0, pieces))),
    )


DELAY = 1.0
GAP = 0.5


def model(a1: Attempt, a2: Attempt) -> dict[str, Any]:
    """What the executor must do, computed sequentially."""
    start = {1: 0.0, 2: DELAY}
    plan = {1: a1, 2: a2}

    def first_write(n: int) -> float | None:
        return None if plan[n].fail_at == 0 else start[n] + plan[n].first

    def end(n: int) -> float:
        p = plan[n]
        steps = p.fail_at if p.fail_at is not None else p.pieces
        return start[n] + p.first + steps * GAP

    w1 = first_write(1)
    hedged = end(1) > DELAY and (w1 is None or w1 > DELAY)
    running = [1, 2] if hedged else [1]
    writes = {n: w for n in running if (w := first_write(n)) is not None}
    owner = min(writes, key=writes.__getitem__) if writes else None
    if owner is not None:
        p = plan[owner]
        count = p.pieces if p.fail_at is None else p.fail_at
        ok = p.fail_at is None
        finish = end(owner)
        # the other attempt, if still running when the owner wrote, is cancelled then
        cancelled = {n for n in running if n != owner and end(n) > writes[owner]}
        output = {"text": text_of(owner, p.pieces), "attempt": owner} if ok else None
        cancelled_at: float | None = writes[owner]
    else:
        count, ok, finish, cancelled = 0, False, max(end(n) for n in running), set()
        output, cancelled_at = None, None
    return {
        "hedged": hedged,
        "owner": owner,
        "pieces": [piece(owner, i) for i in range(count)] if owner else [],
        "ok": ok,
        "output": output,
        "finish": finish,
        "cancelled": cancelled,
        "cancelled_at": cancelled_at,
    }


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
# the hedge_clock fixture's patch holds for every example (not reset between them)
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(attempts(), attempts())
def test_streaming_hedges_match_a_sequential_model(backend: str, a1: Attempt, a2: Attempt) -> None:
    a1 = attrs.evolve(a1, first=a1.first + 1 / 8)
    a2 = attrs.evolve(a2, first=a2.first + 3 / 8)
    agent = Writer({1: a1, 2: a2}, gap=GAP)
    ex = hedging_executor(agent, DELAY)

    async def main() -> tuple[AgentResponse, list[tuple[float, str]], float]:
        return await run_streaming(ex, limit=1000)

    response, got, t0 = run_virtual(backend, main)
    expected = model(a1, a2)

    # the pieces delivered are exactly those of one attempt (the first to write), in order
    assert [p for _, p in got] == expected["pieces"]
    if expected["owner"] is not None:
        assert [p for _, p in agent.written[expected["owner"]]] == expected["pieces"]
        assert [at for at, _ in got] == [at - t0 for at, _ in agent.written[expected["owner"]]]
    # that attempt's output is the response's when it succeeded
    assert response.ok == expected["ok"]
    if expected["ok"]:
        assert response.output == expected["output"]
        assert "".join(p for _, p in got) == response.output["text"]
        assert response.hedge_won == (expected["owner"] == 2)
    else:
        assert response.status is Status.ERROR and response.output is None
        assert not response.hedge_won
    assert response.hedged == expected["hedged"]
    assert response.attempts == (2 if expected["hedged"] else 1)
    assert set(agent.starts) == ({1, 2} if expected["hedged"] else {1})
    # the loser is cancelled when the owner writes; the request ends with its owner
    assert set(agent.cancelled) == expected["cancelled"]
    assert all(at - t0 == expected["cancelled_at"] for at in agent.cancelled.values())
    assert response.duration == expected["finish"]
    assert ex.statistics().borrowed_tokens == 0


# ------------------------------------------------------------- per-server limiter


@attrs.define(eq=False)
class Busy:
    """Holds its server for ``seconds`` (in units); records when it ran."""

    seconds: float
    unit: float
    intervals: list[tuple[str, float, float]]

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        start = anyio.current_time()
        await anyio.sleep(self.seconds * self.unit)
        self.intervals.append((request.id, start, anyio.current_time()))
        return request.id


async def test_agents_sharing_a_server_limiter_of_one_never_overlap_and_queue_fifo(
    unit: float,
) -> None:
    intervals: list[tuple[str, float, float]] = []
    server = anyio.CapacityLimiter(1)
    agents = {
        "x": ServerLimitedAgent(Busy(2, unit, intervals), server),
        "y": ServerLimitedAgent(Busy(1, unit, intervals), server),
    }
    arrivals = [("c0", "x"), ("c1", "y"), ("c2", "x"), ("c3", "y"), ("c4", "y")]
    async with anyio.create_task_group() as tg:
        for i, (rid, name) in enumerate(arrivals):
            request = AgentRequest(id=rid, agent=name)
            tg.start_soon(agents[name].run, request, {})
            if i < len(arrivals) - 1:
                await anyio.sleep(0.25 * unit)  # arrival order: c0, c1, c2, ...
    # first come, first served, one at a time
    assert [rid for rid, _, _ in intervals] == [rid for rid, _ in arrivals]
    for (_, _, end), (_, start, _) in itertools.pairwise(intervals):
        assert end <= start
    assert server.borrowed_tokens == 0


async def test_server_limiter_exact_schedule() -> None:
    intervals: list[tuple[str, float, float]] = []
    server = anyio.CapacityLimiter(1)
    x = ServerLimitedAgent(Busy(2, 1.0, intervals), server)
    y = ServerLimitedAgent(Busy(1, 1.0, intervals), server)
    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(x.run, AgentRequest(id="c0", agent="x"), {})
        await anyio.sleep(0.25)
        tg.start_soon(y.run, AgentRequest(id="c1", agent="y"), {})
        await anyio.sleep(0.25)
        tg.start_soon(x.run, AgentRequest(id="c2", agent="x"), {})
    assert [(rid, s - t0, e - t0) for rid, s, e in intervals] == [
        ("c0", 0, 2),
        ("c1", 2, 3),
        ("c2", 3, 5),
    ]


async def test_a_server_limiter_inside_the_executor_counts_against_the_deadline() -> None:
    # two requests on one single-slot server; the second waits for the first and
    # its timeout (from readiness) covers that wait
    intervals: list[tuple[str, float, float]] = []
    server = anyio.CapacityLimiter(1)
    agents = {
        "x": ServerLimitedAgent(Busy(2, 1.0, intervals), server),
        "y": ServerLimitedAgent(Busy(2, 1.0, intervals), server),
    }
    ex = ParallelAgentExecutor(agents, max_concurrent=10, agent_timeout=3.0)
    responses = await ex.execute_parallel(
        [AgentRequest(id="a", agent="x"), AgentRequest(id="b", agent="y")]
    )
    # both are ready at once, so either may get the server first
    (winner,) = [r for r in responses if r.ok]
    (loser,) = [r for r in responses if not r.ok]
    assert winner.duration == 2
    # the loser waited 2 s at the server, then ran until its 3 s were up
    assert loser.status is Status.TIMEOUT and loser.duration == 3
    assert [rid for rid, _, _ in intervals] == [winner.request_id]
    assert server.borrowed_tokens == 0
