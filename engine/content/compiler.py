"""Compiling a module: its sources into one SQLite file (chunks + FTS5 index).

A compiled file is named after the module and a fingerprint of its sources (file
names, sizes and times for the SRD; file bytes for an adventure), so an unchanged
module is reused at once and a changed one is recompiled. Compilation writes a
temporary file in the same folder and renames it into place, so a half-compiled
file is never opened; a cached file that is not a complete module with the right
fingerprint is compiled over.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from ..errors import ModuleError
from .phrase_scores import WORD_SCORES_SCHEMA, write_word_scores
from .query import is_term, words
from .sources import (
    FORMAT_VERSION,
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

__all__ = ["SCHEMA_VERSION", "compile_module", "connect_read_only", "locate_module", "read_meta"]

SCHEMA_VERSION: Final = "dm-engine-module-6"
_SCHEMA_FAMILY: Final = "dm-engine-module-"  # every version ever written

#: the index's tokenizer: a word's token is its porter stem ("hits", "hit": "hit")
_TOKENIZE: Final = "porter unicode61"

_SCHEMA = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE chunks(
    rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, section TEXT NOT NULL,
    title TEXT NOT NULL, keys TEXT NOT NULL, tokens INTEGER NOT NULL, units INTEGER NOT NULL,
    source TEXT NOT NULL, digest TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX chunks_section ON chunks(section);
CREATE TABLE chunk_keys(key TEXT NOT NULL, chunk INTEGER NOT NULL, PRIMARY KEY (key, chunk))
    WITHOUT ROWID;
CREATE VIRTUAL TABLE chunks_fts USING fts5(
    title, keys, text, content='chunks', content_rowid='rowid',
    tokenize='{_TOKENIZE}');
CREATE TABLE vocab(word TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
"""


def _write(path: Path, name: str, fingerprint: str, chunks: Iterable[Chunk]) -> int:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_SCHEMA + WORD_SCORES_SCHEMA)
        n = 0
        seen: set[str] = set()
        sections: dict[str, None] = {}
        vocab: dict[str, int] = {}
        with conn:
            for c in chunks:
                if c.id in seen:
                    raise ModuleError(f"module {name!r}: duplicate chunk id {c.id!r} ({c.source})")
                seen.add(c.id)
                sections[c.section] = None
                n += 1
                for w in words(c.title + " " + c.text):  # the typo repair's vocabulary
                    vocab[w] = vocab.get(w, 0) + 1
                conn.execute(
                    "INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        n,
                        c.id,
                        c.section,
                        c.title,
                        "\n".join(c.keys),
                        c.tokens,
                        DEFAULT_COUNTER.units(c.text),
                        c.source,
                        c.digest,
                        c.text,
                    ),
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO chunk_keys VALUES (?, ?)", [(k, n) for k in c.keys]
                )
            conn.execute(
                "INSERT INTO chunks_fts(rowid, title, keys, text) "
                "SELECT rowid, title, keys, text FROM chunks"
            )
            conn.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('optimize')")
            conn.executemany("INSERT INTO vocab VALUES (?, ?)", sorted(vocab.items()))
            # the BM25 per chunk of each query word (the words a search can ask for) and
            # of each pair of their tokens adjacent somewhere (the pairs that can match)
            write_word_scores(conn, filter(is_term, sorted(vocab)), _TOKENIZE)
            conn.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("schema", SCHEMA_VERSION),
                    ("name", name),
                    ("fingerprint", fingerprint),
                    ("counter", DEFAULT_COUNTER.name),
                    ("chunks", str(n)),
                    ("sections", "\n".join(sections)),
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


def connect_read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)


def read_meta(conn: sqlite3.Connection, path: Path) -> dict[str, str]:
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


def locate_module(
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
    for old in cache_dir.glob(f"{name}-*.sqlite"):
        # only files proven to be our own compiles of this module: the same folder
        # may hold a session store named like one (a recompile once deleted it)
        if old != path and _is_superseded_compile(old, name):
            with contextlib.suppress(OSError):
                old.unlink()
    return path, False


def _is_superseded_compile(path: Path, name: str) -> bool:
    """True only for ``<name>-<24 hex>.sqlite`` files whose ``meta`` table says they are
    a compiled dm-engine module named ``name``; anything else is left alone."""
    if not re.fullmatch(re.escape(name) + r"-[0-9a-f]{24}\.sqlite", path.name):
        return False
    try:
        conn = connect_read_only(path)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    schema = str(meta.get("schema", ""))
    return schema.startswith(_SCHEMA_FAMILY) and meta.get("name") == name and "fingerprint" in meta


def _valid_cache(path: Path, fp: str) -> bool:
    """A cached file is reused only when it is a complete module with our fingerprint;
    anything else (corrupt, foreign) is recompiled over."""
    try:
        conn = connect_read_only(path)
        try:
            return read_meta(conn, path).get("fingerprint") == fp
        finally:
            conn.close()
    except (sqlite3.Error, ModuleError):
        return False
