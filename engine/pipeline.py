"""The player action: classify → prefetch → contexts → agent DAG → state update.

:class:`DungeonMaster` is what ``open_engine`` yields. ``player_action`` is the hot
path; every step is traced under one ``player_action`` root span, so the result
carries the action's span tree. Guarantees:

* actions of one session run one at a time (a per-session lock, FIFO, and on a store
  shared by several engine processes the session's lease in the store, so processes
  never interleave a session's actions); different sessions run concurrently and share
  the agents, the cache and the limiter;
* the action returns within ``action_deadline_seconds`` (plus the state update):
  an agent that times out or fails costs its own part only, and the result says in
  one plain line per missing part what the player is not getting;
* the state update is one transaction; an action whose text is rejected writes
  nothing;
* the narrative streams: the agents configured with ``narrates = true`` write it in
  their order in the action's agent list (a later part's pieces wait until the earlier
  parts are done); ``stream_action`` hands the pieces to the player as they are
  written, and their concatenation is ``ActionResult.narrative``. The time from the
  start of the action to its first piece is the ``first_token`` operation.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, final

import anyio
import attrs

from .agents.base import Agent, AgentRequest, AgentResponse, DeltaSink, Status
from .classify import classify_action
from .config import Config
from .content.cache import ModuleCache
from .content.context import ContextResult, OptimizedContextBuilder
from .content.lazy import LazyLoadManager
from .errors import LoadError, SessionError
from .observability.metrics import MetricsExporter
from .observability.profiler import PerformanceProfiler, Span
from .scheduling.executor import ParallelAgentExecutor
from .state import AnySessionStore
from .state.records import check_text
from .streaming import ActionStream, Narrative

__all__ = ["ActionResult", "ActionStream", "DungeonMaster", "TracedAgent"]

#: What the player is told when an agent's part is missing, by agent.
_MISSING = {
    "narrator": "The narrator could not finish this turn; here is what the others found.",
    "narrator_opening": "The scene-setting lines are missing this turn: the narrator {why}.",
    "arbiter": "No rules ruling this turn: the rules arbiter {why}.",
    "archivist": "No lore lookup this turn: the archivist {why}.",
    "module_keeper": "The scene was not updated this turn: the module keeper {why}.",
}
_WHY = {
    Status.TIMEOUT: "did not answer in time",
    Status.ERROR: "ran into an error",
    Status.SKIPPED: "was waiting on an agent that did not answer",
    Status.CANCELLED: "ran out of time",
}
# Time kept back from the agents for the state update (the state_update p95 target).
_STATE_RESERVE = 0.3


@attrs.frozen
class ActionResult:
    """The outcome of one player action.

    ``responses`` maps agent name → response (every agent of the action type);
    ``missing`` holds one user-facing line per agent whose part is missing; ``span``
    is the action's root span (its tree: context building, agent queries, state
    update); ``contexts`` maps agent name → the context it was given.
    ``first_token`` is the time from the start of the action to the first piece of
    its narrative; ``tokens`` sums the agents' prompt tokens (``prompt``), the part of
    them the servers had cached (``cached``) and their output (``generated``).
    """

    session_id: str
    turn: int
    text: str
    action_type: str
    narrative: str
    responses: Mapping[str, AgentResponse]
    missing: tuple[str, ...]
    contexts: Mapping[str, ContextResult]
    span: Span
    elapsed: float
    first_token: float | None = None
    tokens: Mapping[str, int] = attrs.field(factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.missing)


@final
@attrs.define(eq=False)
class TracedAgent:
    """Wraps an agent so every call is an ``agent_query`` span (hedges included)."""

    name: str
    inner: Agent
    profiler: PerformanceProfiler
    on_usage: Callable[[str, Mapping[str, Any]], None] | None = None

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        attempt = request.context.get("attempt", 1)
        with self.profiler.trace("agent_query", agent=self.name, attempt=attempt) as span:
            output = await self.inner.run(request, inputs)
            if isinstance(output, Mapping):
                usage = output.get("usage")
                if isinstance(usage, Mapping):
                    span.attributes["usage"] = dict(usage)
                    if self.on_usage is not None:
                        self.on_usage(self.name, usage)
                if "simulated_latency" in output:
                    span.attributes["simulated_latency"] = output["simulated_latency"]
            return output


@final
@attrs.define(eq=False)
class _SessionLocks:
    """One FIFO lock per session, dropped when nobody holds or waits for it."""

    _locks: dict[str, tuple[anyio.Lock, int]] = attrs.field(factory=dict)

    def acquire_ref(self, session_id: str) -> anyio.Lock:
        lock, refs = self._locks.get(session_id, (None, 0))
        if lock is None:
            lock = anyio.Lock(fast_acquire=True)  # uncontended: no trip through the loop
        self._locks[session_id] = (lock, refs + 1)
        return lock

    def release_ref(self, session_id: str) -> None:
        lock, refs = self._locks[session_id]
        if refs == 1:
            del self._locks[session_id]
        else:
            self._locks[session_id] = (lock, refs - 1)

    def __len__(self) -> int:
        return len(self._locks)


@final
@attrs.define(eq=False)
class DungeonMaster:
    """The running engine; get one from :func:`engine.open_engine`."""

    config: Config
    profiler: PerformanceProfiler
    builder: OptimizedContextBuilder
    lazy: LazyLoadManager
    executor: ParallelAgentExecutor
    store: AnySessionStore
    cache: ModuleCache
    metrics: MetricsExporter | None = None
    session_cache_size: int = 10_000
    tasks: anyio.abc.TaskGroup | None = None  # owns streamed actions (set by open_engine)
    _locks: _SessionLocks = attrs.field(factory=_SessionLocks, init=False)
    # turn and state of recently active sessions, so an action needs one store write
    _sessions: OrderedDict[str, tuple[int, dict[str, Any]]] = attrs.field(
        factory=OrderedDict, init=False
    )
    _synopsis: str | None = attrs.field(default=None, init=False)  # read once

    async def player_action(self, session_id: str, text: str) -> ActionResult:
        """Run one player action to the end (see the module docstring).

        Raises:
            SessionError: empty or oversized text, or a bad session id (nothing is
                written).
        """
        self._check_text(text)
        return await self._serialized(session_id, text, None, None)

    @contextlib.asynccontextmanager
    async def stream_action(self, session_id: str, text: str) -> AsyncIterator[ActionStream]:
        """Run one player action and stream its narrative::

            async with dm.stream_action("s1", "I open the reliquary") as stream:
                async for piece in stream:
                    print(piece, end="")
            result = stream.result

        Leaving the block before the narrative is complete (``break``, an error,
        cancellation) cancels the action: its agent calls stop (HTTP streams are
        closed, so servers stop generating) and nothing is recorded; the session is
        exactly as before and its next action works. Once the whole narrative has been
        handed out, the durable state update is allowed to finish (the player has seen
        the turn, so it counts).

        Raises:
            SessionError: as ``player_action`` (before anything runs).
            RuntimeError: the engine was not opened with ``open_engine``.
        """
        self._check_text(text)
        if self.tasks is None:
            raise RuntimeError("stream_action needs an engine opened with open_engine()")
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        stream = ActionStream(receive)
        scope = anyio.CancelScope()
        finished = anyio.Event()
        told: list[bool] = [False]  # the whole narrative has been handed out

        async def run() -> None:
            try:
                with scope, send:
                    stream._result = await self._serialized(
                        session_id, text, send.send_nowait, told
                    )
            except Exception as exc:  # goes to the reader, never into the engine's nursery
                stream._error = exc
            finally:
                finished.set()

        self.tasks.start_soon(run)
        try:
            yield stream
        finally:
            if not finished.is_set():
                if not told[0]:
                    scope.cancel()
                with anyio.CancelScope(shield=True):
                    await finished.wait()
            receive.close()

    async def _serialized(
        self, session_id: str, text: str, sink: DeltaSink | None, told: list[bool] | None
    ) -> ActionResult:
        """Run the action under its session's lock (FIFO in this process) and, on a
        store shared by several processes, the session's lease in the store."""
        lock = self._locks.acquire_ref(session_id)
        try:
            async with lock, self.store.session_lease(session_id):
                try:
                    return await self._run(session_id, text, sink, told)
                except BaseException:
                    # whatever happened, the next action rereads the store
                    self._sessions.pop(session_id, None)
                    raise
        finally:
            self._locks.release_ref(session_id)

    async def _session(self, session_id: str) -> tuple[int, dict[str, Any]]:
        """The session's turn and state: from memory when recently active (this
        engine serializes a session's actions, so its copy is current), else read
        in the store. A store shared with other processes is always read: another
        process may have played the session since. A session the store does not
        have is at turn 0: its first action's record creates it, in the same
        transaction."""
        cached = None if self.store.shared else self._sessions.get(session_id)
        if cached is not None:
            self._sessions.move_to_end(session_id)
            return cached
        state = await self.store.find_session(session_id)
        if state is None:
            return self._remember(session_id, 0, {})
        return self._remember(session_id, state.turn, dict(state.state))

    def _remember(
        self, session_id: str, turn: int, state: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        self._sessions[session_id] = entry = (turn, state)
        self._sessions.move_to_end(session_id)
        while len(self._sessions) > self.session_cache_size:
            self._sessions.popitem(last=False)
        return entry

    def _check_text(self, text: str) -> None:
        """Reject, before anything is spent, text the action cannot use or store."""
        limit = self.config.state.max_action_chars
        if not isinstance(text, str):
            raise SessionError(f"the action text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise SessionError("the action text is empty: say what your character does")
        if len(text) > limit:
            raise SessionError(
                f"the action text has {len(text)} characters; the limit is {limit} "
                "([state] max_action_chars)"
            )
        try:
            check_text("it", text)  # what no store can keep: refuse it now
        except SessionError as exc:
            raise SessionError(f"the action text cannot be stored: {exc}") from None

    async def _run(
        self, session_id: str, text: str, sink: DeltaSink | None, told: list[bool] | None
    ) -> ActionResult:
        config = self.config
        deadline = config.performance.parallelization.action_deadline_seconds
        started = anyio.current_time()
        first: list[float] = []

        def emit(piece: str) -> None:
            if not first:
                first.append(anyio.current_time() - started)
            if sink is not None:
                sink(piece)

        with self.profiler.trace("player_action", session=session_id) as root:
            with self.profiler.trace("classify"):
                action_type = classify_action(text)
            root.attributes["action_type"] = action_type
            turn_before, state = await self._session(session_id)
            turn = turn_before + 1
            root.attributes["turn"] = turn
            with self.profiler.trace("prefetch", action_type=action_type):
                sections = self.lazy.get_load_priority(action_type)
                if config.performance.lazy_loading.background_load:
                    for section in sections:
                        self.lazy.load_background(section)
            names = config.agents_for(action_type)
            scene = {
                "action": text,
                "action_type": action_type,
                "location": state.get("scene", ""),
                "npcs_present": list(state.get("npcs_present") or ()),
                "session": session_id,
                "module": self.builder.module.name,
                "notes": _notes(state),
                "synopsis": await self._module_synopsis(),
            }
            contexts = await self._contexts(names, scene, started + deadline)
            narrators = [n for n in names if config.agents[n].narrates]
            story = Narrative(len(narrators), emit)
            requests = self._requests(
                names, scene, contexts, f"{session_id}:{turn}", narrators, story
            )
            part_of = {name: i for i, name in enumerate(narrators)}

            def on_response(response: AgentResponse) -> None:
                part = part_of.get(response.agent)
                if part is not None:
                    story.finish(part, _text(response.output) if response.ok else None)

            remaining = started + deadline - _STATE_RESERVE - anyio.current_time()
            responses = await self.executor.execute_parallel(
                requests, deadline=max(remaining, 0.001), on_response=on_response
            )
            by_agent = {r.agent: r for r in responses}
            told_text = story.text
            narrative, missing = _narrate(names, by_agent, narrators, told_text)
            root.attributes["degraded"] = bool(missing)
            changes: dict[str, Any] = {}
            tokens = {"prompt": 0, "cached": 0, "generated": 0}
            for r in responses:
                if r.ok and isinstance(r.output, Mapping):
                    changes.update(r.output.get("state_changes") or {})
                    _add_usage(tokens, r.output.get("usage"))
            root.attributes["tokens"] = tokens
            if tail := narrative[len(told_text) :]:
                emit(tail)  # the whole narrative is handed out before the durable write
            if told is not None:
                told[0] = True
            with self.profiler.trace("state_update", session=session_id):
                turn = await self.store.record_action(
                    session_id,
                    turn_expected=turn_before,
                    action_text=text,
                    action_type=action_type,
                    narrative=narrative,
                    state_changes=changes,
                    responses={r.agent: _summary(r) for r in responses},
                )
            new_state = {k: v for k, v in {**state, **changes}.items() if v is not None}
            self._remember(session_id, turn, new_state)
            if first:
                root.attributes["first_token"] = first[0]
                self.profiler.record("first_token", first[0])
        return ActionResult(
            session_id=session_id,
            turn=turn,
            text=text,
            action_type=action_type,
            narrative=narrative,
            responses=by_agent,
            missing=missing,
            contexts=contexts,
            span=root,
            elapsed=anyio.current_time() - started,
            first_token=first[0] if first else None,
            tokens=tokens,
        )

    async def _module_synopsis(self) -> str:
        """The module's opening passages (its first section, in order) that fit in
        ``[performance.prompts] synopsis_tokens``: the same text for every prompt of
        every session, so it stays in a server's prompt cache. Read once; when the
        section fails to load, this action goes without and the next one tries again."""
        limit = self.config.performance.prompts.synopsis_tokens
        if limit == 0:
            return ""
        if self._synopsis is None:
            sections = self.lazy.module.section_names()
            try:
                loaded = await self.lazy.ensure_loaded(*sections[:1])
            except LoadError:
                return ""
            first = loaded[sections[0]] if sections else ()
            parts: list[str] = []
            used = 0
            for chunk in first:
                if used + chunk.tokens > limit:
                    break
                parts.append(chunk.text)
                used += chunk.tokens
            self._synopsis = "\n\n".join(parts)
        return self._synopsis

    async def _contexts(
        self, names: Sequence[str], scene: Mapping[str, Any], deadline_at: float
    ) -> dict[str, ContextResult]:
        """One context per agent, within its token budget; the candidates are ranked
        once for all of them. Contexts not ready by the deadline are left out (the
        agents still run, without module context)."""
        budgets = {name: self.config.agents[name].budget_tokens for name in names}
        request = AgentRequest(id="context", agent="context", context=scene)
        contexts: dict[str, ContextResult] = {}
        with self.profiler.trace("context_building", agents=len(budgets)) as span:
            with anyio.move_on_after(max(deadline_at - anyio.current_time(), 0.0)):
                contexts = await self.builder.build_contexts(request, budgets)
            span.attributes["tokens"] = {n: c.tokens for n, c in contexts.items()}
        return contexts

    def _requests(
        self,
        names: Sequence[str],
        scene: Mapping[str, Any],
        contexts: Mapping[str, ContextResult],
        draw_key: str,
        narrators: Sequence[str],
        story: Narrative,
    ) -> list[AgentRequest]:
        chosen = set(names)
        catalogue = self.builder.module.catalogue
        dice_key = f"{self.config.simulation.seed}|{draw_key}"
        requests = []
        for name in names:
            agent = self.config.agents[name]
            ctx = contexts.get(name)
            ids = [cid for cid, _ in ctx.sources] if ctx else []
            part = narrators.index(name) if name in narrators else None
            requests.append(
                AgentRequest(
                    id=name,
                    agent=name,
                    context={
                        **scene,
                        "text": ctx.text if ctx else "",
                        "sources": ids,
                        "titles": [catalogue[cid].title for cid in ids],
                        "sections": [catalogue[cid].section for cid in ids],
                        "draw_key": draw_key,
                        "dice_key": dice_key,
                        "continues": bool(part),
                    },
                    depends_on=tuple(d for d in agent.depends_on if d in chosen),
                    timeout=agent.timeout_seconds,
                    on_delta=story.sink(part) if part is not None else None,
                )
            )
        return requests


def _notes(state: Mapping[str, Any]) -> str:
    """The session notes of the prompts: the scene and who is present (they change only
    when the scene does, so they stay in a server's prompt cache across turns)."""
    parts = []
    if scene := state.get("scene"):
        parts.append(f"The party is at {scene}.")
    present = state.get("npcs_present")
    if isinstance(present, list) and present:
        parts.append(f"Present: {', '.join(str(p) for p in present)}.")
    return " ".join(parts)


def _add_usage(tokens: dict[str, int], usage: Any) -> None:
    if not isinstance(usage, Mapping):
        return
    for key, field in (("prompt", "input_tokens"), ("cached", "cached_tokens")):
        value = usage.get(field)
        if isinstance(value, int):
            tokens[key] += value
    value = usage.get("output_tokens")
    if isinstance(value, int):
        tokens["generated"] += value


def _narrate(
    names: Sequence[str],
    responses: Mapping[str, AgentResponse],
    narrators: Sequence[str],
    told: str,
) -> tuple[str, tuple[str, ...]]:
    """The narrative and the user-facing lines for every missing part.

    With narrating agents, the narrative begins with what they told (``told``);
    without any (or when they told nothing), it is the last agent's text, else what
    the others said. The missing-part lines come last.
    """
    missing: list[str] = []
    for name in names:
        r = responses[name]
        if not r.ok:
            template = _MISSING.get(name, f"The {name} {{why}}; its part is missing.")
            missing.append(template.format(why=_WHY.get(r.status, "failed")))
    narrative = told
    if not narrators:
        final = responses.get(names[-1]) if names else None
        if final is not None and final.ok:
            narrative = _text(final.output)
    if not narrative or any(not responses[n].ok for n in narrators):
        # a narrating part is missing: tell what the other agents found
        parts = [narrative] if narrative else []
        parts.extend(
            _text(responses[n].output) for n in names if responses[n].ok and n not in narrators
        )
        narrative = " ".join(p for p in parts if p)
    if missing:
        narrative = (narrative + "\n\n" if narrative else "") + " ".join(f"({m})" for m in missing)
    return narrative, tuple(missing)


def _text(output: Any) -> str:
    if isinstance(output, Mapping):
        return str(output.get("text", ""))
    return "" if output is None else str(output)


def _summary(response: AgentResponse) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "status": response.status.value,
        "text": _text(response.output) if response.ok else None,
        "error": response.error,
        "queued": response.queued,
        "duration": response.duration,
        "attempts": response.attempts,
        "hedged": response.hedged,
    }
    if response.ok and isinstance(response.output, Mapping):
        structured = response.output.get("structured")
        if isinstance(structured, Mapping):
            summary["structured"] = dict(structured)  # the ruling and its dice roll
    return summary
