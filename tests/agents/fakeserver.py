"""A real HTTP/1.1 server on 127.0.0.1 that plays an LLM API, for the HTTP agent tests.

Each incoming request takes the next scripted :class:`Reply` (``ok`` once the script
is empty) and is recorded (path, lower-cased headers, JSON body). Replies can answer
in the OpenAI or Anthropic shape (chosen by path), return any status and headers, drop
the connection mid-body, send malformed JSON, or hold the request until the client
disconnects (``hold``, before the headers; ``stall``, after half the body). Every
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

OPENAI_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "fake-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "The altar is trapped."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49},
}
ANTHROPIC_ANSWER = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "fake-claude",
    "content": [
        {"type": "text", "text": "The altar "},
        {"type": "text", "text": "is trapped."},
    ],
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 40, "output_tokens": 6},
}


@attrs.frozen
class Reply:
    """What the server does with one request.

    kind: ``ok`` (answer in the path's API shape), ``raw`` (status/headers/body as
    given), ``drop`` (promise a body, send part of it, close), ``hold`` (send nothing
    until the client disconnects), ``stall`` (send headers and half a body, then wait),
    ``chunked`` (200 with ``body`` in chunked encoding).
    """

    kind: str = "ok"
    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


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
        if reply.kind == "ok":
            answer = ANTHROPIC_ANSWER if self.path.endswith("/messages") else OPENAI_ANSWER
            self._send(200, (), json.dumps(answer).encode())
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
        elif reply.kind == "drop":
            self._head(200, (("content-type", "application/json"),), 1000)
            self.wfile.write(b'{"choices": [')
            self.wfile.flush()
            self.close_connection = True
        elif reply.kind == "hold":
            self._wait_for_disconnect()
        elif reply.kind == "stall":
            self._head(200, (("content-type", "application/json"),), 1000)
            self.wfile.write(b'{"choices": [')
            self.wfile.flush()
            self._wait_for_disconnect()
        else:  # pragma: no cover - a typo in a test
            raise ValueError(reply.kind)

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

    def _wait_for_disconnect(self) -> None:
        """Block until the client closes the connection (or the server stops)."""
        self.close_connection = True
        conn = self.connection
        while not self.server.fake.stopping.is_set():
            readable, _, _ = select.select([conn], [], [], 0.05)
            if not readable:
                continue
            try:
                data = conn.recv(1024)
            except OSError:
                data = b""
            if not data:
                self.server.fake.disconnected.set()
                return


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
    stopping: threading.Event = attrs.field(factory=threading.Event)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
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
