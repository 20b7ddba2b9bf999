"""Seeded simulated LLM agents: realistic latency on the event loop's clock, real outputs.

Latency = LogNormal time to first token + prefill of the prompt + output tokens x
inter-token time; with a small probability the call is a straggler, ``straggler_factor``
times slower. Prefill costs ``prefill_seconds_per_token`` per prompt token the
simulated server has not cached and ``cached_prefill_fraction`` of that per cached one;
the prompt is laid out exactly as an HTTP agent would send it
(:func:`~engine.agents.prompts.build_prompt`), so prompt size and layout cost time here
as they do on a real server. Random draws are a pure function of ``(seed, draw key,
agent, attempt)``, so two strategies that replay the same actions see the same draws,
and a hedge (attempt 2) gets an independent draw.

A streaming request (``request.on_delta`` set) gets its text word by word: the first
piece after the time to first token and the prefill, the others spread over the output
time. The output is built from what the agent was given — its context (the module chunks
the context builder chose) and its dependencies' outputs — and rulings and scenes go
through the same :func:`~engine.agents.schemas.finish` as a real model's answers (the
engine rolls the dice).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Mapping
from typing import Any, final

import anyio
import attrs

from ..config import Config, LatencyModel
from .base import AgentRequest
from .prompt_cache import PromptCacheModel
from .prompts import build_prompt, estimate_tokens
from .schemas import finish

__all__ = ["PromptCacheModel", "SimulatedAgent", "draw_latency", "prompt_tokens"]

ROLES = ("archivist", "module_keeper", "arbiter", "narrator_opening", "narrator")


def _rng(seed: int, key: str, agent: str, attempt: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}|{key}|{agent}|{attempt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def prompt_tokens(text: str) -> int:
    """Tokens of a prompt for the simulation: the rule of thumb of 4 characters a token."""
    return estimate_tokens(text)


def draw_latency(
    model: LatencyModel,
    output_tokens: int,
    seed: int,
    key: str,
    agent: str,
    attempt: int = 1,
    *,
    uncached_tokens: int = 0,
    cached_tokens: int = 0,
) -> float:
    """The simulated latency of one call, in seconds (deterministic in its arguments)."""
    rng = _rng(seed, key, agent, attempt)
    ttft = model.ttft_median_seconds * math.exp(model.ttft_sigma * rng.gauss(0.0, 1.0))
    prefill = model.prefill_seconds_per_token * (
        uncached_tokens + cached_tokens * model.cached_prefill_fraction
    )
    latency = ttft + prefill + output_tokens * model.inter_token_seconds
    if rng.random() < model.straggler_probability:
        latency *= model.straggler_factor
    return latency


def _first_token_share(model: LatencyModel, output_tokens: int, unscaled: float) -> float:
    """The fraction of a call's latency before its first token (the rest is decoding)."""
    decode = output_tokens * model.inter_token_seconds
    return min(max(1.0 - decode / unscaled, 0.0), 1.0) if unscaled > 0 else 0.0


