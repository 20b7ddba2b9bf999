"""LLM agents over HTTP: OpenAI-compatible chat completions and the Anthropic Messages API.

Both agents share one ``httpx.AsyncClient`` (owned by the engine, so connections are
pooled) and one retry loop. Guarantees:

- **Deadlines are cancel scopes.** httpx's own timeouts are switched off per request;
  the enclosing cancel scope (the executor's ``fail_after``) bounds the call. Only when
  the caller set no deadline at all does the agent apply ``timeout`` itself.
- **Cancellation aborts the request.** The response is streamed inside ``async with``;
  a cancelled read or write closes the connection instead of returning it to the pool,
  so the server sees the disconnect.
- **Retries stay inside the deadline.** 408/429/5xx and transport errors are retried
  with jittered exponential backoff, honouring ``Retry-After`` (seconds form). When the
  next wait would end at or past ``anyio.current_effective_deadline()`` the loop stops
  and raises :class:`RetryDeadlineError` at once rather than sleeping into the timeout.
- **The API key stays secret.** It is read once from the environment variable named by
  ``api_key_env``, held in a wrapper whose ``repr`` is ``<secret>``, sent only in the
  auth header and scrubbed from any server text quoted in an error. It never appears in
  logs, reprs, outputs or error messages.
- **Malformed answers are errors.** Non-JSON bodies and missing fields raise
  :class:`~engine.errors.AgentError` naming what is wrong.

The retry loop is our own (about thirty lines) rather than ``stamina``: stamina measures
its time budget on ``time.monotonic`` and knows nothing of anyio's effective deadline, so
it would sleep into the cancel scope instead of stopping before it, and it would not run
on trio's virtual clock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import types
from collections.abc import Mapping
from typing import Any, ClassVar, final

import anyio
import attrs
import httpx

from ..config import AgentConfig
from ..errors import AgentError, ConfigError
from .base import Agent, AgentRequest
from .retry import RetryPolicy, parse_retry_after, retryable

__all__ = [
    "DEFAULT_PROMPTS",
    "AnthropicAgent",
    "HTTPAgentError",
    "OpenAIChatAgent",
    "RetryDeadlineError",
    "RetryPolicy",
    "make_http_agent",
    "parse_retry_after",
]

logger = logging.getLogger(__name__)

#: System prompts of the default agents, used when ``agents.<name>.prompt`` is empty.
DEFAULT_PROMPTS: Mapping[str, str] = types.MappingProxyType(
    {
        "narrator": (
            "You are the narrator of a Dungeons & Dragons 5e adventure. In the second person "
            "and at most two short paragraphs, describe what happens after the player's "
            "action. Follow the rules arbiter's ruling and the module's facts; never decide "
            "for the player."
        ),
        "arbiter": (
            "You are the rules arbiter of a Dungeons & Dragons 5e game. Decide whether the "
            "player's action is possible, which checks, saves or attacks apply (with DCs) "
            "and their mechanical consequences. Answer tersely."
        ),
        "archivist": (
            "You are the archivist of a Dungeons & Dragons campaign. From the context, list "
            "the facts about the party, past events and the world that matter for the "
            "player's action, as terse bullet points."
        ),
        "module_keeper": (
            "You are the keeper of the adventure module. From the module excerpts, state "
            "what the module says about the places, NPCs and encounters relevant to the "
            "player's action. Answer tersely and never invent what the module does not say."
        ),
    }
)
_GENERIC_PROMPT = (
    "You are the {agent} agent of an AI Dungeon Master for a Dungeons & Dragons 5e game. "
    "Answer for the player's action from the context given, tersely."
)
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_NO_HTTPX_TIMEOUT = httpx.Timeout(None)  # deadlines are cancel scopes
# transient transport failures; a misconfigured URL or proxy is not retried
_TRANSIENT = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.TimeoutException)


class HTTPAgentError(AgentError):
    """An HTTP agent gave up: an error status, retries exhausted, or no time left to retry.

    ``status`` is the last HTTP status (None after a transport error) and ``attempts``
    the number of requests sent.
    """

    def __init__(self, message: str, *, status: int | None, attempts: int) -> None:
        self.status = status
        self.attempts = attempts
        super().__init__(message)


class RetryDeadlineError(HTTPAgentError, TimeoutError):
    """The next retry would end past the deadline, so the agent stopped before it.

    A ``TimeoutError`` too, so a caller may report it as a timeout rather than a failure.
    """


@final
class _Secret:
    """A string that never shows itself in ``repr``/``str`` (so not in logs or tracebacks)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__


