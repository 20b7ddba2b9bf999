"""Shared fixtures: every async test runs on trio (with an autojump MockClock) and asyncio."""

from __future__ import annotations

from typing import Any

import pytest
import trio.testing
from servers import redis_url  # noqa: F401  (a real redis-server, one per test session)


@pytest.fixture(
    params=[
        pytest.param(("trio", {"clock": None}), id="trio"),
        pytest.param(("asyncio", {}), id="asyncio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """Run each ``@pytest.mark.anyio`` test on trio (virtual time) and on asyncio."""
    name, options = request.param
    if name == "trio":
        # a fresh clock per test: virtual time starts at 0 and jumps when all tasks wait
        return name, {"clock": trio.testing.MockClock(autojump_threshold=0)}
    return name, options


@pytest.fixture
def trio_only(anyio_backend: tuple[str, dict[str, Any]]) -> None:
    """Skip on asyncio: for tests whose assertions need trio's virtual clock."""
    if anyio_backend[0] != "trio":
        pytest.skip("needs trio's MockClock")
