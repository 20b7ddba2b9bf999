"""Decoding the streamed answers of the HTTP agents, one Server-Sent Event at a time.

:mod:`httpx_sse` does the event framing; the decoders here turn each event's data into
pieces of the answer, the usage figures and the stop reason. They are pure (no I/O), so
one decoder serves exactly one streamed response.

- OpenAI-compatible servers send ``data: {chunk}`` events: ``choices[0].delta.content``
  carries the text, ``choices[0].finish_reason`` the stop reason, a last chunk (with
  ``stream_options.include_usage``) the ``usage``, and ``data: [DONE]`` ends the stream.
- Anthropic sends typed events: ``message_start`` (model, input usage),
  ``content_block_start``/``content_block_delta`` (``text_delta`` text or, for tool use,
  ``input_json_delta`` pieces of the tool's JSON input), ``message_delta`` (stop reason,
  output usage), ``message_stop``; ``ping`` and unknown types are ignored.

An ``error`` in the stream or event data that is not JSON raises :class:`StreamError`.
A stream is :attr:`~StreamDecoder.complete` once its end marker (``[DONE]``,
``message_stop``) or a stop reason was seen; one that ends before is cut short.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import anyio
import attrs
import httpx
from httpx_sse import EventSource, ServerSentEvent

from ..errors import AgentError
from .base import DeltaSink

__all__ = [
    "AnthropicStream",
    "OpenAIStream",
    "StreamCutShort",
    "StreamDecoder",
    "StreamError",
    "add_usage",
    "read_events",
]

_USAGE_KEYS = ("input_tokens", "cached_tokens", "output_tokens")


class StreamError(AgentError):
    """The stream carried an error event or data that cannot be decoded."""


class StreamCutShort(Exception):
    """The stream ended cleanly but before its end marker (as good as a dropped one)."""


def add_usage(a: Mapping[str, int | None], b: Mapping[str, int | None]) -> dict[str, int | None]:
    """Usage of two calls: per key the sum of the figures reported, None if neither was."""
    return {
        k: None if a[k] is None and b[k] is None else (a[k] or 0) + (b[k] or 0) for k in _USAGE_KEYS
    }


def _opt_int(data: Any, key: str) -> int | None:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


def _error_message(error: Any) -> str:
    if isinstance(error, Mapping):
        message = error.get("message")
        kind = error.get("type")
        if isinstance(message, str):
            return f"{kind}: {message}" if isinstance(kind, str) else message
    return str(error)


@attrs.define
class StreamDecoder:
    """What one streamed answer said so far: its pieces, model, stop reason and usage.

    :meth:`feed` takes one event and returns the piece of the answer it carried ("" if
    none). ``pieces`` joined is the answer; ``input_tokens`` counts the whole prompt and
    ``cached_tokens`` the part of it served from the server's prompt cache (None where
    the server did not report them).
    """

    pieces: list[str] = attrs.field(factory=list)
    model: str | None = None
    stop_reason: str | None = None
    input_tokens: int | None = None
    cached_tokens: int | None = None
    output_tokens: int | None = None
    ended: bool = False  # the end marker was seen
    first_piece_at: float | None = None  # event-loop time of the first piece

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def complete(self) -> bool:
        return self.ended or self.stop_reason is not None

    def usage(self) -> dict[str, int | None]:
        return {k: getattr(self, k) for k in _USAGE_KEYS}

    def feed(self, event: ServerSentEvent) -> str:
        raise NotImplementedError

    def _json(self, event: ServerSentEvent) -> Any:
        try:
            return json.loads(event.data)
        except ValueError:
            raise StreamError(f"malformed event data: {_snippet(event.data)}") from None

    def _add(self, piece: Any) -> str:
        if isinstance(piece, str) and piece:
            self.pieces.append(piece)
            return piece
        return ""


@attrs.define
class OpenAIStream(StreamDecoder):
    """An OpenAI-compatible ``chat.completion.chunk`` stream."""

    def feed(self, event: ServerSentEvent) -> str:
        if self.ended or not event.data.strip():
            return ""
        if event.data.strip() == "[DONE]":
            self.ended = True
            return ""
        chunk = self._json(event)
        if not isinstance(chunk, Mapping):
            raise StreamError(f"event data is not an object: {_snippet(event.data)}")
        if chunk.get("error") is not None:
            raise StreamError(f"the server reported an error: {_error_message(chunk['error'])}")
        if isinstance(chunk.get("model"), str) and chunk["model"]:
            self.model = chunk["model"]
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self.input_tokens = _opt_int(usage, "prompt_tokens")
            self.output_tokens = _opt_int(usage, "completion_tokens")
            self.cached_tokens = _opt_int(usage.get("prompt_tokens_details"), "cached_tokens")
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
            return ""  # the usage chunk has no choices
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            self.stop_reason = choice["finish_reason"]
        delta = choice.get("delta")
        return self._add(delta.get("content")) if isinstance(delta, Mapping) else ""


@attrs.define
class AnthropicStream(StreamDecoder):
    """An Anthropic Messages stream. With ``tool`` the answer is the tool's JSON input
    (``input_json_delta`` pieces); without, it is the text (``text_delta`` pieces)."""

    tool: bool = False
    cache_creation_tokens: int | None = None
    uncached_input_tokens: int | None = None

    def feed(self, event: ServerSentEvent) -> str:
        if self.ended or not event.data.strip():
            return ""
        data = self._json(event)
        if not isinstance(data, Mapping):
            raise StreamError(f"event data is not an object: {_snippet(event.data)}")
        kind = data.get("type", event.event)
        if kind == "error":
            raise StreamError(f"the server reported an error: {_error_message(data.get('error'))}")
        if kind == "message_start":
            message = data.get("message")
            if isinstance(message, Mapping):
                if isinstance(message.get("model"), str) and message["model"]:
                    self.model = message["model"]
                self._usage(message.get("usage"))
        elif kind == "message_delta":
            delta = data.get("delta")
            if isinstance(delta, Mapping) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
            self._usage(data.get("usage"))
        elif kind == "message_stop":
            self.ended = True
        elif kind == "content_block_start":
            block = data.get("content_block")
            if isinstance(block, Mapping) and block.get("type") == "text" and not self.tool:
                return self._add(block.get("text"))
        elif kind == "content_block_delta":
            delta = data.get("delta")
            if isinstance(delta, Mapping):
                if delta.get("type") == "text_delta" and not self.tool:
                    return self._add(delta.get("text"))
                if delta.get("type") == "input_json_delta" and self.tool:
                    return self._add(delta.get("partial_json"))
        return ""

    def _usage(self, usage: Any) -> None:
        """Counts are cumulative: a later event's figure replaces an earlier one."""
        if not isinstance(usage, Mapping):
            return
        for key, attr in (
            ("input_tokens", "uncached_input_tokens"),
            ("cache_read_input_tokens", "cached_tokens"),
            ("cache_creation_input_tokens", "cache_creation_tokens"),
            ("output_tokens", "output_tokens"),
        ):
            if (value := _opt_int(usage, key)) is not None:
                setattr(self, attr, value)
        if self.uncached_input_tokens is not None:
            self.input_tokens = (
                self.uncached_input_tokens
                + (self.cached_tokens or 0)
                + (self.cache_creation_tokens or 0)
            )


