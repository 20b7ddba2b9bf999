"""The engine's agent calls under one global limit kept in a real Redis."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

import engine
from engine.agents.base import AgentRequest
from engine.config import Config


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # a real server: the real clock


@attrs.define(eq=False)
class Gauge:
    """Counts the agent calls running at once, across agents and engines."""

    running: int = 0
    peak: int = 0
    calls: int = 0


@attrs.define(eq=False)
class Slow:
    gauge: Gauge

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        self.gauge.running += 1
        self.gauge.calls += 1
        self.gauge.peak = max(self.gauge.peak, self.gauge.running)
        try:
            await anyio.sleep(0.01)
        finally:
            self.gauge.running -= 1
        return {"text": f"{request.agent} answers"}


def _config(tmp: Path, redis_url: str, limit: int, spares: int = 0) -> Config:
    config = Config()
    par = attrs.evolve(
        config.performance.parallelization,
        redis_url=redis_url,
        global_max_concurrent_agents=limit,
        global_spare_leases=spares,
        max_concurrent_agents=16,
    )
    return attrs.evolve(
        config,
        performance=attrs.evolve(config.performance, parallelization=par),
        module=attrs.evolve(config.module, include_srd=False, cache_dir=str(tmp / "modules")),
        state=attrs.evolve(config.state, write_in_thread=False),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("spares", [0, 2], ids=["no spares", "2 spare leases"])
async def test_two_engines_share_one_global_limit(
    tmp_path: Path, redis_url: str, spares: int
) -> None:
    gauge = Gauge()
    config = _config(tmp_path, redis_url, limit=2, spares=spares)
    agents = {name: Slow(gauge) for name in config.agents}

    async def engine_plays(index: int) -> None:
        state = tmp_path / f"engine{index}.sqlite"
        async with (
            engine.open_engine(config, agents=agents, state_path=state) as dm,
            anyio.create_task_group() as tg,
        ):
            for s in range(4):  # 4 sessions x 2 engines: far more than 2 calls at once
                tg.start_soon(play, dm, f"s{index}-{s}")

    async def play(dm: Any, session: str) -> None:
        for text in ("I attack the goblin", "I search the altar"):
            result = await dm.player_action(session, text)
            assert not result.degraded, result.missing

    async with anyio.create_task_group() as tg:
        tg.start_soon(engine_plays, 0)
        tg.start_soon(engine_plays, 1)
    assert gauge.calls > 20
    assert gauge.peak <= 2  # never more model calls at once than the global limit


@pytest.mark.anyio
async def test_an_unreachable_redis_is_one_clear_error(tmp_path: Path) -> None:
    config = _config(tmp_path, "redis://127.0.0.1:1/0", limit=2)
    with pytest.raises(engine.EngineError, match=r"127\.0\.0\.1:1"):
        async with engine.open_engine(config, state_path=tmp_path / "s.sqlite"):
            pass
