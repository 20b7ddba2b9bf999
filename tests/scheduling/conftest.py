"""Fixtures of the scheduling tests."""

from __future__ import annotations

from typing import Any

import pytest

from engine.scheduling.executor import ParallelAgentExecutor


@pytest.fixture(params=["own clock", "serving"])
def hedge_clock(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test twice: each execution with its own hedge clock, then every execution
    inside ``ParallelAgentExecutor.serving()`` (one timer task shared by executions)."""
    if request.param == "serving":
        execute_parallel = ParallelAgentExecutor.execute_parallel
        execute_with_timeout = ParallelAgentExecutor.execute_with_timeout

        async def served_parallel(self: ParallelAgentExecutor, *args: Any, **kw: Any) -> Any:
            async with self.serving():
                return await execute_parallel(self, *args, **kw)

        async def served_timeout(self: ParallelAgentExecutor, *args: Any, **kw: Any) -> Any:
            async with self.serving():
                return await execute_with_timeout(self, *args, **kw)

        monkeypatch.setattr(ParallelAgentExecutor, "execute_parallel", served_parallel)
        monkeypatch.setattr(ParallelAgentExecutor, "execute_with_timeout", served_timeout)
    return str(request.param)
