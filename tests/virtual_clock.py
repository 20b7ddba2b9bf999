"""A virtual clock for asyncio: the equivalent of trio's ``MockClock(autojump_threshold=0)``.

``VirtualTimeLoop`` is an ``asyncio.SelectorEventLoop`` whose ``time()`` is virtual (it starts at
0 and moves only by jumps) and whose selector, whenever the loop would block waiting for a timer
(no ready callbacks, no I/O ready), does not sleep: it moves the clock straight to the earliest
timer's deadline, so that timer fires at exactly its virtual time. A 1000 s ``anyio.sleep`` takes
no real time and advances ``anyio.current_time()`` by exactly 1000.

How: asyncio's ``_run_once`` computes ``timeout = earliest_timer - time()`` and calls
``selector.select(timeout)``. The selector below first polls the file descriptors (``select(0)``);
if nothing is ready and the loop asked to wait for a timer, it sets the virtual time to that
timer's deadline (``loop._scheduled[0]``, never a cancelled handle at that point: ``_run_once``
drops those first) and returns no events, and the loop runs the timer. With no timer at all
(``timeout is None``) it blocks for real, as asyncio does: only I/O or another thread can wake it.

Caveat, the same as trio's MockClock with ``autojump_threshold=0``: the clock jumps as soon as the
loop has nothing ready, even if a worker thread (``anyio.to_thread``, ``run_in_executor``), a
subprocess or a real socket (a PostgreSQL/Redis/llama.cpp server) is about to answer. A timeout
around such a wait would fire at once. Only pure-loop tests should use it: in the suite, mark them
``@pytest.mark.virtual_clock`` (see ``tests/conftest.py``), and set options such as
``write_in_thread=False`` / ``query_in_thread=False`` as the trio tests do.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import trio.testing

__all__ = ["VirtualTimeLoop", "run_virtual"]

T = TypeVar("T")


class _AutojumpSelector(selectors.DefaultSelector):
    """A selector that, instead of sleeping until a timer, jumps the loop's virtual clock."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:  # no timer: wait for I/O (or another thread) for real
            return list(super().select(None))
        events = list(super().select(0))
        if events or timeout <= 0:
            return events
        self._loop._jump(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time that jumps to the next timer whenever it would block."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(selector=_AutojumpSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def _jump(self, timeout: float) -> None:
        """Move the clock to the earliest timer (exactly its deadline, no float drift)."""
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled", [])
        target = scheduled[0].when() if scheduled else self._virtual_now + timeout
        self._virtual_now = max(self._virtual_now, target)


def run_virtual(backend: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(fn, *args)`` on ``backend`` ("trio" or "asyncio") with a fresh virtual clock
    starting at 0: trio's ``MockClock(autojump_threshold=0)`` or a ``VirtualTimeLoop``."""
    if backend == "trio":
        options: dict[str, Any] = {"clock": trio.testing.MockClock(autojump_threshold=0)}
    else:
        options = {"loop_factory": VirtualTimeLoop}
    return anyio.run(fn, *args, backend=backend, backend_options=options)
