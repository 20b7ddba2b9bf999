"""The eager executor's behaviour, in virtual time (trio MockClock) and on asyncio."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import anyio
import pytest
from gc_watch import engine_cyclic_garbage

import engine
from engine.agents.base import AgentRequest, AgentResponse, Status
from engine.scheduling.executor import ParallelAgentExecutor
from engine.scheduling.hedging import HedgePolicy
from engine.scheduling.limits import FifoLimiter

from .helpers import ScriptedAgent

pytestmark = pytest.mark.anyio


def req(rid: str, *deps: str, timeout: float | None = None) -> AgentRequest:
    return AgentRequest(id=rid, agent="a", depends_on=deps, timeout=timeout)


def executor(agent: ScriptedAgent, **kwargs: Any) -> ParallelAgentExecutor:
    kwargs.setdefault("max_concurrent", 100)
    kwargs.setdefault("agent_timeout", 100.0)
    return ParallelAgentExecutor({"a": agent}, **kwargs)


@pytest.mark.virtual_clock
async def test_fast_chain_does_not_wait_for_slow_sibling() -> None:
    # a -> b is fast (1 + 1); c is slow (5). A level barrier would start b at 5.
    agent = ScriptedAgent({"a": 1, "b": 1, "c": 5})
    t0 = anyio.current_time()
    responses = await executor(agent).execute_parallel([req("a"), req("c"), req("b", "a")])
    assert agent.starts["b"] == [t0 + 1]
    assert agent.ends["b"] == t0 + 2
    assert anyio.current_time() - t0 == 5
    assert [r.request_id for r in responses] == ["a", "c", "b"]


async def test_dependents_receive_outputs() -> None:
    agent = ScriptedAgent(default=0.01)
    await executor(agent).execute_parallel([req("x"), req("y"), req("z", "x", "y")])
    assert agent.inputs_seen["z"] == {"x": "out:x:1", "y": "out:y:1"}
    assert agent.inputs_seen["x"] == {}


@pytest.mark.virtual_clock
async def test_concurrency_limit() -> None:
    agent = ScriptedAgent(default=1)
    t0 = anyio.current_time()
    responses = await executor(agent, max_concurrent=2).execute_parallel(
        [req("r0"), req("r1"), req("r2"), req("r3")]
    )
    assert agent.peak == 2
    assert sorted(r.queued for r in responses) == [0, 0, 1, 1]
    assert all(r.duration == 1 for r in responses)
    assert anyio.current_time() - t0 == 2


@pytest.mark.virtual_clock
async def test_admission_is_fifo_by_readiness() -> None:
    # three executions share one token; "early" becomes ready before "late"
    agent = ScriptedAgent({"long": 3, "early": 1, "late": 1})
    ex = executor(agent, max_concurrent=1)
    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(ex.execute_parallel, [req("long")])
        await anyio.sleep(1)
        tg.start_soon(ex.execute_parallel, [req("early")])
        await anyio.sleep(1)
        tg.start_soon(ex.execute_parallel, [req("late")])
    assert agent.starts["early"][0] < agent.starts["late"][0]
    assert (agent.starts["early"][0] - t0, agent.starts["late"][0] - t0) == (3, 4)


@pytest.mark.virtual_clock
async def test_timeout_counts_queue_time() -> None:
    agent = ScriptedAgent({"slow": 4, "late": 2})
    ex = executor(agent, max_concurrent=1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ex.execute_parallel, [req("slow")])
        await anyio.sleep(0.5)  # "slow" holds the only token
        (late,) = await ex.execute_parallel([req("late", timeout=3)])
    # it would finish at 6 if its timer started at admission; from readiness it ends at 3
    assert late.status is Status.TIMEOUT
    assert late.queued == 3 and late.duration == 0
    assert "queued for capacity" in (late.error or "")
    assert "late" not in agent.starts


@pytest.mark.virtual_clock
async def test_timeout_while_running() -> None:
    agent = ScriptedAgent({"a": 10})
    (response,) = await executor(agent).execute_parallel([req("a", timeout=2)])
    assert response.status is Status.TIMEOUT
    assert (response.queued, response.duration) == (0, 2)
    assert agent.cancelled == ["a"]


async def test_failure_skips_exactly_transitive_dependents() -> None:
    agent = ScriptedAgent(default=0.01, fail=frozenset({"b"}))
    requests = [req("a"), req("b", "a"), req("c", "b"), req("d", "c"), req("e", "a"), req("f")]
    responses = {r.request_id: r for r in await executor(agent).execute_parallel(requests)}
    assert responses["b"].status is Status.ERROR
    assert "Boom: b failed" in (responses["b"].error or "")
    for rid in ("c", "d"):
        assert responses[rid].status is Status.SKIPPED
        assert "'b'" in (responses[rid].error or "")
    assert {responses[r].status for r in ("a", "e", "f")} == {Status.OK}
    assert "c" not in agent.starts and "d" not in agent.starts


@pytest.mark.virtual_clock
async def test_overall_deadline_cancels_the_rest() -> None:
    agent = ScriptedAgent({"a": 1, "b": 5, "c": 1, "d": 1})
    ex = executor(agent, max_concurrent=1)  # one token: a leaked one would block "d"
    t0 = anyio.current_time()
    responses = await ex.execute_parallel([req("a"), req("b", "a"), req("c", "b")], deadline=3)
    assert anyio.current_time() - t0 == 3  # at the deadline, not when "b" would end (6)
    assert [r.status for r in responses] == [Status.OK, Status.CANCELLED, Status.CANCELLED]
    assert agent.starts["b"] == [t0 + 1] and "c" not in agent.starts
    assert agent.cancelled == ["b"]
    stats = ex.statistics()  # this executor's limiter, after the cancellation
    assert (stats.borrowed_tokens, stats.total_tokens, stats.waiting) == (0, 1, 0)
    with anyio.fail_after(10):  # the token "b" held is free again: "d" starts at once
        (again,) = await ex.execute_parallel([req("d")])
    assert again.status is Status.OK and again.queued == 0
    assert agent.starts["d"] == [t0 + 3]


async def test_caller_cancellation_releases_everything() -> None:
    agent = ScriptedAgent(default=10)
    ex = executor(agent, max_concurrent=2)
    with anyio.move_on_after(1) as scope:
        await ex.execute_parallel([req("a"), req("b"), req("c"), req("d", "a")])
    assert scope.cancelled_caught
    assert len(agent.cancelled) == 2 and set(agent.cancelled) <= {"a", "b", "c"}
    assert "d" not in agent.starts
    assert agent.running == 0
    stats = ex.statistics()
    assert stats.borrowed_tokens == 0 and stats.waiting == 0


async def test_bad_graph_raises_before_anything_runs() -> None:
    agent = ScriptedAgent()
    with pytest.raises(engine.DependencyError):
        await executor(agent).execute_parallel([req("a", "b"), req("b", "a"), req("c")])
    assert agent.starts == {}


async def test_unknown_agent_raises_before_anything_runs() -> None:
    agent = ScriptedAgent()
    with pytest.raises(ValueError, match="unknown agent 'ghost'"):
        await executor(agent).execute_parallel([req("a"), AgentRequest(id="g", agent="ghost")])
    assert agent.starts == {}


async def test_equal_requests_with_different_ids() -> None:
    agent = ScriptedAgent(default=0.01)
    twins = [AgentRequest(id=f"t{i}", agent="a", context={"same": True}) for i in range(5)]
    responses = await executor(agent).execute_parallel(twins)
    assert [r.output for r in responses] == [f"out:t{i}:1" for i in range(5)]


@pytest.mark.virtual_clock
async def test_execute_with_timeout() -> None:
    agent = ScriptedAgent({"a": 2})
    ex = executor(agent)
    ok = await ex.execute_with_timeout(req("a"), 3, inputs={"x": 1})
    assert ok.status is Status.OK and ok.duration == 2
    assert agent.inputs_seen["a"] == {"x": 1}
    late = await ex.execute_with_timeout(req("a"), 1)
    assert late.status is Status.TIMEOUT
    with pytest.raises(ValueError):
        await ex.execute_with_timeout(req("a"), 0)


async def test_on_response_sees_every_decision() -> None:
    seen: list[tuple[str, Status]] = []
    agent = ScriptedAgent(default=0.01, fail=frozenset({"a"}))
    ex = executor(agent, on_response=lambda r: seen.append((r.request_id, r.status)))
    await ex.execute_parallel([req("a"), req("b", "a"), req("c")])
    assert sorted(seen) == [("a", Status.ERROR), ("b", Status.SKIPPED), ("c", Status.OK)]


def test_reuse_across_event_loops() -> None:
    # the previous design bound its semaphore to the first loop
    agent = ScriptedAgent(default=0.0)
    ex = executor(agent, max_concurrent=1)
    for backend in ("trio", "asyncio", "trio"):
        responses = anyio.run(ex.execute_parallel, [req("a"), req("b")], backend=backend)
        assert [r.status for r in responses] == [Status.OK, Status.OK]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        ParallelAgentExecutor({}, max_concurrent=0)
    with pytest.raises(ValueError, match="agent_timeout"):
        ParallelAgentExecutor({}, agent_timeout=0)


# ---------------------------------------------------------------- the limiter


@pytest.mark.virtual_clock
async def test_limiter_grants_in_arrival_order_and_newcomers_queue_behind() -> None:
    limiter = FifoLimiter(1)
    assert limiter.try_acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        await limiter.acquire()
        order.append(name)

    async with anyio.create_task_group() as tg:
        for name in ("first", "second"):
            tg.start_soon(take, name)
            await anyio.sleep(1)  # arrival order: first, second
        assert limiter.waiting == 2
        limiter.release()  # handed to "first": nobody may take it in between
        assert not limiter.try_acquire()
        assert (limiter.borrowed, limiter.waiting) == (1, 1)
        await anyio.sleep(1)
        limiter.release()
    assert order == ["first", "second"]
    limiter.release()
    assert (limiter.borrowed, limiter.waiting) == (0, 0)
    with pytest.raises(RuntimeError):
        limiter.release()


async def test_limiter_waiter_cancelled_holds_no_token() -> None:
    limiter = FifoLimiter(1)
    assert limiter.try_acquire()
    with anyio.move_on_after(0.01):
        await limiter.acquire()
    assert (limiter.borrowed, limiter.waiting) == (1, 0)
    # granted and cancelled in the same instant: it holds the token and wakes with it, or
    # is cancelled (asyncio) and gives the token back: none is lost either way
    async with anyio.create_task_group() as tg:
        cancelled = anyio.CancelScope()

        async def granted_then_cancelled() -> None:
            with cancelled:
                await limiter.acquire()
                limiter.release()  # woke with the token (trio does not cancel a granted wait)

        tg.start_soon(granted_then_cancelled)
        await anyio.wait_all_tasks_blocked()
        limiter.release()  # hands the token over...
        cancelled.cancel()  # ...to a waiter cancelled before it woke
    assert (limiter.borrowed, limiter.waiting) == (0, 0)
    assert limiter.try_acquire()


# ---------------------------------------------------------------- hedging


def hedged(
    agent: ScriptedAgent, after: float = 2.0, budget: float = 1.0, **kw: Any
) -> ParallelAgentExecutor:
    policy = HedgePolicy({"a": after}, budget_fraction=budget, max_tokens=1.0)
    return executor(agent, hedging=policy, **kw)


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_hedge_wins_and_loser_is_cancelled() -> None:
    agent = ScriptedAgent({"a": [10, 1]})  # first attempt straggles, the hedge is quick
    ex = hedged(agent)
    t0 = anyio.current_time()
    (response,) = await ex.execute_parallel([req("a")])
    assert response.status is Status.OK and response.output == "out:a:2"
    assert response.hedged and response.attempts == 2
    assert anyio.current_time() - t0 == 3  # hedge sent at 2, answered at 3
    assert agent.starts["a"] == [t0, t0 + 2]
    assert agent.cancelled == ["a"] and agent.running == 0
    stats = ex.statistics()
    assert (stats.hedges_sent, stats.hedges_won, stats.borrowed_tokens) == (1, 1, 0)


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_first_answer_wins_when_primary_is_faster() -> None:
    agent = ScriptedAgent({"a": [3, 5]})
    ex = hedged(agent)
    (response,) = await ex.execute_parallel([req("a")])
    assert response.output == "out:a:1" and response.hedged
    assert ex.statistics().hedges_won == 0
    assert agent.running == 0


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_no_hedge_when_answer_is_in_time() -> None:
    agent = ScriptedAgent({"a": [1, 1]})
    (response,) = await hedged(agent).execute_parallel([req("a")])
    assert not response.hedged and response.attempts == 1
    assert len(agent.starts["a"]) == 1


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_hedge_never_waits_for_capacity() -> None:
    # both tokens are busy when the hedge would fire: no hedge, no extra queueing
    agent = ScriptedAgent({"a": [10, 1], "b": 10})
    ex = hedged(agent, max_concurrent=2)
    responses = await ex.execute_parallel([req("a"), req("b")])
    assert not responses[0].hedged
    assert agent.peak == 2
    assert len(agent.starts["a"]) == 1


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_hedge_budget_caps_extra_calls() -> None:
    agent = ScriptedAgent({f"r{i}": [5, 1] for i in range(40)})
    policy = HedgePolicy({"a": 1.0}, budget_fraction=0.1)
    ex = executor(agent, hedging=policy)
    for i in range(40):
        await ex.execute_parallel([req(f"r{i}")])
    stats = ex.statistics()
    assert stats.hedges_sent == 4  # 10 % of 40 calls
    assert stats.attempts == 44


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_failed_primary_waits_for_running_hedge() -> None:
    agent = ScriptedAgent({"a": [3, 2]}, fail=frozenset())

    # primary errors at 3 after the hedge started at 2; the hedge answers at 4
    class FailFirst(ScriptedAgent):
        async def run(self, request: AgentRequest, inputs: Any) -> Any:
            out = await super().run(request, inputs)
            if request.context.get("attempt", 1) == 1:
                raise RuntimeError("primary broke")
            return out

    flaky = FailFirst(agent.latency)
    (response,) = await hedged(flaky).execute_parallel([req("a")])
    assert response.status is Status.OK and response.output == "out:a:2"


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_timeout_cancels_both_attempts_of_a_hedged_request() -> None:
    agent = ScriptedAgent({"a": [10, 10]})
    ex = hedged(agent, max_concurrent=2)
    t0 = anyio.current_time()
    (response,) = await ex.execute_parallel([req("a", timeout=5)])
    assert response.status is Status.TIMEOUT and response.hedged and response.attempts == 2
    assert anyio.current_time() - t0 == 5 and response.duration == 5
    assert agent.starts["a"] == [t0, t0 + 2]
    assert agent.cancelled == ["a", "a"] and agent.running == 0
    assert ex.statistics().borrowed_tokens == 0


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_dependent_starts_when_the_hedge_answers() -> None:
    agent = ScriptedAgent({"a": [10, 1], "b": [1, 1], "c": [1, 1]})
    ex = hedged(agent)
    t0 = anyio.current_time()
    responses = await ex.execute_parallel([req("a"), req("b", "a"), req("c")])
    assert [r.status for r in responses] == [Status.OK] * 3
    assert responses[0].hedge_won and agent.inputs_seen["b"] == {"a": "out:a:2"}
    assert agent.starts["b"] == [t0 + 3]  # the hedge (sent at 2) answered at 3
    assert anyio.current_time() - t0 == 4 and agent.running == 0


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_a_dependent_is_hedged_when_no_root_is() -> None:
    # only "b" hedges, and it becomes ready at 1: the hedge clock starts then
    agent = ScriptedAgent({"a": 1, "b": [10, 1]})
    policy = HedgePolicy({"b": 2.0}, budget_fraction=1.0, max_tokens=1.0)
    ex = ParallelAgentExecutor({"a": agent, "b": agent}, hedging=policy)
    t0 = anyio.current_time()
    responses = await ex.execute_parallel(
        [AgentRequest(id="a", agent="a"), AgentRequest(id="b", agent="b", depends_on=("a",))]
    )
    assert not responses[0].hedged and responses[1].hedge_won
    assert agent.starts["b"] == [t0 + 1, t0 + 3]  # hedged 2 after it started
    assert anyio.current_time() - t0 == 4
    assert agent.cancelled == ["b"] and ex.statistics().borrowed_tokens == 0


@pytest.mark.usefixtures("hedge_clock")
@pytest.mark.virtual_clock
async def test_execute_with_timeout_is_hedged() -> None:
    agent = ScriptedAgent({"a": [10, 1]})
    ex = hedged(agent)
    t0 = anyio.current_time()
    response = await ex.execute_with_timeout(req("a"), 30)
    assert response.status is Status.OK and response.output == "out:a:2"
    assert response.hedge_won and anyio.current_time() - t0 == 3
    assert agent.cancelled == ["a"] and ex.statistics().borrowed_tokens == 0


@pytest.mark.virtual_clock
async def test_p95_hedge_delay_learns_from_observations() -> None:
    policy = HedgePolicy({"a": "p95"}, min_samples=20)
    assert policy.delay_for("a") is None
    for i in range(160):
        policy.observe("a", float(i + 1))
    assert policy.delay_for("a") == 152.0  # the 152nd of 160 samples
    assert policy.delay_for("other") is None


@pytest.mark.parametrize("serving", [False, True], ids=["own clock", "serving"])
@pytest.mark.parametrize("hedged", [False, True])
@pytest.mark.virtual_clock
async def test_an_execution_leaves_no_cyclic_garbage(hedged: bool, serving: bool) -> None:
    """Everything an execution made is freed by reference counting when it returns:
    the cyclic collector's pauses grow with the garbage it has to find."""
    agent = ScriptedAgent(default=1)
    hedging = HedgePolicy({"a": 0.5}, budget_fraction=1.0) if hedged else None
    ex = executor(agent, hedging=hedging)
    requests = [req("x"), req("y"), req("z", "x", "y"), req("w", "z")]
    async with ex.serving() if serving else contextlib.nullcontext():  # as the engine: once
        await ex.execute_parallel(requests)  # warm: whatever is made once is made
        with engine_cyclic_garbage() as ours:
            responses = await ex.execute_parallel(requests)
    assert all(r.ok for r in responses)
    assert any(r.hedged for r in responses) == hedged
    assert ours == []


