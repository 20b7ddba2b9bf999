"""The parallel agent executor: a request DAG run eagerly under a capacity limiter.

Guarantees:

* **Eager.** A request starts the moment its last dependency succeeded; nothing waits
  for a whole level. With unlimited capacity the makespan is the critical path.
* **Few tasks.** A request that becomes ready runs on the task that made it ready
  when that task has nothing else to do (the first root on the caller's task, the
  first dependent a request made ready on that request's task); only the others get
  a task of their own. A chain of requests is one task. (An agent on the caller's
  task shares its context variables, as any coroutine the caller awaits does.)
* **Bounded.** At most ``max_concurrent`` agent attempts hold a limiter token at once,
  hedges included; admission is FIFO by readiness.
* **Timed from readiness.** A request's timeout covers queueing and running; the
  response reports both separately.
* **Hedged on the first token when streaming.** A request with ``on_delta`` is raced
  on its time to first token: a hedge goes out only if no piece of text has arrived
  by the hedge delay, the first attempt to produce a piece owns the stream (the other
  is cancelled at once), and only the owner's pieces reach ``on_delta``. The hedge
  delay of such an agent is learnt from its time to first piece.
* **Isolated.** An agent that raises or times out yields an ``ERROR``/``TIMEOUT``
  response and its transitive dependents are ``SKIPPED``; other branches go on.
* **Cancellation-safe.** Cancelling the caller cancels every in-flight call, leaves no
  task running and releases every token; ``Cancelled`` is never an agent error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, final

import anyio
import anyio.lowlevel
import attrs

from ..agents.base import Agent, AgentRequest, AgentResponse, Status
from ..config import Config
from .dag import RequestGraph, analyze_dependencies
from .hedging import HedgePolicy
from .limits import FifoLimiter

__all__ = ["ExecutorStatistics", "ParallelAgentExecutor"]


@attrs.frozen
class ExecutorStatistics:
    """A snapshot: limiter occupancy and what the executor has done so far."""

    borrowed_tokens: int
    total_tokens: int
    waiting: int
    requests: int
    attempts: int
    hedges_sent: int
    hedges_won: int


@final
@attrs.define(eq=False)
class _Outcome:
    """The winning attempt of one request (or the error if every attempt failed)."""

    output: Any = None
    error: BaseException | None = None
    attempts: int = 0
    hedged: bool = False
    hedge_won: bool = False


@final
@attrs.define(eq=False)
class ParallelAgentExecutor:
    """Runs agent requests as a dependency DAG; see the module docstring.

    Args:
        agents: agent name -> object with ``async run(request, inputs)``.
        max_concurrent: agent attempts running at once (one shared limiter).
        agent_timeout: default per-request timeout in seconds (from readiness).
        hedging: optional hedge policy (``None``: never hedge).
        on_response: called with every response as it is decided (metrics hook).
    """

    agents: Mapping[str, Agent]
    max_concurrent: int = 4
    agent_timeout: float = 5.0
    hedging: HedgePolicy | None = None
    on_response: Callable[[AgentResponse], None] | None = None
    _limiter: FifoLimiter | None = attrs.field(default=None, init=False)
    _limiter_loop: object = attrs.field(default=None, init=False)
    _requests: int = attrs.field(default=0, init=False)
    _attempts: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        if self.agent_timeout <= 0:
            raise ValueError(f"agent_timeout must be > 0, got {self.agent_timeout}")

    @classmethod
    def from_config(
        cls, agents: Mapping[str, Agent], config: Config, **kwargs: Any
    ) -> ParallelAgentExecutor:
        par = config.performance.parallelization
        kwargs.setdefault("hedging", HedgePolicy.from_config(config))
        return cls(agents, par.max_concurrent_agents, par.agent_timeout_seconds, **kwargs)

    # ------------------------------------------------------------------ public API

    def analyze_dependencies(self, requests: Sequence[AgentRequest]) -> list[list[AgentRequest]]:
        """Topological levels (Kahn); raises ``DependencyError`` for a bad graph."""
        return analyze_dependencies(requests)

    def statistics(self) -> ExecutorStatistics:
        limiter = self._limiter
        hedges = self.hedging.statistics() if self.hedging is not None else None
        return ExecutorStatistics(
            borrowed_tokens=limiter.borrowed if limiter is not None else 0,
            total_tokens=self.max_concurrent,
            waiting=limiter.waiting if limiter is not None else 0,
            requests=self._requests,
            attempts=self._attempts,
            hedges_sent=hedges.hedges_sent if hedges else 0,
            hedges_won=hedges.hedges_won if hedges else 0,
        )

    async def execute_parallel(
        self,
        requests: Sequence[AgentRequest],
        *,
        deadline: float | None = None,
        on_response: Callable[[AgentResponse], None] | None = None,
    ) -> list[AgentResponse]:
        """Run ``requests`` eagerly; responses come back in request order.

        Args:
            requests: the DAG; ``depends_on`` names other requests' ids.
            deadline: optional overall budget in seconds; requests unfinished when it
                passes are ``CANCELLED``.
            on_response: called with each response the moment it is decided (before
                its dependents start), besides the executor's own ``on_response``.

        Raises:
            DependencyError: the graph is malformed (before anything runs).
            ValueError: a request names an agent the executor does not have.
        """
        graph = RequestGraph.build(requests)
        self._check_agents(graph.requests)
        limiter = self._current_limiter()
        n = len(graph.requests)
        responses: list[AgentResponse | None] = [None] * n
        remaining = [len(p) for p in graph.parents]
        ready_at: dict[int, float] = {}

        def decide(i: int, response: AgentResponse) -> None:
            responses[i] = response
            if self.on_response is not None:
                self.on_response(response)
            if on_response is not None:
                on_response(response)

        def skip_dependents(failed: int) -> None:
            failed_req = graph.requests[failed]
            status = responses[failed]
            reason = f"dependency {failed_req.id!r} {status.status.value if status else 'failed'}"
            stack = list(graph.children[failed])
            while stack:
                c = stack.pop()
                if responses[c] is not None:
                    continue
                req = graph.requests[c]
                decide(c, AgentResponse(req.id, req.agent, Status.SKIPPED, error=reason))
                stack.extend(graph.children[c])

        async def run_from(i: int) -> None:
            """Run request ``i``, then go on with one request its success made ready
            (in this task: no task is started for it); the others it made ready are
            started as tasks of their own."""
            while True:
                request = graph.requests[i]
                inputs = {graph.requests[p].id: _output(responses[p]) for p in graph.parents[i]}
                response, now = await self._run_request(request, inputs, ready_at[i], limiter)
                decide(i, response)
                if not response.ok:
                    skip_dependents(i)
                    return
                following = None
                for c in graph.children[i]:
                    remaining[c] -= 1
                    if remaining[c] == 0 and responses[c] is None:
                        ready_at[c] = now
                        if following is None:
                            following = c
                        else:
                            tg.start_soon(run_from, c)
                if following is None:
                    return
                i = following

        scope = anyio.move_on_after(deadline) if deadline is not None else nullcontext()
        with scope:
            async with anyio.create_task_group() as tg:
                start = anyio.current_time()
                roots = graph.levels[0] if graph.levels else ()
                for i in roots:
                    ready_at[i] = start
                for i in roots[1:]:
                    tg.start_soon(run_from, i)
                if roots:
                    await run_from(roots[0])  # in this task, before the others start

        # Only the overall deadline leaves requests undecided.
        end = anyio.current_time()
        result: list[AgentResponse] = []
        for i, response in enumerate(responses):
            if response is None:
                req = graph.requests[i]
                waited = end - ready_at[i] if i in ready_at else 0.0
                response = AgentResponse(
                    req.id,
                    req.agent,
                    Status.CANCELLED,
                    error=f"execution deadline of {deadline}s passed",
                    queued=waited,
                )
                decide(i, response)
            result.append(response)
        return result

    async def execute_with_timeout(
        self,
        request: AgentRequest,
        timeout: float,  # noqa: ASYNC109 - the public API (docs/api.md)
        inputs: Mapping[str, Any] | None = None,
    ) -> AgentResponse:
        """Run one request on its own with ``timeout`` (queue time included).

        Its ``depends_on`` is not consulted: ``inputs`` (default empty) are given
        to the agent as they are.
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self._check_agents([request])
        request = attrs.evolve(request, timeout=timeout)
        response, _end = await self._run_request(
            request, inputs or {}, anyio.current_time(), self._current_limiter()
        )
        if self.on_response is not None:
            self.on_response(response)
        return response

    # ------------------------------------------------------------------ internals

    def _check_agents(self, requests: Sequence[AgentRequest]) -> None:
        for request in requests:
            if request.agent not in self.agents:
                raise ValueError(
                    f"request {request.id!r} names unknown agent {request.agent!r}; "
                    f"known: {sorted(self.agents)}"
                )

    def _current_limiter(self) -> FifoLimiter:
        """The limiter of the running event loop (a new loop gets a new limiter)."""
        loop = anyio.lowlevel.current_token().native_token
        if self._limiter is None or self._limiter_loop is not loop:
            self._limiter = FifoLimiter(self.max_concurrent)
            self._limiter_loop = loop
        return self._limiter

    async def _run_request(
        self,
        request: AgentRequest,
        inputs: Mapping[str, Any],
        ready_at: float,
        limiter: FifoLimiter,
    ) -> tuple[AgentResponse, float]:
        """Run one request; its response and the time it was decided."""
        self._requests += 1
        if self.hedging is not None:
            return await self._run_with_policy(request, inputs, ready_at, limiter, self.hedging)
        timeout = request.timeout if request.timeout is not None else self.agent_timeout
        agent = self.agents[request.agent]
        admitted: float | None = None
        output: Any = None
        error: Exception | None = None
        with anyio.CancelScope(deadline=ready_at + timeout) as scope:
            if limiter.try_acquire():  # a free token, nobody waiting
                admitted = ready_at  # no wait for capacity (and one clock read saved)
            else:
                await limiter.acquire()
                admitted = anyio.current_time()
            self._attempts += 1
            try:
                output = await agent.run(request, inputs)
            except Exception as exc:
                error = exc
            finally:
                limiter.release()
        end = anyio.current_time()
        response = _response(
            request, timeout, ready_at, admitted, end, scope.cancelled_caught, output, error
        )
        return response, end

    async def _run_with_policy(
        self,
        request: AgentRequest,
        inputs: Mapping[str, Any],
        ready_at: float,
        limiter: FifoLimiter,
        policy: HedgePolicy,
    ) -> tuple[AgentResponse, float]:
        """:meth:`_run_request` under a hedge policy: the call earns hedge budget, may
        be hedged, and its latency (to its first piece when streaming) is observed."""
        timeout = request.timeout if request.timeout is not None else self.agent_timeout
        agent = self.agents[request.agent]
        delay = policy.delay_for(request.agent)
        admitted: float | None = None
        outcome = _Outcome()
        first_piece: list[float] = []
        if request.on_delta is not None:
            sink = request.on_delta

            def stamp(piece: str) -> None:
                if not first_piece:
                    first_piece.append(anyio.current_time())
                sink(piece)

            request = attrs.evolve(request, on_delta=stamp)
        with anyio.CancelScope(deadline=ready_at + timeout) as scope:
            if limiter.try_acquire():
                admitted = ready_at
            else:
                await limiter.acquire()
                admitted = anyio.current_time()
            policy.on_call()
            if delay is None:  # one attempt, no task group
                outcome.attempts = 1
                self._attempts += 1
                try:
                    outcome.output = await agent.run(request, inputs)
                except Exception as exc:
                    outcome.error = exc
                finally:
                    limiter.release()
            else:
                await self._hedged(agent, request, inputs, delay, limiter, outcome)
        end = anyio.current_time()
        if outcome.error is None and not scope.cancelled_caught:
            assert admitted is not None
            policy.observe(request.agent, (first_piece[0] if first_piece else end) - admitted)
        response = _response(
            request,
            timeout,
            ready_at,
            admitted,
            end,
            scope.cancelled_caught,
            outcome.output,
            outcome.error,
            outcome.attempts,
            outcome.hedged,
            outcome.hedge_won,
        )
        return response, end

    async def _hedged(
        self,
        agent: Agent,
        request: AgentRequest,
        inputs: Mapping[str, Any],
        delay: float,
        limiter: FifoLimiter,
        outcome: _Outcome,
    ) -> None:
        """Run the first attempt (its token already held) and, after ``delay``, a hedge.

        The first successful answer wins and the other attempt is cancelled; every
        attempt releases its own token when it ends, however it ends.
        """
        policy = self.hedging
        assert policy is not None
        ended = 0  # attempts that ended without winning
        done = anyio.Event()
        scopes: dict[int, anyio.CancelScope] = {}
        owner: list[int] = []  # the attempt whose text streams (the first to write)
        sink = request.on_delta

        def gate(number: int) -> Callable[[str], None]:
            assert sink is not None

            def emit(piece: str) -> None:
                if not piece:
                    return  # an empty piece claims nothing
                if not owner:
                    owner.append(number)
                    for other, other_scope in scopes.items():
                        if other != number:
                            other_scope.cancel()
                if owner[0] == number:
                    sink(piece)

            return emit

        async def attempt(number: int, req: AgentRequest) -> None:
            nonlocal ended
            scope = scopes[number]  # made before the task was started: a gate can cancel it
            if sink is not None:
                req = attrs.evolve(req, on_delta=gate(number))
            output: Any = _FAILED
            try:
                with scope:
                    try:
                        output = await agent.run(req, inputs)
                    except Exception as exc:
                        if outcome.error is None:
                            outcome.error = exc
                        output = _FAILED
                lost_stream = bool(owner) and owner[0] != number
                if output is _FAILED or scope.cancelled_caught or lost_stream:
                    ended += 1
                    if ended == outcome.attempts:
                        done.set()
                    return
                if done.is_set():
                    return  # lost a photo finish; the winner is already decided
                outcome.output, outcome.error = output, None
                outcome.hedge_won = number > 1
                done.set()
            finally:
                limiter.release()

        async with anyio.create_task_group() as tg:
            outcome.attempts = 1
            self._attempts += 1
            scopes[1] = anyio.CancelScope()
            tg.start_soon(attempt, 1, request)
            with anyio.move_on_after(delay):
                await done.wait()
            if not done.is_set() and not owner and limiter.try_acquire():
                if policy.try_spend():
                    outcome.attempts = 2
                    self._attempts += 1
                    outcome.hedged = True
                    hedge = attrs.evolve(request, context={**request.context, "attempt": 2})
                    scopes[2] = anyio.CancelScope()
                    tg.start_soon(attempt, 2, hedge)
                else:
                    limiter.release()
            await done.wait()
            tg.cancel_scope.cancel()
        if outcome.hedge_won:
            policy.record_hedge_win()


