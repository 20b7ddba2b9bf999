"""Simulated agents: the prompt-cache model, streaming word by word, prefill in the latency."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import anyio
import attrs
import pytest
import trio

from engine.agents.base import AgentRequest
from engine.agents.prompts import build_prompt
from engine.agents.simulated import PromptCacheModel, SimulatedAgent, draw_latency, prompt_tokens
from engine.config import LatencyModel

# ------------------------------------------------------------------ PromptCacheModel

SHARED = "x" * 8000  # 2 000 tokens
A = SHARED + "A" * 400
B = SHARED + "B" * 400

pytestmark = pytest.mark.virtual_clock  # pure-loop: the asyncio tests run in virtual time


def test_a_prompt_sharing_a_long_prefix_is_cached_in_step_multiples() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128)
    cache.store("s", A, ready_at=0.0)
    # 8 000 shared characters are 2 000 tokens: 15 whole steps of 128
    assert cache.lookup("s", B, now=1.0) == 1920
    assert cache.lookup("s", A, now=1.0) == (prompt_tokens(A) // 128) * 128


@pytest.mark.parametrize(
    ("shared_chars", "cached"),
    [
        (0, 0),
        (4000, 0),  # 1 000 tokens: below min_tokens
        (4092, 0),  # 1 023 tokens
        (4093, 1024),  # 1 024 tokens: the minimum, one whole number of steps
        (4612, 1152),  # 1 153 tokens: rounded down to 9 steps
        (5120, 1280),
    ],
)
def test_cached_tokens_need_min_tokens_and_come_in_steps(shared_chars: int, cached: int) -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128)
    cache.store("s", "y" * shared_chars + "A" * 100, ready_at=0.0)
    assert cache.lookup("s", "y" * shared_chars + "B" * 100, now=0.0) == cached


def test_a_prompt_is_cached_only_once_its_prefill_is_done() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128)
    cache.store("s", A, ready_at=10.0)
    assert cache.lookup("s", B, now=9.99) == 0
    assert cache.lookup("s", B, now=10.0) == 1920


def test_a_cached_prompt_expires_after_the_ttl() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128, ttl=300.0)
    cache.store("s", A, ready_at=10.0)
    assert cache.lookup("s", B, now=310.0) == 1920  # exactly the ttl: still there
    assert cache.lookup("s", B, now=310.5) == 0
    assert cache.lookup("s", B, now=310.5) == 0


def test_the_cache_is_per_key() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128)
    cache.store("s1", A, ready_at=0.0)
    assert cache.lookup("s2", B, now=1.0) == 0
    assert cache.lookup("s1", B, now=1.0) == 1920


def test_each_key_keeps_its_last_prompts() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128, per_key=3)
    prompts = [f"{i}|" + SHARED for i in range(4)]  # distinct from the first character
    for p in prompts:
        cache.store("s", p, ready_at=0.0)
    assert cache.lookup("s", prompts[0] + "!", now=1.0) == 0  # pushed out
    assert [cache.lookup("s", p + "!", now=1.0) for p in prompts[1:]] == [1920] * 3


def test_keys_are_dropped_least_recently_used() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128, max_keys=2)
    cache.store("a", A, ready_at=0.0)
    cache.store("b", A, ready_at=0.0)
    assert cache.lookup("a", B, now=1.0) == 1920  # "a" is now the most recent
    cache.store("c", A, ready_at=0.0)  # drops "b"
    assert cache.lookup("b", B, now=1.0) == 0
    assert cache.lookup("a", B, now=1.0) == cache.lookup("c", B, now=1.0) == 1920


def test_min_tokens_zero_still_needs_a_shared_token() -> None:
    cache = PromptCacheModel(min_tokens=0, step=1)
    cache.store("s", "abc", ready_at=0.0)
    assert cache.lookup("s", "xyz", now=0.0) == 0
    assert cache.lookup("s", "abcd", now=0.0) == 1


def test_a_prompt_past_its_ttl_is_never_served_even_behind_a_fresher_one() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128, ttl=300.0)
    # two calls of one session at t=0: a slow one (ready at 100) stored first, a fast
    # one (ready at 0) second, as two concurrent agents of one action do
    cache.store("s", "slow|" + SHARED, ready_at=100.0)
    cache.store("s", A, ready_at=0.0)
    # at 350 the fast prompt is 350 s old: past the ttl; the slow one is 250 s old
    assert cache.lookup("s", "slow|" + SHARED + "!", now=350.0) == 1920
    assert cache.lookup("s", B, now=350.0) == 0


# ------------------------------------------------------------------ SimulatedAgent

REFERENCE = "Locations > The Reliquary\n" + " ".join(
    f"Stone niche {i} holds a skull." for i in range(300)
)
NO_JITTER = LatencyModel(ttft_median_seconds=0.5, ttft_sigma=0.0, inter_token_seconds=0.01)


def request(on_delta: Any = None, **context: Any) -> AgentRequest:
    base: dict[str, Any] = {
        "action": "I pry open the reliquary",
        "action_type": "exploration",
        "text": REFERENCE,
        "titles": ["Locations > The Reliquary"],
        "sections": ["locations"],
        "session": "s1",
        "draw_key": "s1:1",
        "module": "The Ember Vault",
        "notes": "",
    }
    base.update(context)
    return AgentRequest(id="narrator", agent="narrator", context=base, on_delta=on_delta)


@pytest.fixture
def scale(anyio_backend: tuple[str, dict[str, Any]]) -> float:
    """Latencies of whole virtual seconds (trio's MockClock, asyncio's virtual clock), or a
    few real milliseconds on asyncio's real clock."""
    virtual = anyio_backend[0] == "trio" or "loop_factory" in anyio_backend[1]
    return 1.0 if virtual else 0.02


