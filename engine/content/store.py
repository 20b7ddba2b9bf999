"""The module store: a module compiled into SQLite (chunk table + FTS5 index), read lazily.

Opening a module reads only its ``meta`` table and the catalogue entries of the few
chunks with keys (adventure locations and NPCs, for the builder's boosts). Other
catalogue entries (id, section, title, tokens, keys, digest) come with the search
hits that name them, and chunk text is fetched on demand; the whole catalogue is
read only when something iterates it or looks up an id no query has returned yet.
Compiling (and recompiling when the sources change) is ``compiler.py``'s part.

Threads: one ``sqlite3`` connection per store, ``check_same_thread=False``, every use
under a ``threading.Lock``. Queries run on the event loop by default: measured, a
search is 0.3 ms at p50 and under 1 ms at p95 over the whole SRD, a worker-thread
round trip costs about as much, and under load a busy loop hands the GIL back to a
worker thread slowly (bench/bench_context.py, docs/load-test.md). A thread wait
would also let a mock clock's autojump advance virtual time in the middle of a
context build. ``query_in_thread=True`` runs every query in
``anyio.to_thread.run_sync`` instead (one connection serialized by the lock: anyio's
worker threads are pooled and anonymous, so per-thread connections could not be
closed deterministically). Opening and compiling always run in a worker thread.
"""

from __future__ import annotations

import functools
import itertools
import os
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, final

import anyio
import anyio.to_thread
import attrs

from ..errors import LoadError, ModuleError
from .compiler import compile_module, connect_read_only, locate_module, read_meta
from .query import STOPWORDS, expand_query
from .sources import (
    ADVENTURE_SECTIONS,
    SRD_SECTIONS,
    Chunk,
)

if TYPE_CHECKING:
    from ..config import ModuleConfig

__all__ = [
    "Catalogue",
    "CatalogueEntry",
    "ModuleStore",
    "SectionContent",
    "compile_module",
    "open_module",
]


@attrs.frozen
class CatalogueEntry:
    """What the store knows about a chunk without reading its text."""

    id: str
    section: str
    title: str
    tokens: int
    keys: tuple[str, ...]
    digest: str
    rowid: int
    units: int | None = None  # the default counter's unscaled count (see tokens.py)


@attrs.frozen
class SectionContent:
    """A whole section's chunks, as ``load_section`` returns it (the lazy loader's unit)."""

    module: str
    section: str
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return sum(len(c.text) + len(c.title) + len(c.id) + 64 for c in self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)


def query_terms(text: str) -> list[str]:
    """The query terms of free text: lower-case words of 2+ characters, stop words
    dropped, in order, without repeats."""
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


@functools.lru_cache(maxsize=1024)
def fts_query(text: str, *more: str) -> str:
    """An FTS5 MATCH expression from free text: its terms (stop words dropped) and each
    pair of adjacent terms as a phrase, OR-ed and quoted; '' when there are no terms.

    ``more``: further segments (alias expansions) whose terms and pairs are OR-ed in;
    pairs never span two segments."""
    out: dict[str, None] = {}
    pairs: dict[str, None] = {}
    for segment in (text, *more):
        words = query_terms(segment)
        out.update(dict.fromkeys(words))
        # adjacent pairs as phrases too: a chunk saying "hold person" beats one saying "hold"
        pairs.update(dict.fromkeys(f"{a} {b}" for a, b in itertools.pairwise(words)))
    return " OR ".join(f'"{t}"' for t in [*out, *pairs])


#: Search results kept per store (all dropped at once when full, like the expansions).
_SEARCHES_KEPT: Final = 256

