"""LLM agents over HTTP: OpenAI-compatible chat completions and the Anthropic Messages API.

Both agents share one ``httpx.AsyncClient`` (owned by the engine: pooled connections)
and one retry loop, and always stream (Server-Sent Events, see :mod:`.sse`). Guarantees:

- **Deadlines are cancel scopes.** httpx's timeouts are off; the caller's cancel scope
  bounds the call, a repair included. Only without any deadline does the agent apply
  ``timeout`` itself.
- **Cancellation aborts the request.** A cancelled read or write closes the connection
  instead of returning it to the pool, so the server sees the disconnect and can stop
  generating.
- **Text streams as it is written.** With ``output = "text"`` and ``request.on_delta``
  set, each piece is passed to ``on_delta`` synchronously as it arrives, in order; the
  pieces joined equal the returned ``text``.
- **Retries stay inside the deadline.** 408/429/5xx, transport errors and streams cut
  short are retried with jittered exponential backoff, honouring ``Retry-After``
  (seconds). When the next wait would end at or past the effective deadline the agent
  raises :class:`RetryDeadlineError` at once instead of sleeping into the timeout. A
  stream that breaks after a piece reached ``on_delta`` is never retried (the player
  saw it): :class:`HTTPAgentError` says after how many characters it broke.
- **Structured answers validate.** For ``output = "ruling"``/``"scene"`` the schema goes
  to the server (OpenAI ``response_format``, Anthropic a forced tool); an answer that
  fails :func:`~.schemas.parse_structured` gets one repair request, then AgentError.
- **The API key stays secret.** Read once from the variable ``api_key_env`` names, held
  in a wrapper whose ``repr`` is ``<secret>``, sent only in the auth header and
  scrubbed from any server text quoted in an error: never in logs, reprs or outputs.
- **Malformed answers are errors.** A 2xx that is not an event stream, undecodable event
  data and error events raise :class:`~engine.errors.AgentError`; none is retried.

Prompts come from :func:`.prompts.build_prompt`, laid out for prefix caches. Cache hints
(``OpenAIChatAgent.prompt_cache``): ``llama.cpp`` sends ``"cache_prompt": true``;
``openai`` sends ``prompt_cache_key``, a 16-hex-digit hash of ``context["session"]``
(none without a session). The Anthropic agent marks its system and reference blocks
``cache_control: ephemeral``.

llama-cpp-python's server (0.3.x, checked in ``tests/llm``) accepts ``response_format``
only as ``{"type": "json_object", "schema": ...}`` (made into a grammar; the
``json_schema`` form fails with HTTP 500, a validation error), so that form is sent when
``prompt_cache == "llama.cpp"`` (llama.cpp's ``llama-server`` takes it too) and
``json_schema`` otherwise; its grammar honours ``maxLength``/``maxItems`` but not an
integer's ``minimum``/``maximum``, so a bounded integer is sent as an ``enum`` (the DC of
a ruling was otherwise out of range in 2 of 10 answers). It ignores ``cache_prompt`` and ``stream_options`` (it reuses
the previous prompt's common prefix by itself) and sends no ``usage`` in streams: usage
is then None.

The retry loop is ours, not ``stamina``'s: stamina budgets on ``time.monotonic``, knows
nothing of anyio's effective deadline and would not run on trio's virtual clock.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
from collections.abc import Mapping
from typing import Any, ClassVar, final

import anyio
import attrs
import httpx

from ..config import AgentConfig, ServerConfig
from ..errors import AgentError, ConfigError
from .base import Agent, AgentRequest, DeltaSink
from .prompt_cache import PromptCacheModel
from .prompts import DEFAULT_PROMPTS, LAYOUTS, Prompt, build_prompt, estimate_tokens
from .retry import RetryPolicy, parse_retry_after, retryable
from .schemas import (
    KINDS,
    SCHEMAS,
    StructuredAnswerError,
    finish,
    parse_structured,
    repair_instruction,
)
from .sse import (
    AnthropicStream,
    OpenAIStream,
    StreamCutShort,
    StreamDecoder,
    StreamError,
    add_usage,
    read_events,
)

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

#: Values of ``OpenAIChatAgent.prompt_cache``.
PROMPT_CACHES = ("off", "llama.cpp", "openai")
_NO_HTTPX_TIMEOUT = httpx.Timeout(None)  # deadlines are cancel scopes
# transient transport failures; a misconfigured URL or proxy is not retried
_TRANSIENT = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.TimeoutException)


class HTTPAgentError(AgentError):
    """An HTTP agent gave up: an error status, retries exhausted, no time left to retry,
    or a stream that broke after part of it was streamed.

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


