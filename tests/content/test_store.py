"""The compiled module store: compile once, recompile on change, reject foreign files."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.content import store as store_mod
from engine.content.query import STOPWORDS
from engine.content.sources import bundled_adventure_dir
from engine.content.store import ModuleStore, SectionContent, fts_query, open_module, query_terms
from engine.errors import LoadError, ModuleError

pytestmark = pytest.mark.anyio


def _adventure_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "emberfall"
    shutil.copytree(bundled_adventure_dir(), folder)
    return folder


async def test_open_reads_catalogue_and_sections(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as m:
        assert m.name == "default"
        assert m.section_names() == [
            "chapters",
            "locations",
            "npcs",
            "encounters",
            "rules",
            "spells",
            "monsters",
            "equipment",
            "magic_items",
            "conditions",
        ]
        entry = m.catalogue["srd/monsters/ogre"]
        assert (entry.section, entry.title) == ("monsters", "Ogre")
        assert not hasattr(entry, "text")  # the catalogue holds no chunk text
        npcs = await m.load_section("npcs")
        assert isinstance(npcs, SectionContent)
        assert {c.section for c in npcs} == {"npcs"}
        assert len(npcs) == len(m.chunk_ids("npcs"))
        with pytest.raises(LoadError, match="no section 'dragons'"):
            await m.load_section("dragons")


async def test_unchanged_module_is_not_recompiled(compiled: Path) -> None:
    files = sorted(compiled.glob("*.sqlite"))  # noqa: ASYNC240
    assert len(files) == 1
    before = files[0].stat()
    async with await open_module("default", cache_dir=compiled) as m:
        assert m.path == files[0]
    after = files[0].stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_srd_only_and_adventure_only(tmp_path: Path) -> None:
    async with await open_module("default", include_srd=False, cache_dir=tmp_path) as m:
        assert m.section_names() == ["chapters", "locations", "npcs", "encounters"]


async def test_search_ranks_by_bm25_deterministically(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as m:
        first = await m.search("cast fireball at the goblins", 10)
        assert first == await m.search("cast fireball at the goblins", 10)
        ids = [cid for cid, _ in first]
        assert "srd/spells/fireball" in ids and "srd/monsters/goblin" in ids
        scores = [s for _, s in first]
        assert scores == sorted(scores, reverse=True) and scores[-1] > 0
        assert await m.search("the of and", 10) == []  # only stop words
        assert await m.search('"); DROP TABLE chunks; --', 5) == await m.search(
            "drop table chunks", 5
        )
        chunks = await m.fetch_chunks(ids[:3])
        assert list(chunks) == ids[:3] or set(chunks) == set(ids[:3])
        assert all(chunks[i].id == i for i in ids[:3])


def test_fts_query_quotes_terms_and_pairs() -> None:
    assert fts_query("Hold Person on the cult-fanatic!") == (
        '"hold" OR "person" OR "cult" OR "fanatic" OR "hold person" OR "person cult" OR "cult fanatic"'
    )
    assert fts_query("?? the") == ""


async def test_changed_source_is_recompiled(tmp_path: Path) -> None:
    folder = _adventure_copy(tmp_path)
    cache = tmp_path / "cache"
    async with await open_module(folder, include_srd=False, cache_dir=cache) as m1:
        assert m1.name == "emberfall"
        assert await m1.search("marmalade", 5) == []
        old_path = m1.path
    nave = folder / "locations" / "the-sunken-nave.md"
    nave.write_text(nave.read_text() + "\nA jar of marmalade sits on the altar.\n")
    async with await open_module(folder, include_srd=False, cache_dir=cache) as m2:
        assert m2.path != old_path and m2.fingerprint != m1.fingerprint
        hits = await m2.search("marmalade", 5)
        assert hits and hits[0][0].startswith("emberfall/locations/the-sunken-nave")
    assert not old_path.exists()  # the superseded file is removed
    assert [p.name for p in cache.iterdir()] == [m2.path.name]  # no temp files left


async def test_malformed_source_leaves_nothing_behind(tmp_path: Path) -> None:
    folder = _adventure_copy(tmp_path)
    (folder / "npcs" / "broken.md").write_text("---\ntype: npc\n")
    cache = tmp_path / "cache"
    with pytest.raises(ModuleError, match=r"broken\.md: front matter is not closed"):
        await open_module(folder, include_srd=False, cache_dir=cache)
    assert list(cache.iterdir()) == []


async def test_missing_folder_is_a_module_error(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match="no such adventure folder"):
        await open_module(tmp_path / "nowhere", cache_dir=tmp_path)


async def test_foreign_sqlite_file_is_rejected(tmp_path: Path) -> None:
    foreign = tmp_path / "other.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE meta(key TEXT, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema', 'someone-else')")
    conn.commit()
    conn.close()
    with pytest.raises(ModuleError, match=r"other\.sqlite: not a compiled dm-engine module"):
        await open_module(foreign)
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(ModuleError, match=r"garbage\.sqlite"):
        await open_module(garbage)


async def test_compiled_file_opens_directly(compiled: Path) -> None:
    path = next(compiled.glob("*.sqlite"))  # noqa: ASYNC240
    async with await open_module(path) as m:
        assert m.name == "default" and "srd/spells/fireball" in m.catalogue


async def test_corrupt_cache_file_is_recompiled(tmp_path: Path) -> None:
    async with await open_module("default", include_srd=False, cache_dir=tmp_path) as m:
        path = m.path
    path.write_bytes(b"\0" * 4096)
    async with await open_module("default", include_srd=False, cache_dir=tmp_path) as m:
        assert m.path == path and len(m.catalogue) > 0


async def test_closed_store_raises(tmp_path: Path) -> None:
    m = await open_module("default", include_srd=False, cache_dir=tmp_path)
    await m.aclose()
    await m.aclose()  # idempotent
    with pytest.raises(ModuleError, match="closed"):
        await m.search("altar", 3)


async def test_cancelled_open_leaves_no_open_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation delivered while the catalogue is read leaves no connection open."""
    async with await open_module("default", include_srd=False, cache_dir=tmp_path):
        pass  # compiled: the next open only reads the catalogue
    opened: list[ModuleStore] = []
    real_open = store_mod._open

    with anyio.CancelScope() as scope:

        def spy(path: Path, query_in_thread: bool = True) -> ModuleStore:
            s = real_open(path, query_in_thread)
            opened.append(s)
            anyio.from_thread.run_sync(scope.cancel)  # cancelled while the thread runs
            return s

        monkeypatch.setattr(store_mod, "_open", spy)
        # anyio hands a finished thread's result back and cancels at the next checkpoint
        async with await open_module("default", include_srd=False, cache_dir=tmp_path):
            await anyio.sleep(1)
            pytest.fail("not cancelled")
    assert scope.cancelled_caught
    assert len(opened) == 1 and opened[0]._conn is None


