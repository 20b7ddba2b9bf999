"""The HTTP LLM agents against a real HTTP server on 127.0.0.1 (real time, real sockets)."""

from __future__ import annotations

import json
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

from engine.agents.base import Agent, AgentRequest, DeltaSink
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
from engine.agents.prompt_cache import PromptCacheModel
from engine.agents.prompts import PREAMBLE
from engine.agents.schemas import (
    SCHEMAS,
    StructuredAnswerError,
    parse_structured,
    repair_instruction,
    roll_d20,
)
from engine.config import AgentConfig, ServerConfig, parse_config
from engine.errors import AgentError, ConfigError

from .fakeserver import (
    FakeLLMServer,
    Reply,
    anthropic_stream,
    event,
    openai_events,
    openai_stream,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KEY = "sk-test-SECRET-0123456789abcdef"
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.02, max_backoff=0.05)
RULING = ('{"check": "ability_check", ', '"ability": "wis", "dc": 15, ', '"reason": "Hidden."}')
RULING_TEXT = "".join(RULING)


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


def request(on_delta: DeltaSink | None = None, **context: Any) -> AgentRequest:
    ctx = {"action": "I search the altar for traps", "text": "An altar of black stone."}
    ctx.update(context)
    return AgentRequest(id="narrator", agent="narrator", context=ctx, on_delta=on_delta)


def openai(server: FakeLLMServer, client: httpx.AsyncClient, **kw: Any) -> OpenAIChatAgent:
    kw.setdefault("retry", FAST)
    kw.setdefault("name", "narrator")
    return OpenAIChatAgent(
        client=client, model="fake-model", base_url=server.url, api_key=KEY, **kw
    )


def anthropic(server: FakeLLMServer, client: httpx.AsyncClient, **kw: Any) -> AnthropicAgent:
    kw.setdefault("retry", FAST)
    kw.setdefault("name", "narrator")
    return AnthropicAgent(
        client=client, model="fake-claude", base_url=server.url, api_key=KEY, **kw
    )


def agent_for(api: str, server: FakeLLMServer, client: httpx.AsyncClient, **kw: Any) -> Any:
    return (openai if api == "openai" else anthropic)(server, client, **kw)


def stream_for(api: str, *pieces: str, **kw: Any) -> Reply:
    return (openai_stream if api == "openai" else anthropic_stream)(*pieces, **kw)


def common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return a[:n]


def user_text(body: dict[str, Any]) -> str:
    """The user message of a recorded body as one string (either API)."""
    content = body["messages"][0]["content"] if "system" in body else body["messages"][1]["content"]
    if isinstance(content, str):
        return content
    return "\n\n".join(block["text"] for block in content)


# --------------------------------------------------------------------------- success


