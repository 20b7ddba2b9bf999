"""ModuleStore keeps search results per query: equal rows, no second FTS5 query."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from engine.content import store as store_mod
from engine.content.store import ModuleStore, open_module
from engine.errors import ModuleError

pytestmark = pytest.mark.anyio


def _traced(m: ModuleStore) -> list[str]:
    """Every SQL statement the store runs from now on (not FTS5's own, traced as "--")."""
    statements: list[str] = []
    assert m._conn is not None
    m._conn.set_trace_callback(lambda sql: None if sql.startswith("--") else statements.append(sql))
    return statements


async def test_repeated_search_is_answered_from_the_cache(tmp_path: Path) -> None:
    async with await open_module("default", include_srd=False, cache_dir=tmp_path) as m:
        first = await m.search_chunks("I search the altar for traps", 10)
        first_text = await m.search_chunks("I search the altar for traps", 10, with_text=True)
        assert first[0]
        queries = _traced(m)
        assert await m.search_chunks("I search the altar for traps", 10) == first
        assert await m.search_chunks("I search the altar for traps", 10, with_text=True) == (
            first_text
        )
        assert queries == []  # both answered from the cache
        other = await m.search_chunks("I search the altar for traps", 3)  # another limit
        assert other[0] == first[0][:3]
        assert queries == []  # its phrases' scores and its hits' entries were kept
        texts = await m.search_chunks("I search the altar for traps", 4, with_text=True)
        assert texts[0] == first[0][:4] and texts[1] == {
            e.id: first_text[1][e.id] for e, _ in first[0][:4]
        }
        # no FTS5 query: one read of the hits' text
        assert len(queries) == 1 and "chunks_fts" not in queries[0]


async def test_a_new_text_of_known_phrases_runs_no_fts5_query(tmp_path: Path) -> None:
    async with await open_module("default", include_srd=False, cache_dir=tmp_path) as m:
        await m.search_chunks("search the altar", 10)
        await m.search_chunks("traps on the altar", 10)
        queries = _traced(m)
        both = await m.search_chunks("traps, altar", 10)  # phrases "traps", "altar" kept
        assert both[0] and not [q for q in queries if "chunks_fts" in q]
        queries.clear()
        await m.search_chunks("altar chapel", 10)  # "chapel" and "altar chapel" are new
        # a word's and a pair's scores are read from the compiled lists (the pair is
        # never adjacent in the module: the read finds nothing): no FTS5 query
        assert not [q for q in queries if "chunks_fts" in q]
        assert len([q for q in queries if "bm25_words" in q]) == 1
        assert len([q for q in queries if "bm25_pairs" in q]) == 1
        queries.clear()
        await m.search_chunks("the altar trap", 10)  # "altar trap" is in the module
        assert len([q for q in queries if "bm25_pairs" in q]) == 1
        assert not [q for q in queries if "chunks_fts" in q]
        m.forget_searches(phrases=False)
        queries.clear()
        assert await m.search_chunks("traps, altar", 10) == both
        # expanded again (one vocabulary look-up), ranked from kept phrase scores, its
        # hits' entries known: no other query
        assert len(queries) == 1 and "FROM vocab" in queries[0]
        m.forget_searches()
        queries.clear()
        assert await m.search_chunks("traps, altar", 10) == both
        assert len([q for q in queries if "bm25_words" in q]) == 1  # traps, altar at once
        assert len([q for q in queries if "bm25_pairs" in q]) == 1  # "traps altar"
        assert not [q for q in queries if "chunks_fts" in q]
        assert len([q for q in queries if "FROM vocab" in q]) == 1
        queries.clear()
        await m.search_chunks("the altar xyzzy", 10)  # a word the vocabulary lacks
        # FTS5 is asked for it, and not for its pair: the word matches no row
        assert [q for q in queries if "chunks_fts" in q] == [
            "SELECT rowid, -bm25(chunks_fts, 4.0, 3.0, 1.0) FROM chunks_fts "
            "WHERE chunks_fts MATCH '\"xyzzy\"'"
        ]


async def test_a_typo_reads_the_vocabulary_once(tmp_path: Path) -> None:
    async with await open_module("default", include_srd=False, cache_dir=tmp_path) as m:
        queries = _traced(m)
        await m.search_chunks("the altar", 5)  # no typo: the words looked up
        assert [q for q in queries if "vocab" in q and "group_concat" not in q]
        queries.clear()
        repaired = m.expand("the altr")  # a typo: its neighbours, the whole vocabulary
        assert repaired[0] == "the altar"
        assert len([q for q in queries if "group_concat" in q]) == 1
        queries.clear()
        assert m.expand("the chapell behind the altr")[0] == "the chapel behind the altar"
        assert m.expand("a goblin guard")[0] == "a goblin guard"
        assert [q for q in queries if "vocab" in q] == []  # answered from memory


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
