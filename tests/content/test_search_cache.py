"""ModuleStore keeps search results per query: equal rows, no second FTS5 query."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine.content import store as store_mod
from engine.content.store import ModuleStore, open_module
from engine.errors import ModuleError

pytestmark = pytest.mark.anyio


async def test_repeated_search_is_answered_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await open_module("default", include_srd=False, cache_dir=tmp_path) as m:
        first = await m.search_chunks("I search the altar for traps", 10)
        first_text = await m.search_chunks("I search the altar for traps", 10, with_text=True)
        assert first[0]
        queries: list[str] = []
        run = ModuleStore._run

        def counted(self: ModuleStore, sql: str, params: Sequence[object]) -> list[Any]:
            queries.append(sql)
            return run(self, sql, params)

        monkeypatch.setattr(ModuleStore, "_run", counted)
        assert await m.search_chunks("I search the altar for traps", 10) == first
        assert await m.search_chunks("I search the altar for traps", 10, with_text=True) == (
            first_text
        )
        assert queries == []  # both answered from the cache
        other = await m.search_chunks("I search the altar for traps", 3)  # another limit
        assert len(queries) == 1 and other[0] == first[0][:3]


async def test_search_cache_is_bounded_and_cleared_on_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_mod, "_SEARCHES_KEPT", 2)
    m = await open_module("default", include_srd=False, cache_dir=tmp_path)
    for query in ("altar", "chapel", "goblin", "cistern"):
        await m.search(query, 5)
        assert len(m._searches) <= 2
    await m.aclose()
    assert not m._searches
    with pytest.raises(ModuleError, match="closed"):
        await m.search("altar", 5)  # cached before the close: still refused


@pytest.mark.parametrize("query_in_thread", [False, True])
async def test_a_kept_search_answers_on_the_callers_step_and_honours_cancellation(
    tmp_path: Path, query_in_thread: bool
) -> None:
    """A kept search is answered without a worker thread or a trip through the loop,
    but a cancelled caller still gets its cancellation there."""
    async with await open_module(
        "default", include_srd=False, cache_dir=tmp_path, query_in_thread=query_in_thread
    ) as m:
        first = await m.search_chunks("I search the altar for traps", 10)
        steps: list[str] = []

        async def other() -> None:
            steps.append("other ran")

        async with anyio.create_task_group() as tg:
            tg.start_soon(other)  # ready to run at the caller's next schedule point
            assert await m.search_chunks("I search the altar for traps", 10) == first
            steps.append("kept search answered")
        assert steps == ["kept search answered", "other ran"]
        with anyio.CancelScope() as scope:
            scope.cancel()
            await m.search_chunks("I search the altar for traps", 10)
            steps.append("not reached")
        assert scope.cancelled_caught and "not reached" not in steps
