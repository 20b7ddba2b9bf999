"""The OpenAI-compatible agent against a real llama.cpp server (llama-cpp-python, SmolLM2-135M).

Run with ``-s`` to read the figures these tests print (usage, first-try validations,
time to first delta). The model is tiny and the machine small: answers are short
(``max_tokens`` 40-60) and nothing here asserts on wall-clock time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from engine.agents.base import AgentRequest, DeltaSink
from engine.agents.http import OpenAIChatAgent, make_http_agent
from engine.config import AgentConfig, ServerConfig
from engine.errors import AgentError

from .conftest import LlamaServer

pytestmark = [pytest.mark.llm, pytest.mark.anyio]

ACTIONS = (
    "I swing my longsword at the goblin",
    "I try to pick the lock of the iron chest",
    "I leap across the chasm",
    "I try to persuade the guard to let us pass",
    "I search the altar for hidden traps",
    "I hold my breath against the poison gas",
    "I climb the slippery cliff",
    "I shoot an arrow at the orc archer",
    "I try to recall the history of the ruined temple",
    "I sneak past the sleeping ogre",
)
REFERENCE = "The Sunless Crypt is a small dungeon under the chapel of Saint Vey."


class Bodies:
    """Records the JSON body of every request the client sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> None:
        self.sent.append(json.loads(request.content))


@pytest.fixture
def bodies() -> Bodies:
    return Bodies()


@pytest.fixture
async def client(bodies: Bodies) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, event_hooks={"request": [bodies]}) as c:
        yield c


def agent(
    server: LlamaServer,
    client: httpx.AsyncClient,
    name: str = "narrator",
    output: str = "text",
    max_tokens: int = 40,
) -> OpenAIChatAgent:
    built = make_http_agent(
        name,
        AgentConfig(
            backend="openai", model="smollm2", output=output, max_tokens=max_tokens,
            timeout_seconds=120.0,
        ),
        client,
        server=ServerConfig(base_url=server),  # prompt_cache "auto": llama.cpp
    )  # fmt: skip
    assert isinstance(built, OpenAIChatAgent)
    assert built.prompt_cache == "llama.cpp"
    return built


def request(
    action: str, text: str = REFERENCE, on_delta: DeltaSink | None = None, **context: Any
) -> AgentRequest:
    ctx = {"action": action, "text": text, "module": "The Sunless Crypt", **context}
    return AgentRequest(id=f"r-{action[:12]}", agent="narrator", context=ctx, on_delta=on_delta)


async def test_streamed_text_answer(llama_server: LlamaServer, client: httpx.AsyncClient) -> None:
    deltas: list[str] = []
    out = await agent(llama_server, client).run(
        request("I open the crypt door", on_delta=deltas.append), {}
    )
    print(f"\ntext ({len(deltas)} deltas): {out['text']!r}")
    print(f"usage reported in the stream: {out['usage']}; model: {out['model']!r}")
    print(f"stop_reason: {out['stop_reason']!r}")
    assert out["text"].strip()
    assert len(deltas) >= 3
    assert "".join(deltas) == out["text"]
    assert out["stop_reason"] in ("stop", "length")
    assert out["attempts"] == 1
    for value in out["usage"].values():  # llama-cpp-python 0.3 reports none in streams
        assert value is None or (isinstance(value, int) and value >= 0)


async def test_structured_rulings_validate(
    llama_server: LlamaServer, client: httpx.AsyncClient, bodies: Bodies
) -> None:
    arbiter = agent(llama_server, client, name="arbiter", output="ruling", max_tokens=60)
    first_try = valid = 0
    failures: list[str] = []
    for action in ACTIONS:
        try:
            out = await arbiter.run(request(action), {})
        except AgentError as exc:
            failures.append(str(exc))
            continue
        valid += 1
        first_try += not out["repaired"]
        print(f"\n{action!r}: {out['structured']} repaired={out['repaired']}")
    print(f"\nrulings: {first_try}/{len(ACTIONS)} valid at the first try, {valid} in all")
    for failure in failures:
        print(f"failed: {failure}")
    assert bodies.sent[0]["response_format"]["type"] == "json_object"
    assert bodies.sent[0]["response_format"]["schema"]["required"] == [
        "check", "ability", "dc", "reason",
    ]  # fmt: skip
    # the grammar makes an invalid answer rare (10/10 here); the bound leaves room for
    # another model build or sampler without hiding a broken response_format
    assert valid >= 7