def _endpoint(base_url: str, path: str) -> str:
    """``base_url`` + ``/v1/`` + ``path``, accepting a base with or without ``/v1``."""
    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    return f"{base}/{path}"


def _small_int_range(schema: Mapping[str, Any]) -> list[int] | None:
    low, high = schema.get("minimum"), schema.get("maximum")
    if schema.get("type") != "integer" or not isinstance(low, int) or not isinstance(high, int):
        return None
    return list(range(low, high + 1)) if 0 <= high - low <= 100 else None


def _plain(value: Any, int_enums: bool = False) -> Any:
    """A schema as plain dicts and lists (JSON-serialisable). With ``int_enums`` a small
    bounded integer becomes an ``enum`` of its values: llama-cpp-python's grammar ignores
    ``minimum``/``maximum`` but honours ``enum`` (the answer is validated as declared)."""
    if isinstance(value, Mapping):
        if int_enums and (values := _small_int_range(value)):
            return {"enum": values}
        return {k: _plain(v, int_enums) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, int_enums) for v in value]
    return value


@attrs.define(eq=False, repr=False)
class _HTTPAgent:
    """Shared machinery: prompt building, the retry loop, stream reading, repair.

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
    prompt: str = ""  # the agent's instructions; empty: DEFAULT_PROMPTS[name], or generic
    timeout: float = 5.0  # applied only when the caller set no deadline
    retry: RetryPolicy = attrs.field(factory=RetryPolicy)
    max_response_bytes: int = 8 * 1024 * 1024
    rng: random.Random = attrs.field(factory=random.Random)
    output: str = attrs.field(default="text", validator=attrs.validators.in_(KINDS))
    layout: str = attrs.field(default="stable_first", validator=attrs.validators.in_(LAYOUTS))
    # a server that reports no cached tokens: what its cache holds, shared by its agents
    cache_model: PromptCacheModel | None = None
    url: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.url = _endpoint(self.base_url or self.default_base_url, self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.url!r}, model={self.model!r})"

    # ---------------------------------------------------------------- the call

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Ask the model; return ``{"text", "usage", "model", "stop_reason", "attempts",
        "repaired"}``, plus ``structured`` and ``state_changes`` for a structured output.

        ``usage`` holds ``input_tokens`` (the whole prompt), ``cached_tokens`` (the part
        served from the server's prompt cache) and ``output_tokens``, each None when the
        server did not report it; for a repaired answer they are summed over both calls,
        as is ``attempts`` (HTTP requests sent, retries included). ``repaired`` says a
        structured answer needed its one repair. A ruling's d20 is drawn from
        ``context["dice_key"]`` (default: the request id).

        Raises:
            RetryDeadlineError: the next retry would end past the deadline.
            HTTPAgentError: an error status, retries exhausted, or the stream broke
                after part of it reached ``request.on_delta``.
            AgentError: the answer is malformed, the server streamed an error, or a
                structured answer did not validate after one repair.
            TimeoutError: only when the caller set no deadline and ``timeout`` passed.
        """
        if math.isinf(anyio.current_effective_deadline()):
            with anyio.fail_after(self.timeout):
                return await self._run(request, inputs)
        return await self._run(request, inputs)

    def build_prompt(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Prompt:
        """The prompt of ``request``: :func:`engine.agents.prompts.build_prompt` with this
        agent's instructions, output kind and layout."""
        return build_prompt(
            self.name,
            request,
            inputs,
            instructions=self.prompt,
            output=self.output,
            layout=self.layout,
        )

    async def _run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> dict[str, Any]:
        prompt = self.build_prompt(request, inputs)
        body = self._body(prompt, request)
        cached = self._cached_estimate(prompt)
        kind = self.output
        if kind not in SCHEMAS:
            answer = await self._call(body, request.on_delta)
            _estimate_missing_usage(answer, prompt, cached)
            return {**answer, "repaired": False}
        answer = await self._call(body, None)  # structured answers never stream
        try:
            data = parse_structured(kind, answer["text"])
            repaired = False
        except StructuredAnswerError as error:
            logger.info("%s: invalid %s (%s); asking for a repair", self._who, kind, error)
            messages = [
                *body["messages"],
                {"role": "assistant", "content": answer["text"] or "(no answer)"},
                {"role": "user", "content": repair_instruction(kind, error)},
            ]
            second = await self._call({**body, "messages": messages}, None)
            try:
                data = parse_structured(kind, second["text"])
            except StructuredAnswerError as again:
                raise AgentError(
                    f"{self._who}: the {kind} did not validate after one repair: {again}"
                ) from None
            usage = add_usage(answer["usage"], second["usage"])
            answer = {**second, "usage": usage, "attempts": answer["attempts"] + second["attempts"]}
            repaired = True
        _estimate_missing_usage(answer, prompt, cached)
        del answer["text"]
        dice_key = str(request.context.get("dice_key", request.id))
        return {**finish(kind, data, dice_key), **answer, "repaired": repaired}

    def _cached_estimate(self, prompt: Prompt) -> int | None:
        """The prompt tokens ``cache_model`` says the server has cached (None without
        one); the prompt is then what the server holds."""
        if self.cache_model is None:
            return None
        text, now = prompt.text(), anyio.current_time()
        cached = self.cache_model.lookup(self.url, text, now)
        self.cache_model.store(self.url, text, now)
        return cached

    async def _call(self, body: Mapping[str, Any], on_delta: DeltaSink | None) -> dict[str, Any]:
        """POST ``body`` and read its stream, with retries; return ``{"text", "usage",
        "model", "stop_reason", "attempts"}``."""
        headers = self._headers()
        attempt = 0
        while True:
            attempt += 1
            stream = self._decoder()
            sent_at = anyio.current_time()
            status: int | None = None
            retry_after: float | None = None
            cause: Exception | None = None
            try:
                status, retry_after, content = await self._send_once(
                    headers, body, attempt, stream, on_delta
                )
            except (*_TRANSIENT, StreamCutShort) as exc:
                failure = f"{type(exc).__name__}: {self._scrub(str(exc)) or 'no detail'}"
                cause = exc
            else:
                if 200 <= status <= 299:
                    first = stream.first_piece_at
                    return {
                        "text": stream.text,
                        "usage": stream.usage(),
                        "model": stream.model or self.model,
                        "stop_reason": stream.stop_reason,
                        "attempts": attempt,
                        # request sent to first piece of the answer (None: no text)
                        "first_token_seconds": None if first is None else first - sent_at,
                    }
                failure = f"HTTP {status}: {self._snippet(content)}"
                if not retryable(status):
                    raise HTTPAgentError(f"{self._who}: {failure}", status=status, attempts=attempt)
            kw: dict[str, Any] = {"status": status, "attempts": attempt}
            if on_delta is not None and stream.text:
                raise HTTPAgentError(
                    f"{self._who}: the stream broke after {len(stream.text)} characters had "
                    f"been streamed, so it is not retried; {failure}", **kw
                ) from cause  # fmt: skip
            if attempt >= self.retry.max_attempts:
                raise HTTPAgentError(
                    f"{self._who}: gave up after {attempt} attempts; last: {failure}", **kw
                ) from cause
            if retry_after is not None and retry_after > self.retry.max_retry_after:
                raise HTTPAgentError(
                    f"{self._who}: server asked to retry after {retry_after:g} s "
                    f"(more than {self.retry.max_retry_after:g} s); last: {failure}", **kw
                ) from cause  # fmt: skip
            wait = self.retry.wait(attempt, retry_after, self.rng)
            left = anyio.current_effective_deadline() - anyio.current_time()
            if wait >= left:
                raise RetryDeadlineError(
                    f"{self._who}: stopped after {attempt} attempts: the next retry in "
                    f"{wait:.2f} s would pass the deadline ({max(left, 0.0):.2f} s left); "
                    f"last: {failure}", **kw
                ) from cause  # fmt: skip
            logger.warning(
                "%s: %s; retry %d in %.2f s", self._who, failure, attempt, wait,
                extra={"agent": self.name, "attempt": attempt, "wait": wait},
            )  # fmt: skip
            await anyio.sleep(wait)

    async def _send_once(
        self,
        headers: Mapping[str, str],
        body: Mapping[str, Any],
        attempt: int,
        stream: StreamDecoder,
        on_delta: DeltaSink | None,
    ) -> tuple[int, float | None, bytes]:
        """One request. A 2xx event stream is fed to ``stream``; any other answer is read
        whole (bounded) and returned as (status, Retry-After, body)."""
        async with self.client.stream(
            "POST", self.url, json=body, headers=headers, timeout=_NO_HTTPX_TIMEOUT
        ) as response:
            status = response.status_code
            media = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if 200 <= status <= 299 and media == "text/event-stream":
                try:
                    await read_events(response, stream, on_delta, self.max_response_bytes)
                except StreamError as exc:
                    raise AgentError(f"{self._who}: {self._scrub(str(exc))}") from None
                return status, None, b""
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_response_bytes:
                raise self._too_large(status, attempt)
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
                raise self._too_large(status, attempt)
            content = b"".join(chunks)
            if 200 <= status <= 299:
                raise AgentError(
                    f"{self._who}: expected an event stream, got "
                    f"{media or 'no content type'}: {self._snippet(content)}"
                )
            return status, parse_retry_after(response.headers.get("retry-after")), content

    # ---------------------------------------------------------------- secrecy

    @property
    def _who(self) -> str:
        return f"agent {self.name!r} ({self.api_name} {self.model})"

    def _too_large(self, status: int, attempt: int) -> HTTPAgentError:
        return HTTPAgentError(
            f"{self._who}: response larger than {self.max_response_bytes} bytes",
            status=status,
            attempts=attempt,
        )

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

    def _body(self, prompt: Prompt, request: AgentRequest) -> dict[str, Any]:
        raise NotImplementedError

    def _decoder(self) -> StreamDecoder:
        raise NotImplementedError


@final
@attrs.define(eq=False, repr=False)
class OpenAIChatAgent(_HTTPAgent):
    """An OpenAI-compatible ``POST /v1/chat/completions`` agent (OpenAI, llama.cpp, vLLM,
    Ollama …). The key, when set, is sent as ``Authorization: Bearer``.

    The body carries the system message, one user message (reference + task), ``stream``
    with ``stream_options.include_usage``, the cache hint ``prompt_cache`` asks for, and
    for a structured output the schema as ``response_format`` (see the module docstring).
    """

    default_base_url: ClassVar[str] = "https://api.openai.com/v1"
    default_api_key_env: ClassVar[str] = ""  # local servers need no key
    api_name: ClassVar[str] = "openai"
    path: ClassVar[str] = "chat/completions"

    prompt_cache: str = attrs.field(default="off", validator=attrs.validators.in_(PROMPT_CACHES))

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "text/event-stream"}
        if self.api_key is not None:
            headers["authorization"] = f"Bearer {self.api_key.reveal()}"
        return headers

    def _body(self, prompt: Prompt, request: AgentRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": prompt.messages(),
            "max_tokens": self.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.prompt_cache == "llama.cpp":
            body["cache_prompt"] = True
        elif self.prompt_cache == "openai" and (session := request.context.get("session")):
            key = hashlib.blake2b(str(session).encode(), digest_size=8)
            body["prompt_cache_key"] = key.hexdigest()
        if self.output in SCHEMAS:
            llama_cpp = self.prompt_cache == "llama.cpp"
            schema = _plain(SCHEMAS[self.output], int_enums=llama_cpp)
            if llama_cpp:
                body["response_format"] = {"type": "json_object", "schema": schema}
            else:
                body["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": self.output, "schema": schema, "strict": True},
                }
        return body

    def _decoder(self) -> StreamDecoder:
        return OpenAIStream()


