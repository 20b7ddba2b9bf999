"""BM25 per phrase, kept: a search over phrases seen before runs no FTS5 query.

FTS5's ``bm25()`` of an OR of phrases is a sum over the phrases: each phrase adds its
own idf times its own frequency term for the row, and nothing else (the row's length
and the table's average length are the same for every phrase). So one phrase's
contribution to every row it matches is what a query for that phrase alone returns,
and a query of many phrases is the sum of theirs, added in the same order FTS5 adds
them: the scores are equal to the last bit, and so is the ranking.

Two places keep a phrase's ``(rowids, scores)``:

* the compiled module, at the default column weights (``write_word_scores`` at
  compile time, ``read_word_scores`` and ``read_pair_scores`` after), for every word
  of its vocabulary and every pair of those words' tokens that the index has
  adjacent somewhere (a two-word phrase matches only where the second word's token
  directly follows the first's, so a pair not listed matches nothing). A text's new
  words are one read of primary keys, and its new pairs one more, where FTS5 scores
  every row a word matches (about 1 us a row; common words match a thousand rows)
  and reads both words' positions for a pair;
* ``PhraseScores``, per open store: the phrases its searches used, as numpy arrays,
  bounded in bytes (from the compiled lists, or from FTS5 for words the vocabulary
  lacks and other weights). A pair whose words are kept and never share a row
  matches nothing: no query either.

``PhraseScores.rank`` adds the kept arrays with ``numpy.bincount``: 0.02 ms for a query
FTS5 answers in 0.1-1 ms (bench/bench_context.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt

__all__ = [
    "BM25_WEIGHTS",
    "NO_MATCH",
    "WORD_SCORES_SCHEMA",
    "Fetch",
    "PhraseScores",
    "Scores",
    "Weights",
    "fts5_scores",
    "pair_key",
    "read_pair_scores",
    "read_word_scores",
    "write_word_scores",
]

Weights = tuple[float, float, float]
#: one phrase's contribution: the rowids it matches and ``-bm25()`` of each
Scores = tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]
#: a phrase's scores, from wherever they are (FTS5 or the compiled lists)
Fetch = Callable[[str, Weights], Scores]

#: column weights (title, keys, text) of searches unless told otherwise; the compiled
#: word lists are for these
BM25_WEIGHTS: Final[Weights] = (4.0, 3.0, 1.0)

_PHRASE: Final = "SELECT rowid, -bm25(chunks_fts, ?, ?, ?) FROM chunks_fts WHERE chunks_fts MATCH ?"
_ROWIDS: Final = np.dtype("<i4")  # stored little-endian, whatever the machine
_SCORES: Final = np.dtype("<f8")
_DEFAULT_BYTES: Final = 8 << 20
NO_MATCH: Final[Scores] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

WORD_SCORES_SCHEMA: Final = """
CREATE TABLE bm25_lists(id INTEGER PRIMARY KEY, rowids BLOB NOT NULL, scores BLOB NOT NULL);
CREATE TABLE bm25_words(word TEXT PRIMARY KEY, list INTEGER NOT NULL, stem INTEGER)
    WITHOUT ROWID;
