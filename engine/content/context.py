"""The optimized context builder: the most relevant module chunks that fit a token budget.

Relevance of a chunk for a request (0..1)::

    0.65 * bm25 / best_bm25  +  0.35 * boost

``bm25`` is the FTS5 score of the chunk for the request's text (the player's action
plus the location and NPC names in its context); ``boost`` is 1.0 for chunks about
the current location, 0.8 for chunks about an NPC present (the request context's
``npcs_present``, a list of names, as the engine's scene passes it; ``npcs`` too),
0.4 for a chunk in one of the sections the action type needs
(``[performance.lazy_loading.priorities]``), else 0. Chunks about the location or
the NPCs present are candidates even when the text does not mention them.

Selection: candidates by decreasing relevance (ties by id); a chunk is taken when it
fits the remaining budget and skipped otherwise (smaller ones after it are still
tried); it stops when the budget is full, no remaining candidate is small enough, or
relevance drops below ``min_relevance``. The final text is counted again with the
builder's counter and trimmed from the least relevant end until it fits, so
``result.tokens <= budget`` holds for any counter. With the default counter over a
``ModuleStore`` that count is computed exactly from the chunks' stored units (the
counter is additive in units over blank-line joins) instead of rescanning the text.

Names come from a model (the module keeper's scene), so they are matched leniently:
case and surrounding blanks do not matter, and a chunk title such as "Skrit >
Bargaining with Skrit" counts as its entity, the part before the first " > ".

Queries: a ``ModuleStore`` ranks and returns the hits' catalogue entries (and, with
no cache, their text) in one query (``search_chunks``); other sources are used
through ``search``, ``catalogue`` and ``fetch_chunks``. Chunk text missing from the
cache is fetched in one query per build, single flight: a chunk that a concurrent
build of the same builder is fetching is awaited, not fetched again.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, final

import anyio
import anyio.lowlevel
import attrs

from .sources import Chunk
from .store import CatalogueEntry, SectionContent, fts_phrases
from .tokens import DEFAULT_COUNTER, TokenCounter

if TYPE_CHECKING:
    from ..agents.base import AgentRequest
    from .cache import ModuleCache
    from .lazy import LazyLoadManager

__all__ = ["ContextResult", "ContextSource", "OptimizedContextBuilder", "chunk_key"]

_SEPARATOR = "\n\n"
_BM25_WEIGHT = 0.65
_BOOST_WEIGHT = 0.35
_BOOST_LOCATION = 1.0
_BOOST_NPC = 0.8
_BOOST_SECTION = 0.4


class ContextSource(Protocol):
    """What the builder needs of a module (``ModuleStore`` implements it)."""

    @property
    def name(self) -> str: ...

    @property
    def counter_name(self) -> str: ...

    @property
    def catalogue(self) -> Mapping[str, CatalogueEntry]: ...

    async def search(self, query: str, limit: int = 40) -> list[tuple[str, float]]: ...

    async def fetch_chunks(self, ids: Iterable[str]) -> dict[str, Chunk]: ...

    def ids_for_key(self, key: str) -> Sequence[str]: ...


@attrs.frozen
class ContextResult:
    """A built context. ``sources``: (chunk id, relevance) in the order of ``text``."""

    text: str
    tokens: int
    sources: tuple[tuple[str, float], ...]
    cache_hits: int
    cache_misses: int
    elapsed: float


def chunk_key(module: str, entry: CatalogueEntry) -> str:
    """Cache key of a chunk's text: ``module:<module>:<section>:<id>@<digest>``.

    The digest makes it a content key: a changed chunk gets a new key and is never
    served stale, even when module, section and id are unchanged.
    """
    return f"module:{module}:{entry.section}:{entry.id}@{entry.digest}"


def _name(value: Any) -> str:
    """An entity name as the chunks' keys spell it, from what a model may send.

    Case and surrounding blanks do not matter (keys are compared lower-cased), and a
    chunk title ("Skrit > Bargaining with Skrit") stands for its entity: the part
    before the first " > ". A mapping stands for its ``name``.
    """
    if isinstance(value, Mapping):
        value = value.get("name")
    if value is None:
        return ""
    return str(value).split(" > ", 1)[0].strip()


def _names(value: Any) -> list[str]:
    """Entity names from a string or an iterable of them, cleaned, without repeats."""
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, Iterable):
        return []
    names = (_name(v) for v in value)
    return list({n.lower(): n for n in names if n}.values())


_WORD = re.compile(r"[a-z0-9]+")


def _stems(text: str) -> set[str]:
    """Cheap stems: lower-case words of 2+ letters cut to 5 characters."""
    return {w[:5] for w in _WORD.findall(text.lower()) if len(w) > 1}


_TITLE_WEIGHT = 0.3
_TITLE_STOP = frozenset({"the", "of", "and", "a", "an", "to", "in", "on", "or", "for", "with"})


@functools.lru_cache(maxsize=8192)
def _title_stems(title: str) -> frozenset[str]:
    last = title.rsplit(" > ", 1)[-1]
    return frozenset(w[:5] for w in _WORD.findall(last.lower()) if w not in _TITLE_STOP)


def _title_cover(title: str, query: set[str]) -> float:
    """Share of the title's last part's words (5-letter stems) that the query has."""
    stems = _title_stems(title)
    return len(stems & query) / len(stems) if stems else 0.0


#: relevance kept by each further passage of an already ranked chunk (see _diversified)
_REPEAT_DECAY = 0.9


def _diversified(ranked: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """``ranked`` (best first) with the n-th passage of one chunk (``id``, ``id~2``, …)
    scaled by ``_REPEAT_DECAY ** (n - 1)`` and sorted again: eleven passages of
    one monster's stat block must not fill a small budget before the rule the action
    names."""
    seen: dict[str, int] = {}
    out = []
    for cid, rel in ranked:
        base = cid.partition("~")[0]
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append((cid, rel * _REPEAT_DECAY**n if n else rel))
    out.sort(key=lambda x: (-x[1], x[0]))
    return out


def _default_priorities() -> Mapping[str, Sequence[str]]:
    from ..config import LazyLoadingConfig

    return LazyLoadingConfig().priorities


@final
@attrs.define(eq=False, repr=False, init=False)
class OptimizedContextBuilder:
    """Builds token-budgeted context for agent requests from a module.

    Args:
        module: the module (a ``ModuleStore`` or anything with its search API).
        cache: chunk text is looked up in it and stored in it after a fetch (content
            keys, :func:`chunk_key`); None: straight from the module. Either way a
            chunk is fetched once however many builds want it at the same time
            (single flight within the builder: the engine has one).
        lazy: when it reports a section loaded, chunk text is taken from the
            section's cache entry (after checking the chunk's digest).
        counter: the token counter of the budget; default: the store's counter,
            whose per-chunk counts are precomputed in the catalogue.
        on_lookup: called with the seconds of every chunk lookup in the cache (the
            engine records them as the ``cache_lookup`` operation).
    """

    module: ContextSource
    cache: ModuleCache | None = None
    lazy: LazyLoadManager | None = None
    counter: TokenCounter = attrs.field(default=DEFAULT_COUNTER, kw_only=True)
    candidates: int = attrs.field(default=40, kw_only=True)
    min_relevance: float = attrs.field(default=0.1, kw_only=True)
    priorities: Mapping[str, Sequence[str]] = attrs.field(factory=_default_priorities, kw_only=True)
    on_lookup: Callable[[float], object] | None = attrs.field(default=None, kw_only=True)
    _flights: dict[str, _Fetch] = attrs.field(init=False, factory=dict)

    def __init__(
        self,
        module: ContextSource,
        cache: ModuleCache | None = None,
        lazy: LazyLoadManager | None = None,
        *,
        counter: TokenCounter | None = None,
        candidates: int = 40,
        min_relevance: float = 0.1,
        priorities: Mapping[str, Sequence[str]] | None = None,
        on_lookup: Callable[[float], object] | None = None,
    ) -> None:
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates!r}")
        if not 0.0 <= min_relevance <= 1.0:
            raise ValueError(f"min_relevance must be in [0, 1], got {min_relevance!r}")
        self.__attrs_init__(
            module,
            cache,
            lazy,
            counter=DEFAULT_COUNTER if counter is None else counter,
            candidates=candidates,
            min_relevance=min_relevance,
            priorities=_default_priorities() if priorities is None else priorities,
            on_lookup=on_lookup,
        )

    def __repr__(self) -> str:
        return f"<OptimizedContextBuilder {self.module.name!r}>"

    @property
    def _precounted(self) -> bool:
        """The catalogue's token counts are this builder's counter's counts."""
        return self.counter == DEFAULT_COUNTER and self.module.counter_name == DEFAULT_COUNTER.name

    # ------------------------------------------------------------ relevance

    def _request_parts(self, request: AgentRequest) -> tuple[str, str, list[str], str]:
        ctx = request.context
        action = str(ctx.get("action") or "")
        location = _name(ctx.get("location"))
        # the engine's scene names them ``npcs_present`` (the module keeper's list of
        # who is present); ``npcs`` is the older spelling, taken as well
        npcs = _names([*_names(ctx.get("npcs_present")), *_names(ctx.get("npcs"))])
        action_type = str(ctx.get("action_type") or "")
        return action, location, npcs, action_type

    def _boost(
        self,
        keys: Iterable[str],
        section: str,
        location: str,
        npcs: Iterable[str],
        sections: Iterable[str],
    ) -> float:
        keyset = set(keys)
        if location and location.lower() in keyset:
            return _BOOST_LOCATION
        if any(n.lower() in keyset for n in npcs):
            return _BOOST_NPC
        if section in sections:
            return _BOOST_SECTION
        return 0.0

    async def _rank(
        self, request: AgentRequest, with_text: bool
    ) -> tuple[list[tuple[str, float]], dict[str, CatalogueEntry], dict[str, str]]:
        """(candidates best first, their catalogue entries, text the search returned).

        A ``ModuleStore`` answers in one call (ranking, entries and, ``with_text``,
        text); any other source through ``search`` and its catalogue."""
        action, location, npcs, action_type = self._request_parts(request)
        query = " ".join(part for part in (action, location, *npcs) if part)
        module = self.module
        entries: dict[str, CatalogueEntry] = {}
        texts: dict[str, str] = {}
        bm25: dict[str, float] = {}
        search_chunks = getattr(module, "search_chunks", None)
        if search_chunks is not None:
            found, texts = await search_chunks(query, self.candidates, with_text=with_text)
            top = found[0][1] if found else 0.0  # best first
            for e, s in found:
                entries[e.id] = e
                bm25[e.id] = s / top if top > 0 else 0.0
        else:
            hits = await module.search(query, self.candidates)
            top = max((s for _, s in hits), default=0.0)
            bm25 = {cid: (s / top if top > 0 else 0.0) for cid, s in hits}
        keyed = [k.lower() for k in (location, *npcs) if k]
        for key in keyed:
            for cid in module.ids_for_key(key):
                bm25.setdefault(cid, 0.0)
        if len(entries) < len(bm25):
            catalogue = module.catalogue  # a property on some sources: read it once
            for cid in bm25:
                if cid not in entries:
                    entries[cid] = catalogue[cid]
        # title boost: the share of the chunk's own heading (the last part of its
        # title) that the query (repaired and expanded) names, so "Shield" the spell
        # outranks "Arrow-Catching Shield" for "I cast shield"
        expand = getattr(module, "expand", None)
        segments = expand(action) if expand is not None and action else (action,)
        qstems = _stems(" ".join(segments))
        loc = location.lower()
        npc_keys = set(keyed[1:] if location else keyed)
        sections = self.priorities.get(action_type, ()) if action_type else ()
        ranked = []
        for cid, b in bm25.items():
            e = entries[cid]
            if e.keys and loc and loc in e.keys:
                boost = _BOOST_LOCATION
            elif e.keys and not npc_keys.isdisjoint(e.keys):
                boost = _BOOST_NPC
            elif e.section in sections:
                boost = _BOOST_SECTION
            else:
                boost = 0.0
            if qstems:
                b = (1 - _TITLE_WEIGHT) * b + _TITLE_WEIGHT * _title_cover(e.title, qstems)
            ranked.append((cid, min(1.0, _BM25_WEIGHT * b + _BOOST_WEIGHT * boost)))
        ranked.sort(key=lambda x: (-x[1], x[0]))
        return _diversified(ranked), entries, texts

    async def rank(self, request: AgentRequest) -> list[tuple[str, float]]:
        """Candidate chunk ids with their relevance (0..1), best first, ties by id."""
        return (await self._rank(request, with_text=False))[0]

    def estimate_relevance(self, content: object, request: AgentRequest) -> float:
        """A cheap 0..1 relevance of ``content`` (a Chunk, CatalogueEntry, SectionContent
        or text) for ``request``: term overlap with the action (title terms count more)
        plus the same location/NPC/section boosts as ``build_context``. No index scan."""
        action, location, npcs, action_type = self._request_parts(request)
        query = _stems(" ".join(phrase.strip('"') for phrase in fts_phrases(action)))
        title, text, section = "", "", ""
        keys: tuple[str, ...] = ()
        if isinstance(content, Chunk):
            title, text, keys, section = content.title, content.text, content.keys, content.section
        elif isinstance(content, CatalogueEntry):
            title, keys, section = content.title, content.keys, content.section
        elif isinstance(content, SectionContent):
            section, text = content.section, " ".join(c.title for c in content.chunks)
        else:
            text = str(content)
        base = 0.0
        if query:
            title_stems, text_stems = _stems(title), _stems(text)
            base = sum(
                1.0 if t in title_stems else 0.6 if t in text_stems else 0.0 for t in query
            ) / len(query)
        sections = self.priorities.get(action_type, ()) if action_type else ()
        boost = self._boost(keys, section, location, npcs, sections)
        return max(0.0, min(1.0, _BM25_WEIGHT * base + _BOOST_WEIGHT * boost))

    # ------------------------------------------------------------ selection

    def _select(
        self, ranked: Sequence[tuple[str, float]], tokens: Mapping[str, int], budget: int
    ) -> list[tuple[str, float]]:
        """Greedy by relevance with skip-and-continue; see the module docstring."""
        eligible = [(cid, r) for cid, r in ranked if r >= self.min_relevance]
        # suffix minima: stop as soon as nothing left could fit
        smallest = [0] * (len(eligible) + 1)
        smallest[-1] = budget + 1
        for i in range(len(eligible) - 1, -1, -1):
            smallest[i] = min(tokens[eligible[i][0]], smallest[i + 1])
        remaining = budget
        chosen: list[tuple[str, float]] = []
        for i, (cid, rel) in enumerate(eligible):
            if remaining < smallest[i]:
                break
            t = tokens[cid]
            if t <= remaining:
                chosen.append((cid, rel))
                remaining -= t
        return chosen

    async def _texts(
        self,
        ids: Sequence[str],
        entries: Mapping[str, CatalogueEntry],
        found: Mapping[str, str],
        known: dict[str, tuple[str, bool]],
    ) -> tuple[dict[str, str], int, int]:
        """Text of each chunk through the cache; (texts, cache hits, cache misses).

        Without a cache every chunk is a miss, its text taken from ``found`` (what the
        search returned) or fetched. ``known`` (chunk id -> text, whether it was a
        hit) holds what this build already looked up: each chunk is looked up once
        per build, and counted as it was then."""
        looked = await self._look_up([cid for cid in ids if cid not in known], entries, found)
        known.update(looked)
        texts: dict[str, str] = {}
        hits = 0
        for cid in ids:
            texts[cid], hit = known[cid]
            hits += hit
        return texts, hits, len(ids) - hits

    async def _look_up(
        self, ids: Sequence[str], entries: Mapping[str, CatalogueEntry], found: Mapping[str, str]
    ) -> dict[str, tuple[str, bool]]:
        """Text of each chunk, and whether the cache (or a loaded section) had it."""
        texts: dict[str, tuple[str, bool]] = {}
        missing: list[str] = []
        cache, lazy, name, on_lookup = self.cache, self.lazy, self.module.name, self.on_lookup
        for cid in ids:
            if cache is None:
                text = found.get(cid)
                if text is None:
                    missing.append(cid)
                else:
                    texts[cid] = (text, False)
                continue
            e = entries[cid]
            if on_lookup is None:
                value = cache.get(chunk_key(name, e))
            else:
                t0 = time.perf_counter()
                value = cache.get(chunk_key(name, e))
                on_lookup(time.perf_counter() - t0)
            if isinstance(value, str):
                texts[cid] = (value, True)
                continue
            if lazy is not None and lazy.is_loaded(e.section):
                section = cache.get(f"module:{name}:{e.section}")
                if isinstance(section, SectionContent):
                    chunk = _find(section, cid)
                    if chunk is not None and chunk.digest == e.digest:
                        texts[cid] = (chunk.text, True)
                        # next time a direct hit, not a scan of the section
                        cache.put(chunk_key(name, e), chunk.text)
                        continue
            missing.append(cid)
        if missing:
            fetched = await self._fetch(missing, entries)
            texts.update((cid, (text, False)) for cid, text in fetched.items())
        return texts

    async def _fetch(
        self, ids: Sequence[str], entries: Mapping[str, CatalogueEntry]
    ) -> dict[str, str]:
        """Text of ``ids`` from the module, single flight per chunk key.

        Chunks a concurrent build of this builder is already fetching are awaited,
        not fetched again; the others are fetched in one query (and put in the
        cache). This build's own query runs before it waits for the others', so two
        builds never wait for each other. If the build fetching a chunk fails or is
        cancelled, its waiters fetch that chunk themselves.
        """
        name, flights = self.module.name, self._flights
        mine: dict[str, _Fetch] = {}
        theirs: dict[str, _Fetch] = {}
        for cid in ids:
            key = chunk_key(name, entries[cid])
            flight = flights.get(key)
            if flight is None:
                mine[cid] = flights[key] = _Fetch(key)
            else:
                theirs[cid] = flight
        texts: dict[str, str] = {}
        if mine:
            fetched: dict[str, Chunk] = {}
            try:
                fetched = await self.module.fetch_chunks(list(mine))  # one query for all
            finally:
                cache = self.cache
                for cid, flight in mine.items():
                    if flights.get(flight.key) is flight:
                        del flights[flight.key]
                    chunk = fetched.get(cid)
                    if chunk is not None:
                        flight.text = chunk.text
                        if cache is not None:
                            cache.put(flight.key, chunk.text)
                    flight.done.set()
            for cid in mine:
                texts[cid] = fetched[cid].text
        orphans: list[str] = []
        for cid, flight in theirs.items():
            await flight.done.wait()
            if flight.text is None:
                orphans.append(cid)
            else:
                texts[cid] = flight.text
        if orphans:
            texts.update(await self._fetch(orphans, entries))
        return texts

    async def build_context(self, request: AgentRequest, budget: int) -> ContextResult:
        """The most relevant chunks that fit ``budget`` tokens, joined by blank lines.

        Guarantees: ``result.tokens == counter.count(result.text) <= budget``; equal
        inputs (request, budget, module content) give equal text and sources.

        Raises:
            ValueError: ``budget`` is negative.
        """
        return (await self.build_contexts(request, {"": budget}))[""]

    async def build_contexts(
        self, request: AgentRequest, budgets: Mapping[str, int]
    ) -> dict[str, ContextResult]:
        """One context per named budget for the same request, ranking only once.

        Each result is exactly what ``build_context(request, budget)`` returns (the
        agents of one player action share the action, location and action type, so
        their candidates are the same; only the budgets differ). Each chunk's text is
        looked up once for all of them, and each result counts its cache hits and
        misses as that look-up found them.

        Raises:
            ValueError: a budget is negative.
        """
        for budget in budgets.values():
            if budget < 0:
                raise ValueError(f"budget must be >= 0, got {budget!r}")
        t0 = anyio.current_time()
        # without a cache the hits' text comes with the search (one query in all)
        ranked, entries, found = await self._rank(request, with_text=self.cache is None)
        results: dict[str, ContextResult] = {}
        known: dict[str, tuple[str, bool]] = {}  # chunk texts looked up, shared by the budgets
        for name, budget in budgets.items():
            results[name] = await self._assemble(ranked, entries, found, budget, t0, known)
        return results

    async def _assemble(
        self,
        ranked: list[tuple[str, float]],
        entries: Mapping[str, CatalogueEntry],
        found: Mapping[str, str],
        budget: int,
        t0: float,
        known: dict[str, tuple[str, bool]],
    ) -> ContextResult:
        precounted = self._precounted
        hits = misses = 0
        texts: dict[str, str] = {}
        if precounted:
            tokens = {cid: entries[cid].tokens for cid, _ in ranked}
        else:  # a user's counter: count the candidates' text with it
            texts, hits, misses = await self._texts(
                [c for c, r in ranked if r >= self.min_relevance], entries, found, known
            )
            tokens = {cid: self.counter.count(texts.get(cid, "")) for cid, _ in ranked}
        chosen = self._select(ranked, tokens, budget)
        need = [cid for cid, _ in chosen if cid not in texts]
        if need:
            more, h, m = await self._texts(need, entries, found, known)
            texts.update(more)
            hits += h
            misses += m
        else:
            await anyio.lowlevel.checkpoint()
        text = _SEPARATOR.join(texts[cid] for cid, _ in chosen)
        units = [entries[cid].units for cid, _ in chosen] if precounted else None
        if units is not None and None not in units:
            # the default counter is additive in units over blank-line joins (tokens.py):
            # the exact count of ``text`` without scanning it again
            unit_list = [u for u in units if u is not None]
            total = sum(unit_list)
            count = DEFAULT_COUNTER.tokens_for(total)
            while count > budget and chosen:  # rounding: trim like the general case
                chosen.pop()
                total -= unit_list.pop()
                count = DEFAULT_COUNTER.tokens_for(total)
            if len(chosen) < len(units):
                text = _SEPARATOR.join(texts[cid] for cid, _ in chosen)
        else:
            count = self.counter.count(text)
            while count > budget and chosen:  # counters need not be additive: verify, trim
                chosen.pop()
                text = _SEPARATOR.join(texts[cid] for cid, _ in chosen)
                count = self.counter.count(text)
        return ContextResult(
            text=text,
            tokens=count,
            sources=tuple(chosen),
            cache_hits=hits,
            cache_misses=misses,
            elapsed=anyio.current_time() - t0,
        )


@attrs.define(eq=False)
class _Fetch:
    """A chunk fetch in flight: ``text`` once it arrived (None if it failed)."""

    key: str
    text: str | None = None
    done: anyio.Event = attrs.field(factory=anyio.Event)


def _find(section: SectionContent, chunk_id: str) -> Chunk | None:
    for c in section.chunks:
        if c.id == chunk_id:
            return c
    return None