# ---------------------------------------------------------------- serving


@pytest.mark.virtual_clock
async def test_serving_runs_a_hedged_first_root_before_any_other_task() -> None:
    """Serving, a hedged execution starts its first root on the caller's task, without
    a pass of the event loop (its own clock would take the caller's task instead)."""
    order: list[str] = []

    class Recording(ScriptedAgent):
        async def run(self, request: AgentRequest, inputs: Any) -> Any:
            order.append(f"start {request.id}")
            return await super().run(request, inputs)

    async def other() -> None:
        order.append("other task")

    ex = hedged(Recording(default=1), after=0.5)
    async with ex.serving(), anyio.create_task_group() as tg:
        tg.start_soon(other)  # runs at the loop's next pass
        responses = await ex.execute_parallel([req("x"), req("y")])
    # x before the loop's next pass (the other task and y run in it, in either order)
    assert order.index("start x") < order.index("other task") < order.index("start x", 1)
    assert all(r.ok for r in responses) and responses[0].hedged  # x's hedge: the one
    assert agent_tokens_free(ex)


def agent_tokens_free(ex: ParallelAgentExecutor) -> bool:
    stats = ex.statistics()
    return stats.borrowed_tokens == 0 and stats.waiting == 0


_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")


@pytest.mark.parametrize("serving", [False, True], ids=["own clock", "serving"])
@pytest.mark.virtual_clock
async def test_a_hedge_runs_in_its_requests_context(serving: bool) -> None:
    """The hedge sees the context variables its request saw (the profiler's current
    span is one), whichever task sent it: here two callers, each its own value, set
    after the executor began serving (as the engine's actions do)."""
    seen: dict[tuple[str, int], str] = {}

    class Reading(ScriptedAgent):
        async def run(self, request: AgentRequest, inputs: Any) -> Any:
            seen[request.id, int(request.context.get("attempt", 1))] = _CALLER.get()
            return await super().run(request, inputs)

    policy = HedgePolicy({"a": 2.0}, budget_fraction=1.0)  # each call earns its hedge
    ex = executor(Reading({"a": [10, 1], "b": [10, 1]}), hedging=policy)
    got: list[AgentResponse] = []

    async def caller(rid: str) -> None:
        _CALLER.set(f"caller of {rid}")  # this task's own context
        got.extend(await ex.execute_parallel([req(rid)]))

    serve = ex.serving() if serving else contextlib.nullcontext()
    async with serve, anyio.create_task_group() as tg:
        tg.start_soon(caller, "a")
        tg.start_soon(caller, "b")
    assert [r.hedge_won for r in got] == [True, True]
    assert seen == {(rid, n): f"caller of {rid}" for rid in "ab" for n in (1, 2)}


@pytest.mark.virtual_clock
async def test_serving_twice_fails_and_serving_without_hedging_does_nothing() -> None:
    ex = hedged(ScriptedAgent())
    async with ex.serving():
        with pytest.raises(RuntimeError, match="already serving"):
            async with ex.serving():
                pass
    async with ex.serving():  # a new block after the first ended
        (response,) = await ex.execute_parallel([req("a")])
    assert response.ok
    plain = executor(ScriptedAgent())
    async with plain.serving(), plain.serving():  # no hedge policy: nothing to serve
        (response,) = await plain.execute_parallel([req("a")])
    assert response.ok


@pytest.mark.virtual_clock
async def test_serving_forgets_the_races_that_ended() -> None:
    """A request that ends before its hedge is due leaves nothing behind in the shared
    timer: it does not wake for it, nor keep the request's inputs alive."""
    agent = ScriptedAgent(default=1)
    ex = hedged(agent, after=5.0)
    async with ex.serving():
        for _ in range(3):
            responses = await ex.execute_parallel([req("x"), req("y", "x"), req("z")])
            assert not any(r.hedged for r in responses)
            assert ex._timer is not None and ex._timer.pending == 0