@final
@attrs.define(eq=False)
class SimulatedAgent:
    """An agent that sleeps for a seeded latency, then answers from its inputs.

    ``request.context["draw_key"]`` selects the latency draw (the benchmark replays
    the same keys for every strategy); without it each call takes the next draw of
    a per-agent sequence. ``request.context["attempt"]`` (set by hedging) gives an
    independent draw for the same key. ``prompt_cache`` (shared by the agents of one
    simulated server) decides which prompt tokens are cached; without one every token
    is prefilled. Stateless per call apart from the counter and the cache, so one
    object serves many sessions at once.
    """

    name: str
    model: LatencyModel = attrs.field(factory=LatencyModel)
    output_tokens: int = 100
    seed: int = 0
    time_scale: float = 1.0  # multiply every latency (load tests shrink real time)
    output: str = "text"  # "text", "ruling" or "scene"
    layout: str = "stable_first"
    prompt_cache: PromptCacheModel | None = None
    # a fixed prompt size instead of the built prompt's (the strategy comparison: then
    # a call's latency depends only on its draw, so the critical path is exact)
    fixed_prompt_tokens: int | None = None
    _counter: itertools.count[int] = attrs.field(factory=itertools.count, init=False)

    @classmethod
    def from_config(
        cls,
        name: str,
        config: Config,
        time_scale: float = 1.0,
        prompt_cache: PromptCacheModel | None = None,
    ) -> SimulatedAgent:
        agent = config.agents[name]
        return cls(
            name,
            config.latency_model(),
            agent.output_tokens,
            config.simulation.seed,
            time_scale,
            agent.output,
            config.performance.prompts.layout,
            prompt_cache,
        )

    def latency(
        self, key: str, attempt: int = 1, *, uncached_tokens: int = 0, cached_tokens: int = 0
    ) -> float:
        return self.time_scale * draw_latency(
            self.model,
            self.output_tokens,
            self.seed,
            key,
            self.name,
            attempt,
            uncached_tokens=uncached_tokens,
            cached_tokens=cached_tokens,
        )

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = str(request.context.get("draw_key", f"#{next(self._counter)}"))
        attempt = int(request.context.get("attempt", 1))
        cached = 0
        text = ""
        cache_key = str(request.context.get("session", key))
        if self.fixed_prompt_tokens is not None:
            total = self.fixed_prompt_tokens
        else:
            prompt = build_prompt(
                self.name, request, inputs, output=self.output, layout=self.layout
            )
            text = prompt.text()
            total = prompt_tokens(text)
            if self.prompt_cache is not None:
                cached = self.prompt_cache.lookup(cache_key, text, anyio.current_time())
        latency = self.latency(key, attempt, uncached_tokens=total - cached, cached_tokens=cached)
        unscaled = latency / self.time_scale if self.time_scale > 0 else 0.0
        first = latency * _first_token_share(self.model, self.output_tokens, unscaled)
        if self.prompt_cache is not None and text:
            self.prompt_cache.store(cache_key, text, anyio.current_time() + first)
        rng = _rng(self.seed, key, self.name + ":out", 1)
        answer = _answer(self.name, self.output, request, inputs, rng)
        sink = request.on_delta
        if sink is None or self.output != "text":
            await anyio.sleep(latency)
        else:
            # each piece is due at a fixed time from the start, as a server's stream
            # arrives whatever the reader does: a late wake-up delays the pieces after
            # it only until they are due, instead of pushing every later one back
            start = anyio.current_time()
            pieces = _pieces(answer["text"], latency - first)
            step = (latency - first) / max(len(pieces), 1)
            for i, piece in enumerate(pieces):
                await anyio.sleep_until(start + first + i * step)
                sink(piece)
            await anyio.sleep_until(start + latency)
        answer["usage"] = {
            "input_tokens": total,
            "cached_tokens": cached,
            "output_tokens": self.output_tokens,
        }
        answer["simulated_latency"] = latency
        return answer


#: Pieces come at least this far apart: word by word at real token rates, in groups of
#: words when latencies are scaled down (the load test), where a wake-up per word
#: would make the harness, not the engine, the load on the event loop.
_MIN_PIECE_SECONDS = 0.001