@final
@attrs.define(eq=False, repr=False)
class AnthropicAgent(_HTTPAgent):
    """An Anthropic Messages API (``POST /v1/messages``) agent; the key goes in
    ``x-api-key``, the API version in ``anthropic-version``.

    The system block and the reference block are marked ``cache_control: ephemeral``
    (the task block is not); a structured output is asked for as the input of one
    forced tool, ``record_<kind>``, whose ``input_schema`` is the kind's schema.
    """

    default_base_url: ClassVar[str] = "https://api.anthropic.com"
    default_api_key_env: ClassVar[str] = "ANTHROPIC_API_KEY"
    api_name: ClassVar[str] = "anthropic"
    path: ClassVar[str] = "messages"

    anthropic_version: str = "2023-06-01"

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "text/event-stream", "anthropic-version": self.anthropic_version}
        if self.api_key is not None:
            headers["x-api-key"] = self.api_key.reveal()
        return headers

    def _body(self, prompt: Prompt, request: AgentRequest) -> dict[str, Any]:
        def block(text: str, cache: bool) -> dict[str, Any]:
            b: dict[str, Any] = {"type": "text", "text": text}
            if cache:
                b["cache_control"] = {"type": "ephemeral"}
            return b

        content = [block(prompt.reference, True)] if prompt.reference else []
        content.append(block(prompt.task, False))
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "stream": True,
            "system": [block(prompt.system, True)],
            "messages": [{"role": "user", "content": content}],
        }
        if self.output in SCHEMAS:
            tool = f"record_{self.output}"
            body["tools"] = [
                {
                    "name": tool,
                    "description": f"Record the {self.output} as structured data.",
                    "input_schema": _plain(SCHEMAS[self.output]),
                }
            ]
            body["tool_choice"] = {"type": "tool", "name": tool}
        return body

    def _decoder(self) -> StreamDecoder:
        return AnthropicStream(tool=self.output in SCHEMAS)


