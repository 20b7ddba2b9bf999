"""A real HTTP/1.1 server on 127.0.0.1 that plays an LLM API, for the HTTP agent tests.

Each incoming request takes the next scripted :class:`Reply` (``ok`` once the script
is empty) and is recorded (path, lower-cased headers, JSON body). Replies can stream
Server-Sent Events in the OpenAI or Anthropic shape (``ok`` picks the shape by path;
:func:`openai_stream` and :func:`anthropic_stream` script any answer), return any
status and headers, drop the connection mid-stream, send malformed data, or hold the
request until the client disconnects (``hold``, before the headers; ``hold_after``,
mid-stream, until the client disconnects or the test sets ``release``). Every
disconnect seen while holding sets ``disconnected``.
"""

from __future__ import annotations

import collections
import http.server
import json
import select
import socketserver
import threading
from typing import Any

import attrs

#: What the default streamed answers say and report.
TEXT_PIECES = ("The altar ", "is trapped.")
OPENAI_USAGE = {
    "prompt_tokens": 42,
    "completion_tokens": 7,
    "total_tokens": 49,
    "prompt_tokens_details": {"cached_tokens": 32},
}
ANTHROPIC_USAGE = {
    "input_tokens": 10,
    "cache_read_input_tokens": 30,
    "cache_creation_input_tokens": 2,
    "output_tokens": 1,
}


def event(data: Any, name: str = "") -> bytes:
    """One SSE event: ``data`` as JSON (a str is sent as it is), with an event name."""
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {name}\n" if name else "").encode() + f"data: {text}\n\n".encode()


def openai_events(
    *pieces: str,
    finish: str | None = "stop",
    usage: dict[str, Any] | None = OPENAI_USAGE,
    done: bool = True,
    model: str = "fake-model",
) -> tuple[bytes, ...]:
    """A chat.completion.chunk stream: a role chunk, one chunk per piece, the finish
    chunk, a usage chunk and ``[DONE]`` (each optional)."""

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return event(
            {"id": "c1", "object": "chat.completion.chunk", "model": model, "choices": [choice]}
        )

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": p}) for p in pieces]
    if finish is not None:
        events.append(chunk({}, finish))
    if usage is not None:
        events.append(event({"id": "c1", "model": model, "choices": [], "usage": usage}))
    if done:
        events.append(b"data: [DONE]\n\n")
    return tuple(events)