def _to_secret(value: str | _Secret | None) -> _Secret | None:
    if value is None or isinstance(value, _Secret):
        return value
    return _Secret(value)


def _render(template: str, values: Mapping[str, str]) -> str:
    """Replace ``{name}`` for known names in one pass; other braces stay literal."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _as_text(output: Any) -> str:
    """A dependency's output as prompt text: its ``text`` field, a string, or JSON."""
    if isinstance(output, Mapping) and isinstance(output.get("text"), str):
        return str(output["text"])
    if isinstance(output, str):
        return output
    return json.dumps(output, default=str, ensure_ascii=False)


def _path(data: Any, *keys: str | int) -> Any:
    """``data[k0][k1]…`` or AgentError naming the first missing step."""
    where = ""
    for key in keys:
        where += f"[{key}]" if isinstance(key, int) else (f".{key}" if where else key)
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            raise AgentError(f"missing field {where}") from None
    return data


def _opt_int(data: Any, key: str) -> int | None:
    value = data.get(key) if isinstance(data, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _endpoint(base_url: str, path: str) -> str:
    """``base_url`` + ``/v1/`` + ``path``, accepting a base with or without ``/v1``."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/{path}"


@attrs.define(eq=False, repr=False)
class _HTTPAgent:
    """Shared machinery: prompt building, the retry loop, response decoding.

    Stateless per call: one object serves concurrent requests.
    """

    default_base_url: ClassVar[str]
    default_api_key_env: ClassVar[str]
    api_name: ClassVar[str]
    path: ClassVar[str]

    name: str
    client: httpx.AsyncClient
    model: str
    base_url: str = ""  # empty: the class's default_base_url
    api_key: _Secret | None = attrs.field(default=None, converter=_to_secret)
    max_tokens: int = 400
    prompt: str = ""  # empty: DEFAULT_PROMPTS[name], or a generic one
    timeout: float = 5.0  # applied only when the caller set no deadline
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    max_response_bytes: int = 8 * 1024 * 1024
    rng: random.Random = attrs.field(factory=random.Random)
    url: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.url = _endpoint(self.base_url or self.default_base_url, self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.url!r}, model={self.model!r})"

    # ---------------------------------------------------------------- the call

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Ask the model; return ``{"text", "usage", "model", "stop_reason", "attempts"}``.

        ``usage`` holds ``input_tokens`` and ``output_tokens`` (None when the server did
        not report them).

        Raises:
            RetryDeadlineError: the next retry would end past the deadline.
            HTTPAgentError: an error status, or retries exhausted.
            AgentError: the answer is not JSON or lacks a required field.
            TimeoutError: only when the caller set no deadline and ``timeout`` passed.
        """
        system, user = self.build_prompt(request, inputs)
        body = self._body(system, user)
        if math.isinf(anyio.current_effective_deadline()):
            with anyio.fail_after(self.timeout):
                data, attempts = await self._post(body)
        else:
            data, attempts = await self._post(body)
        try:
            result = self._parse(data)
        except AgentError as exc:
            raise AgentError(f"{self._who}: malformed response: {exc}") from None
        result["attempts"] = attempts
        return result

    def build_prompt(self, request: AgentRequest, inputs: Mapping[str, Any]) -> tuple[str, str]:
        """The (system, user) messages for ``request``.

        The system message is the agent's template with ``{agent}`` and every string
        entry of ``request.context`` (``{action}``, ``{text}`` …) substituted. The user
        message holds the built context (``context["text"]``), the dependencies' outputs
        and the player's action (``context["action"]``), omitting empty parts.
        """
        context = request.context
        values = {k: v for k, v in context.items() if isinstance(v, str)}
        values["agent"] = self.name
        template = self.prompt or DEFAULT_PROMPTS.get(self.name, _GENERIC_PROMPT)
        system = _render(template, values)
        parts: list[str] = []
        if text := str(context.get("text") or "").strip():
            parts.append(f"Context:\n{text}")
        if inputs:
            answers = "\n\n".join(f"[{rid}]\n{_as_text(out)}" for rid, out in inputs.items())
            parts.append(f"What the other agents answered:\n{answers}")
        parts.append(f"Player action: {context.get('action', '')}")
        return system, "\n\n".join(parts)

    async def _post(self, body: Mapping[str, Any]) -> tuple[Any, int]:
        """POST ``body`` with retries; return the decoded JSON and the attempts made."""
        headers = self._headers()
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            retry_after: float | None = None
            cause: Exception | None = None
            try:
                status, retry_after, content = await self._send_once(headers, body, attempt)
            except _TRANSIENT as exc:
                failure = f"{type(exc).__name__}: {self._scrub(str(exc)) or 'no detail'}"
                cause = exc
            else:
                if 200 <= status <= 299:
                    return self._decode(content), attempt
                failure = f"HTTP {status}: {self._snippet(content)}"
                if not retryable(status):
                    raise HTTPAgentError(f"{self._who}: {failure}", status=status, attempts=attempt)
            if attempt >= self.retry.max_attempts:
                raise HTTPAgentError(
                    f"{self._who}: gave up after {attempt} attempts; last: {failure}",
                    status=status,
                    attempts=attempt,
                ) from cause
            if retry_after is not None and retry_after > self.retry.max_retry_after:
                raise HTTPAgentError(
                    f"{self._who}: server asked to retry after {retry_after:g} s "
                    f"(more than {self.retry.max_retry_after:g} s); last: {failure}",
                    status=status,
                    attempts=attempt,
                ) from cause
            wait = self.retry.wait(attempt, retry_after, self.rng)
            left = anyio.current_effective_deadline() - anyio.current_time()
            if wait >= left:
                raise RetryDeadlineError(
                    f"{self._who}: stopped after {attempt} attempts: the next retry in "
                    f"{wait:.2f} s would pass the deadline ({max(left, 0.0):.2f} s left); "
                    f"last: {failure}",
                    status=status,
                    attempts=attempt,
                ) from cause
            logger.warning(
                "%s: %s; retry %d in %.2f s", self._who, failure, attempt, wait,
                extra={"agent": self.name, "attempt": attempt, "wait": wait},
            )  # fmt: skip
            await anyio.sleep(wait)

    async def _send_once(
        self, headers: Mapping[str, str], body: Mapping[str, Any], attempt: int
    ) -> tuple[int, float | None, bytes]:
        """One request; the body is streamed so that cancellation closes the connection."""
        async with self.client.stream(
            "POST", self.url, json=body, headers=headers, timeout=_NO_HTTPX_TIMEOUT
        ) as response:
            too_large = HTTPAgentError(
                f"{self._who}: response larger than {self.max_response_bytes} bytes",
                status=response.status_code,
                attempts=attempt,
            )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise too_large
            # Never break out of httpx's async generators (trio warns about unfinished
            # ones): an undeclared oversized body is drained, not kept; the deadline
            # bounds the time that takes.
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size <= self.max_response_bytes:
                    chunks.append(chunk)
            if size > self.max_response_bytes:
                raise too_large
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            return response.status_code, retry_after, b"".join(chunks)

    def _decode(self, content: bytes) -> Any:
        try:
            return json.loads(content)
        except ValueError as exc:
            raise AgentError(
                f"{self._who}: response is not JSON ({exc}): {self._snippet(content)}"
            ) from None

    # ---------------------------------------------------------------- secrecy

    @property
    def _who(self) -> str:
        return f"agent {self.name!r} ({self.api_name} {self.model})"

    def _scrub(self, text: str) -> str:
        if self.api_key is not None and (key := self.api_key.reveal()):
            text = text.replace(key, "***")
        return text

    def _snippet(self, content: bytes, limit: int = 300) -> str:
        text = self._scrub(content[: limit * 4].decode("utf-8", "replace")).strip()
        text = " ".join(text.split())
        return repr(text[:limit] + ("…" if len(text) > limit else "")) if text else "(empty body)"

    # ---------------------------------------------------------------- per API

    def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    def _body(self, system: str, user: str) -> dict[str, Any]:
        raise NotImplementedError

    def _parse(self, data: Any) -> dict[str, Any]:
        raise NotImplementedError


@final
@attrs.define(eq=False, repr=False)
class OpenAIChatAgent(_HTTPAgent):
    """An OpenAI-compatible ``POST /v1/chat/completions`` agent (OpenAI, llama.cpp, vLLM,
    Ollama …). The key, when set, is sent as ``Authorization: Bearer``."""

    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    default_api_key_env: ClassVar[str] = ""  # local servers need no key
    api_name: ClassVar[str] = "openai"
    path: ClassVar[str] = "chat/completions"

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "application/json"}
        if self.api_key is not None:
            headers["authorization"] = f"Bearer {self.api_key.reveal()}"
        return headers

    def _body(self, system: str, user: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
            ],
            "max_tokens": self.max_tokens,
            "stream": False,
        }

    def _parse(self, data: Any) -> dict[str, Any]:
        if isinstance(data, Mapping) and "choices" not in data and "error" in data:
            error = data["error"]
            message = error.get("message") if isinstance(error, Mapping) else error
            raise AgentError(f"the server reported an error: {self._scrub(str(message))}")
        text = _path(data, "choices", 0, "message", "content")
        if not isinstance(text, str):
            raise AgentError(f"choices[0].message.content is {type(text).__name__}, not text")
        usage = data.get("usage")
        finish = _path(data, "choices", 0).get("finish_reason")
        return {
            "text": text,
            "usage": {
                "input_tokens": _opt_int(usage, "prompt_tokens"),
                "output_tokens": _opt_int(usage, "completion_tokens"),
            },
            "model": data.get("model") if isinstance(data.get("model"), str) else self.model,
            "stop_reason": finish if isinstance(finish, str) else None,
        }


