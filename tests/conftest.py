"""Shared fixtures: every async test runs on trio (with an autojump MockClock) and asyncio.

On asyncio the loop runs on the real clock, unless the test is marked
``@pytest.mark.virtual_clock``: then it runs on ``virtual_clock.VirtualTimeLoop``, the asyncio
equivalent of trio's ``MockClock(autojump_threshold=0)``. Only pure-loop tests may opt in (no
worker threads, subprocesses or real sockets while a timer is pending: the clock would jump).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio.testing
from servers import redis_url  # noqa: F401  (a real redis-server, one per test session)
from virtual_clock import VirtualTimeLoop


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "virtual_clock: on asyncio, run on a virtual clock that jumps to the next timer "
        "(like trio's MockClock(autojump_threshold=0)); pure-loop tests only",
    )


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
    if request.node.get_closest_marker("virtual_clock") is not None:
        # a fresh loop per test (anyio's runner): virtual time starts at 0, as on trio
        return name, {**options, "loop_factory": VirtualTimeLoop}
    return name, options


@pytest.fixture
def trio_only(anyio_backend: tuple[str, dict[str, Any]]) -> None:
    """Skip on asyncio: for tests that cannot run on the virtual asyncio clock (see each one)."""
    if anyio_backend[0] != "trio":
        pytest.skip("needs trio's MockClock")
