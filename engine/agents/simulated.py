"""Seeded simulated LLM agents: realistic latency on the event loop's clock, real outputs.

Latency = LogNormal time to first token + output tokens x inter-token time; with a
small probability the call is a straggler, ``straggler_factor`` times slower. Draws
are a pure function of ``(seed, draw key, agent, attempt)``, so two strategies that
replay the same actions see exactly the same latencies, and a hedge (attempt 2)
gets an independent draw.

The output is built from what the agent was given — its context (the module chunks
the context builder chose) and its dependencies' outputs — so the narrator's text
names the arbiter's ruling and the module content it was shown.
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

__all__ = ["SimulatedAgent", "draw_latency"]

ROLES = ("archivist", "module_keeper", "arbiter", "narrator")


def _rng(seed: int, key: str, agent: str, attempt: int) -> random.Random:
    digest = hashlib.blake2b(f"{seed}|{key}|{agent}|{attempt}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def draw_latency(
    model: LatencyModel, output_tokens: int, seed: int, key: str, agent: str, attempt: int = 1
) -> float:
    """The simulated latency of one call, in seconds (deterministic in its arguments)."""
    rng = _rng(seed, key, agent, attempt)
    ttft = model.ttft_median_seconds * math.exp(model.ttft_sigma * rng.gauss(0.0, 1.0))
    latency = ttft + output_tokens * model.inter_token_seconds
    if rng.random() < model.straggler_probability:
        latency *= model.straggler_factor
    return latency


@final
@attrs.define(eq=False)
class SimulatedAgent:
    """An agent that sleeps for a seeded latency, then answers from its inputs.

    ``request.context["draw_key"]`` selects the latency draw (the benchmark replays
    the same keys for every strategy); without it each call takes the next draw of
    a per-agent sequence. ``request.context["attempt"]`` (set by hedging) gives an
    independent draw for the same key. Stateless per call apart from that counter,
    so one object serves many sessions at once.
    """

    name: str
    model: LatencyModel = attrs.field(factory=LatencyModel)
    output_tokens: int = 100
    seed: int = 0
    time_scale: float = 1.0  # multiply every latency (load tests shrink real time)
    _counter: itertools.count[int] = attrs.field(factory=itertools.count, init=False)

    @classmethod
    def from_config(cls, name: str, config: Config, time_scale: float = 1.0) -> SimulatedAgent:
        agent = config.agents[name]
        return cls(
            name, config.latency_model(), agent.output_tokens, config.simulation.seed, time_scale
        )

    def latency(self, key: str, attempt: int = 1) -> float:
        return self.time_scale * draw_latency(
            self.model, self.output_tokens, self.seed, key, self.name, attempt
        )

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> dict[str, Any]:
        key = str(request.context.get("draw_key", f"#{next(self._counter)}"))
        attempt = int(request.context.get("attempt", 1))
        await anyio.sleep(self.latency(key, attempt))
        rng = _rng(self.seed, key, self.name + ":out", 1)
        return _answer(self.name, request, inputs, rng)


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
    role: str, request: AgentRequest, inputs: Mapping[str, Any], rng: random.Random
) -> dict[str, Any]:
    action = str(request.context.get("action", ""))
    context_text = str(request.context.get("text", ""))
    sources = _sources(request)
    sections = [str(x) for x in request.context.get("sections") or ()]
    lead = sources[0] if sources else "the adventure notes"
    gist = _gist(context_text, lead) if context_text else ""
    given = {k: v.get("text", "") for k, v in inputs.items() if isinstance(v, Mapping)}

    if role == "archivist":
        text = f"From {lead}: {gist}" if gist else f"Nothing in {lead} bears on this."
        return {"role": role, "text": text, "sources": sources}
    if role == "module_keeper":
        places = [t for t, sec in zip(sources, sections, strict=False) if sec == "locations"]
        scene = str(request.context.get("location", "")) or (places[0] if places else "")
        text = f"The scene: {scene}." if scene else "The scene is unchanged."
        changes = {"scene": scene} if scene else {}
        return {
            "role": role,
            "text": text,
            "scene": scene,
            "sources": sources,
            "state_changes": changes,
        }
    if role == "arbiter":
        dc = 10 + 5 * rng.randint(0, 2)
        roll = rng.randint(1, 20)
        success = roll >= dc
        basis = f" (per {lead})" if sources else ""
        verdict = "succeeds" if success else "fails"
        text = f"Ruling: a DC {dc} check{basis}; the d20 shows {roll}, so the attempt {verdict}."
        return {
            "role": role,
            "text": text,
            "dc": dc,
            "roll": roll,
            "success": success,
            "considered": sorted(given),
            "sources": sources,
        }
    # narrator, or any other role: weave the inputs into a narrative
    ruling = next((t for t in given.values() if t.startswith("Ruling:")), "")
    parts = [_second_person(action)] if action else []
    parts.extend(t for t in given.values() if t and not t.startswith("Ruling:"))
    if gist:
        parts.append(f"{lead}: {gist}")
    if ruling:
        parts.append(ruling.replace("Ruling: ", "The rules say: "))
    return {"role": role, "text": " ".join(parts), "sources": sources, "used_inputs": sorted(given)}