CREATE TABLE bm25_pairs(pair INTEGER PRIMARY KEY, list INTEGER NOT NULL);
"""
#: a word's compiled scores and the id of its index token (None: not one token)
CompiledWord = tuple[Scores, "int | None"]


def fts5_scores(conn: sqlite3.Connection, phrase: str, weights: Weights) -> Scores:
    """``phrase``'s contribution to every row, from an FTS5 query (``phrase`` is an
    FTS5 phrase: quoted)."""
    rows = conn.execute(_PHRASE, (*weights, phrase)).fetchall()
    return (
        np.fromiter((r for r, _ in rows), dtype=np.int64, count=len(rows)),
        np.fromiter((s for _, s in rows), dtype=np.float64, count=len(rows)),
    )


def pair_key(first: int, second: int) -> int:
    """The ``bm25_pairs`` key of two token ids, in this order."""
    return first << 32 | second


def _tokens_of(conn: sqlite3.Connection, words: list[str], tokenize: str) -> dict[str, str]:
    """Each word's token under ``tokenize`` (the index's own tokenizer: its porter
    stem), for the words that make exactly one token."""
    conn.execute(f'CREATE VIRTUAL TABLE temp.word_tokens USING fts5(word, tokenize="{tokenize}")')
    conn.execute(
        "CREATE VIRTUAL TABLE temp.word_terms USING fts5vocab(temp, word_tokens, instance)"
    )
    try:
        conn.executemany(
            "INSERT INTO temp.word_tokens(rowid, word) VALUES (?, ?)", enumerate(words)
        )
        tokens: dict[int, list[str]] = {}
        for term, doc in conn.execute("SELECT term, doc FROM temp.word_terms"):
            tokens.setdefault(doc, []).append(term)
    finally:
        conn.execute("DROP TABLE temp.word_terms")
        conn.execute("DROP TABLE temp.word_tokens")
    return {words[doc]: found[0] for doc, found in tokens.items() if len(found) == 1}


def _adjacent(conn: sqlite3.Connection, token_ids: dict[str, int]) -> list[tuple[int, int]]:
    """Every pair of tokens of ``token_ids`` adjacent in some column of some row of
    the index, as token ids in their order there (sorted)."""
    conn.execute(
        "CREATE VIRTUAL TABLE temp.index_terms USING fts5vocab(main, chunks_fts, instance)"
    )
    try:
        rows = conn.execute(
            "SELECT term, doc, col, offset FROM temp.index_terms ORDER BY doc, col, offset"
        ).fetchall()
    finally:
        conn.execute("DROP TABLE temp.index_terms")
    if not rows:
        return []
    ids = np.fromiter((token_ids.get(r[0], -1) for r in rows), dtype=np.int64, count=len(rows))
    docs = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    columns: dict[str, int] = {}  # column name -> its number
    # each token's place: its column's number, then its offset in the column (< 2**32)
    at = np.fromiter(
        (columns.setdefault(r[2], len(columns)) << 32 | r[3] for r in rows), np.int64, len(rows)
    )
    follows = (docs[1:] == docs[:-1]) & (at[1:] == at[:-1] + 1) & (ids[1:] >= 0) & (ids[:-1] >= 0)
    keys = np.unique((ids[:-1][follows] << 32) | ids[1:][follows]).tolist()
    return [(k >> 32, k & 0xFFFFFFFF) for k in keys]


class _Lists:
    """``bm25_lists`` being written: each distinct list once."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._ids: dict[tuple[bytes, bytes], int] = {}

    def add(self, phrase: str) -> int:
        """The id of ``phrase``'s list at ``BM25_WEIGHTS``, written if new."""
        ids, scores = fts5_scores(self._conn, phrase, BM25_WEIGHTS)
        blob = (ids.astype(_ROWIDS).tobytes(), scores.astype(_SCORES).tobytes())
        list_id = self._ids.get(blob)
        if list_id is None:
            list_id = self._ids[blob] = len(self._ids) + 1
            self._conn.execute("INSERT INTO bm25_lists VALUES (?, ?, ?)", (list_id, *blob))
        return list_id


def write_word_scores(conn: sqlite3.Connection, words: Iterable[str], tokenize: str) -> None:
    """Store the scores at ``BM25_WEIGHTS`` (a compiled module's FTS5 index is
    complete) of each word, with its token's id, then of each pair of those tokens
    adjacent in the index. Equal lists share one row ("hit" and "hits" stem alike).
    ``tokenize``: the index's tokenizer option."""
    words = list(words)
    tokens = _tokens_of(conn, words, tokenize)
    token_ids = {t: i for i, t in enumerate(sorted(set(tokens.values())))}
    lists = _Lists(conn)
    spelling: dict[int, str] = {}  # token id -> a word with that token
    for word in words:
        token = tokens.get(word)
        stem = token_ids[token] if token is not None else None
        if stem is not None:
            spelling.setdefault(stem, word)
        conn.execute(
            "INSERT INTO bm25_words VALUES (?, ?, ?)", (word, lists.add(f'"{word}"'), stem)
        )
    for first, second in _adjacent(conn, token_ids):
        list_id = lists.add(f'"{spelling[first]} {spelling[second]}"')
        conn.execute("INSERT INTO bm25_pairs VALUES (?, ?)", (pair_key(first, second), list_id))


def _decoded(rowids: bytes, scores: bytes) -> Scores:
    return (
        np.frombuffer(rowids, dtype=_ROWIDS).astype(np.int64),
        np.frombuffer(scores, dtype=_SCORES).astype(np.float64),
    )


def read_word_scores(conn: sqlite3.Connection, words: Sequence[str]) -> dict[str, CompiledWord]:
    """The compiled scores (at ``BM25_WEIGHTS``) and token id of each of ``words``
    the module's vocabulary has, in one query; words it lacks are left out."""
    rows = _rows_in(
        conn,
        "SELECT w.word, l.rowids, l.scores, w.stem FROM bm25_words AS w JOIN bm25_lists "
        "AS l ON l.id = w.list WHERE w.word IN ({})",
        words,
    )
    return {word: (_decoded(rowids, scores), stem) for word, rowids, scores, stem in rows}


def read_pair_scores(conn: sqlite3.Connection, keys: Iterable[int]) -> dict[int, Scores]:
    """The compiled scores (at ``BM25_WEIGHTS``) of the pairs of ``keys`` (each made by
    ``pair_key`` of two token ids) that the index has adjacent somewhere; a pair left
    out matches nothing."""
    rows = _rows_in(
        conn,
        "SELECT p.pair, l.rowids, l.scores FROM bm25_pairs AS p JOIN bm25_lists AS l "
        "ON l.id = p.list WHERE p.pair IN ({})",
        list(keys),
    )
    return {key: _decoded(rowids, scores) for key, rowids, scores in rows}


