"""The module store: a module compiled into SQLite (chunk table + FTS5 index), read lazily.

Opening a module reads only its catalogue (id, section, title, tokens, keys, digest
of every chunk); chunk text is fetched on demand. A compiled file is named after the
module and a fingerprint of its sources, so an unchanged module is opened at once and
a changed one is recompiled; compilation writes a temporary file in the same folder
and renames it into place, so a half-compiled file is never opened.

Threads: one ``sqlite3`` connection per store, ``check_same_thread=False``, every use
under a ``threading.Lock``, every query in ``anyio.to_thread.run_sync``. anyio's worker
threads are pooled and anonymous, so per-thread connections could not be closed
deterministically; the queries are sub-millisecond, so serializing them costs nothing
measurable (see ``bench/bench_context.py``). With ``query_in_thread=False`` the
queries run on the event loop instead: a thread round trip costs about as much as
the query, and a thread wait would let a mock clock's autojump advance virtual time
in the middle of a context build (the virtual-time benchmark uses this mode).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, final

import anyio
import anyio.to_thread
import attrs

from ..errors import LoadError, ModuleError
from .sources import (
    ADVENTURE_SECTIONS,
    FORMAT_VERSION,
    SRD_SECTIONS,
    Chunk,
    adventure_chunks,
    adventure_fingerprint,
    bundled_adventure_dir,
    find_srd_dir,
    slug,
    srd_chunks,
    srd_fingerprint,
)
from .tokens import DEFAULT_COUNTER

if TYPE_CHECKING:
    from ..config import ModuleConfig

__all__ = ["CatalogueEntry", "ModuleStore", "SectionContent", "compile_module", "open_module"]

SCHEMA_VERSION: Final = "dm-engine-module-1"
_STOPWORDS: Final = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "by",
        "can",
        "do",
        "does",
        "for",
        "from",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "of",
        "on",
        "or",
        "our",
        "so",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "this",
        "to",
        "us",
        "was",
        "we",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


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


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression from free text: its terms (stop words dropped) and each
    pair of adjacent terms as a phrase, OR-ed and quoted; '' when there are no terms."""
    terms: dict[str, None] = {}
    word: list[str] = []
    for ch in text.lower() + " ":
        if ch.isalnum():
            word.append(ch)
        elif word:
            w = "".join(word)
            word.clear()
            if len(w) > 1 and w not in _STOPWORDS:
                terms[w] = None
    words = list(terms)
    # adjacent pairs as phrases too: a chunk saying "hold person" beats one saying "hold"
    phrases = [f"{a} {b}" for a, b in itertools.pairwise(words)]
    return " OR ".join(f'"{t}"' for t in words + phrases)


_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks(
    rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, section TEXT NOT NULL,
    title TEXT NOT NULL, keys TEXT NOT NULL, tokens INTEGER NOT NULL,
    source TEXT NOT NULL, digest TEXT NOT NULL, text TEXT NOT NULL);
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    title, keys, text, content='chunks', content_rowid='rowid',
    tokenize='porter unicode61');
"""


def _write(path: Path, name: str, fingerprint: str, chunks: Iterable[Chunk]) -> int:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_SCHEMA)
        n = 0
        seen: set[str] = set()
        with conn:
            for c in chunks:
                if c.id in seen:
                    raise ModuleError(f"module {name!r}: duplicate chunk id {c.id!r} ({c.source})")
                seen.add(c.id)
                n += 1
                conn.execute(
                    "INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?)",
                    (
                        n,
                        c.id,
                        c.section,
                        c.title,
                        "\n".join(c.keys),
                        c.tokens,
                        c.source,
                        c.digest,
                        c.text,
                    ),
                )
            conn.execute(
                "INSERT INTO chunks_fts(rowid, title, keys, text) "
                "SELECT rowid, title, keys, text FROM chunks"
            )
            conn.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('optimize')")
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("schema", SCHEMA_VERSION),
                    ("name", name),
                    ("fingerprint", fingerprint),
                    ("counter", DEFAULT_COUNTER.name),
                    ("chunks", str(n)),
                ],
            )
        conn.execute("VACUUM")
        return n
    finally:
        conn.close()


def compile_module(path: Path, name: str, fingerprint: str, chunks: Iterable[Chunk]) -> None:
    """Write ``chunks`` to ``path`` atomically: a temp file in the same folder, then rename.

    Raises:
        ModuleError: the folder is not writable or a source is malformed (nothing is
            left behind: the temp file is removed).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ModuleError(f"{path.parent}: cannot write compiled modules here: {e}") from e
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _write(tmp, name, fingerprint, chunks)
        os.replace(tmp, path)
    except sqlite3.Error as e:
        raise ModuleError(f"{path}: compiling module {name!r} failed: {e}") from e
    except OSError as e:
        raise ModuleError(f"{path}: cannot write compiled module: {e}") from e
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _connect_ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)


def _read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
    """The meta table; ModuleError when the file is not a compiled module."""
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as e:
        raise ModuleError(f"{path}: not a compiled dm-engine module ({e})") from e
    if meta.get("schema") != SCHEMA_VERSION:
        raise ModuleError(
            f"{path}: not a compiled dm-engine module (schema {meta.get('schema')!r}, "
            f"expected {SCHEMA_VERSION!r})"
        )
    return meta