@attrs.define
class Pieces:
    t0: float = attrs.field(factory=anyio.current_time)
    got: list[tuple[float, str]] = attrs.field(factory=list)

    def __call__(self, piece: str) -> None:
        self.got.append((anyio.current_time() - self.t0, piece))

    @property
    def text(self) -> str:
        return "".join(p for _, p in self.got)


@pytest.mark.anyio
async def test_streams_word_pieces_that_join_to_the_text(scale: float) -> None:
    agent = SimulatedAgent("narrator", NO_JITTER, output_tokens=100, seed=1, time_scale=scale)
    sink = Pieces()
    out = await agent.run(request(sink), {})
    text = out["text"]
    assert text.startswith("You pry open the reliquary.")
    assert sink.text == text
    words = text.split(" ")
    assert [p for _, p in sink.got] == [words[0], *(" " + w for w in words[1:])]
    times = [t for t, _ in sink.got]
    assert times == sorted(times) and times[-1] <= anyio.current_time() - sink.t0


@pytest.mark.anyio
async def test_piece_times_are_exact_in_virtual_time() -> None:
    agent = SimulatedAgent("narrator", NO_JITTER, output_tokens=100, seed=1)
    sink = Pieces()
    out = await agent.run(request(sink), {})
    elapsed = anyio.current_time() - sink.t0
    latency = out["simulated_latency"]
    assert latency == 0.5 + 100 * 0.01  # time to first token + output; no prefill cost
    # the first piece after the time to first token, the rest spread over the output
    assert sink.got[0][0] == 0.5
    n = len(sink.got)
    step = (latency - 0.5) / n
    assert [t for t, _ in sink.got] == pytest.approx([0.5 + i * step for i in range(n)])
    assert elapsed == pytest.approx(latency, abs=1e-12)