def _pieces(text: str, decode_seconds: float) -> list[str]:
    """``text`` in word-sized pieces (each but the first with its leading space),
    grouped so that ``decode_seconds`` gives each at least ``_MIN_PIECE_SECONDS``."""
    if not text:
        return []
    words = text.split(" ")
    pieces = [words[0], *(" " + w for w in words[1:])]
    most = max(1, int(decode_seconds / _MIN_PIECE_SECONDS))
    if len(pieces) <= most:
        return pieces
    size = -(-len(pieces) // most)  # ceil
    return ["".join(pieces[i : i + size]) for i in range(0, len(pieces), size)]


def _gist(text: str, title: str, limit: int = 160) -> str:
    """The first sentence of a chunk's text, without the title line it starts with."""
    # the first sentence (at most ``limit`` characters) lies within the first lines:
    # look no further than needed, the context can be a few thousand tokens
    lines = text.strip()[: 2 * limit + 200].splitlines()
    if lines and title and lines[0].strip().startswith((title, title.split(" > ")[-1])):
        lines = lines[1:]
    flat = " ".join(" ".join(lines).split())
    cut = flat.find(". ")
    sentence = flat if cut < 0 else flat[: cut + 1]
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def _second_person(action: str) -> str:
    """ "I search the altar" -> "You search the altar." """
    words = action.strip().rstrip(".!").split()
    if not words:
        return ""
    if words[0].lower() in ("i", "we"):
        words[0] = "You"
        words = [{"my": "your", "me": "you", "our": "your", "us": "you"}.get(w, w) for w in words]
    elif action.strip().endswith("?"):
        return f"You ask: {action.strip()}"
    else:
        words[0] = words[0][0].upper() + words[0][1:]
    return " ".join(words) + "."


def _sources(request: AgentRequest) -> list[str]:
    titles = request.context.get("titles") or ()
    return [str(t) for t in titles]


def _answer(
    role: str,
    output: str,
    request: AgentRequest,
    inputs: Mapping[str, Any],
    rng: random.Random,
) -> dict[str, Any]:
    action = str(request.context.get("action", ""))
    context_text = str(request.context.get("text", ""))
    sources = _sources(request)
    sections = [str(x) for x in request.context.get("sections") or ()]
    lead = sources[0] if sources else "the adventure notes"
    gist = _gist(context_text, lead) if context_text else ""
    given = {k: str(v.get("text", "")) for k, v in inputs.items() if isinstance(v, Mapping)}
    dice_key = str(request.context.get("dice_key", request.id))

    if output == "ruling":
        check = "attack" if request.context.get("action_type") == "combat" else "ability_check"
        ability = rng.choice(("str", "dex", "con", "int", "wis", "cha"))
        decision = {
            "check": check,
            "ability": ability,
            "dc": 10 + 5 * rng.randint(0, 2),
            "reason": f"Per {lead}." if sources else "By the general rules.",
        }
        return {**finish("ruling", decision, dice_key), "sources": sources}
    if output == "scene":
        places = [t for t, sec in zip(sources, sections, strict=False) if sec == "locations"]
        scene = str(request.context.get("location", "")) or (places[0] if places else "")
        people = list(
            dict.fromkeys(
                t.split(" > ")[0]
                for t, sec in zip(sources, sections, strict=False)
                if sec == "npcs"
            )
        )
        data = {"location": scene, "present": people[:3], "changes": []}
        return {**finish("scene", data, dice_key), "sources": sources}
    if role == "archivist":
        text = f"From {lead}: {gist}" if gist else f"Nothing in {lead} bears on this."
        return {"role": role, "text": text, "sources": sources}
    if role == "narrator_opening":
        parts = [_second_person(action)] if action else []
        if gist:
            parts.append(f"{lead}: {gist}")
        return {"role": role, "text": " ".join(parts), "sources": sources}
    # narrator, or any other role: weave the inputs into a narrative
    ruling = next((t for t in given.values() if t.startswith("Ruling:")), "")
    continuing = bool(request.context.get("continues"))
    parts = [_second_person(action)] if action and not continuing else []
    parts.extend(t for t in given.values() if t and not t.startswith("Ruling:"))
    if gist and not continuing:
        parts.append(f"{lead}: {gist}")
    if ruling:
        parts.append(ruling.replace("Ruling: ", "The rules say: "))
    return {"role": role, "text": " ".join(parts), "sources": sources, "used_inputs": sorted(given)}
