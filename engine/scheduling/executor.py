"""The parallel agent executor: a request DAG run eagerly under a capacity limiter.

Guarantees:

* **Eager.** A request starts the moment its last dependency succeeded; nothing waits
  for a whole level. With unlimited capacity the makespan is the critical path.
* **Few tasks.** A request that becomes ready runs on the task that made it ready
  when that task has nothing else to do (the first root on the caller's task, the
  first dependent a request made ready on that request's task); only the others get
  a task of their own. A chain of requests is one task. (An agent on the caller's
  task shares its context variables, as any coroutine the caller awaits does.)
  Hedges are sent by one timer task: the executor's own while :meth:`serving`
  (every execution on that loop shares it, so hedging adds no task and no trip
  through the event loop to an execution), else one per execution (the caller's when
  a request ready at the start may be hedged, instead of it running the first root).
  A hedge costs no task and no timer of its own until it is sent.
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

import contextlib
import contextvars
import heapq
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, final

import anyio
import anyio.abc
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
    _timer: _HedgeClock | None = attrs.field(default=None, init=False)
    _timer_loop: object = attrs.field(default=None, init=False)
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

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Run the executor's hedge timer for the block (a no-op without a hedge policy).

        Executions on this event loop inside the block schedule their hedges on that
        one task instead of a clock of their own, so a hedged execution starts its
        first root on the caller's task and ends when its last request does, as an
        unhedged one: no task of its own to start, wake or wait for. Behaviour is
        otherwise the same. The engine serves for its whole life (``open_engine``).

        Raises:
            RuntimeError: the executor is already serving.
        """
        if self.hedging is None:
            yield
            return
        if self._timer is not None:
            raise RuntimeError("the executor is already serving")
        async with anyio.create_task_group() as tg:
            timer = _HedgeClock(tg)
            await tg.start(timer.run)
            self._timer = timer
            self._timer_loop = anyio.lowlevel.current_token().native_token
            try:
                yield
            finally:
                self._timer = self._timer_loop = None
                timer.close()

    def _shared_timer(self) -> _HedgeClock | None:
        """The serving timer, if it runs on the current event loop."""
        timer = self._timer
        if timer is None or self._timer_loop is not anyio.lowlevel.current_token().native_token:
            return None
        return timer

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
        undecided = n
        clock: _HedgeClock | _SharedClock | None = None
        own: _HedgeClock | None = None  # this execution's own clock (not serving)

        def decide(i: int, response: AgentResponse) -> None:
            nonlocal undecided
            responses[i] = response
            undecided -= 1
            if undecided == 0 and own is not None:
                own.close()
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
                response, now = await self._run_request(
                    request, inputs, ready_at[i], limiter, clock
                )
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
                if self.hedging is not None:
                    timer = self._shared_timer()
                    if timer is not None:
                        clock = _SharedClock(timer, tg)
                    else:
                        clock = own = _HedgeClock(tg)
                if own is not None and self._hedges_at_once(graph, roots):
                    for i in roots:
                        tg.start_soon(run_from, i)
                    await own.run()  # this task sends the hedges until all is decided
                else:
                    for i in roots[1:]:
                        tg.start_soon(run_from, i)
                    if roots:
                        await run_from(roots[0])  # in this task, before the others start

        # run_from refers to itself through its closure, and a clock to the races it
        # holds: break both, so this execution is freed when it returns, not by the
        # cyclic collector (whose pauses grow with the garbage it finds)
        run_from = None  # type: ignore[assignment]
        if own is not None:
            own.close()
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
        ready_at = anyio.current_time()
        limiter = self._current_limiter()
        if self.hedging is None:
            response, _end = await self._run_request(request, inputs or {}, ready_at, limiter)
        else:
            async with anyio.create_task_group() as tg:
                timer = self._shared_timer()
                clock = _SharedClock(timer, tg) if timer is not None else _HedgeClock(tg)
                response, _end = await self._run_request(
                    request, inputs or {}, ready_at, limiter, clock
                )
                clock.close()
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

    def _hedges_at_once(self, graph: RequestGraph, roots: Sequence[int]) -> bool:
        """Whether a request ready at the start would be hedged (its agent has a delay)."""
        policy = self.hedging
        return policy is not None and any(
            policy.delay_for(graph.requests[i].agent) is not None for i in roots
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
        clock: _HedgeClock | _SharedClock | None = None,
    ) -> tuple[AgentResponse, float]:
        """Run one request; its response and the time it was decided. Under a hedge
        policy ``clock`` sends the hedges."""
        self._requests += 1
        if self.hedging is not None:
            assert clock is not None
            return await self._run_with_policy(
                request, inputs, ready_at, limiter, self.hedging, clock
            )
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
        clock: _HedgeClock | _SharedClock,
    ) -> tuple[AgentResponse, float]:
        """:meth:`_run_request` under a hedge policy: the call earns hedge budget, may
        be hedged, and its latency (to its first piece when streaming) is observed."""
        timeout = request.timeout if request.timeout is not None else self.agent_timeout
        agent = self.agents[request.agent]
        delay = policy.delay_for(request.agent)
        admitted: float | None = None
        first_piece: list[float] = []
        if request.on_delta is not None:
            sink = request.on_delta

            def stamp(piece: str) -> None:
                if not first_piece:
                    first_piece.append(anyio.current_time())
                sink(piece)

            request = attrs.evolve(request, on_delta=stamp)
        output: Any = None
        error: Exception | None = None
        race: _Race | None = None
        with anyio.CancelScope(deadline=ready_at + timeout) as scope:
            if limiter.try_acquire():
                admitted = ready_at
            else:
                await limiter.acquire()
                admitted = anyio.current_time()
            policy.on_call()
            self._attempts += 1
            if delay is None:  # one attempt: nothing to race
                try:
                    output = await agent.run(request, inputs)
                except Exception as exc:
                    error = exc
                finally:
                    limiter.release()
            else:
                race = _Race(self, policy, agent, request, inputs, limiter, clock)
                try:
                    await race.run(delay)
                finally:
                    race.stop()
        if race is not None:
            await race.hedge_stopped()  # a cancelled hedge gives its token back first
            output, error = race.output, race.error
        end = anyio.current_time()
        if error is None and not scope.cancelled_caught:
            assert admitted is not None
            policy.observe(request.agent, (first_piece[0] if first_piece else end) - admitted)
        attempts, hedged, hedge_won = (
            (race.attempts, race.hedged, race.hedge_won) if race is not None else (1, False, False)
        )
        if hedge_won:
            policy.record_hedge_win()
        response = _response(
            request,
            timeout,
            ready_at,
            admitted,
            end,
            scope.cancelled_caught,
            output,
            error,
            attempts,
            hedged,
            hedge_won,
        )
        return response, end