_COLUMNS: Final = "c.id, c.section, c.title, c.tokens, c.keys, c.digest, c.rowid, c.units"
_RANKED: Final = (
    "SELECT rowid, -bm25(chunks_fts, ?, ?, ?) AS s FROM chunks_fts "
    "WHERE chunks_fts MATCH ? ORDER BY s DESC, rowid LIMIT ?"
)
# one query for the ranking and the hits' catalogue entries (and text): the FTS5 part
# is materialized first, so only the LIMIT rows are joined to the chunk table
_SEARCH: Final = (
    f"SELECT {_COLUMNS}, f.s FROM ({_RANKED}) AS f JOIN chunks AS c ON c.rowid = f.rowid "
    "ORDER BY f.s DESC, f.rowid"
)
_SEARCH_TEXT: Final = (
    f"SELECT {_COLUMNS}, f.s, c.text FROM ({_RANKED}) AS f JOIN chunks AS c "
    "ON c.rowid = f.rowid ORDER BY f.s DESC, f.rowid"
)


def _entry(row: Sequence[Any]) -> CatalogueEntry:
    """A catalogue entry from the first 8 columns of a row selecting ``_COLUMNS``."""
    keys = row[4]
    return CatalogueEntry(
        row[0],
        sys.intern(row[1]),  # a handful of section names, shared by every entry
        row[2],
        row[3],
        tuple(k for k in keys.split("\n") if k) if keys else (),
        row[5],
        row[6],
        row[7],
    )


@final
class Catalogue(Mapping[str, CatalogueEntry]):
    """A module's catalogue (chunk id -> entry, in module order), read on demand.

    Entries returned by a query (search hits, fetched chunks, loaded sections, the
    keyed chunks read at open) are known at once. Iterating, ``len`` or looking up an
    id no query has returned reads the whole catalogue once, synchronously (about
    3 ms for the SRD's 1 411 chunks); ``await store.load_catalogue()`` does that read
    as a store query instead. An entry never changes once known: the file is read-only.
    """

    __slots__ = ("_complete", "_known", "_load_all")

    def __init__(
        self, known: Iterable[CatalogueEntry], load_all: Callable[[], list[CatalogueEntry]]
    ) -> None:
        self._known: dict[str, CatalogueEntry] = {e.id: e for e in known}
        self._complete = False
        self._load_all = load_all

    @property
    def complete(self) -> bool:
        """Every entry has been read."""
        return self._complete

    def _remember(self, row: Sequence[Any]) -> CatalogueEntry:
        e = self._known.get(row[0])
        if e is None:
            e = self._known[row[0]] = _entry(row)
        return e

    def _fill(self, entries: list[CatalogueEntry]) -> None:
        if not self._complete:
            known = self._known
            self._known = {e.id: known.get(e.id, e) for e in entries}  # module order
            self._complete = True

    def _all(self) -> dict[str, CatalogueEntry]:
        if not self._complete:
            self._fill(self._load_all())
        return self._known

    def __getitem__(self, chunk_id: str) -> CatalogueEntry:
        e = self._known.get(chunk_id)
        if e is not None:
            return e
        if self._complete:
            raise KeyError(chunk_id)
        return self._all()[chunk_id]

    def __contains__(self, chunk_id: object) -> bool:
        return chunk_id in self._known or (not self._complete and chunk_id in self._all())

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        state = "complete" if self._complete else f"{len(self._known)} known"
        return f"<Catalogue {state}>"