_FAILED: Any = object()


def _response(
    request: AgentRequest,
    timeout: float,
    ready_at: float,
    admitted: float | None,
    end: float,
    timed_out: bool,
    output: Any,
    error: BaseException | None,
    attempts: int = 1,
    hedged: bool = False,
    hedge_won: bool = False,
) -> AgentResponse:
    """The response of a request that became ready at ``ready_at``, was admitted at
    ``admitted`` (None: never) and was decided at ``end``."""
    queued = (admitted if admitted is not None else end) - ready_at
    duration = end - admitted if admitted is not None else 0.0
    if timed_out:
        where = "running" if admitted is not None else "queued for capacity"
        status = Status.TIMEOUT
        message: str | None = f"timed out after {timeout:g}s ({where}; queued {queued:.3f}s)"
        output = None
    elif error is not None:
        # an agent that gave up because its deadline was near (a TimeoutError, e.g.
        # retries that would outlive it) timed out rather than failed
        status = Status.TIMEOUT if isinstance(error, TimeoutError) else Status.ERROR
        message = f"{type(error).__name__}: {error}"
        output = None
    else:
        status, message = Status.OK, None
    return AgentResponse(
        request.id,
        request.agent,
        status,
        output,
        message,
        queued,
        duration,
        attempts if admitted is not None else 0,
        hedged,
        hedge_won,
    )


def _output(response: AgentResponse | None) -> Any:
    assert response is not None and response.ok
    return response.output