@final
class _HedgeClock:
    """Starts hedges when they are due, from one task: an execution's own, or while
    the executor serves, one for every execution on the loop (:class:`_SharedClock`
    is an execution's view of it).

    That task sleeps until the earliest hedge is due, and scheduling an earlier one
    moves its alarm at once: a hedge costs no task and no timer of its own until it
    is sent. An execution's own clock runs on the execution's task (:meth:`run`) or,
    when none runs it, on one started in ``tasks`` by the first :meth:`schedule`; its
    hedges start in ``tasks``. A race that ends is dropped from the front at once
    (:meth:`withdraw`), so the task wakes only for hedges that may still be sent; one
    that ends behind the front is dropped when it gets there.
    """

    __slots__ = ("_alarm", "_armed", "_closed", "_due", "_order", "tasks")

    def __init__(self, tasks: anyio.abc.TaskGroup) -> None:
        self.tasks = tasks
        self._due: list[tuple[float, int, _Race]] = []  # a heap
        self._order = 0  # ties are sent in the order they were scheduled
        self._alarm: anyio.CancelScope | None = None  # set while a task runs the clock
        self._armed: anyio.Event | None = None  # set once a started task set its alarm
        self._closed = anyio.Event()

    @property
    def pending(self) -> int:
        """Races held (some may be over, behind one that is not)."""
        return len(self._due)

    def add(self, when: float, race: _Race) -> None:
        """Call ``race.due()`` at ``when`` unless the race is over or the clock closed
        by then; the alarm, if set, moves at once."""
        self._order += 1
        heapq.heappush(self._due, (when, self._order, race))
        alarm = self._alarm
        if alarm is not None and when < alarm.deadline:
            alarm.deadline = when

    async def schedule(self, when: float, race: _Race) -> None:
        """:meth:`add`, starting the clock's task if none runs it.

        Returns once the alarm is set: the hedge falls due before any timer the
        caller sets afterwards for the same instant.
        """
        self.add(when, race)
        if self._alarm is None:
            if self._armed is None:
                self._armed = anyio.Event()
                self.tasks.start_soon(self.run)
            await self._armed.wait()  # its alarm is the earliest hedge's, this one's too

    def withdraw(self, race: _Race) -> None:
        """``race`` is over: drop the races over at the front, and wake later."""
        due = self._due
        if not due or due[0][2] is not race:
            return
        while due and due[0][2].over:
            heapq.heappop(due)
        if self._alarm is not None:
            self._alarm.deadline = due[0][0] if due else math.inf

    def close(self) -> None:
        """No more hedges: :meth:`run` returns. The races still due are dropped (they
        refer to the clock: a cycle the cyclic collector would have to free)."""
        self._closed.set()
        self._due.clear()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Send the hedges as they fall due, until :meth:`close` (``task_status``:
        started once the alarm is set)."""
        due = self._due
        closed = self._closed
        started = False
        try:
            while not closed.is_set():
                now = anyio.current_time()
                while due and (due[0][0] <= now or due[0][2].over):
                    heapq.heappop(due)[2].due()
                with anyio.CancelScope(deadline=due[0][0] if due else math.inf) as self._alarm:
                    if self._armed is not None:
                        self._armed.set()
                    if not started:
                        started = True
                        task_status.started()
                    await closed.wait()
        finally:
            self._alarm = None


@final
class _SharedClock:
    """An execution's view of the serving :class:`_HedgeClock`: the same interface,
    with the hedges started in the execution's own ``tasks``."""

    __slots__ = ("_clock", "tasks")

    def __init__(self, clock: _HedgeClock, tasks: anyio.abc.TaskGroup) -> None:
        self._clock = clock
        self.tasks = tasks

    async def schedule(self, when: float, race: _Race) -> None:
        """As :meth:`_HedgeClock.schedule`; returns at once (the serving clock's alarm
        is set while it serves; after that, no hedge is sent)."""
        self._clock.add(when, race)

    def withdraw(self, race: _Race) -> None:
        self._clock.withdraw(race)

    def close(self) -> None:
        """Nothing to close: the clock serves other executions."""


