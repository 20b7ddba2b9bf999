"""Limits around agent calls: per server, and global across processes.

A server has a capacity of its own: llama.cpp's Python server runs one request at a
time and keeps one prompt in its cache. :class:`ServerLimitedAgent` makes every call
of the agents that share a server hold one token of that server's
``CapacityLimiter`` (FIFO), inside the engine-wide limit and inside the call's
deadline (time spent queueing counts against it, as the executor's queue does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol, final

import anyio
import attrs

from ..agents.base import Agent, AgentRequest

__all__ = ["GloballyLimitedAgent", "ServerLimitedAgent"]


@final
@attrs.define(eq=False)
class ServerLimitedAgent:
    """Runs ``inner`` while holding a token of ``limiter`` (shared per server)."""

    inner: Agent
    limiter: anyio.CapacityLimiter

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        async with self.limiter:
            return await self.inner.run(request, inputs)


class _GlobalLimiter(Protocol):
    def slot(self, tokens: int = 0) -> contextlib.AbstractAsyncContextManager[Any]: ...


@final
@attrs.define(eq=False)
class GloballyLimitedAgent:
    """Runs ``inner`` inside one slot of a limiter shared by every engine process
    (:class:`~engine.scheduling.global_limits.RedisLimiter`), counting ``tokens`` (the
    agent's context budget plus its output cap) against the tokens-per-minute rate.
    The wait counts against the call's deadline like any other queue."""

    inner: Agent
    limiter: _GlobalLimiter
    tokens: int = 0

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        async with self.limiter.slot(self.tokens):
            return await self.inner.run(request, inputs)