def _read_catalogue(conn: sqlite3.Connection, path: Path) -> list[CatalogueEntry]:
    try:
        rows = conn.execute(
            "SELECT id, section, title, tokens, keys, digest, rowid FROM chunks ORDER BY rowid"
        ).fetchall()
    except sqlite3.Error as e:
        raise ModuleError(f"{path}: unreadable module catalogue ({e})") from e
    return [
        CatalogueEntry(r[0], r[1], r[2], r[3], tuple(k for k in r[4].split("\n") if k), r[5], r[6])
        for r in rows
    ]


@final
@attrs.define(eq=False, repr=False)
class ModuleStore:
    """A compiled module, open for reading. Implements the module protocol of DESIGN.md
    (``name``, ``section_names()``, ``await load_section(name)``) plus search and
    per-chunk fetches for the context builder. Use as ``async with`` or call ``aclose``."""

    name: str
    path: Path
    fingerprint: str
    counter_name: str
    _conn: sqlite3.Connection | None
    catalogue: Mapping[str, CatalogueEntry]
    query_in_thread: bool = True
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _rowid_to_id: dict[int, str] = attrs.field(factory=dict, init=False)
    _by_section: dict[str, list[str]] = attrs.field(factory=dict, init=False)
    _by_key: dict[str, list[str]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        for e in self.catalogue.values():
            self._rowid_to_id[e.rowid] = e.id
            self._by_section.setdefault(e.section, []).append(e.id)
            for k in e.keys:
                self._by_key.setdefault(k, []).append(e.id)

    def __repr__(self) -> str:
        return f"<ModuleStore {self.name!r} {len(self.catalogue)} chunks at {str(self.path)!r}>"

    # ----- module protocol

    def section_names(self) -> list[str]:
        """Sections in a stable order: adventure sections first, then the SRD's."""
        order = {s: i for i, s in enumerate(ADVENTURE_SECTIONS + SRD_SECTIONS)}
        return sorted(self._by_section, key=lambda s: (order.get(s, len(order)), s))

    async def load_section(self, name: str) -> SectionContent:
        """Every chunk of a section, text included.

        Raises:
            LoadError: the module has no section ``name``.
        """
        ids = self._by_section.get(name)
        if ids is None:
            await anyio.lowlevel.checkpoint()
            raise LoadError(name, f"module {self.name!r} has no section {name!r}")
        chunks = await self.fetch_chunks(ids)
        return SectionContent(self.name, name, tuple(chunks[i] for i in ids))

    # ----- catalogue (in memory, sync)

    def entry(self, chunk_id: str) -> CatalogueEntry:
        return self.catalogue[chunk_id]

    def chunk_ids(self, section: str) -> Sequence[str]:
        return tuple(self._by_section.get(section, ()))

    def ids_for_key(self, key: str) -> Sequence[str]:
        """Chunks whose front matter names ``key`` (a location or an NPC), lower-cased."""
        return tuple(self._by_key.get(key.lower(), ()))

    # ----- queries (worker thread)

    def _run(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        with self._lock:
            if self._conn is None:
                raise ModuleError(f"module {self.name!r} is closed")
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise ModuleError(f"{self.path}: query failed: {e}") from e

    async def _query(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        if self.query_in_thread:
            return await anyio.to_thread.run_sync(self._run, sql, params)
        await anyio.lowlevel.checkpoint()
        return self._run(sql, params)

    async def search(
        self, query: str, limit: int = 40, *, weights: tuple[float, float, float] = (4.0, 3.0, 1.0)
    ) -> list[tuple[str, float]]:
        """Chunk ids ranked by FTS5 BM25 over title, keys and text, best first.

        Scores are ``-bm25()`` (larger is better, > 0 for any match); ties are broken
        by id so equal inputs give equal outputs. ``[]`` when the query has no terms.
        """
        expr = fts_query(query)
        if not expr or limit <= 0:
            await anyio.lowlevel.checkpoint()
            return []
        sql = (
            "SELECT rowid, -bm25(chunks_fts, ?, ?, ?) AS s FROM chunks_fts "
            "WHERE chunks_fts MATCH ? ORDER BY s DESC, rowid LIMIT ?"
        )
        rows = await self._query(sql, (*weights, expr, limit))
        return [(self._rowid_to_id[int(r)], float(s)) for r, s in rows]  # type: ignore[call-overload, arg-type]

    async def fetch_chunks(self, ids: Iterable[str]) -> dict[str, Chunk]:
        """The chunks named by ``ids`` (unknown ids raise ``KeyError``), one query."""
        rowids = [self.catalogue[i].rowid for i in ids]
        if not rowids:
            await anyio.lowlevel.checkpoint()
            return {}
        out: dict[str, Chunk] = {}
        for start in range(0, len(rowids), 500):  # stay under SQLite's variable limit
            batch = rowids[start : start + 500]
            sql = (
                "SELECT id, section, title, text, tokens, source, keys FROM chunks "
                f"WHERE rowid IN ({','.join('?' * len(batch))})"
            )
            rows = await self._query(sql, batch)
            for r in rows:
                cid, section, title, text, tokens, source, keys = r
                out[str(cid)] = Chunk(
                    str(cid),
                    str(section),
                    str(title),
                    str(text),
                    int(tokens),  # type: ignore[call-overload]
                    str(source),
                    tuple(k for k in str(keys).split("\n") if k),
                )
        return out

    # ----- lifetime

    async def aclose(self) -> None:
        """Close the connection (idempotent); waits for a query in flight."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def __aenter__(self) -> ModuleStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dm-engine"


def _plan(name_or_path: str | os.PathLike[str], include_srd: bool) -> tuple[str, Path | None, bool]:
    """(module name, adventure folder or None, include SRD)."""
    spec = os.fspath(name_or_path)
    if spec == "default":
        return "default", bundled_adventure_dir(), include_srd
    if spec == "srd":
        return "srd", None, True
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ModuleError(
            f"{folder}: no such adventure folder (use 'default', 'srd', a folder of "
            "Markdown files or a compiled .sqlite module)"
        )
    return slug(folder.resolve().name), folder, include_srd


def _fingerprint(name: str, folder: Path | None, srd: Path | None) -> str:
    h = hashlib.sha256(f"{SCHEMA_VERSION}|{FORMAT_VERSION}|{DEFAULT_COUNTER!r}|{name}".encode())
    if folder is not None:
        h.update(b"|adventure:" + adventure_fingerprint(folder).encode())
    if srd is not None:
        h.update(b"|srd:" + srd_fingerprint(srd).encode())
    return h.hexdigest()


def _prepare(
    name_or_path: str | os.PathLike[str],
    include_srd: bool,
    cache_dir_option: str | os.PathLike[str] | None,
) -> tuple[Path, bool]:
    """Locate (compiling if needed) the module file; (path, is a user-given file)."""
    cache_dir = Path(cache_dir_option).expanduser() if cache_dir_option else _default_cache_dir()
    spec = os.fspath(name_or_path)
    if spec.endswith((".sqlite", ".db")) and Path(spec).is_file():
        return Path(spec), True
    name, folder, with_srd = _plan(spec, include_srd)
    srd = find_srd_dir() if with_srd else None
    fp = _fingerprint(name, folder, srd)
    path = cache_dir / f"{name}-{fp[:24]}.sqlite"
    if path.is_file() and _valid_cache(path, fp):
        return path, False

    def chunks() -> Iterator[Chunk]:
        if folder is not None:
            yield from adventure_chunks(folder, name)
        if srd is not None:
            yield from srd_chunks(srd)

    compile_module(path, name, fp, chunks())
    for old in cache_dir.glob(f"{name}-*.sqlite"):  # superseded versions of this module
        if old != path:
            with contextlib.suppress(OSError):
                old.unlink()
    return path, False


def _valid_cache(path: Path, fp: str) -> bool:
    """A cached file is reused only when it is a complete module with our fingerprint;
    anything else (corrupt, foreign) is recompiled over."""
    try:
        conn = _connect_ro(path)
        try:
            return _read_meta(conn, path).get("fingerprint") == fp
        finally:
            conn.close()
    except (sqlite3.Error, ModuleError):
        return False


def _open(path: Path, query_in_thread: bool = True) -> ModuleStore:
    try:
        conn = _connect_ro(path)
    except sqlite3.Error as e:
        raise ModuleError(f"{path}: cannot open module file: {e}") from e
    try:
        meta = _read_meta(conn, path)
        entries = _read_catalogue(conn, path)
    except BaseException:
        conn.close()
        raise
    return ModuleStore(
        name=meta["name"],
        path=path,
        fingerprint=meta["fingerprint"],
        counter_name=meta.get("counter", ""),
        conn=conn,
        catalogue={e.id: e for e in entries},
        query_in_thread=query_in_thread,
    )


async def open_module(
    name_or_path: str | os.PathLike[str] = "default",
    *,
    include_srd: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    query_in_thread: bool = True,
) -> ModuleStore:
    """Open a module, compiling it first when its sources changed (or on first use).

    Args:
        name_or_path: ``"default"`` (the bundled adventure, plus the SRD when
            ``include_srd``), ``"srd"`` (the SRD alone), a folder of adventure
            Markdown, or a compiled ``.sqlite`` module file.
        include_srd: add the SRD 5.1 sections to an adventure.
        cache_dir: where compiled modules live; ``None`` or ``""``: ``~/.cache/dm-engine``.
        query_in_thread: run queries in a worker thread (False: on the event loop).

    Raises:
        ModuleError: a source is missing or malformed, or the file is not a module;
            the message names the file and the problem.
    """
    path, _ = await anyio.to_thread.run_sync(_prepare, name_or_path, include_srd, cache_dir)
    # anyio returns a finished thread's result and delivers a cancellation at the next
    # checkpoint; should a backend raise instead, the store opened meanwhile is closed
    opened: list[ModuleStore] = []

    def open_into() -> None:
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
