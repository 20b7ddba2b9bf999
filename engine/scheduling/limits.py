"""Per-server limits: agents sharing one LLM server queue for it.

A server has a capacity of its own: llama.cpp's Python server runs one request at a
time and keeps one prompt in its cache. :class:`ServerLimitedAgent` makes every call
of the agents that share a server hold one token of that server's
``CapacityLimiter`` (FIFO), inside the engine-wide limit and inside the call's
deadline (time spent queueing counts against it, as the executor's queue does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import anyio
import attrs

from ..agents.base import Agent, AgentRequest

__all__ = ["ServerLimitedAgent"]


@final
@attrs.define(eq=False)
class ServerLimitedAgent:
    """Runs ``inner`` while holding a token of ``limiter`` (shared per server)."""

    inner: Agent
    limiter: anyio.CapacityLimiter

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        async with self.limiter:
            return await self.inner.run(request, inputs)