def _estimate_missing_usage(answer: dict[str, Any], prompt: Prompt, cached: int | None) -> None:
    """Fill in the tokens a server did not report (llama-cpp-python sends no usage in
    streams) and mark them estimated: prompt and output tokens by the
    4-characters-a-token rule, cached tokens from the agent's ``cache_model`` (without
    one they stay None: only the server knows them)."""
    usage = answer["usage"]
    missing = [
        k for k in ("input_tokens", "output_tokens", "cached_tokens") if usage.get(k) is None
    ]
    if cached is None and missing == ["cached_tokens"]:
        return
    if missing:
        usage = dict(usage)
        if usage.get("input_tokens") is None:
            usage["input_tokens"] = estimate_tokens(prompt.text())
        if usage.get("output_tokens") is None:
            usage["output_tokens"] = estimate_tokens(answer["text"])
        if usage.get("cached_tokens") is None and cached is not None:
            usage["cached_tokens"] = min(cached, usage["input_tokens"])
        usage["estimated"] = True
        answer["usage"] = usage


_BACKENDS: Mapping[str, type[_HTTPAgent]] = {
    "openai": OpenAIChatAgent,
    "anthropic": AnthropicAgent,
}


def _resolve_prompt_cache(hint: str, base_url: str) -> str:
    """``auto``: ``openai`` for api.openai.com, ``llama.cpp`` for any other URL."""
    if hint != "auto":
        return hint
    return "openai" if httpx.URL(base_url).host == "api.openai.com" else "llama.cpp"


