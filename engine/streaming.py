"""Streaming the narrative: assembling its parts in order, and the player's stream.

:class:`Narrative` joins the pieces that the narrating agents write into one text,
part by part in the order of the action's agent list: the pieces of the part being
told go straight to the player; a later part's pieces wait until the earlier parts
are done. :class:`ActionStream` is what ``DungeonMaster.stream_action`` yields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, final

import anyio
import anyio.abc
import attrs

from .agents.base import DeltaSink

if TYPE_CHECKING:
    from .pipeline import ActionResult

__all__ = ["ActionStream", "Narrative"]


@final
@attrs.define(eq=False)
class Narrative:
    """Assembles the narrative from its streamed parts, in part order.

    Pieces of the part being told go straight to ``emit``; a later part's pieces wait
    in a buffer until every earlier part is done. A part that did not stream gets its
    whole text when it is done. Parts are joined by one space.
    """

    parts: int
    emit: DeltaSink
    _buffers: list[list[str]] = attrs.field(init=False)
    _done: list[bool] = attrs.field(init=False)
    _streamed: list[bool] = attrs.field(init=False)
    _current: int = attrs.field(default=0, init=False)
    _told: list[str] = attrs.field(factory=list, init=False)
    _part_started: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._buffers = [[] for _ in range(self.parts)]
        self._done = [False] * self.parts
        self._streamed = [False] * self.parts

    @property
    def text(self) -> str:
        return "".join(self._told)

    def sink(self, part: int) -> DeltaSink:
        def piece(text: str) -> None:
            if not text or self._done[part]:
                return
            self._streamed[part] = True
            if part == self._current:
                self._forward(text)
            else:
                self._buffers[part].append(text)

        return piece

    def finish(self, part: int, text: str | None) -> None:
        """Part ``part`` is over; ``text`` is its answer (None: it failed)."""
        if self._done[part]:
            return
        if text and not self._streamed[part]:
            self.sink(part)(text)
        self._done[part] = True
        while self._current < self.parts and self._done[self._current]:
            self._current += 1
            self._part_started = False
            if self._current < self.parts:
                for text in self._buffers[self._current]:
                    self._forward(text)
                self._buffers[self._current].clear()

    def _forward(self, text: str) -> None:
        if not self._part_started:
            self._part_started = True
            if self._told:
                text = " " + text.lstrip()
        self._told.append(text)
        self.emit(text)


@final
class ActionStream:
    """The narrative of one action as it is written; see ``DungeonMaster.stream_action``.

    ``async for piece in stream`` yields ``str`` pieces in order and ends when the
    action is done (raising the action's error, if it failed); ``stream.result`` is
    then its :class:`ActionResult`.
    """

    def __init__(self, receive: anyio.abc.ObjectReceiveStream[str]) -> None:
        self._receive = receive
        self._result: ActionResult | None = None
        self._error: BaseException | None = None

    def __aiter__(self) -> ActionStream:
        return self

    async def __anext__(self) -> str:
        # a plain async iterator, not an async generator: a reader that breaks out
        # of ``async for`` leaves nothing unfinished behind
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None

    @property
    def result(self) -> ActionResult:
        """The action's result.

        Raises:
            RuntimeError: the action has not finished (or was cancelled).
            Exception: the action's own error, when it failed.
        """
        if self._error is not None:
            raise self._error
        if self._result is None:
            raise RuntimeError("the action has not finished: read the stream to its end first")
        return self._result
