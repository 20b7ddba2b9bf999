"""The HTTP LLM agents against a real HTTP server on 127.0.0.1 (real time, real sockets)."""

from __future__ import annotations

import logging
import random
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx
import pytest

from engine.agents.base import Agent, AgentRequest
from engine.agents.http import (
    DEFAULT_PROMPTS,
    AnthropicAgent,
    HTTPAgentError,
    OpenAIChatAgent,
    RetryDeadlineError,
    RetryPolicy,
    make_http_agent,
    parse_retry_after,
)
from engine.config import AgentConfig, parse_config
from engine.errors import AgentError, ConfigError

from .fakeserver import FakeLLMServer, Reply

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY = "sk-test-SECRET-0123456789abcdef"
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.02, max_backoff=0.05)


@pytest.fixture(
    params=[pytest.param(("trio", {}), id="trio"), pytest.param(("asyncio", {}), id="asyncio")]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Real sockets need real time: trio with its ordinary clock, and asyncio."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    fake = FakeLLMServer()
    fake.start()
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    # trust_env=False: a proxy set in the environment must not capture 127.0.0.1
    async with httpx.AsyncClient(trust_env=False) as c:
        yield c


class MaxRandom(random.Random):
    """Jitter always at its upper bound, so backoff waits are exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


def request(**context: Any) -> AgentRequest:
    ctx = {"action": "I search the altar for traps", "text": "An altar of black stone."}
    ctx.update(context)
    return AgentRequest(id="narrator", agent="narrator", context=ctx)


def openai(server: FakeLLMServer, client: httpx.AsyncClient, **kw: Any) -> OpenAIChatAgent:
    kw.setdefault("retry", FAST)
    return OpenAIChatAgent(
        name="narrator", client=client, model="fake-model", base_url=server.url, api_key=KEY, **kw
    )


def anthropic(server: FakeLLMServer, client: httpx.AsyncClient, **kw: Any) -> AnthropicAgent:
    kw.setdefault("retry", FAST)
    return AnthropicAgent(
        name="narrator", client=client, model="fake-claude", base_url=server.url, api_key=KEY, **kw
    )


# --------------------------------------------------------------------------- success


@pytest.mark.anyio
async def test_OpenAIChatAgent_sends_chat_completion_and_returns_text_and_usage(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    agent = openai(server, client, max_tokens=123)
    out = await agent.run(request(), {"arbiter": {"text": "DC 15 Investigation."}})
    assert out == {
        "text": "The altar is trapped.",
        "usage": {"input_tokens": 42, "output_tokens": 7},
        "model": "fake-model",
        "stop_reason": "stop",
        "attempts": 1,
    }
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["content-type"] == "application/json"
    body = seen.body
    assert body["model"] == "fake-model"
    assert body["max_tokens"] == 123
    assert body["stream"] is False
    system, user = body["messages"]
    assert system == {"role": "system", "content": DEFAULT_PROMPTS["narrator"]}
    assert user["role"] == "user"
    assert "An altar of black stone." in user["content"]
    assert "[arbiter]\nDC 15 Investigation." in user["content"]
    assert user["content"].endswith("Player action: I search the altar for traps")


@pytest.mark.anyio
async def test_AnthropicAgent_sends_messages_request_with_key_and_version_headers(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    agent = anthropic(server, client, prompt="You are {agent}; the player said: {action}")
    out = await agent.run(request(), {})
    assert out == {
        "text": "The altar is trapped.",
        "usage": {"input_tokens": 40, "output_tokens": 6},
        "model": "fake-claude",
        "stop_reason": "end_turn",
        "attempts": 1,
    }
    (seen,) = server.requests
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in seen.headers
    assert seen.body["system"] == "You are narrator; the player said: I search the altar for traps"
    assert seen.body["max_tokens"] == 400
    (message,) = seen.body["messages"]
    assert message["role"] == "user"
    assert "other agents" not in message["content"]  # no inputs, no empty section


@pytest.mark.anyio
async def test_make_http_agent_reads_key_from_env_and_accepts_base_url_with_v1(
    server: FakeLLMServer, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DM_TEST_KEY", f"  {KEY}\n")
    config = AgentConfig(
        backend="openai",
        base_url=server.url + "/v1/",
        model="m",
        api_key_env="DM_TEST_KEY",
        max_tokens=50,
        prompt="Be {agent}.",
        timeout_seconds=2.0,
    )
    agent = make_http_agent("archivist", config, client)
    assert isinstance(agent, OpenAIChatAgent)
    assert isinstance(agent, Agent)
    out = await agent.run(AgentRequest(id="a", agent="archivist", context={"action": "hi"}), {})
    assert out["text"] == "The altar is trapped."
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.body["messages"][0]["content"] == "Be archivist."
    assert seen.body["max_tokens"] == 50


@pytest.mark.anyio
async def test_OpenAIChatAgent_without_key_sends_no_authorization(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    agent = make_http_agent(
        "narrator", AgentConfig(backend="openai", base_url=server.url, model="m"), client
    )
    await agent.run(request(), {})
    assert "authorization" not in server.requests[0].headers


def test_make_http_agent_rejects_bad_config(monkeypatch: pytest.MonkeyPatch) -> None:
    client = httpx.AsyncClient()
    monkeypatch.delenv("DM_MISSING_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"agents\.narrator\.model"):
        make_http_agent("narrator", AgentConfig(backend="openai"), client)
    with pytest.raises(ConfigError, match=r"agents\.narrator\.backend"):
        make_http_agent("narrator", AgentConfig(backend="simulated", model="m"), client)
    with pytest.raises(ConfigError, match=r"agents\.narrator\.base_url"):
        make_http_agent("narrator", AgentConfig(backend="openai", model="m", base_url="x"), client)
    with pytest.raises(AgentError, match="DM_MISSING_KEY"):
        make_http_agent(
            "narrator",
            AgentConfig(backend="anthropic", model="m", api_key_env="DM_MISSING_KEY"),
            client,
        )
    # anthropic without api_key_env falls back to ANTHROPIC_API_KEY
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AgentError, match="ANTHROPIC_API_KEY"):
        make_http_agent("narrator", AgentConfig(backend="anthropic", model="m"), client)


# --------------------------------------------------------------------------- retries


@pytest.mark.anyio
@pytest.mark.parametrize(
    "failure",
    [
        Reply("raw", 429, (("retry-after", "0"),), b'{"error": "slow down"}'),
        Reply("raw", 500, (), b"oops"),
        Reply("raw", 503, (), b""),
        Reply("drop"),
    ],
    ids=["429", "500", "503", "drop"],
)
async def test_transient_failures_are_retried_until_success(
    server: FakeLLMServer, client: httpx.AsyncClient, failure: Reply
) -> None:
    server.push(failure, failure)
    out = await anthropic(server, client).run(request(), {})
    assert out["text"] == "The altar is trapped."
    assert out["attempts"] == 3
    assert server.attempts == 3


@pytest.mark.anyio
async def test_retries_stop_after_max_attempts(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(*[Reply("raw", 502, (), b"bad gateway")] * 10)
    with pytest.raises(HTTPAgentError, match=r"gave up after 4 attempts.*HTTP 502") as info:
        await openai(server, client).run(request(), {})
    assert (info.value.status, info.value.attempts) == (502, 4)
    assert server.attempts == 4


@pytest.mark.anyio
async def test_client_errors_are_not_retried(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(Reply("raw", 400, (), b'{"error": {"message": "max_tokens too large"}}'))
    with pytest.raises(HTTPAgentError, match=r"HTTP 400.*max_tokens too large") as info:
        await openai(server, client).run(request(), {})
    assert info.value.attempts == 1
    assert server.attempts == 1


@pytest.mark.anyio
async def test_connection_refused_is_retried_then_reported(client: httpx.AsyncClient) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = OpenAIChatAgent(
        name="narrator", client=client, model="m", base_url=f"http://127.0.0.1:{port}", retry=FAST
    )
    with pytest.raises(HTTPAgentError, match=r"gave up after 4 attempts.*ConnectError") as info:
        await agent.run(request(), {})
    assert info.value.status is None
    assert isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.anyio
async def test_retry_after_longer_than_the_deadline_stops_at_once(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    # backoff alone (<= 0.05 s) would retry; the server's Retry-After: 1 does not fit in 0.5 s
    server.push(Reply("raw", 429, (("retry-after", "1"),), b""))
    with anyio.fail_after(0.5):
        with pytest.raises(RetryDeadlineError, match="would pass the deadline") as info:
            await openai(server, client).run(request(), {})
    assert (info.value.status, info.value.attempts) == (429, 1)
    assert server.attempts == 1


@pytest.mark.anyio
async def test_retry_after_is_waited_for(
    server: FakeLLMServer, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    server.push(Reply("raw", 429, (("retry-after", "0.3"),), b""))
    with caplog.at_level(logging.WARNING, logger="engine.agents.http"):
        out = await openai(server, client).run(request(), {})
    assert out["attempts"] == 2
    (record,) = [r for r in caplog.records if r.name == "engine.agents.http"]
    assert record.wait == 0.3  # type: ignore[attr-defined]  # max(Retry-After, backoff)


@pytest.mark.anyio
async def test_retries_stop_before_the_deadline_instead_of_sleeping_into_it(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    # waits 0.2, 0.4, 0.8 s: attempts at ~0, ~0.2, ~0.6; the third wait would end at
    # ~1.4 s, past the 1 s deadline, so the agent raises at ~0.6 s without sleeping
    server.push(*[Reply("raw", 500, (), b"")] * 20)
    policy = RetryPolicy(max_attempts=20, initial_backoff=0.2, max_backoff=10)
    agent = openai(server, client, retry=policy, rng=MaxRandom())
    with anyio.fail_after(1.0):
        with pytest.raises(RetryDeadlineError, match=r"stopped after 3 attempts.*deadline") as info:
            await agent.run(request(), {})
    assert isinstance(info.value, TimeoutError)  # callers may report it as a timeout
    assert info.value.attempts == 3
    assert server.attempts == 3


@pytest.mark.anyio
async def test_agent_applies_its_own_timeout_when_the_caller_sets_none(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(Reply("hold"))
    with pytest.raises(TimeoutError):
        await openai(server, client, timeout=0.3).run(request(), {})
    assert await anyio.to_thread.run_sync(server.disconnected.wait, 5)


# --------------------------------------------------------------------------- cancellation


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["hold", "stall"], ids=["before-headers", "mid-body"])
async def test_cancelled_request_closes_its_connection(
    server: FakeLLMServer, client: httpx.AsyncClient, kind: str
) -> None:
    server.push(Reply(kind))
    agent = openai(server, client)
    with anyio.move_on_after(0.3) as scope:
        await agent.run(request(), {})
    assert scope.cancelled_caught
    # the client stays open: only the cancelled request's connection may have closed
    assert await anyio.to_thread.run_sync(server.disconnected.wait, 5)
    assert server.attempts == 1
    # the pool is still consistent: the next call goes through on a fresh connection
    out = await agent.run(request(), {})
    assert out["attempts"] == 1
    assert server.attempts == 2


# --------------------------------------------------------------------------- malformed


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"choices": [', "not JSON"),
        (b"<html>Bad gateway</html>", "not JSON"),
        (b'{"choices": []}', r"missing field choices\[0\]"),
        (b'{"choices": [{"message": {}}]}', r"missing field choices\[0\]\.message\.content"),
        (b'{"choices": [{"message": {"content": null}}]}', "NoneType, not text"),
        (b"[1, 2]", "missing field choices"),
        (b'{"error": {"message": "model not loaded"}}', "model not loaded"),
    ],
)
async def test_OpenAIChatAgent_malformed_response_raises_AgentError(
    server: FakeLLMServer, client: httpx.AsyncClient, body: bytes, message: str
) -> None:
    server.push(Reply("raw", 200, (), body))
    with pytest.raises(AgentError, match=message):
        await openai(server, client).run(request(), {})
    assert server.attempts == 1  # a malformed answer is not retried


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not JSON"),
        (b'{"type": "message"}', "missing field content"),
        (b'{"content": "hi"}', "str, not a list"),
    ],
)
async def test_AnthropicAgent_malformed_response_raises_AgentError(
    server: FakeLLMServer, client: httpx.AsyncClient, body: bytes, message: str
) -> None:
    server.push(Reply("raw", 200, (), body))
    with pytest.raises(AgentError, match=message):
        await anthropic(server, client).run(request(), {})


@pytest.mark.anyio
async def test_AnthropicAgent_usage_missing_is_none(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(Reply("raw", 200, (), b'{"content": [{"type": "text", "text": "ok"}]}'))
    out = await anthropic(server, client).run(request(), {})
    assert out["text"] == "ok"
    assert out["usage"] == {"input_tokens": None, "output_tokens": None}
    assert out["model"] == "fake-claude"


# --------------------------------------------------------------------------- secrecy


@pytest.mark.anyio
async def test_key_never_appears_in_errors_reprs_outputs_or_logs(
    server: FakeLLMServer,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DM_TEST_KEY", KEY)
    agent = make_http_agent(
        "narrator",
        AgentConfig(backend="anthropic", base_url=server.url, model="m", api_key_env="DM_TEST_KEY"),
        client,
    )
    assert isinstance(agent, AnthropicAgent)
    agent = attrs.evolve(agent, retry=FAST)
    echo = f'{{"error": {{"message": "invalid x-api-key {KEY}"}}}}'.encode()
    server.push(
        Reply("raw", 500, (), echo),  # retried, logged
        Reply("drop"),  # retried, logged
        Reply("raw", 401, (), echo),  # the server echoes the key back in its error
        Reply("raw", 200, (), echo),  # a 200 that is not a message
    )
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):  # httpx and httpcore debug logs too
        for _ in range(2):
            try:
                await agent.run(request(), {})
            except AgentError as exc:
                errors.append(exc)
        output = await agent.run(request(), {})
    assert len(errors) == 2
    assert [r.headers["x-api-key"] for r in server.requests] == [KEY] * 5  # it was sent
    texts = (
        [str(e) for e in errors] + [repr(e) for e in errors] + [repr(e.__cause__) for e in errors]
    )
    texts += [repr(agent), str(agent), repr(output), caplog.text]
    texts += [str(r.__dict__) for r in caplog.records]
    assert "invalid x-api-key ***" in str(errors[0])  # scrubbed, not dropped
    assert len(caplog.records) >= 2
    for text in texts:
        assert KEY not in text


# --------------------------------------------------------------------------- units


def test_parse_retry_after_takes_seconds_and_ignores_dates() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after(None) is None


def test_RetryPolicy_wait_is_jittered_exponential_capped_and_honours_retry_after() -> None:
    policy = RetryPolicy(initial_backoff=0.5, multiplier=2.0, max_backoff=3.0)
    rng = random.Random(7)
    for retry, full in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        waits = [policy.wait(retry, None, rng) for _ in range(200)]
        assert all(full / 2 <= w <= full for w in waits)
        assert max(waits) - min(waits) > full / 4  # actually jittered
    assert policy.wait(1, 10.0, rng) == 10.0
    assert 0.25 <= policy.wait(1, 0.0, rng) <= 0.5
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_prompt_template_substitutes_known_names_only() -> None:
    agent = OpenAIChatAgent(
        name="oracle",
        client=httpx.AsyncClient(),
        model="m",
        prompt='{agent} answers {action} as JSON like {"a": 1} {unknown}',
    )
    system, user = agent.build_prompt(request(action="{text}"), {"x": [1, 2]})
    # substitution is one pass: the player's "{text}" is not expanded again
    assert system == '{agent} answers {action} as JSON like {"a": 1} {unknown}'.replace(
        "{agent}", "oracle"
    ).replace("{action}", "{text}")
    assert "[x]\n[1, 2]" in user
    default = OpenAIChatAgent(name="oracle", client=httpx.AsyncClient(), model="m")
    assert "oracle agent" in default.build_prompt(request(), {})[0]


def test_docs_example_config_is_valid_and_builds_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "agents.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 1
    config = parse_config(tomllib.loads(blocks[0]))
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    client = httpx.AsyncClient()
    agents = {name: make_http_agent(name, ac, client) for name, ac in config.agents.items()}
    assert {name: type(a).__name__ for name, a in agents.items()} == {
        "archivist": "OpenAIChatAgent",
        "module_keeper": "OpenAIChatAgent",
        "arbiter": "OpenAIChatAgent",
        "narrator": "AnthropicAgent",
    }
    keeper = agents["module_keeper"]
    assert isinstance(keeper, OpenAIChatAgent)
    assert keeper.url == "http://127.0.0.1:11434/v1/chat/completions"
    system, _ = keeper.build_prompt(request(), {})
    assert system.startswith("You are the module_keeper of a D&D adventure. From the module")
    narrator = agents["narrator"]
    assert isinstance(narrator, AnthropicAgent)
    assert narrator.url == "https://api.anthropic.com/v1/messages"
    assert config.agents["narrator"].hedge_after == 4.0


@pytest.mark.anyio
async def test_oversized_response_is_refused(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    with pytest.raises(HTTPAgentError, match="larger than 100 bytes"):
        await openai(server, client, max_response_bytes=100).run(request(), {})
    assert server.attempts == 1


@pytest.mark.anyio
async def test_oversized_chunked_response_is_refused(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(Reply("chunked", body=b"x" * 300))
    with pytest.raises(HTTPAgentError, match="larger than 100 bytes"):
        await openai(server, client, max_response_bytes=100).run(request(), {})
    assert server.attempts == 1