def _stall(seconds: float) -> None:
    """Move the virtual clock on without running anything: an event loop busy elsewhere."""
    try:
        trio.lowlevel.current_clock().jump(seconds)  # type: ignore[attr-defined]
    except RuntimeError:  # not in trio: the VirtualTimeLoop
        loop = asyncio.get_running_loop()
        loop._virtual_now += seconds  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_reader_that_falls_behind_catches_up_with_the_stream() -> None:
    """Each piece is due at a fixed time from the start, as a server's stream arrives
    whatever the reader does: a reader stalled at the first piece gets the pieces due
    meanwhile at once and ends on time, instead of pushing every later one back."""
    agent = SimulatedAgent("narrator", NO_JITTER, output_tokens=100, seed=1)
    sink = Pieces()

    def stalled(piece: str) -> None:
        sink(piece)
        if len(sink.got) == 1:
            _stall(0.4)

    out = await agent.run(request(stalled), {})
    latency = out["simulated_latency"]
    assert anyio.current_time() - sink.t0 == pytest.approx(latency, abs=1e-12)
    assert sink.text == out["text"]
    n = len(sink.got)
    step = (latency - 0.5) / n
    due = [0.5 + i * step for i in range(n)]
    assert [t for t, _ in sink.got] == pytest.approx([0.5, *(max(0.9, d) for d in due[1:])])
    assert sum(d < 0.9 for d in due) > 1  # the stall did hold pieces back


@pytest.mark.anyio
async def test_prefill_is_part_of_the_latency_and_of_the_time_to_first_piece() -> None:
    model = attrs.evolve(NO_JITTER, prefill_seconds_per_token=0.001)
    agent = SimulatedAgent("narrator", model, output_tokens=100, seed=1)
    sink = Pieces()
    out = await agent.run(request(sink), {})
    tokens = out["usage"]["input_tokens"]
    prefill = 0.001 * tokens
    assert out["simulated_latency"] == pytest.approx(0.5 + prefill + 1.0, abs=1e-12)
    unscaled = out["simulated_latency"]
    first = unscaled * min(max(1.0 - 1.0 / unscaled, 0.0), 1.0)  # as the agent splits it
    assert sink.got[0][0] == first
    assert first == pytest.approx(0.5 + prefill, abs=1e-12)
    assert anyio.current_time() - sink.t0 == pytest.approx(unscaled, abs=1e-12)


@pytest.mark.anyio
async def test_usage_reports_prompt_cached_and_output_tokens(scale: float) -> None:
    agent = SimulatedAgent("narrator", NO_JITTER, output_tokens=70, seed=1, time_scale=scale)
    req = request()
    out = await agent.run(req, {})
    prompt = build_prompt("narrator", req, {}, output="text", layout="stable_first")
    assert out["usage"] == {
        "input_tokens": prompt_tokens(prompt.text()),
        "cached_tokens": 0,
        "output_tokens": 70,
    }
    assert out["usage"]["input_tokens"] > 2000  # the reference text is in the prompt


@pytest.mark.anyio
async def test_without_on_delta_or_for_structured_output_nothing_streams() -> None:
    plain = SimulatedAgent("narrator", NO_JITTER, output_tokens=100, seed=1)
    t0 = anyio.current_time()
    out = await plain.run(request(), {})
    assert anyio.current_time() - t0 == out["simulated_latency"] == 1.5
    arbiter = SimulatedAgent("arbiter", NO_JITTER, output_tokens=30, seed=1, output="ruling")
    sink = Pieces()
    ruling = await arbiter.run(request(sink), {})
    assert sink.got == []  # a ruling is one JSON answer, not streamed
    assert ruling["text"].startswith("Ruling: ")
    assert set(ruling["structured"]) >= {"check", "ability", "dc", "reason", "roll", "success"}


@pytest.mark.anyio
async def test_draws_depend_on_key_and_attempt_only(scale: float) -> None:
    model = LatencyModel(ttft_median_seconds=0.5, ttft_sigma=0.8, inter_token_seconds=0.01)
    agent = SimulatedAgent("narrator", model, output_tokens=10, seed=3, time_scale=scale)
    one = await agent.run(request(draw_key="k"), {})
    again = await agent.run(request(draw_key="k"), {})
    hedge = await agent.run(request(draw_key="k", attempt=2), {})
    assert one["simulated_latency"] == again["simulated_latency"]
    assert hedge["simulated_latency"] != one["simulated_latency"]  # an independent draw
    assert one["simulated_latency"] == pytest.approx(
        scale
        * draw_latency(model, 10, 3, "k", "narrator", uncached_tokens=one["usage"]["input_tokens"])
    )


