"""Limits around agent calls: the engine's own, per server, and global across processes.

:class:`FifoLimiter` is the executor's engine-wide limit: at most ``total`` agent
attempts at once, admitted first come, first served. A server has a capacity of its own: llama.cpp's Python server runs one request at a
time and keeps one prompt in its cache. :class:`ServerLimitedAgent` makes every call
of the agents that share a server hold one token of that server's
``CapacityLimiter`` (FIFO), inside the engine-wide limit and inside the call's
deadline (time spent queueing counts against it, as the executor's queue does).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol, final

import anyio
import attrs

from ..agents.base import Agent, AgentRequest

__all__ = ["FifoLimiter", "GloballyLimitedAgent", "ServerLimitedAgent"]


@final
class FifoLimiter:
    """At most ``total`` tokens held at once, granted in the order they were asked for.

    A token given back while someone waits goes straight to the first waiter, so a
    newcomer never overtakes the queue (:meth:`try_acquire` fails while anyone
    waits). Taking a free token and giving one back never yield to the event loop.
    Tokens are counted, not owned: each successful acquire must be paired with one
    :meth:`release`. Waiting uses the running loop's events: one loop per limiter.
    """

    __slots__ = ("_borrowed", "_waiters", "total")

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total}")
        self.total = total
        self._borrowed = 0
        self._waiters: deque[anyio.Event] = deque()

    @property
    def borrowed(self) -> int:
        """Tokens held now."""
        return self._borrowed

    @property
    def waiting(self) -> int:
        """Callers queued in :meth:`acquire`."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a token if one is free and nobody is queued; never blocks."""
        if self._borrowed < self.total and not self._waiters:
            self._borrowed += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a token, queueing (FIFO) until one is free.

        Cancelled while queued, it holds no token: one granted in the same instant
        is passed on to the next waiter.
        """
        if self.try_acquire():
            return
        granted = anyio.Event()  # set by release(), which hands its token over
        self._waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.release()
            else:
                self._waiters.remove(granted)
            raise

    def release(self) -> None:
        """Give a token back: to the first waiter if any, else to the pool."""
        if self._waiters:
            self._waiters.popleft().set()  # the token changes hands; borrowed stays
        elif self._borrowed > 0:
            self._borrowed -= 1
        else:
            raise RuntimeError("release() without a token held")


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