@final
@attrs.define(eq=False, repr=False)
class AnthropicAgent(_HTTPAgent):
    """An Anthropic Messages API (``POST /v1/messages``) agent; the key goes in
    ``x-api-key``, the API version in ``anthropic-version``."""

    default_base_url: ClassVar[str] = "https://api.anthropic.com"
    default_api_key_env: ClassVar[str] = "ANTHROPIC_API_KEY"
    api_name: ClassVar[str] = "anthropic"
    path: ClassVar[str] = "messages"

    anthropic_version: str = "2023-06-01"

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "application/json", "anthropic-version": self.anthropic_version}
        if self.api_key is not None:
            headers["x-api-key"] = self.api_key.reveal()
        return headers

    def _body(self, system: str, user: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": system,
            "messages": [{"role": "user", "content": user}],
        }

    def _parse(self, data: Any) -> dict[str, Any]:
        blocks = _path(data, "content")
        if not isinstance(blocks, list):
            raise AgentError(f"content is {type(blocks).__name__}, not a list of blocks")
        texts = [
            b["text"]
            for b in blocks
            if isinstance(b, Mapping) and b.get("type") == "text" and isinstance(b.get("text"), str)
        ]
        usage = data.get("usage")
        stop = data.get("stop_reason")
        return {
            "text": "".join(texts),
            "usage": {
                "input_tokens": _opt_int(usage, "input_tokens"),
                "output_tokens": _opt_int(usage, "output_tokens"),
            },
            "model": data.get("model") if isinstance(data.get("model"), str) else self.model,
            "stop_reason": stop if isinstance(stop, str) else None,
        }


