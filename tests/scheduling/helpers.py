"""A scripted agent that records what the executor did to it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import attrs

from engine.agents.base import AgentRequest


class Boom(Exception):
    pass


@attrs.define(eq=False)
class ScriptedAgent:
    """Sleeps ``latency[request.id]`` (per attempt if a list), fails for ids in ``fail``."""

    latency: Mapping[str, Any] = attrs.field(factory=dict)
    fail: frozenset[str] = frozenset()
    default: float = 1.0
    starts: dict[str, list[float]] = attrs.field(factory=dict)
    ends: dict[str, float] = attrs.field(factory=dict)
    cancelled: list[str] = attrs.field(factory=list)
    inputs_seen: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    running: int = 0
    peak: int = 0

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        attempt = int(request.context.get("attempt", 1))
        self.starts.setdefault(request.id, []).append(anyio.current_time())
        self.inputs_seen[request.id] = dict(inputs)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            delay = self.latency.get(request.id, self.default)
            if isinstance(delay, (list, tuple)):
                delay = delay[attempt - 1]
            await anyio.sleep(delay)
        except BaseException:
            self.cancelled.append(request.id)
            raise
        finally:
            self.running -= 1
        if request.id in self.fail:
            raise Boom(f"{request.id} failed")
        self.ends[request.id] = anyio.current_time()
        return f"out:{request.id}:{attempt}"