async def test_catalogue_is_read_on_demand(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled, query_in_thread=False) as m:
        catalogue = m.catalogue
        assert not catalogue.complete
        # the keyed adventure chunks are known from the open, for the builder's boosts
        nave = m.ids_for_key("the sunken nave")
        assert nave and all(cid in catalogue for cid in nave) and not catalogue.complete
        hits, texts = await m.search_chunks("cast fireball at the goblins", 10, with_text=True)
        assert [(e.id, s) for e, s in hits] == await m.search("cast fireball at the goblins", 10)
        fetched = await m.fetch_chunks([e.id for e, _ in hits])
        assert texts == {cid: c.text for cid, c in fetched.items()}
        fireball = next(e for e, _ in hits if e.id == "srd/spells/fireball")
        assert catalogue["srd/spells/fireball"] is fireball
        assert not catalogue.complete  # hits and fetches did not read the whole catalogue
        known = {e.id: e for e, _ in hits}
        assert len(catalogue) == sum(len(m.chunk_ids(s)) for s in m.section_names())
        assert catalogue.complete
        assert all(catalogue[cid] is e for cid, e in known.items())  # entries kept
        assert list(catalogue) == sorted(catalogue, key=lambda cid: catalogue[cid].rowid)
        with pytest.raises(KeyError):
            catalogue["no/such/chunk"]
        with pytest.raises(KeyError):
            await m.fetch_chunks(["srd/spells/fireball", "no/such/chunk"])


