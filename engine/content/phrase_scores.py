"""BM25 per phrase, kept: a search over phrases seen before runs no FTS5 query.

FTS5's ``bm25()`` of an OR of phrases is a sum over the phrases: each phrase adds its
own idf times its own frequency term for the row, and nothing else (the row's length
and the table's average length are the same for every phrase). So one phrase's
contribution to every row it matches is what a query for that phrase alone returns,
and a query of many phrases is the sum of theirs, added in the same order FTS5 adds
them: the scores are equal to the last bit, and so is the ranking.

Two places keep a phrase's ``(rowids, scores)``:

* the compiled module, for every word of its vocabulary at the default column
  weights (``write_word_scores`` at compile time, ``read_word_scores`` after): a
  word's list is one primary-key read where its FTS5 query scores every row it
  matches, about 1 us a row, and common words match a thousand rows;
* ``PhraseScores``, per open store: the phrases its searches used (pairs, words the
  vocabulary lacks, other weights), as numpy arrays, bounded in bytes. A pair whose
  words are kept and never share a row matches nothing: no query either.

``PhraseScores.rank`` adds the kept arrays with ``numpy.bincount``: 0.02 ms for a query
FTS5 answers in 0.1-1 ms (bench/bench_context.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

__all__ = [
    "BM25_WEIGHTS",
    "WORD_SCORES_SCHEMA",
    "Fetch",
    "PhraseScores",
    "Scores",
    "Weights",
    "fts5_scores",
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
_NO_MATCH: Final[Scores] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64))

WORD_SCORES_SCHEMA: Final = """
CREATE TABLE bm25_lists(id INTEGER PRIMARY KEY, rowids BLOB NOT NULL, scores BLOB NOT NULL);
CREATE TABLE bm25_words(word TEXT PRIMARY KEY, list INTEGER NOT NULL) WITHOUT ROWID;
"""


def fts5_scores(conn: sqlite3.Connection, phrase: str, weights: Weights) -> Scores:
    """``phrase``'s contribution to every row, from an FTS5 query (``phrase`` is an
    FTS5 phrase: quoted)."""
    rows = conn.execute(_PHRASE, (*weights, phrase)).fetchall()
    return (
        np.fromiter((r for r, _ in rows), dtype=np.int64, count=len(rows)),
        np.fromiter((s for _, s in rows), dtype=np.float64, count=len(rows)),
    )


def write_word_scores(conn: sqlite3.Connection, words: Iterable[str]) -> None:
    """Store each word's scores at ``BM25_WEIGHTS`` (a compiled module's FTS5 index is
    complete); words with equal lists (one stem: "hit", "hits") share one row."""
    lists: dict[tuple[bytes, bytes], int] = {}
    for word in words:
        ids, scores = fts5_scores(conn, f'"{word}"', BM25_WEIGHTS)
        blob = (ids.astype(_ROWIDS).tobytes(), scores.astype(_SCORES).tobytes())
        list_id = lists.get(blob)
        if list_id is None:
            list_id = lists[blob] = len(lists) + 1
            conn.execute("INSERT INTO bm25_lists VALUES (?, ?, ?)", (list_id, *blob))
        conn.execute("INSERT INTO bm25_words VALUES (?, ?)", (word, list_id))


def read_word_scores(conn: sqlite3.Connection, word: str) -> Scores | None:
    """``word``'s compiled scores at ``BM25_WEIGHTS``; None when the module's
    vocabulary lacks it."""
    row = conn.execute(
        "SELECT l.rowids, l.scores FROM bm25_words AS w JOIN bm25_lists AS l "
        "ON l.id = w.list WHERE w.word = ?",
        (word,),
    ).fetchone()
    if row is None:
        return None
    return (
        np.frombuffer(row[0], dtype=_ROWIDS).astype(np.int64),
        np.frombuffer(row[1], dtype=_SCORES).astype(np.float64),
    )


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

    def clear(self) -> None:
        self._kept.clear()
        self._rows_of.clear()
        self._bytes = 0

    def _phrase(self, phrase: str, weights: Weights, fetch: Fetch) -> Scores:
        key = (phrase, weights)
        kept = self._kept.get(key)
        if kept is None:
            kept = _NO_MATCH if self._cannot_match(phrase, weights) else fetch(phrase, weights)
            # the arrays, the key, about 200 bytes of objects around them, and for a
            # word its row bits (rows / 8 bytes), should a pair need them
            size = kept[0].nbytes + kept[1].nbytes + len(phrase) + 200
            if " " not in phrase:
                size += self.rows // 8
            if self._bytes + size > self.max_bytes:
                self.clear()
            if size <= self.max_bytes:
                self._kept[key] = kept
                self._bytes += size
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