async def test_structured_scene_validates(
    llama_server: LlamaServer, client: httpx.AsyncClient
) -> None:
    keeper = agent(llama_server, client, name="module_keeper", output="scene", max_tokens=120)
    text = (
        "Room 3, the ossuary: skulls line the walls. Brother Aldric, a ghoul priest, "
        "waits here with two skeletons."
    )
    out = await keeper.run(request("I enter the ossuary", text=text), {})
    print(f"\nscene: {out['structured']} repaired={out['repaired']} text={out['text']!r}")
    assert set(out["structured"]) == {"location", "present", "changes"}
    assert out["state_changes"]["npcs_present"] == [
        p.strip() for p in out["structured"]["present"] if p.strip()
    ]


def long_reference() -> str:
    """About 600 tokens of module text."""
    rooms = [
        "a flooded stair where cold water rises to the knee",
        "a chapel of cracked marble with a defaced statue of Saint Vey",
        "an ossuary whose walls are stacked with skulls and thigh bones",
        "a guard room with a rotten table, three stools and a rusted brazier",
        "a narrow gallery whose floor hides a pit trap, DC 14 to notice",
        "the priest's cell, with a cot, a chest of moth-eaten robes and a diary",
        "a collapsed tunnel that a Medium creature can squeeze through",
        "the reliquary, sealed by an iron door with a DC 15 lock",
        "a shrine to a forgotten god, its altar stained with old wax",
        "the crypt of the founders, six stone sarcophagi under a vaulted roof",
        "a well room where the rope has rotted and the bucket lies broken",
        "the bell chamber, its bell cracked and hanging by one chain",
    ]
    parts = [
        f"Room {i}: {room}. A ghoul may lurk here at night; the air smells of damp earth "
        f"and old incense, and the torches have long gone out."
        for i, room in enumerate(rooms, 1)
    ]
    return " ".join(parts)


async def test_a_shared_prefix_makes_the_next_first_delta_faster(
    llama_server: LlamaServer, client: httpx.AsyncClient, bodies: Bodies
) -> None:
    narrator = agent(llama_server, client, max_tokens=30)
    reference = long_reference()
    timings: list[float] = []
    for action in ("I light a torch and look around", "I listen at the iron door"):
        start = anyio.current_time()
        first: list[float] = []

        def on_delta(piece: str, first: list[float] = first, start: float = start) -> None:
            if not first:
                first.append(anyio.current_time() - start)

        out = await narrator.run(request(action, text=reference, on_delta=on_delta), {})
        assert out["text"].strip()
        timings.append(first[0])
    cold, warm = timings
    prompt = narrator.build_prompt(request("x", text=reference), {}).text()
    print(f"\nprompt ~{len(prompt) // 4} tokens; time to first delta: cold {cold:.2f} s, "
          f"same reference {warm:.2f} s")  # fmt: skip
    hits = [line for line in llama_server.log.read_text().splitlines() if "prefix-match" in line]
    print("server:", hits[-2:])
    assert [b["cache_prompt"] for b in bodies.sent] == [True, True]
    first_prompt, second_prompt = (b["messages"] for b in bodies.sent)
    assert first_prompt[0] == second_prompt[0]  # the same system message
    assert (
        first_prompt[1]["content"].split("\n\n")[0] == second_prompt[1]["content"].split("\n\n")[0]
    )


async def test_cancelling_mid_stream_leaves_the_server_ready(
    llama_server: LlamaServer, client: httpx.AsyncClient
) -> None:
    long_answer = agent(llama_server, client, max_tokens=400)
    deltas: list[str] = []
    with anyio.move_on_after(60) as scope:

        def on_delta(piece: str) -> None:
            deltas.append(piece)
            if len(deltas) == 3:
                scope.cancel()  # the player left: stop reading after three pieces

        await long_answer.run(
            request("I tell the whole story of the crypt, in detail", on_delta=on_delta), {}
        )
    assert scope.cancelled_caught
    assert len(deltas) == 3
    start = anyio.current_time()
    with anyio.fail_after(60):
        out = await agent(llama_server, client).run(request("I step back"), {})
    elapsed = anyio.current_time() - start
    print(f"\nafter the cancelled call, the next answer took {elapsed:.2f} s: {out['text']!r}")
    assert out["text"].strip()
    assert "Disconnected from client" in llama_server.log.read_text()  # the server saw it