def _rows_in(conn: sqlite3.Connection, sql: str, keys: Sequence[Any]) -> Iterator[Any]:
    """The rows of ``sql`` whose ``IN ({})`` takes ``keys``, in batches under SQLite's
    variable limit."""
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        yield from conn.execute(sql.format(",".join("?" * len(batch))), batch)


def _row_bits(rowids: npt.NDArray[np.int64], rows: int) -> int:
    """``rowids`` as the set bits of an int (bit ``r`` for row ``r``)."""
    mask = np.zeros(rows, dtype=bool)
    mask[rowids] = True
    return int.from_bytes(np.packbits(mask, bitorder="little").tobytes(), "little")


@attrs.define(eq=False)
class PhraseScores:
    """Each phrase's BM25 contribution per row, kept; queries ranked by adding them.

    The kept arrays' bytes stay under ``max_bytes``: when a phrase would pass it,
    everything kept is dropped at once (the store's other caches do the same). A
    module file is read-only once compiled, so kept scores never go stale. Not
    thread-safe by itself: the store calls it under its connection's lock.
    """

    rows: int  # one more than the largest rowid
    max_bytes: int = _DEFAULT_BYTES
    _kept: dict[tuple[str, Weights], Scores] = attrs.field(factory=dict, init=False)
    #: the rows a kept one-word phrase matches, as the bits of an int (made on first use)
    _rows_of: dict[tuple[str, Weights], int] = attrs.field(factory=dict, init=False)
    _bytes: int = attrs.field(default=0, init=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the kept arrays."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def kept(self, phrase: str, weights: Weights) -> bool:
        """Whether ``phrase``'s scores at ``weights`` are kept (``rank`` fetches no others)."""
        return (phrase, weights) in self._kept

    def clear(self) -> None:
        self._kept.clear()
        self._rows_of.clear()
        self._bytes = 0

    def keep(self, phrase: str, weights: Weights, scores: Scores) -> None:
        """Keep ``phrase``'s scores at ``weights`` (read elsewhere, e.g. from the
        compiled lists), within ``max_bytes``: ``rank`` then fetches nothing for it."""
        # the arrays, the key, about 200 bytes of objects around them, and for a
        # word its row bits (rows / 8 bytes), should a pair need them
        size = scores[0].nbytes + scores[1].nbytes + len(phrase) + 200
        if " " not in phrase:
            size += self.rows // 8
        if self._bytes + size > self.max_bytes:
            self.clear()
        if size <= self.max_bytes:
            self._kept[(phrase, weights)] = scores
            self._bytes += size

    def _phrase(self, phrase: str, weights: Weights, fetch: Fetch) -> Scores:
        kept = self._kept.get((phrase, weights))
        if kept is None:
            kept = NO_MATCH if self._cannot_match(phrase, weights) else fetch(phrase, weights)
            self.keep(phrase, weights, kept)
        return kept

    def _cannot_match(self, phrase: str, weights: Weights) -> bool:
        """True when ``phrase`` has several words, each kept as a phrase of its own, and
        no row has them all: a phrase matches only rows each of its words matches."""
        words = phrase[1:-1].split(" ")
        if len(words) < 2:
            return False
        common = -1  # every row
        for word in words:
            key = (f'"{word}"', weights)
            rows = self._rows_of.get(key)
            if rows is None:
                alone = self._kept.get(key)
                if alone is None:
                    return False  # not known here: ask
                rows = self._rows_of[key] = _row_bits(alone[0], self.rows)
            common &= rows
        return common == 0

    def rank(
        self, phrases: Sequence[str], weights: Weights, limit: int, fetch: Fetch
    ) -> list[tuple[int, float]]:
        """The ``limit`` best rows for the OR of ``phrases``: ``(rowid, score)``, score
        descending, then rowid; the rows FTS5 would return for that OR query ranked by
        ``-bm25()``. ``fetch`` gives a phrase's scores when they are not kept."""
        if not phrases or limit <= 0:
            return []
        parts = [self._phrase(p, weights, fetch) for p in phrases]
        ids = np.concatenate([p[0] for p in parts])
        if not ids.size:
            return []
        # bincount adds each row's contributions in phrase order, as bm25() does
        total = np.bincount(ids, weights=np.concatenate([p[1] for p in parts]), minlength=self.rows)
        matched = np.zeros(self.rows, dtype=bool)
        matched[ids] = True  # a match counts even if its weighted score is 0
        found = np.flatnonzero(matched)
        scores = total[found]
        if found.size > limit:  # keep the best `limit` and every row tied with the last
            cut = np.partition(scores, found.size - limit)[found.size - limit]
            keep = scores >= cut
            found, scores = found[keep], scores[keep]
        order = np.lexsort((found, -scores))[:limit]
        return list(zip(found[order].tolist(), scores[order].tolist(), strict=True))