@final
@attrs.define(eq=False, repr=False)
class ModuleStore:
    """A compiled module, open for reading. Implements the module protocol of docs/api.md
    (``name``, ``section_names()``, ``await load_section(name)``) plus search and
    per-chunk fetches for the context builder. Use as ``async with`` or call ``aclose``."""

    name: str
    path: Path
    fingerprint: str
    counter_name: str
    _conn: sqlite3.Connection | None
    _sections: tuple[str, ...]
    _keyed: Sequence[tuple[str, CatalogueEntry]] = ()  # (key, entry) of chunks with keys
    query_in_thread: bool = False
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _catalogue: Catalogue = attrs.field(init=False)
    _by_key: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    _expansions: dict[str, tuple[str, ...]] = attrs.field(factory=dict, init=False)
    # search rows per (sql, weights, FTS expression, limit): the file is read-only, so
    # equal queries give equal rows; an FTS5 query over the SRD costs 0.3-2.5 ms
    _searches: dict[tuple[object, ...], list[tuple[Any, ...]]] = attrs.field(
        factory=dict, init=False
    )

    def __attrs_post_init__(self) -> None:
        self._catalogue = Catalogue((e for _, e in self._keyed), self._read_catalogue)
        for key, e in self._keyed:
            self._by_key.setdefault(key, []).append(e.id)

    def __repr__(self) -> str:
        return f"<ModuleStore {self.name!r} at {str(self.path)!r}>"

    @property
    def catalogue(self) -> Catalogue:
        """Chunk id -> ``CatalogueEntry``, read on demand (see ``Catalogue``)."""
        return self._catalogue

    async def load_catalogue(self) -> Catalogue:
        """Read the whole catalogue now (as a query: in a worker thread by default)."""
        if not self._catalogue.complete:
            rows = await self._query(f"SELECT {_COLUMNS} FROM chunks AS c ORDER BY c.rowid", ())
            self._catalogue._fill([_entry(r) for r in rows])
        else:
            await anyio.lowlevel.checkpoint()
        return self._catalogue

    def _read_catalogue(self) -> list[CatalogueEntry]:
        rows = self._run(f"SELECT {_COLUMNS} FROM chunks AS c ORDER BY c.rowid", ())
        return [_entry(r) for r in rows]

    # ----- module protocol

    def section_names(self) -> list[str]:
        """Sections in a stable order: adventure sections first, then the SRD's."""
        order = {s: i for i, s in enumerate(ADVENTURE_SECTIONS + SRD_SECTIONS)}
        return sorted(self._sections, key=lambda s: (order.get(s, len(order)), s))

    async def load_section(self, name: str) -> SectionContent:
        """Every chunk of a section, text included, in module order.

        Raises:
            LoadError: the module has no section ``name``.
        """
        if name not in self._sections:
            await anyio.lowlevel.checkpoint()
            raise LoadError(name, f"module {self.name!r} has no section {name!r}")
        rows = await self._query(
            f"SELECT {_COLUMNS}, c.source, c.text FROM chunks AS c WHERE c.section = ? "
            "ORDER BY c.rowid",
            (name,),
        )
        return SectionContent(self.name, name, tuple(self._chunk(r) for r in rows))

    # ----- catalogue

    def entry(self, chunk_id: str) -> CatalogueEntry:
        return self._catalogue[chunk_id]

    def chunk_ids(self, section: str) -> Sequence[str]:
        """Ids of a section's chunks in module order (reads the whole catalogue)."""
        return tuple(cid for cid, e in self._catalogue.items() if e.section == section)

    def ids_for_key(self, key: str) -> Sequence[str]:
        """Chunks whose front matter names ``key`` (a location or an NPC), lower-cased."""
        return tuple(self._by_key.get(key.lower(), ()))

    # ----- queries (worker thread, or the event loop with query_in_thread=False)

    def _run(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        # a query takes milliseconds: a lock still held after 30 s is a bug, and an
        # error names it where a plain ``with`` would hang the event loop for good
        if not self._lock.acquire(timeout=30.0):
            raise ModuleError(f"module {self.name!r}: its connection stayed busy for 30 s")
        try:
            if self._conn is None:
                raise ModuleError(f"module {self.name!r} is closed")
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise ModuleError(f"{self.path}: query failed: {e}") from e
        finally:
            self._lock.release()

    async def _query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        if self.query_in_thread:
            return await anyio.to_thread.run_sync(self._run, sql, params)
        await anyio.lowlevel.checkpoint()
        return self._run(sql, params)

    def _chunk(self, row: Sequence[Any]) -> Chunk:
        """A chunk from a row of ``_COLUMNS, c.source, c.text``; remembers its entry."""
        e = self._catalogue._remember(row)
        return Chunk(e.id, e.section, e.title, row[9], e.tokens, row[8], e.keys)

    async def search(
        self, query: str, limit: int = 40, *, weights: tuple[float, float, float] = (4.0, 3.0, 1.0)
    ) -> list[tuple[str, float]]:
        """Chunk ids ranked by FTS5 BM25 over title, keys and text, best first.

        Scores are ``-bm25()`` (larger is better, > 0 for any match); ties are broken
        by id so equal inputs give equal outputs. ``[]`` when the query has no terms.
        """
        hits, _ = await self.search_chunks(query, limit, weights=weights)
        return [(e.id, s) for e, s in hits]

    async def search_chunks(
        self,
        query: str,
        limit: int = 40,
        *,
        weights: tuple[float, float, float] = (4.0, 3.0, 1.0),
        with_text: bool = False,
    ) -> tuple[list[tuple[CatalogueEntry, float]], dict[str, str]]:
        """``search`` in one query that also returns the hits' catalogue entries and,
        ``with_text``, their text: ``(hits, {chunk id: text})``.

        The query is repaired and expanded first (``expression``): words the module's
        vocabulary does not know are replaced by their most frequent neighbour one
        edit away, and the alias table's SRD phrasing is OR-ed in. The last 256
        distinct searches are kept: one of them is answered at once, without a query
        (a cancellation point, not a schedule point)."""
        if limit <= 0 or not query_terms(query):
            await anyio.lowlevel.checkpoint()
            return [], {}
        sql = _SEARCH_TEXT if with_text else _SEARCH
        rows = self._kept_rows(sql, query, weights, limit)
        if rows is not None:  # a text searched before: no query, no trip through the loop
            await anyio.lowlevel.checkpoint_if_cancelled()
        elif self.query_in_thread:
            rows = await anyio.to_thread.run_sync(self._search_rows, sql, query, weights, limit)
        else:
            await anyio.lowlevel.checkpoint()
            rows = self._search_rows(sql, query, weights, limit)
        remember = self._catalogue._remember
        hits = [(remember(r), r[8]) for r in rows]
        texts = {r[0]: r[9] for r in rows} if with_text else {}
        return hits, texts

    def _kept_rows(
        self, sql: str, query: str, weights: tuple[float, float, float], limit: int
    ) -> list[tuple[Any, ...]] | None:
        """The kept result of this search, or ``None`` when it must run."""
        segments = self._expansions.get(query)
        if segments is None:
            return None
        return self._searches.get((sql, weights, fts_query(*segments), limit))

    def _search_rows(
        self, sql: str, query: str, weights: tuple[float, float, float], limit: int
    ) -> list[tuple[Any, ...]]:
        expr = fts_query(*self._expand(query))
        if not expr:
            return []
        key = (sql, weights, expr, limit)
        rows = self._searches.get(key)
        if rows is None:
            rows = self._run(sql, (*weights, expr, limit))
            if len(self._searches) >= _SEARCHES_KEPT:
                self._searches.clear()
            self._searches[key] = rows
        return rows

    def _expand(self, query: str) -> tuple[str, ...]:
        segments = self._expansions.get(query)
        if segments is None:
            segments = expand_query(query, self._known_words)
            if len(self._expansions) >= 1024:
                self._expansions.clear()
            self._expansions[query] = segments
        return segments

    def expand(self, query: str) -> tuple[str, ...]:
        """``query`` repaired, then its alias expansions (what ``search`` looks for);
        cached per query text (vocabulary look-ups run as store queries)."""
        return self._expand(query)

    def _known_words(self, candidates: Sequence[str]) -> dict[str, int]:
        """Which of ``candidates`` the module's text uses, with their frequencies."""
        out: dict[str, int] = {}
        for start in range(0, len(candidates), 900):
            batch = candidates[start : start + 900]
            rows = self._run(
                f"SELECT word, n FROM vocab WHERE word IN ({','.join('?' * len(batch))})", batch
            )
            out.update(rows)
        return out

    def expression(self, query: str) -> str:
        """The FTS5 expression ``search`` runs for ``query`` (repaired and expanded)."""
        return fts_query(*self.expand(query))

    async def fetch_chunks(self, ids: Iterable[str]) -> dict[str, Chunk]:
        """The chunks named by ``ids`` (unknown ids raise ``KeyError``), one query per
        500 ids."""
        wanted = list(dict.fromkeys(ids))
        if not wanted:
            await anyio.lowlevel.checkpoint()
            return {}
        out: dict[str, Chunk] = {}
        for start in range(0, len(wanted), 500):  # stay under SQLite's variable limit
            batch = wanted[start : start + 500]
            rows = await self._query(
                f"SELECT {_COLUMNS}, c.source, c.text FROM chunks AS c "
                f"WHERE c.id IN ({','.join('?' * len(batch))})",
                batch,
            )
            for r in rows:
                out[r[0]] = self._chunk(r)
        for cid in wanted:
            if cid not in out:
                raise KeyError(cid)
        return {cid: out[cid] for cid in wanted}

    # ----- lifetime

    async def aclose(self) -> None:
        """Close the connection (idempotent); waits for a query in flight."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close)

    def forget_searches(self) -> None:
        """Drop the kept search results and query expansions: the next searches run
        their FTS5 queries again (what a text never seen before costs)."""
        with self._lock:
            self._searches.clear()
            self._expansions.clear()

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._searches.clear()  # a closed store answers no query, cached or not

    async def __aenter__(self) -> ModuleStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _open(path: Path, query_in_thread: bool = False) -> ModuleStore:
    try:
        conn = connect_read_only(path)
    except sqlite3.Error as e:
        raise ModuleError(f"{path}: cannot open module file: {e}") from e
    try:
        meta = read_meta(conn, path)
        try:
            rows = conn.execute(
                f"SELECT {_COLUMNS}, k.key FROM chunk_keys AS k JOIN chunks AS c "
                "ON c.rowid = k.chunk ORDER BY k.key, c.rowid"
            ).fetchall()
        except sqlite3.Error as e:
            raise ModuleError(f"{path}: unreadable module catalogue ({e})") from e
    except BaseException:
        conn.close()
        raise
    entries: dict[str, CatalogueEntry] = {}
    keyed = [(r[8], entries.setdefault(r[0], _entry(r))) for r in rows]
    return ModuleStore(
        name=meta["name"],
        path=path,
        fingerprint=meta["fingerprint"],
        counter_name=meta.get("counter", ""),
        conn=conn,
        sections=tuple(s for s in meta.get("sections", "").split("\n") if s),
        keyed=keyed,
        query_in_thread=query_in_thread,
    )


async def open_module(
    name_or_path: str | os.PathLike[str] = "default",
    *,
    include_srd: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    query_in_thread: bool = False,
) -> ModuleStore:
    """Open a module, compiling it first when its sources changed (or on first use).

    Args:
        name_or_path: ``"default"`` (the bundled adventure, plus the SRD when
            ``include_srd``), ``"srd"`` (the SRD alone), a folder of adventure
            Markdown, or a compiled ``.sqlite`` module file.
        include_srd: add the SRD 5.1 sections to an adventure.
        cache_dir: where compiled modules live; ``None`` or ``""``: ``~/.cache/dm-engine``.
        query_in_thread: run queries in a worker thread (default: on the event loop;
            each query is well under a millisecond, about what a thread hop costs).

    Raises:
        ModuleError: a source is missing or malformed, or the file is not a module;
            the message names the file and the problem.
    """
    # anyio returns a finished thread's result and delivers a cancellation at the next
    # checkpoint; should a backend raise instead, the store opened meanwhile is closed
    opened: list[ModuleStore] = []

    def open_into() -> None:  # one worker-thread trip: locate (or compile), then open
        path, _ = locate_module(name_or_path, include_srd, cache_dir)
        opened.append(_open(path, query_in_thread))

    try:
        await anyio.to_thread.run_sync(open_into)
    except BaseException:
        for store in opened:
            store._close()
        raise
    return opened[0]


async def from_config(config: ModuleConfig) -> ModuleStore:
    """``open_module`` with the ``[module]`` section of the configuration."""
    return await open_module(
        config.name,
        include_srd=config.include_srd,
        cache_dir=config.cache_dir or None,
        query_in_thread=config.query_in_thread,
    )