@final
class _Race:
    """A request's attempts: the first on the request's task, the hedge (if the clock
    sends one) on a task of the execution's group, in a copy of the request's context
    variables (so its spans are the request's, whichever task sent it).

    The first attempt to succeed wins and the other is cancelled; when streaming, the
    first to write a piece owns the stream (the other is cancelled at once) and only
    it may win. Every attempt releases its own token when it ends, however it ends.
    """

    __slots__ = (
        "_agent",
        "_clock",
        "_context",
        "_executor",
        "_hedge_ended",
        "_inputs",
        "_limiter",
        "_over",
        "_owner",
        "_policy",
        "_request",
        "_scopes",
        "_winner",
        "attempts",
        "error",
        "hedge_running",
        "hedge_won",
        "hedged",
        "output",
    )

    def __init__(
        self,
        executor: ParallelAgentExecutor,
        policy: HedgePolicy,
        agent: Agent,
        request: AgentRequest,
        inputs: Mapping[str, Any],
        limiter: FifoLimiter,
        clock: _HedgeClock | _SharedClock,
    ) -> None:
        self._executor = executor
        self._policy = policy
        self._agent = agent
        self._request = request
        self._inputs = inputs
        self._limiter = limiter
        self._clock = clock
        # the hedge runs in this (the request's) context, whichever task sends it
        self._context = contextvars.copy_context()
        self._scopes: dict[int, anyio.CancelScope] = {}
        self._winner = 0  # the attempt whose answer is the response (0: none yet)
        self._owner = 0  # the attempt whose text streams (the first to write; 0: none)
        self._over = False  # decided or abandoned: no hedge may start any more
        self.output: Any = None
        self.error: Exception | None = None  # the first attempt error, unless one won
        self.attempts = 1
        self.hedged = False
        self.hedge_won = False
        self.hedge_running = False
        self._hedge_ended: anyio.Event | None = None  # made when the hedge is sent

    async def run(self, delay: float) -> None:
        """Run attempt 1 (its token already held) with a hedge due after ``delay``;
        return when the request is decided."""
        try:
            # before attempt 1 starts: a hedge due in the instant it writes comes first
            await self._clock.schedule(anyio.current_time() + delay, self)
        except BaseException:
            self._limiter.release()  # attempt 1 never started: its token back
            raise
        if await self._attempt(1, self._request) is _FAILED:
            await self.hedge_stopped()  # attempt 1 failed or lost: the hedge decides

    async def hedge_stopped(self) -> None:
        """Return once no hedge is running (at once if none was sent)."""
        if self.hedge_running:
            assert self._hedge_ended is not None
            await self._hedge_ended.wait()

    @property
    def over(self) -> bool:
        """Decided or abandoned: no hedge may start any more."""
        return self._over

    def stop(self) -> None:
        """The request is over (decided, timed out or cancelled): no hedge starts any
        more, and a hedge still running is cancelled."""
        self._over = True
        if self.hedge_running:
            self._scopes[2].cancel()
        self._clock.withdraw(self)

    def due(self) -> None:
        """The hedge delay passed: send the hedge unless the request is over, a piece
        was written, no token is free or the budget is spent."""
        if self._over or self._owner or not self._limiter.try_acquire():
            return
        if not self._policy.try_spend():
            self._limiter.release()
            return
        self._executor._attempts += 1
        self.attempts = 2
        self.hedged = True
        self.hedge_running = True
        self._hedge_ended = anyio.Event()
        self._scopes[2] = anyio.CancelScope()  # now: a piece of attempt 1 may cancel it
        request = self._request
        hedge = attrs.evolve(request, context={**request.context, "attempt": 2})
        self._clock.tasks.start_soon(self._run_hedge, hedge)

    async def _run_hedge(self, request: AgentRequest) -> None:
        for var, value in self._context.items():  # as if the request's task started it
            var.set(value)
        try:
            await self._attempt(2, request)
        finally:
            self.hedge_running = False
            assert self._hedge_ended is not None
            self._hedge_ended.set()

    async def _attempt(self, number: int, request: AgentRequest) -> Any:
        """Run one attempt (its token held); its output if it won, else ``_FAILED``."""
        scope = self._scopes.get(number)
        if scope is None:
            scope = self._scopes[number] = anyio.CancelScope()
        if request.on_delta is not None:
            request = attrs.evolve(request, on_delta=self._gate(number, request.on_delta))
        output: Any = _FAILED
        try:
            with scope:
                try:
                    output = await self._agent.run(request, self._inputs)
                except Exception as exc:
                    if self.error is None:
                        self.error = exc
                    output = _FAILED
        finally:
            self._limiter.release()
        lost_stream = self._owner not in (0, number)
        if output is _FAILED or scope.cancelled_caught or lost_stream or self._winner:
            return _FAILED  # failed, cancelled, or lost the stream or a photo finish
        self._winner = number
        self._over = True
        self.output, self.error = output, None
        self.hedge_won = number > 1
        for other, other_scope in self._scopes.items():
            if other != number:
                other_scope.cancel()
        return output

    def _gate(self, number: int, sink: Callable[[str], None]) -> Callable[[str], None]:
        """``sink`` for attempt ``number``: its pieces pass only if it owns the stream;
        the first non-empty piece of any attempt claims it and cancels the other."""

        def emit(piece: str) -> None:
            if not piece:
                return  # an empty piece claims nothing
            if not self._owner:
                self._owner = number
                for other, other_scope in self._scopes.items():
                    if other != number:
                        other_scope.cancel()
            if self._owner == number:
                sink(piece)

        return emit


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