_BACKENDS: Mapping[str, type[_HTTPAgent]] = {
    "openai": OpenAIChatAgent,
    "anthropic": AnthropicAgent,
}


def make_http_agent(name: str, agent_config: AgentConfig, client: httpx.AsyncClient) -> Agent:
    """Build the HTTP agent ``agents.<name>`` describes, sharing ``client``.

    The key is read now from the environment variable ``api_key_env`` names (for
    ``anthropic`` an empty name means ``ANTHROPIC_API_KEY``; for ``openai`` it means no
    key, as local servers need none).

    Raises:
        ConfigError: the backend is not an HTTP one, the model is empty, or the base URL
            is not http(s).
        AgentError: the named environment variable is unset or empty (the message names
            the variable, never a value).
    """
    cls = _BACKENDS.get(agent_config.backend)
    if cls is None:
        raise ConfigError(
            f"agents.{name}.backend", agent_config.backend, 'must be "openai" or "anthropic"'
        )
    if not agent_config.model:
        raise ConfigError(
            f"agents.{name}.model", "", f"must name the model when backend = {cls.api_name!r}"
        )
    base_url = agent_config.base_url or cls.default_base_url
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"agents.{name}.base_url", base_url, "must start with http:// or https://"
        )
    env = agent_config.api_key_env or cls.default_api_key_env
    key: str | None = None
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise AgentError(
                f"agent {name!r}: the environment variable {env} (agents.{name}.api_key_env) "
                "is not set or empty"
            )
    return cls(
        name=name,
        client=client,
        model=agent_config.model,
        base_url=base_url,
        api_key=key,
        max_tokens=agent_config.max_tokens,
        prompt=agent_config.prompt,
        timeout=agent_config.timeout_seconds,
    )