async def read_events(
    response: httpx.Response, decoder: StreamDecoder, on_delta: DeltaSink | None, limit: int
) -> None:
    """Feed every event of ``response`` to ``decoder``, passing each piece of the answer
    to ``on_delta`` (when set) as soon as it is decoded.

    To stop early (an error event, bad data, more than ``limit`` characters of event
    data, ``on_delta`` raising) the loop cancels its own scope rather than leaving the
    ``async for``: the cancellation lands inside httpx's async generators, which then
    finish by exception (trio warns about abandoned ones), and the unread response
    makes httpx close the connection. The failure is raised once the scope has exited.

    Raises:
        StreamError: an error event, undecodable data, or too much data.
        StreamCutShort: the stream ended before its end marker and stop reason.
    """
    failure: Exception | None = None
    size = 0
    with anyio.CancelScope() as stop:
        async for event in EventSource(response).aiter_sse():
            if failure is not None:
                continue
            try:
                size += len(event.data)
                if size > limit:
                    raise StreamError(f"response larger than {limit} bytes of event data")
                piece = decoder.feed(event)
                if piece and decoder.first_piece_at is None:
                    decoder.first_piece_at = anyio.current_time()
                if piece and on_delta is not None:
                    on_delta(piece)
            except Exception as exc:
                failure = exc
                stop.cancel()
    if failure is not None:
        raise failure
    if not decoder.complete:
        raise StreamCutShort(f"stream ended early (after {len(decoder.text)} characters)")
