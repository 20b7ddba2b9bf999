"""The module store: a module compiled into SQLite (chunk table + FTS5 index), read lazily.

Opening a module reads only its ``meta`` table and the catalogue entries of the few
chunks with keys (adventure locations and NPCs, for the builder's boosts). Other
catalogue entries (id, section, title, tokens, keys, digest) come with the search
hits that name them, and chunk text is fetched on demand; the whole catalogue is
read only when something iterates it or looks up an id no query has returned yet.
Compiling (and recompiling when the sources change) is ``compiler.py``'s part.

A search ranks by FTS5's BM25 without running the OR query: it adds each phrase's
kept scores (``phrase_scores.py``; a vocabulary word's and pair's come from the
compiled lists), so a text of phrases seen before runs no FTS5 query. Kept per
store, each bounded and dropped at close: search results (256), query expansions
(1 024), phrase scores (8 MB), typo checks (10 000), words' token ids (20 000) and,
from the first typo repair on, the vocabulary.

Threads: one ``sqlite3`` connection per store, ``check_same_thread=False``, every use
under a ``threading.Lock``. Queries run on the event loop by default: measured, a
search of a new text is 0.3 ms at p50 and under 1 ms at p95 over the whole SRD, a
worker-thread round trip costs about as much, and under load a busy loop hands the GIL back to a
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
import re
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import anyio
import anyio.to_thread
import attrs

from ..errors import LoadError, ModuleError
from .compiler import compile_module, connect_read_only, locate_module, read_meta
from .phrase_scores import (
    BM25_WEIGHTS,
    NO_MATCH,
    PhraseScores,
    Weights,
    fts5_scores,
    pair_key,
    read_pair_scores,
    read_word_scores,
)
from .query import expand_query, forget_alias_matches, is_term
from .sources import (
    ADVENTURE_SECTIONS,
    SRD_SECTIONS,
    Chunk,
)

if TYPE_CHECKING:
    from ..config import ModuleConfig

T = TypeVar("T")

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


#: a search hit: the chunk's entry, its score, its text (None when not asked for)
Hit = tuple[CatalogueEntry, float, "str | None"]


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


#: a run of alphanumeric characters (``str.isalnum``, Unicode): FTS5's unicode61 tokens
_TERM: Final = re.compile(r"[^\W_]+")


def query_terms(text: str) -> list[str]:
    """The query terms of free text: lower-case words of 2+ characters, stop words
    dropped, in order, without repeats."""
    return list(dict.fromkeys(w for w in _TERM.findall(text.lower()) if is_term(w)))


@functools.lru_cache(maxsize=1024)
def fts_phrases(text: str, *more: str) -> tuple[str, ...]:
    """The quoted FTS5 phrases of free text: its terms (stop words dropped), then each
    pair of adjacent terms, without repeats; ``()`` when there are no terms.

    ``more``: further segments (alias expansions) whose terms and pairs are added;
    pairs never span two segments."""
    out: dict[str, None] = {}
    pairs: dict[str, None] = {}
    for segment in (text, *more):
        words = query_terms(segment)
        out.update(dict.fromkeys(words))
        # adjacent pairs as phrases too: a chunk saying "hold person" beats one saying "hold"
        pairs.update(dict.fromkeys(f"{a} {b}" for a, b in itertools.pairwise(words)))
    return tuple(f'"{t}"' for t in [*out, *pairs])


def fts_query(text: str, *more: str) -> str:
    """The FTS5 MATCH expression of ``fts_phrases(text, *more)``: the phrases OR-ed;
    '' when there are no terms."""
    return " OR ".join(fts_phrases(text, *more))


#: Search results kept per store (all dropped at once when full, like the expansions).
_SEARCHES_KEPT: Final = 256
#: A look-up of more words than this (a typo's neighbours) reads the whole vocabulary.
_VOCABULARY_AT: Final = 200
#: Typo checks kept per store (all dropped at once when full).
_REPAIRS_KEPT: Final = 10_000
#: Words' token ids kept per store (all dropped at once when full).
_TOKENS_KEPT: Final = 20_000

_COLUMNS: Final = "c.id, c.section, c.title, c.tokens, c.keys, c.digest, c.rowid, c.units"


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

    __slots__ = ("_at_rowid", "_complete", "_known", "_load_all")

    def __init__(
        self, known: Iterable[CatalogueEntry], load_all: Callable[[], list[CatalogueEntry]]
    ) -> None:
        self._known: dict[str, CatalogueEntry] = {e.id: e for e in known}
        self._at_rowid = {e.rowid: e for e in self._known.values()}
        self._complete = False
        self._load_all = load_all

    @property
    def complete(self) -> bool:
        """Every entry has been read."""
        return self._complete

    def _remember(self, row: Sequence[Any]) -> CatalogueEntry:
        e = self._known.get(row[0])
        if e is None:
            e = self._known[row[0]] = self._at_rowid[row[6]] = _entry(row)
        return e

    def _known_at(self, rowid: int) -> CatalogueEntry | None:
        """The entry of the chunk at ``rowid`` if some query returned it, else None."""
        return self._at_rowid.get(rowid)

    def _fill(self, entries: list[CatalogueEntry]) -> None:
        if not self._complete:
            known = self._known
            self._known = {e.id: known.get(e.id, e) for e in entries}  # module order
            self._at_rowid = {e.rowid: e for e in self._known.values()}
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
    # search rows per (with text, weights, FTS phrases, limit): the file is read-only,
    # so equal queries give equal rows
    _searches: dict[tuple[object, ...], list[Hit]] = attrs.field(factory=dict, init=False)
    _vocabulary: dict[str, int] | None = attrs.field(default=None, init=False)  # word -> n
    # each word checked for typos -> its repair (itself: not a typo; None: no repair)
    _repairs: dict[str, str | None] = attrs.field(factory=dict, init=False)
    # word -> its index token's id (None: not one token), read with its compiled scores
    _tokens: dict[str, int | None] = attrs.field(factory=dict, init=False)
    # each phrase's BM25 per row: a new text of known phrases runs no FTS5 query
    _scores: PhraseScores = attrs.field(alias="scores", kw_only=True)

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

    def _locked(self, work: Callable[..., T], *args: Any) -> T:
        """``work(connection, *args)`` under the connection's lock; an SQLite error
        becomes a ``ModuleError`` naming the file."""
        # a query takes milliseconds: a lock still held after 30 s is a bug, and an
        # error names it where a plain ``with`` would hang the event loop for good
        if not self._lock.acquire(timeout=30.0):
            raise ModuleError(f"module {self.name!r}: its connection stayed busy for 30 s")
        try:
            if self._conn is None:
                raise ModuleError(f"module {self.name!r} is closed")
            try:
                return work(self._conn, *args)
            except sqlite3.Error as e:
                raise ModuleError(f"{self.path}: query failed: {e}") from e
        finally:
            self._lock.release()

    def _run(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        return self._locked(lambda conn: conn.execute(sql, params).fetchall())

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
        self, query: str, limit: int = 40, *, weights: Weights = BM25_WEIGHTS
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
        weights: Weights = BM25_WEIGHTS,
        with_text: bool = False,
    ) -> tuple[list[tuple[CatalogueEntry, float]], dict[str, str]]:
        """``search``, also returning the hits' catalogue entries and, ``with_text``,
        their text: ``(hits, {chunk id: text})``.

        The query is repaired and expanded first (``expression``): words the module's
        vocabulary does not know are replaced by their most frequent neighbour one
        edit away, and the alias table's SRD phrasing is OR-ed in. The hits and scores
        are those of FTS5's ``bm25()`` for the OR of the expression's phrases, added
        from each phrase's kept scores (``phrase_scores.py``). The last 256 distinct
        searches are kept: one of them is answered at once, without a query (a
        cancellation point, not a schedule point)."""
        if limit <= 0 or not query_terms(query):
            await anyio.lowlevel.checkpoint()
            return [], {}
        rows = self._kept_rows(query, weights, limit, with_text)
        if rows is not None:  # a text searched before: no query, no trip through the loop
            await anyio.lowlevel.checkpoint_if_cancelled()
        elif self.query_in_thread:
            rows = await anyio.to_thread.run_sync(
                self._search_rows, query, weights, limit, with_text
            )
        else:
            await anyio.lowlevel.checkpoint()
            rows = self._search_rows(query, weights, limit, with_text)
        hits = [(e, score) for e, score, _ in rows]
        texts = {e.id: text for e, _, text in rows if text is not None}
        return hits, texts

    def _kept_rows(
        self, query: str, weights: Weights, limit: int, with_text: bool
    ) -> list[Hit] | None:
        """The kept result of this search, or ``None`` when it must run."""
        segments = self._expansions.get(query)
        if segments is None:
            return None
        return self._searches.get((with_text, weights, fts_phrases(*segments), limit))

    def _search_rows(self, query: str, weights: Weights, limit: int, with_text: bool) -> list[Hit]:
        phrases = fts_phrases(*self._expand(query))
        if not phrases:
            return []
        key = (with_text, weights, phrases, limit)
        rows = self._searches.get(key)
        if rows is None:
            rows = self._locked(self._ranked_rows, phrases, weights, limit, with_text)
            if len(self._searches) >= _SEARCHES_KEPT:
                self._searches.clear()
            self._searches[key] = rows
        return rows

    def _ranked_rows(
        self,
        conn: sqlite3.Connection,
        phrases: tuple[str, ...],
        weights: Weights,
        limit: int,
        with_text: bool,
    ) -> list[Hit]:
        """The ranked hits: entry, score and (``with_text``) text. Entries some query
        returned before are not read again; without text, often nothing is read."""

        self._read_ahead(conn, phrases, weights)
        ranked = self._scores.rank(phrases, weights, limit, lambda p, w: fts5_scores(conn, p, w))
        catalogue = self._catalogue
        known = catalogue._known_at
        unknown = [r for r, _ in ranked if known(r) is None]
        texts: dict[int, str] = {}
        if unknown or with_text:
            # the entries no query returned yet (with text: every hit's row), or only
            # the hits' text when every entry is known
            need = [r for r, _ in ranked] if with_text else unknown
            marks = ",".join("?" * len(need))
            if unknown:
                text = ", c.text" if with_text else ""
                sql = f"SELECT {_COLUMNS}{text} FROM chunks AS c WHERE c.rowid IN ({marks})"
                for row in conn.execute(sql, need):
                    catalogue._remember(row)
                    if with_text:
                        texts[row[6]] = row[8]
            else:
                texts.update(
                    conn.execute(f"SELECT rowid, text FROM chunks WHERE rowid IN ({marks})", need)
                )
        out: list[Hit] = []
        for rowid, score in ranked:
            e = known(rowid)
            assert e is not None  # every rowid was read or known
            out.append((e, score, texts.get(rowid)))
        return out

    def _read_ahead(
        self, conn: sqlite3.Connection, phrases: tuple[str, ...], weights: Weights
    ) -> None:
        """Keep the scores of ``phrases`` not kept that the compiled lists give (at the
        default weights), read in at most two queries: the new words' (their token ids
        are kept too), then the new pairs of words with token ids (a pair the index
        never has adjacent matches nothing). ``rank`` fetches only the others."""
        if weights != BM25_WEIGHTS:
            return
        scores = self._scores
        new = [p for p in phrases if not scores.kept(p, weights)]
        compiled = read_word_scores(conn, [p[1:-1] for p in new if " " not in p])
        if len(self._tokens) + len(compiled) > _TOKENS_KEPT:
            self._tokens.clear()
        for word, (found, token) in compiled.items():
            scores.keep(f'"{word}"', weights, found)
            self._tokens[word] = token
        tokens = self._tokens
        pairs: dict[str, int] = {}
        for phrase in new:
            first, space, second = phrase[1:-1].partition(" ")
            if space and " " not in second:
                a, b = tokens.get(first), tokens.get(second)
                if a is not None and b is not None:
                    pairs[phrase] = pair_key(a, b)
        if pairs:
            listed = read_pair_scores(conn, pairs.values())
            for phrase, key in pairs.items():
                scores.keep(phrase, weights, listed.get(key, NO_MATCH))

    def _expand(self, query: str) -> tuple[str, ...]:
        segments = self._expansions.get(query)
        if segments is None:
            if len(self._repairs) >= _REPAIRS_KEPT:
                self._repairs.clear()
            segments = expand_query(query, self._known_words, self._repairs)
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
        return self._locked(self._look_up_words, candidates)

    def _look_up_words(self, conn: sqlite3.Connection, candidates: Sequence[str]) -> dict[str, int]:
        vocabulary = self._vocabulary
        if vocabulary is None and len(candidates) > _VOCABULARY_AT:
            # a typo's neighbours: read the whole vocabulary once (SRD: 7 500 words,
            # 0.6 MB, ~2 ms), and no query of this kind again
            words, counts = conn.execute(
                "SELECT group_concat(word, ' '), group_concat(n, ' ') FROM vocab"
            ).fetchone()
            vocabulary = self._vocabulary = (
                dict(zip(words.split(" "), map(int, counts.split(" ")), strict=True))
                if words
                else {}
            )
        if vocabulary is not None:
            return {w: n for w in candidates if (n := vocabulary.get(w))}
        out: dict[str, int] = {}
        for start in range(0, len(candidates), 900):  # stay under SQLite's variable limit
            batch = candidates[start : start + 900]
            out.update(
                conn.execute(
                    f"SELECT word, n FROM vocab WHERE word IN ({','.join('?' * len(batch))})",
                    batch,
                ).fetchall()
            )
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

    def forget_searches(self, *, phrases: bool = True) -> None:
        """Drop the kept search results and query expansions, and with ``phrases`` the
        kept phrase scores, typo repairs and vocabulary, and the process's memos of
        query texts (their phrases, their alias matches): the next searches cost what
        they cost on a new store for texts never seen (``phrases=False``: what a new
        text of words and phrases searched before costs)."""
        with self._lock:
            self._drop_kept(phrases=phrases)
        if phrases:
            fts_phrases.cache_clear()
            forget_alias_matches()

    def _drop_kept(self, *, phrases: bool) -> None:
        self._searches.clear()
        self._expansions.clear()
        if phrases:
            self._scores.clear()
            self._vocabulary = None
            self._repairs.clear()
            self._tokens.clear()

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._drop_kept(phrases=True)  # a closed store answers no query, kept or not

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
            (last,) = conn.execute("SELECT coalesce(max(rowid), 0) FROM chunks").fetchone()
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
        scores=PhraseScores(last + 1),
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