def anthropic_events(
    *pieces: str,
    tool: str | None = None,
    stop: str | None = "end_turn",
    usage: dict[str, Any] | None = ANTHROPIC_USAGE,
    output_tokens: int = 6,
    end: bool = True,
    model: str = "fake-claude",
) -> tuple[bytes, ...]:
    """A Messages stream: message_start, one content block (text, or with ``tool`` a
    tool_use block whose JSON input comes in ``pieces``), a ping, message_delta and
    message_stop (the last two optional)."""
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "usage": usage or {},
    }
    block = (
        {"type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}
        if tool
        else {"type": "text", "text": ""}
    )
    kind, key = ("input_json_delta", "partial_json") if tool else ("text_delta", "text")
    events = [
        event({"type": "message_start", "message": message}, "message_start"),
        event(
            {"type": "content_block_start", "index": 0, "content_block": block},
            "content_block_start",
        ),
        event({"type": "ping"}, "ping"),
    ]
    events += [
        event(
            {"type": "content_block_delta", "index": 0, "delta": {"type": kind, key: p}},
            "content_block_delta",
        )
        for p in pieces
    ]
    events.append(event({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    if stop is not None:
        events.append(
            event(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop},
                    "usage": {"output_tokens": output_tokens},
                },
                "message_delta",
            )
        )
    if end:
        events.append(event({"type": "message_stop"}, "message_stop"))
    return tuple(events)


@attrs.frozen
class Reply:
    """What the server does with one request.

    kind: ``ok`` (stream the default answer in the path's API shape), ``sse`` (stream
    ``events``), ``raw`` (status/headers/body as given), ``drop`` (stream the first
    event of the default answer, then close), ``hold`` (send nothing until the client
    disconnects), ``chunked`` (200 with ``body`` in chunked encoding).

    For ``sse``: ``drop_after`` closes the connection (mid chunked body) after that many
    events; ``hold_after`` waits after that many events until the client disconnects
    (then stops) or the test sets ``FakeLLMServer.release`` (then goes on).
    """

    kind: str = "ok"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    events: tuple[bytes, ...] = ()
    drop_after: int | None = None
    hold_after: int | None = None


def openai_stream(
    *pieces: str, drop_after: int | None = None, hold_after: int | None = None, **kw: Any
) -> Reply:
    return Reply(
        "sse", events=openai_events(*pieces, **kw), drop_after=drop_after, hold_after=hold_after
    )


def anthropic_stream(
    *pieces: str, drop_after: int | None = None, hold_after: int | None = None, **kw: Any
) -> Reply:
    return Reply(
        "sse", events=anthropic_events(*pieces, **kw), drop_after=drop_after, hold_after=hold_after
    )


@attrs.frozen
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls between head and body
    timeout = 10  # an idle keep-alive connection never blocks shutdown for long
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("content-length", "0")))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        reply = fake.record(
            Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        anthropic = self.path.endswith("/messages")
        default = anthropic_events(*TEXT_PIECES) if anthropic else openai_events(*TEXT_PIECES)
        if reply.kind == "ok":
            self._stream(default, None, None)
        elif reply.kind == "sse":
            self._stream(reply.events, reply.drop_after, reply.hold_after)
        elif reply.kind == "drop":
            self._stream(default, 1, None)
        elif reply.kind == "raw":
            self._send(reply.status, reply.headers, reply.body)
        elif reply.kind == "chunked":  # no content-length; the body in 50-byte chunks
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(0, len(reply.body), 50):
                part = reply.body[i : i + 50]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        elif reply.kind == "hold":
            self._wait_for_disconnect(released=False)
        else:  # pragma: no cover - a typo in a test
            raise ValueError(reply.kind)

    def _stream(
        self, events: tuple[bytes, ...], drop_after: int | None, hold_after: int | None
    ) -> None:
        """``events`` as an event stream in chunked encoding, one chunk per event."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        for i, data in enumerate((*events, None)):
            if i == hold_after and not self._wait_for_disconnect(released=True):
                return
            if i == drop_after:  # no terminating chunk: the body is cut off
                self.close_connection = True
                return
            if data is not None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _head(self, status: int, headers: tuple[tuple[str, str], ...], length: int) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(length))
        self.end_headers()

    def _send(self, status: int, headers: tuple[tuple[str, str], ...], body: bytes) -> None:
        if not any(name.lower() == "content-type" for name, _ in headers):
            headers = (*headers, ("content-type", "application/json"))
        self._head(status, headers, len(body))
        self.wfile.write(body)
        self.wfile.flush()

    def _wait_for_disconnect(self, *, released: bool) -> bool:
        """Block until the client closes the connection (False) or, with ``released``,
        until the test sets ``release`` (True); False when the server stops."""
        fake = self.server.fake
        conn = self.connection
        while not fake.stopping.is_set():
            if released and fake.release.is_set():
                return True
            readable, _, _ = select.select([conn], [], [], 0.05)
            if not readable:
                continue
            try:
                data = conn.recv(1024)
            except OSError:
                data = b""
            if not data:
                self.close_connection = True
                fake.disconnected.set()
                return False
        self.close_connection = True
        return False


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeLLMServer


@attrs.define(eq=False)
class FakeLLMServer:
    """The server; ``start()`` binds 127.0.0.1 port 0, ``close()`` stops every thread."""

    script: collections.deque[Reply] = attrs.field(factory=collections.deque)
    requests: list[Recorded] = attrs.field(factory=list)
    disconnected: threading.Event = attrs.field(factory=threading.Event)
    release: threading.Event = attrs.field(factory=threading.Event)
    stopping: threading.Event = attrs.field(factory=threading.Event)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)
        return f"http://{host}:{port}"

    def push(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def record(self, request: Recorded) -> Reply:
        with self._lock:
            self.requests.append(request)
            return self.script.popleft() if self.script else Reply()

    @property
    def attempts(self) -> int:
        with self._lock:
            return len(self.requests)

    def start(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