def make_http_agent(
    name: str,
    agent_config: AgentConfig,
    client: httpx.AsyncClient,
    *,
    server: ServerConfig | None = None,
    layout: str = "stable_first",
    cache_model: PromptCacheModel | None = None,
) -> Agent:
    """Build the HTTP agent ``agents.<name>`` describes, sharing ``client``.

    ``server`` is the server the agent calls (``Config.server_of(name)``); None means
    one made of the agent's own ``base_url`` and ``api_key_env``. Its ``prompt_cache``
    picks the OpenAI agent's cache hint (``auto``: ``openai`` for api.openai.com,
    ``llama.cpp`` otherwise). ``layout`` is the prompt layout
    (``performance.prompts.layout``). ``cache_model`` (one per server, shared by its
    agents) estimates the cached prompt tokens of a llama.cpp server with one slot
    (``max_concurrent = 1``), which reports none; other agents do not use it.

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
    if server is None:
        server = ServerConfig(base_url=agent_config.base_url, api_key_env=agent_config.api_key_env)
    base_url = server.base_url or cls.default_base_url
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"agents.{name}.base_url", base_url, "must start with http:// or https://"
        )
    env = server.api_key_env or cls.default_api_key_env
    key: str | None = None
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise AgentError(
                f"agent {name!r}: the environment variable {env} (agents.{name}.api_key_env) "
                "is not set or empty"
            )
    extra: dict[str, Any] = {}
    if cls is OpenAIChatAgent:
        extra["prompt_cache"] = hint = _resolve_prompt_cache(server.prompt_cache, base_url)
        if hint == "llama.cpp" and server.max_concurrent == 1:
            extra["cache_model"] = cache_model
    return cls(
        name=name,
        client=client,
        model=agent_config.model,
        base_url=base_url,
        api_key=key,
        max_tokens=agent_config.max_tokens,
        prompt=agent_config.prompt,
        timeout=agent_config.timeout_seconds,
        output=agent_config.output,
        layout=layout,
        **extra,
    )