HOSTED = LatencyModel(
    ttft_median_seconds=0.5,
    ttft_sigma=0.0,
    inter_token_seconds=0.01,
    prefill_seconds_per_token=0.001,
    cached_prefill_fraction=0.125,
)


async def _two_calls(agent: SimulatedAgent, wait: float) -> tuple[dict[str, Any], float]:
    """Call 1 of session s1, then (``wait`` later) call 2; call 2's output and duration."""
    await agent.run(request(draw_key="s1:1"), {})
    await anyio.sleep(wait)
    t0 = anyio.current_time()
    out = await agent.run(request(draw_key="s1:2", action="I lift the lid"), {})
    return out, anyio.current_time() - t0


@pytest.mark.anyio
async def test_a_later_call_of_the_session_gets_its_shared_prefix_from_the_cache(
    scale: float,
) -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128)
    cached_agent = SimulatedAgent(
        "narrator", HOSTED, output_tokens=100, seed=1, time_scale=scale, prompt_cache=cache
    )
    plain_agent = SimulatedAgent("narrator", HOSTED, output_tokens=100, seed=1, time_scale=scale)
    cached, _ = await _two_calls(cached_agent, 0.0)
    plain, _ = await _two_calls(plain_agent, 0.0)
    usage = cached["usage"]
    assert usage["input_tokens"] == plain["usage"]["input_tokens"]
    # preamble + reference + instructions are shared; the player's text differs
    assert usage["cached_tokens"] >= 1024 and usage["cached_tokens"] % 128 == 0
    # all of it but the player's text and the last partial step
    assert usage["input_tokens"] - usage["cached_tokens"] < 128 + 16
    assert plain["usage"]["cached_tokens"] == 0
    assert cached["simulated_latency"] < plain["simulated_latency"]
    saved = scale * 0.001 * (1 - 0.125) * usage["cached_tokens"]
    assert plain["simulated_latency"] - cached["simulated_latency"] == pytest.approx(saved)


@pytest.mark.anyio
async def test_the_cached_call_is_shorter_in_virtual_time() -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128)
    agent = SimulatedAgent("narrator", HOSTED, output_tokens=100, seed=1, prompt_cache=cache)
    out, elapsed = await _two_calls(agent, 5.0)
    assert out["usage"]["cached_tokens"] > 0
    assert elapsed == pytest.approx(out["simulated_latency"], abs=1e-12)
    plain = SimulatedAgent("narrator", HOSTED, output_tokens=100, seed=1)
    _, plain_elapsed = await _two_calls(plain, 5.0)
    assert elapsed < plain_elapsed


@pytest.mark.anyio
async def test_concurrent_calls_do_not_hit_each_others_unfinished_prefill(
    scale: float,
) -> None:
    cache = PromptCacheModel(min_tokens=1024, step=128)
    agent = SimulatedAgent(
        "narrator", HOSTED, output_tokens=100, seed=1, time_scale=scale, prompt_cache=cache
    )
    outs: dict[str, Mapping[str, Any]] = {}

    async def call(key: str) -> None:
        outs[key] = await agent.run(request(draw_key=key), {})

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, "s1:1")
        tg.start_soon(call, "s1:2")  # the same prompt, sent while the first is prefilling
    assert [o["usage"]["cached_tokens"] for o in outs.values()] == [0, 0]
    # once the first prefill is done, the same prompt is served from the cache
    await anyio.sleep(5 * scale)
    await call("s1:3")
    assert outs["s1:3"]["usage"]["cached_tokens"] > 0
