"""What an agent is, what it is asked and what it answers."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

__all__ = ["Agent", "AgentRequest", "AgentResponse", "Status"]


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
    """

    id: str
    agent: str
    context: Mapping[str, Any] = attrs.field(factory=dict)
    depends_on: tuple[str, ...] = attrs.field(default=(), converter=_ids)
    timeout: float | None = None  # None: the executor's agent_timeout


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


@runtime_checkable
class Agent(Protocol):
    """Anything with ``async def run(request, inputs) -> output``.

    ``inputs`` maps each dependency's request id to its output. Agents are stateless
    per call: one object may serve many requests concurrently.
    """

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any: ...
