"""BM25 per phrase, kept: a search over phrases seen before runs no FTS5 query.

FTS5's ``bm25()`` of an OR of phrases is a sum over the phrases: each phrase adds its
own idf times its own frequency term for the row, and nothing else (the row's length
and the table's average length are the same for every phrase). So one phrase's
contribution to every row it matches is what a query for that phrase alone returns,
and a query of many phrases is the sum of theirs, added in the same order FTS5 adds
them: the scores are equal to the last bit, and so is the ranking.

``PhraseScores`` keeps each phrase's ``(rowids, scores)`` as two numpy arrays (FTS5
queried once per phrase and column weights) and ranks a query by adding the kept
arrays with ``numpy.bincount``. Measured over the SRD (bench/bench_context.py), that
is 0.02 ms for a query FTS5 answers in 0.1-1 ms: FTS5 scores every matching row one
phrase at a time, about 0.8 us per row, and common words match a thousand rows.

Bounded: the kept arrays' bytes stay under ``max_bytes``; when a phrase would pass it,
everything kept is dropped at once (the store's other caches do the same). A module
file is read-only once compiled, so kept scores never go stale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

__all__ = ["PhraseScores"]

Weights = tuple[float, float, float]
#: one phrase's FTS5 rows: (rowid, -bm25) for every row it matches
Fetch = Callable[[str, Weights], Sequence[tuple[int, float]]]

_DEFAULT_BYTES: Final = 8 << 20


@attrs.define(eq=False)
class PhraseScores:
    """Each phrase's BM25 contribution per row, kept; queries ranked by adding them.

    Not thread-safe by itself: the store calls it under its connection's lock.
    """

    rows: int  # one more than the largest rowid
    max_bytes: int = _DEFAULT_BYTES
    _kept: dict[tuple[str, Weights], tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = (
        attrs.field(factory=dict, init=False)
    )
    _bytes: int = attrs.field(default=0, init=False)

    @property
    def nbytes(self) -> int:
        """Bytes of the kept arrays."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()
        self._bytes = 0

    def _phrase(
        self, phrase: str, weights: Weights, fetch: Fetch
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        key = (phrase, weights)
        kept = self._kept.get(key)
        if kept is None:
            found = fetch(phrase, weights)
            ids = np.fromiter((r for r, _ in found), dtype=np.int64, count=len(found))
            scores = np.fromiter((s for _, s in found), dtype=np.float64, count=len(found))
            kept = (ids, scores)
            size = ids.nbytes + scores.nbytes + len(phrase) + 200
            if self._bytes + size > self.max_bytes:
                self.clear()
            if size <= self.max_bytes:
                self._kept[key] = kept
                self._bytes += size
        return kept

    def rank(
        self, phrases: Sequence[str], weights: Weights, limit: int, fetch: Fetch
    ) -> list[tuple[int, float]]:
        """The ``limit`` best rows for the OR of ``phrases``: ``(rowid, score)``, score
        descending, then rowid; the rows FTS5 would return for that OR query ranked by
        ``-bm25()``. ``fetch`` queries FTS5 for a phrase not kept yet."""
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