@pytest.mark.anyio
async def test_OpenAIChatAgent_streams_chat_completion_and_returns_text_and_usage(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    agent = openai(server, client, max_tokens=123)
    inputs = {"arbiter": {"text": "DC 15 Investigation."}}
    out = await agent.run(request(), inputs)
    assert out.pop("first_token_seconds") >= 0  # request sent to first piece
    assert out == {
        "text": "The altar is trapped.",
        "usage": {"input_tokens": 42, "cached_tokens": 32, "output_tokens": 7},
        "model": "fake-model",
        "stop_reason": "stop",
        "attempts": 1,
        "repaired": False,
    }
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "text/event-stream"
    body = seen.body
    assert body["model"] == "fake-model"
    assert body["max_tokens"] == 123
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    for absent in ("cache_prompt", "prompt_cache_key", "response_format"):
        assert absent not in body  # prompt_cache = "off", text output
    assert body["messages"] == agent.build_prompt(request(), inputs).messages()
    system, user = body["messages"]
    assert system["content"].startswith(PREAMBLE.replace("{module}", "the module"))
    assert user["content"].startswith("Reference:\nAn altar of black stone.")
    assert DEFAULT_PROMPTS["narrator"] in user["content"]
    assert "- arbiter: DC 15 Investigation." in user["content"]
    assert "Player action: I search the altar for traps" in user["content"]
    assert user["content"].endswith(DEFAULT_PROMPTS["narrator"])  # instructions last


@pytest.mark.anyio
async def test_AnthropicAgent_streams_messages_with_key_version_and_cache_control(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    agent = anthropic(server, client, prompt="You are {agent}; the player said: {action}")
    out = await agent.run(request(), {})
    assert out.pop("first_token_seconds") >= 0
    # input_tokens counts the whole prompt: 10 uncached + 30 read + 2 written to the cache
    assert out == {
        "text": "The altar is trapped.",
        "usage": {"input_tokens": 42, "cached_tokens": 30, "output_tokens": 6},
        "model": "fake-claude",
        "stop_reason": "end_turn",
        "attempts": 1,
        "repaired": False,
    }
    (seen,) = server.requests
    assert seen.path == "/v1/messages"
    assert seen.headers["x-api-key"] == KEY
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in seen.headers
    body = seen.body
    assert body["stream"] is True
    assert body["max_tokens"] == 400
    prompt = agent.build_prompt(request(), {})
    ephemeral = {"type": "ephemeral"}
    assert body["system"] == [{"type": "text", "text": prompt.system, "cache_control": ephemeral}]
    (message,) = body["messages"]
    assert message["role"] == "user"
    reference, task = message["content"]
    assert reference == {"type": "text", "text": prompt.reference, "cache_control": ephemeral}
    assert task == {"type": "text", "text": prompt.task}  # the per-call part: no breakpoint
    assert task["text"].endswith("You are narrator; the player said: I search the altar for traps")
    assert "other agents" not in task["text"]  # no inputs, no empty section
    assert "tools" not in body


@pytest.mark.anyio
async def test_AnthropicAgent_without_reference_sends_the_task_block_only(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    await anthropic(server, client).run(request(text=""), {})
    (block,) = server.requests[0].body["messages"][0]["content"]
    assert "cache_control" not in block
    assert block["text"].startswith("Player action: I search the altar for traps")


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
    assert agent.prompt_cache == "llama.cpp"  # "auto" for a URL other than api.openai.com
    out = await agent.run(AgentRequest(id="a", agent="archivist", context={"action": "hi"}), {})
    assert out["text"] == "The altar is trapped."
    (seen,) = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    assert seen.body["messages"][1]["content"] == "Player action: hi\n\nBe archivist."
    assert seen.body["max_tokens"] == 50
    assert seen.body["cache_prompt"] is True


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
    with pytest.raises(ConfigError, match=r"agents\.narrator\.base_url"):
        make_http_agent(
            "narrator",
            AgentConfig(backend="openai", model="m"),
            client,
            server=ServerConfig(base_url="ftp://x"),
        )
    with pytest.raises(AgentError, match="DM_MISSING_KEY"):
        make_http_agent(
            "narrator",
            AgentConfig(backend="anthropic", model="m", api_key_env="DM_MISSING_KEY"),
            client,
        )
    with pytest.raises(AgentError, match="DM_MISSING_KEY"):
        make_http_agent(
            "narrator",
            AgentConfig(backend="openai", model="m"),
            client,
            server=ServerConfig(base_url="http://h", api_key_env="DM_MISSING_KEY"),
        )
    # anthropic without api_key_env falls back to ANTHROPIC_API_KEY
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(AgentError, match="ANTHROPIC_API_KEY"):
        make_http_agent("narrator", AgentConfig(backend="anthropic", model="m"), client)


def test_make_http_agent_takes_url_key_and_cache_hint_from_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DM_TEST_KEY", KEY)
    client = httpx.AsyncClient()
    config = AgentConfig(backend="openai", model="m", output="ruling", server="gpu")

    def build(server: ServerConfig, **kw: Any) -> Any:
        return make_http_agent("arbiter", config, client, server=server, **kw)

    hosted = build(ServerConfig(base_url="https://api.openai.com/v1", api_key_env="DM_TEST_KEY"))
    assert isinstance(hosted, OpenAIChatAgent)
    assert hosted.url == "https://api.openai.com/v1/chat/completions"
    assert hosted.api_key is not None and hosted.api_key.reveal() == KEY
    assert (hosted.prompt_cache, hosted.output, hosted.layout) == (
        "openai",
        "ruling",
        "stable_first",
    )
    local = build(ServerConfig(base_url="http://127.0.0.1:8080"), layout="action_first")
    assert isinstance(local, OpenAIChatAgent)
    assert (local.prompt_cache, local.layout, local.api_key) == ("llama.cpp", "action_first", None)
    off = build(ServerConfig(base_url="http://127.0.0.1:8080", prompt_cache="off"))
    assert isinstance(off, OpenAIChatAgent) and off.prompt_cache == "off"
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    claude = make_http_agent(
        "narrator", AgentConfig(backend="anthropic", model="m"), client, server=ServerConfig()
    )
    assert isinstance(claude, AnthropicAgent)
    assert claude.url == "https://api.anthropic.com/v1/messages"
    with pytest.raises(ValueError, match="layout"):
        build(ServerConfig(base_url="http://h"), layout="sideways")


# --------------------------------------------------------------------------- streaming


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_deltas_arrive_in_order_and_join_to_the_text(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str
) -> None:
    pieces = ("You ", "find ", "a hidden ", "needle", ".", " ✨")
    server.push(stream_for(api, *pieces))
    seen: list[str] = []
    out = await agent_for(api, server, client).run(request(seen.append), {})
    assert seen == list(pieces)
    assert "".join(seen) == out["text"] == "You find a hidden needle. ✨"


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_on_delta_is_called_while_the_stream_is_still_open(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str
) -> None:
    # OpenAI: role chunk + first piece; Anthropic: message_start, block start, ping, piece
    server.push(
        stream_for(api, "The altar ", "is trapped.", hold_after=2 if api == "openai" else 4)
    )
    seen: list[str] = []
    first = anyio.Event()

    def on_delta(piece: str) -> None:
        seen.append(piece)
        first.set()

    result: dict[str, Any] = {}

    async def call() -> None:
        result.update(await agent_for(api, server, client).run(request(on_delta), {}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        with anyio.fail_after(5):
            await first.wait()
        assert seen == ["The altar "]
        assert not result  # the server is still holding the rest of the stream
        server.release.set()
    assert seen == ["The altar ", "is trapped."]
    assert result["text"] == "The altar is trapped."


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_stream_that_breaks_after_a_delta_is_not_retried(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str
) -> None:
    drop_after = 3 if api == "openai" else 5  # after "The altar " and "is "
    server.push(stream_for(api, "The altar ", "is ", "trapped.", drop_after=drop_after))
    seen: list[str] = []
    with pytest.raises(HTTPAgentError, match="stream broke after 13 characters") as info:
        await agent_for(api, server, client).run(request(seen.append), {})
    assert "RemoteProtocolError" in str(info.value)
    assert seen == ["The altar ", "is "]
    assert server.attempts == 1


@pytest.mark.anyio
async def test_a_stream_that_ends_early_after_a_delta_is_not_retried(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(openai_stream("The altar ", finish=None, usage=None, done=False))
    with pytest.raises(HTTPAgentError, match=r"broke after 10 characters.*ended early"):
        await openai(server, client).run(request(lambda _: None), {})
    assert server.attempts == 1


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_a_stream_that_breaks_before_any_delta_is_retried(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str
) -> None:
    server.push(
        stream_for(api, "The altar ", drop_after=1),  # only the role chunk / message_start
        stream_for(api, "The altar ", finish=None, usage=None, done=False)
        if api == "openai"
        else stream_for(api, "The altar ", stop=None, end=False),  # ends cleanly, too early
    )
    seen: list[str] = []
    out = await agent_for(api, server, client).run(request(), {})
    assert out["attempts"] == 3  # without on_delta nothing was shown, so the cut-off is retried
    assert out["text"] == "The altar is trapped."
    server.push(stream_for(api, "Once", drop_after=1))
    out = await agent_for(api, server, client).run(request(seen.append), {})
    assert out["attempts"] == 2
    assert seen == ["The altar ", "is trapped."]  # nothing twice


@pytest.mark.anyio
async def test_on_delta_raising_stops_the_stream_at_once(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(openai_stream("The altar ", "is trapped.", hold_after=3))

    def on_delta(piece: str) -> None:
        raise RuntimeError("the player's socket is gone")

    with anyio.fail_after(5), pytest.raises(RuntimeError, match="socket is gone"):
        await openai(server, client).run(request(on_delta), {})
    assert await anyio.to_thread.run_sync(server.disconnected.wait, 5)
    assert server.attempts == 1


# --------------------------------------------------------------------------- structured


@pytest.mark.anyio
async def test_structured_ruling_validates_first_time_and_never_streams(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(openai_stream(*RULING))
    seen: list[str] = []
    agent = openai(server, client, name="arbiter", output="ruling")
    out = await agent.run(request(seen.append, dice_key="k7"), {})
    assert seen == []
    roll = roll_d20("k7")
    success = roll == 20 or (roll != 1 and roll >= 15)
    assert out["structured"] == {
        "check": "ability_check",
        "ability": "wis",
        "dc": 15,
        "reason": "Hidden.",
        "roll": roll,
        "success": success,
    }
    assert out["text"].startswith(f"Ruling: a DC 15 Wisdom check; the d20 shows {roll}")
    assert out["state_changes"] == {}
    assert out["repaired"] is False
    assert out["attempts"] == 1
    assert out["usage"] == {"input_tokens": 42, "cached_tokens": 32, "output_tokens": 7}
    body = server.requests[0].body
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "ruling", "schema": dict(SCHEMAS["ruling"]), "strict": True},
    }
    assert "JSON only" in body["messages"][1]["content"]  # the format is in the instructions


@pytest.mark.anyio
async def test_structured_answer_for_llama_cpp_uses_json_object_with_schema(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(openai_stream(*RULING))
    agent = openai(server, client, name="arbiter", output="ruling", prompt_cache="llama.cpp")
    out = await agent.run(request(), {})
    assert out["structured"]["dc"] == 15
    body = server.requests[0].body
    # llama-cpp-python's grammar ignores an integer's minimum/maximum but honours enum
    schema = {**SCHEMAS["ruling"], "properties": {**SCHEMAS["ruling"]["properties"]}}
    schema["properties"]["dc"] = {"enum": list(range(1, 31))}
    assert body["response_format"] == {"type": "json_object", "schema": schema}
    assert body["cache_prompt"] is True


@pytest.mark.anyio
async def test_invalid_structured_answer_is_repaired_once(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    bad = '{"check": "dance", "ability": "wis", "dc": 15, "reason": "x"}'
    server.push(openai_stream(bad), openai_stream(*RULING))
    out = await openai(server, client, name="arbiter", output="ruling").run(request(), {})
    assert out["repaired"] is True
    assert out["structured"]["check"] == "ability_check"
    assert out["attempts"] == 2
    assert out["usage"] == {"input_tokens": 84, "cached_tokens": 64, "output_tokens": 14}
    first, second = (r.body for r in server.requests)
    with pytest.raises(StructuredAnswerError) as error:
        parse_structured("ruling", bad)
    assert second["messages"] == [
        *first["messages"],
        {"role": "assistant", "content": bad},
        {"role": "user", "content": repair_instruction("ruling", error.value)},
    ]
    assert second["response_format"] == first["response_format"]


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_structured_answer_invalid_twice_raises(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str
) -> None:
    tool = {"tool": "record_ruling"} if api == "anthropic" else {}
    server.push(stream_for(api, '{"check": ', **tool), stream_for(api, "[]", **tool))
    agent = agent_for(api, server, client, name="arbiter", output="ruling")
    with pytest.raises(
        AgentError, match=r"the ruling did not validate after one repair: the answer: \[\] is not"
    ):
        await agent.run(request(), {})
    assert server.attempts == 2


@pytest.mark.anyio
async def test_AnthropicAgent_structured_scene_comes_from_a_forced_tool(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    scene = ('{"location": "the crypt", ', '"present": ["a ghoul"], ', '"changes": ["lit"]}')
    server.push(anthropic_stream(*scene, tool="record_scene", stop="tool_use"))
    seen: list[str] = []
    agent = anthropic(server, client, name="module_keeper", output="scene")
    out = await agent.run(request(seen.append), {})
    assert seen == []
    assert out["structured"] == {
        "location": "the crypt",
        "present": ["a ghoul"],
        "changes": ["lit"],
    }
    assert out["state_changes"] == {"scene": "the crypt", "npcs_present": ["a ghoul"]}
    assert out["stop_reason"] == "tool_use"
    assert out["repaired"] is False
    body = server.requests[0].body
    assert body["tools"] == [
        {
            "name": "record_scene",
            "description": "Record the scene as structured data.",
            "input_schema": dict(SCHEMAS["scene"]),
        }
    ]
    assert body["tool_choice"] == {"type": "tool", "name": "record_scene"}


@pytest.mark.anyio
async def test_AnthropicAgent_repair_resends_the_invalid_tool_input_as_text(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(
        anthropic_stream('{"location": 3}', tool="record_scene", stop="tool_use"),
        anthropic_stream('{"location": "", "present": [], "changes": []}', tool="record_scene"),
    )
    out = await anthropic(server, client, output="scene").run(request(), {})
    assert out["repaired"] is True
    assert out["text"] == "The scene is unchanged."
    messages = server.requests[1].body["messages"]
    assert messages[1] == {"role": "assistant", "content": '{"location": 3}'}
    with pytest.raises(StructuredAnswerError) as error:
        parse_structured("scene", '{"location": 3}')
    assert messages[2] == {"role": "user", "content": repair_instruction("scene", error.value)}


# --------------------------------------------------------------------------- prompt caching


@pytest.mark.anyio
async def test_prompt_cache_key_is_a_stable_hash_of_the_session(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    agent = openai(server, client, prompt_cache="openai")
    for session in ("s-1", "s-1", "s-2", None):
        await agent.run(request() if session is None else request(session=session), {})
    bodies = [r.body for r in server.requests]
    keys = [b.get("prompt_cache_key") for b in bodies]
    assert keys[0] == keys[1] != keys[2]
    assert re.fullmatch(r"[0-9a-f]{16}", keys[0])
    assert "s-1" not in json.dumps(bodies[0])  # the session id itself is not sent
    assert keys[3] is None and "prompt_cache_key" not in bodies[3]
    assert all("cache_prompt" not in b for b in bodies)


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_stable_first_prompts_of_two_agents_share_system_and_reference(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str
) -> None:
    reference = "The crypt of Saint Vey. " * 20
    req = request(text=reference, notes="The party is in the crypt.", module="Vey")
    prompts: dict[str, list[str]] = {}
    for layout in ("stable_first", "action_first"):
        for name in ("archivist", "arbiter"):
            agent = agent_for(api, server, client, name=name, layout=layout)
            await agent.run(req, {})
            body = server.requests[-1].body
            system = body["system"][0]["text"] if api == "anthropic" else body["messages"][0]
            system = system if isinstance(system, str) else system["content"]
            prompts.setdefault(layout, []).append(f"{system}\n\n{user_text(body)}")
    a, b = prompts["stable_first"]
    shared = common_prefix(a, b)
    assert shared.startswith("You are one of the agents")
    assert f"Reference:\n{reference.strip()}" in shared  # the whole reference is reusable
    assert "archivist" not in shared and "arbiter" not in shared
    a, b = prompts["action_first"]
    assert reference.strip() not in common_prefix(a, b)
    assert len(common_prefix(a, b)) < 20  # "You are the ..."


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
async def test_streams_ending_early_are_retried_then_reported(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(*[openai_stream("The altar ", finish=None, usage=None, done=False)] * 4)
    with pytest.raises(HTTPAgentError, match=r"gave up after 4 attempts.*stream ended early"):
        await openai(server, client).run(request(), {})
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
async def test_repair_stays_inside_the_deadline(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(openai_stream('{"check": '), Reply("hold"))
    agent = openai(server, client, output="ruling", timeout=0.5)
    with pytest.raises(TimeoutError):
        await agent.run(request(), {})  # no caller deadline: the agent's own 0.5 s
    assert server.attempts == 2  # the repair was sent, then cut off by the same deadline
    assert await anyio.to_thread.run_sync(server.disconnected.wait, 5)


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
@pytest.mark.parametrize("api", ["openai", "anthropic"])
@pytest.mark.parametrize("mid_stream", [False, True], ids=["before-headers", "mid-stream"])
async def test_cancelled_request_closes_its_connection(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str, mid_stream: bool
) -> None:
    stall = stream_for(api, "The altar ", "is trapped.", hold_after=2 if api == "openai" else 4)
    server.push(stall if mid_stream else Reply("hold"))
    agent = agent_for(api, server, client)
    seen: list[str] = []
    with anyio.move_on_after(0.3) as scope:
        await agent.run(request(seen.append), {})
    assert scope.cancelled_caught
    assert seen == (["The altar "] if mid_stream else [])
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
    ("reply", "message"),
    [
        (Reply("sse", events=(b"data: {not json\n\n",)), r"malformed event data: '\{not json'"),
        (Reply("sse", events=(b"data: [1, 2]\n\n",)), "not an object"),
        (
            Reply("sse", events=(event({"error": {"message": "model not loaded"}}),)),
            "the server reported an error: model not loaded",
        ),
        (
            Reply("sse", events=(*openai_events("The ")[:2], b"data: {oops\n\n")),
            "malformed event data",
        ),
        (Reply("raw", 200, (), b'{"choices": []}'), "expected an event stream, got application"),
        (Reply("raw", 200, (("content-type", "text/html"),), b"<html>"), "got text/html: '<html>'"),
    ],
)
async def test_OpenAIChatAgent_malformed_stream_raises_AgentError(
    server: FakeLLMServer, client: httpx.AsyncClient, reply: Reply, message: str
) -> None:
    server.push(reply)
    with pytest.raises(AgentError, match=message):
        await openai(server, client).run(request(lambda _: None), {})
    assert server.attempts == 1  # a malformed answer is not retried


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply("sse", events=(b"event: message_start\ndata: nope\n\n",)), "malformed event data"),
        (
            Reply(
                "sse",
                events=(
                    event(
                        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
                        "error",
                    ),
                ),
            ),
            "the server reported an error: overloaded_error: busy",
        ),
        (Reply("raw", 200, (), b'{"content": []}'), "expected an event stream"),
    ],
)
async def test_AnthropicAgent_malformed_stream_raises_AgentError(
    server: FakeLLMServer, client: httpx.AsyncClient, reply: Reply, message: str
) -> None:
    server.push(reply)
    with pytest.raises(AgentError, match=message):
        await anthropic(server, client).run(request(), {})
    assert server.attempts == 1


@pytest.mark.anyio
@pytest.mark.parametrize("api", ["openai", "anthropic"])
async def test_usage_the_server_does_not_report_is_estimated(
    server: FakeLLMServer, client: httpx.AsyncClient, api: str
) -> None:
    # llama-cpp-python sends no usage in streams; a minimal Anthropic proxy may not either
    server.push(stream_for(api, "ok", usage=None, model=""))
    agent = agent_for(api, server, client)
    out = await agent.run(request(), {})
    assert out["text"] == "ok"
    prompt = agent.build_prompt(request(), {}).text()
    assert out["usage"] == {
        "input_tokens": (len(prompt) + 3) // 4,  # 4 characters a token
        "cached_tokens": None,  # only the server could know
        "output_tokens": 1 if api == "openai" else 6,  # Anthropic's message_delta counts
        "estimated": True,
    }
    assert out["model"] == ("fake-model" if api == "openai" else "fake-claude")  # our own


@pytest.mark.anyio
async def test_a_one_slot_servers_cached_tokens_are_estimated_from_the_last_prompt(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    """llama.cpp's Python server reports no cached tokens; its agents (one cache model
    per server) estimate them as the prefix shared with the prompt it read last."""
    cache = PromptCacheModel.one_slot()
    config = AgentConfig(backend="openai", model="m", max_tokens=50)
    one_slot = ServerConfig(base_url=server.url, max_concurrent=1, prompt_cache="llama.cpp")
    opening = make_http_agent(
        "narrator_opening", config, client, server=one_slot, cache_model=cache
    )
    arbiter = make_http_agent("arbiter", config, client, server=one_slot, cache_model=cache)
    assert isinstance(opening, OpenAIChatAgent) and isinstance(arbiter, OpenAIChatAgent)
    server.push(*[openai_stream("ok", usage=None)] * 3)
    first = await opening.run(request(), {})
    assert first["usage"]["cached_tokens"] == 0  # nothing read yet
    second = await arbiter.run(request(), {"narrator_opening": {"text": "You kneel."}})
    shared = common_prefix(
        opening.build_prompt(request(), {}).text(),
        arbiter.build_prompt(request(), {"narrator_opening": {"text": "You kneel."}}).text(),
    )
    assert shared.startswith("You are one of the agents")
    assert second["usage"]["cached_tokens"] == (len(shared) + 3) // 4
    assert second["usage"]["estimated"] is True
    # a server with several slots keeps several prompts: no estimate there
    many = ServerConfig(base_url=server.url, max_concurrent=4, prompt_cache="llama.cpp")
    other = make_http_agent("arbiter", config, client, server=many, cache_model=cache)
    third = await other.run(request(), {})
    assert third["usage"]["cached_tokens"] is None


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
    error = {"type": "error", "error": {"type": "authentication_error", "message": f"bad {KEY}"}}
    echo = json.dumps({"error": {"message": f"invalid x-api-key {KEY}"}}).encode()
    server.push(
        Reply("raw", 500, (), echo),  # retried, logged
        Reply("drop"),  # retried, logged
        Reply("raw", 401, (), echo),  # the server echoes the key back in its error
        Reply("sse", events=(event(error, "error"),)),  # and in an error event
        Reply("raw", 200, (), echo),  # a 200 that is not a stream
    )
    errors: list[BaseException] = []
    with caplog.at_level(logging.DEBUG):  # httpx and httpcore debug logs too
        for _ in range(3):
            try:
                await agent.run(request(), {})
            except AgentError as exc:
                errors.append(exc)
        output = await agent.run(request(), {})
    assert len(errors) == 3
    assert [r.headers["x-api-key"] for r in server.requests] == [KEY] * 6  # it was sent
    texts = (
        [str(e) for e in errors] + [repr(e) for e in errors] + [repr(e.__cause__) for e in errors]
    )
    texts += [repr(agent), str(agent), repr(output), caplog.text]
    texts += [str(r.__dict__) for r in caplog.records]
    assert "invalid x-api-key ***" in str(errors[0])  # scrubbed, not dropped
    assert "authentication_error: bad ***" in str(errors[1])
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
    prompt = agent.build_prompt(request(action="{text}"), {"x": [1, 2]})
    # substitution is one pass: the player's "{text}" is not expanded again
    assert prompt.task.endswith('\noracle answers {text} as JSON like {"a": 1} {unknown}')
    assert "- x: [1, 2]" in prompt.task
    assert prompt.reference == "Reference:\nAn altar of black stone."
    default = OpenAIChatAgent(name="oracle", client=httpx.AsyncClient(), model="m")
    assert "You are the oracle agent" in default.build_prompt(request(), {}).task
    with pytest.raises(ValueError, match="output"):
        OpenAIChatAgent(name="o", client=httpx.AsyncClient(), model="m", output="poem")
    with pytest.raises(ValueError, match="prompt_cache"):
        OpenAIChatAgent(name="o", client=httpx.AsyncClient(), model="m", prompt_cache="redis")


def test_docs_example_config_is_valid_and_builds_agents(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "agents.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 1
    config = parse_config(tomllib.loads(blocks[0]))
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    client = httpx.AsyncClient()
    agents = {
        name: make_http_agent(name, ac, client, server=config.server_of(name))
        for name, ac in config.agents.items()
    }
    assert {name: type(a).__name__ for name, a in agents.items()} == {
        "archivist": "OpenAIChatAgent",
        "module_keeper": "OpenAIChatAgent",
        "arbiter": "OpenAIChatAgent",
        "narrator": "AnthropicAgent",
    }
    keeper = agents["module_keeper"]
    assert isinstance(keeper, OpenAIChatAgent)
    assert keeper.url == "http://127.0.0.1:11434/v1/chat/completions"
    task = keeper.build_prompt(request(), {}).task
    assert "\nYou are the module_keeper of a D&D adventure. From the module" in task
    narrator = agents["narrator"]
    assert isinstance(narrator, AnthropicAgent)
    assert narrator.url == "https://api.anthropic.com/v1/messages"
    assert config.agents["narrator"].hedge_after == 4.0


@pytest.mark.anyio
async def test_oversized_stream_is_refused(
    server: FakeLLMServer, client: httpx.AsyncClient
) -> None:
    server.push(openai_stream("x" * 300, hold_after=3))  # stopped without waiting for the rest
    with anyio.fail_after(5), pytest.raises(AgentError, match="larger than 100 bytes"):
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
