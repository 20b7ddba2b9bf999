"""What an agent is, what it is asked and what it answers."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, TypedDict, runtime_checkable

import attrs

__all__ = ["Agent", "AgentOutput", "AgentRequest", "AgentResponse", "DeltaSink", "Status", "Usage"]

#: Receives the pieces of an agent's text as they are written, in order.
DeltaSink = Callable[[str], None]


class Status(enum.Enum):
    """How an agent request ended."""

    OK = "ok"
    TIMEOUT = "timeout"  # its deadline passed (queue time included)
    ERROR = "error"  # the agent raised
    SKIPPED = "skipped"  # a dependency did not succeed, so it never ran
    CANCELLED = "cancelled"  # the whole execution was cancelled or hit its deadline


def _ids(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):  # a lone id, not its characters
        return (value,)
    return tuple(value)


@attrs.frozen(eq=False)
class AgentRequest:
    """One call of one agent inside an action's DAG.

    Requests are identified by ``id``; two requests with equal fields but different
    ids are independent. ``context["action"]`` carries the player's text.

    ``on_delta``, when set, asks the agent to stream: a streaming agent calls it with
    each piece of its ``text`` as it is written, in order, so that the pieces joined
    equal the final ``text``. An agent that cannot stream may ignore it (the engine
    then sends the whole text at once when the call returns).
    """

    id: str
    agent: str
    context: Mapping[str, Any] = attrs.field(factory=dict)
    depends_on: tuple[str, ...] = attrs.field(default=(), converter=_ids)
    timeout: float | None = None  # None: the executor's agent_timeout
    on_delta: DeltaSink | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class AgentResponse:
    """The outcome of one request.

    ``queued`` is the time from readiness to admission by the limiter and ``duration``
    the time the agent ran (of the winning attempt when hedged), both in seconds of
    the event loop's clock. ``hedged``: a second attempt was sent; ``hedge_won``: it
    answered first.
    """

    request_id: str
    agent: str
    status: Status
    output: Any = None
    error: str | None = None
    queued: float = 0.0
    duration: float = 0.0
    attempts: int = 0
    hedged: bool = False
    hedge_won: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


class Usage(TypedDict, total=False):
    """Tokens of one call as the server reported them (None where it did not).

    ``cached_tokens`` is the part of ``input_tokens`` the server served from its
    prompt cache (OpenAI ``prompt_tokens_details.cached_tokens``, Anthropic
    ``cache_read_input_tokens``); ``input_tokens`` always counts the whole prompt.
    """

    input_tokens: int | None
    cached_tokens: int | None
    output_tokens: int | None


class AgentOutput(TypedDict, total=False):
    """What the engine reads from an agent's answer (every key optional).

    ``text`` is what the player or a dependent agent reads; ``state_changes`` are
    merged into the session state; ``structured`` is a validated structured answer
    (a ruling or a scene, see :mod:`engine.agents.schemas`); ``usage`` feeds the
    token counters. Agents may add keys of their own.
    """

    text: str
    state_changes: dict[str, Any]
    structured: dict[str, Any]
    usage: Usage
    attempts: int


@runtime_checkable
class Agent(Protocol):
    """Anything with ``async def run(request, inputs) -> output``.

    ``inputs`` maps each dependency's request id to its output, in the order of the
    requests. Agents are stateless per call: one object may serve many requests
    concurrently.
    """

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any: ...