async def test_load_catalogue_matches_the_sync_read(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as a:
        loaded = await a.load_catalogue()
        assert loaded.complete and loaded is a.catalogue
    async with await open_module("default", cache_dir=compiled) as b:
        assert dict(b.catalogue) == dict(loaded)  # the sync read on first iteration
        assert all(e.units is not None and e.tokens > 0 for e in loaded.values())


async def test_queries_in_a_worker_thread_give_the_same_answers(compiled: Path) -> None:
    query = "what does a dragon's frightful presence do"
    async with await open_module("default", cache_dir=compiled) as on_loop:
        assert not on_loop.query_in_thread
        expected = await on_loop.search(query, 20)
        chunks = await on_loop.fetch_chunks([cid for cid, _ in expected])
    async with await open_module("default", cache_dir=compiled, query_in_thread=True) as threaded:
        assert await threaded.search(query, 20) == expected
        assert await threaded.fetch_chunks([cid for cid, _ in expected]) == chunks


async def test_recompile_keeps_a_session_store_named_like_the_module(tmp_path: Path) -> None:
    """Regression (hardening #1): a recompile deleted ``<cache_dir>/<module>-*.sqlite``,
    the session store among them, and the next action silently started at turn 1."""
    import attrs

    import engine

    folder = tmp_path / "game"
    shutil.copytree(bundled_adventure_dir(), folder)
    cache = tmp_path / "cache"
    config = engine.Config()
    config = attrs.evolve(
        config,
        module=attrs.evolve(
            config.module, name=str(folder), include_srd=False, cache_dir=str(cache)
        ),
        state=attrs.evolve(
            config.state, path=str(cache / "game-save1.sqlite"), write_in_thread=False
        ),
        simulation=attrs.evolve(config.simulation, time_scale=0.001),
    )
    # a store whose name even looks like a compile (24 hex digits) is not one either
    lookalike = cache / "game-0123456789abcdef01234567.sqlite"
    async with engine.open_engine(config) as dm:
        for text in ("I look around", "I walk to the door", "I open it"):
            await dm.player_action("s1", text)
    cache.joinpath(lookalike.name).write_bytes((cache / "game-save1.sqlite").read_bytes())
    first_compiles = {p.name for p in cache.glob("game-*.sqlite")} - {
        "game-save1.sqlite",
        lookalike.name,
    }
    nave = folder / "locations" / "the-sunken-nave.md"
    nave.write_text(nave.read_text() + "\nA jar of marmalade sits on the altar.\n")
    async with engine.open_engine(config) as dm:
        result = await dm.player_action("s1", "I search the altar")
        transcript = await dm.store.transcript("s1")
    assert result.turn == 4
    assert [row.turn for row in transcript] == [1, 2, 3, 4]
    assert lookalike.exists()
    assert not any((cache / name).exists() for name in first_compiles)  # the old compile went


def _terms_char_by_char(text: str) -> list[str]:
    """The definition, spelled out: runs of ``str.isalnum`` characters of the
    lower-cased text, 2+ characters, not stop words, first occurrence order."""
    terms: dict[str, None] = {}
    word: list[str] = []
    for ch in text.lower() + " ":
        if ch.isalnum():
            word.append(ch)
        elif word:
            w = "".join(word)
            word.clear()
            if len(w) > 1 and w not in STOPWORDS:
                terms[w] = None
    return list(terms)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
    | st.text("ab _-'é²İ1 ", max_size=30)
)
def test_query_terms_are_the_alphanumeric_runs(text: str) -> None:
    assert query_terms(text) == _terms_char_by_char(text)
