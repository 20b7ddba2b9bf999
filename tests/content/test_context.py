"""The context builder: budget, skip-and-continue, determinism, no stale content, caching."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.agents.base import AgentRequest
from engine.content.cache import ModuleCache
from engine.content.context import OptimizedContextBuilder, chunk_key
from engine.content.lazy import LazyLoadManager
from engine.content.sources import Chunk, bundled_adventure_dir
from engine.content.store import CatalogueEntry, open_module
from engine.content.tokens import DEFAULT_COUNTER


def req(action: str, **context: object) -> AgentRequest:
    return AgentRequest(id="r", agent="narrator", context={"action": action, **context})


@attrs.define
class FakeModule:
    """An in-memory module: chunk i has ``sizes[i]`` words and BM25 score ``scores[i]``."""

    sizes: Sequence[int]
    scores: Sequence[float]
    name: str = "fake"
    counter_name: str = DEFAULT_COUNTER.name
    fetches: list[list[str]] = attrs.Factory(list)

    def _chunk(self, i: int) -> Chunk:
        text = f"c{i:03d} " + "w " * self.sizes[i]
        return Chunk(f"c{i:03d}", "rules", f"c{i:03d}", text, DEFAULT_COUNTER.count(text), "fake")

    @property
    def catalogue(self) -> dict[str, CatalogueEntry]:
        out = {}
        for i in range(len(self.sizes)):
            c = self._chunk(i)
            out[c.id] = CatalogueEntry(c.id, c.section, c.title, c.tokens, (), c.digest, i + 1)
        return out

    async def search(self, query: str, limit: int = 40) -> list[tuple[str, float]]:
        await trio.lowlevel.checkpoint()
        hits = [(f"c{i:03d}", s) for i, s in enumerate(self.scores) if s > 0]
        return sorted(hits, key=lambda h: (-h[1], h[0]))[:limit]

    async def fetch_chunks(self, ids: Iterable[str]) -> dict[str, Chunk]:
        await trio.lowlevel.checkpoint()
        ids = list(ids)
        self.fetches.append(ids)
        return {i: self._chunk(int(i[1:])) for i in ids}

    def ids_for_key(self, key: str) -> Sequence[str]:
        return ()


def greedy_model(
    ranked: list[tuple[str, float]], tokens: dict[str, int], budget: int, floor: float
) -> list[str]:
    """The plain sequential rule: in order, take what fits, skip what does not."""
    chosen, left = [], budget
    for cid, rel in ranked:
        if rel >= floor and tokens[cid] <= left:
            chosen.append(cid)
            left -= tokens[cid]
    return chosen


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_budget_never_exceeded_and_skip_and_continue(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 30))
    sizes = data.draw(st.lists(st.integers(0, 400), min_size=n, max_size=n))
    scores = data.draw(st.lists(st.floats(0, 20, allow_nan=False), min_size=n, max_size=n))
    budget = data.draw(st.integers(0, 3000))
    module = FakeModule(sizes, scores)
    builder = OptimizedContextBuilder(module, candidates=50)

    async def main() -> None:
        result = await builder.build_context(req("anything"), budget)
        assert result.tokens <= budget
        assert result.tokens == DEFAULT_COUNTER.count(result.text)
        ranked = await builder.rank(req("anything"))
        catalogue = module.catalogue
        tokens = {cid: catalogue[cid].tokens for cid, _ in ranked}
        chosen = [cid for cid, _ in result.sources]
        assert chosen == greedy_model(ranked, tokens, budget, builder.min_relevance)
        # maximality: nothing eligible that was left out would still fit
        left = budget - sum(tokens[c] for c in chosen)
        for cid, rel in ranked:
            if cid not in chosen and rel >= builder.min_relevance:
                assert tokens[cid] > left
        # only the chosen chunks' text was fetched
        assert sorted(c for f in module.fetches for c in f) == sorted(chosen)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_skips_a_big_chunk_and_takes_smaller_ones() -> None:
    module = FakeModule(sizes=[100, 900, 50, 40], scores=[10, 9, 8, 7])
    builder = OptimizedContextBuilder(module)

    async def main() -> None:
        result = await builder.build_context(req("x"), 300)
        assert [c for c, _ in result.sources] == ["c000", "c002", "c003"]

    trio.run(main)


class WordsPlusOverhead:
    """A non-additive counter: words plus a fixed overhead per call (like a chat template)."""

    name = "words+8"

    def count(self, text: str) -> int:
        return len(text.split()) + 8 if text else 0


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 200), min_size=1, max_size=15),
    budget=st.integers(0, 1500),
)
def test_a_users_counter_bounds_the_result_too(sizes: list[int], budget: int) -> None:
    module = FakeModule(sizes, [float(len(sizes) - i) for i in range(len(sizes))])
    counter = WordsPlusOverhead()
    builder = OptimizedContextBuilder(module, counter=counter)

    async def main() -> None:
        result = await builder.build_context(req("x"), budget)
        assert result.tokens == counter.count(result.text) <= budget

    trio.run(main)


def test_bad_arguments() -> None:
    module = FakeModule([1], [1.0])
    with pytest.raises(ValueError, match="candidates"):
        OptimizedContextBuilder(module, candidates=0)
    with pytest.raises(ValueError, match="min_relevance"):
        OptimizedContextBuilder(module, min_relevance=2)

    async def main() -> None:
        with pytest.raises(ValueError, match="budget"):
            await OptimizedContextBuilder(module).build_context(req("x"), -1)

    trio.run(main)


# ------------------------------------------------------------ on the real module


NAVE = req(
    "I search the altar for traps",
    location="The Sunken Nave",
    npcs=["Sister Ilse Maren"],
    action_type="exploration",
)


@pytest.mark.anyio
async def test_deterministic_and_boosted(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as m:
        a = await OptimizedContextBuilder(m).build_context(NAVE, 1500)
        b = await OptimizedContextBuilder(m, ModuleCache()).build_context(NAVE, 1500)
        assert (a.text, a.sources, a.tokens) == (b.text, b.sources, b.tokens)
        ids = [c for c, _ in a.sources]
        assert ids[0].startswith("default/locations/the-sunken-nave")  # the altar paragraph
        assert "default/npcs/sister-ilse-maren" in ids
        rels = [r for _, r in a.sources]
        assert rels == sorted(rels, reverse=True) and all(0 <= r <= 1 for r in rels)
        # without the location and NPC in context, the boosts disappear
        plain = await OptimizedContextBuilder(m).build_context(req(NAVE.context["action"]), 1500)
        assert "default/npcs/sister-ilse-maren" not in [c for c, _ in plain.sources]


@pytest.mark.anyio
async def test_build_contexts_equals_one_build_per_budget(compiled: Path) -> None:
    budgets = {"narrator": 2000, "arbiter": 1500, "tiny": 40, "none": 0}
    async with await open_module("default", cache_dir=compiled) as m:
        together = await OptimizedContextBuilder(m, ModuleCache()).build_contexts(NAVE, budgets)
        for name, budget in budgets.items():
            alone = await OptimizedContextBuilder(m).build_context(NAVE, budget)
            got = together[name]
            assert (got.text, got.sources, got.tokens) == (alone.text, alone.sources, alone.tokens)
            assert got.tokens <= budget
        with pytest.raises(ValueError):
            await OptimizedContextBuilder(m).build_contexts(NAVE, {"bad": -1})


@pytest.mark.anyio
async def test_build_contexts_looks_each_chunk_up_once(compiled: Path) -> None:
    """The budgets of one action share their look-ups; each result still counts its
    hits and misses as a build of its own on the same cache would."""
    budgets = {"narrator": 2000, "arbiter": 1500, "keeper": 600}
    async with await open_module("default", cache_dir=compiled) as m:
        lookups: list[float] = []
        cache = ModuleCache()
        builder = OptimizedContextBuilder(m, cache, on_lookup=lookups.append)
        cold = await builder.build_contexts(NAVE, budgets)
        union = {cid for r in cold.values() for cid, _ in r.sources}
        assert len(lookups) == len(union) < sum(len(r.sources) for r in cold.values())
        for r in cold.values():
            assert (r.cache_hits, r.cache_misses) == (0, len(r.sources))
        warm = await builder.build_contexts(NAVE, budgets)
        assert len(lookups) == 2 * len(union)
        for name, r in warm.items():
            assert r.text == cold[name].text
            assert (r.cache_hits, r.cache_misses) == (len(r.sources), 0)


@pytest.mark.anyio
async def test_cache_hits_on_repeat_and_keys_carry_the_digest(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as m:
        cache = ModuleCache()
        builder = OptimizedContextBuilder(m, cache)
        first = await builder.build_context(NAVE, 1000)
        assert (first.cache_hits, first.cache_misses) == (0, len(first.sources))
        again = await builder.build_context(NAVE, 1000)
        assert (again.cache_hits, again.cache_misses) == (len(first.sources), 0)
        assert again.text == first.text
        cid = first.sources[0][0]
        key = chunk_key(m.name, m.catalogue[cid])
        assert key.startswith(f"module:default:locations:{cid}@") and cache.get(key) is not None


@pytest.mark.anyio
async def test_changed_content_is_not_served_stale(tmp_path: Path) -> None:
    folder = tmp_path / "emberfall"
    shutil.copytree(bundled_adventure_dir(), folder)
    cache = ModuleCache()  # shared across both versions, as in a long-running engine
    request = req("I look at the altar", location="The Sunken Nave")
    async with await open_module(folder, include_srd=False, cache_dir=tmp_path / "c") as m1:
        old = await OptimizedContextBuilder(m1, cache).build_context(request, 2000)
    assert "pressure plate" in old.text
    nave = folder / "locations" / "the-sunken-nave.md"
    nave.write_text(nave.read_text().replace("pressure plate", "tripwire of braided hair"))
    async with await open_module(folder, include_srd=False, cache_dir=tmp_path / "c") as m2:
        assert m2.name == m1.name
        new = await OptimizedContextBuilder(m2, cache).build_context(request, 2000)
    assert "tripwire of braided hair" in new.text and "pressure plate" not in new.text


@pytest.mark.anyio
async def test_lazy_loaded_sections_serve_chunk_text(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as m:
        cache = ModuleCache()
        async with LazyLoadManager(m, cache) as lazy:
            await lazy.ensure_loaded("locations", "npcs", "encounters")
            builder = OptimizedContextBuilder(m, cache, lazy)
            result = await builder.build_context(NAVE, 1200)
            adventure = [c for c, _ in result.sources if c.startswith("default/")]
            assert adventure
            assert result.cache_hits >= len(adventure)
            assert result.cache_misses == len(result.sources) - result.cache_hits
            plain = await OptimizedContextBuilder(m).build_context(NAVE, 1200)
            assert plain.text == result.text


@pytest.mark.anyio
async def test_estimate_relevance(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as m:
        builder = OptimizedContextBuilder(m)
        chunks = await m.fetch_chunks(["srd/spells/fireball", "srd/monsters/ogre"])
        fire = req("cast fireball at the goblins", action_type="combat")
        hit = builder.estimate_relevance(chunks["srd/spells/fireball"], fire)
        miss = builder.estimate_relevance(chunks["srd/monsters/ogre"], fire)
        assert 0.0 <= miss < hit <= 1.0
        assert builder.estimate_relevance("", req("")) == 0.0
        nave = m.catalogue["default/locations/the-sunken-nave"]
        assert builder.estimate_relevance(nave, NAVE) > builder.estimate_relevance(nave, req("x"))
        section = await m.load_section("conditions")
        assert 0.0 <= builder.estimate_relevance(section, fire) <= 1.0


@pytest.mark.anyio
async def test_zero_budget_and_no_match(compiled: Path) -> None:
    async with await open_module("default", cache_dir=compiled) as m:
        builder = OptimizedContextBuilder(m)
        empty = await builder.build_context(NAVE, 0)
        assert (empty.text, empty.tokens, empty.sources) == ("", 0, ())
        nothing = await builder.build_context(req("zzqx qqzx"), 500)
        assert nothing.sources == ()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=80), max_size=6), st.sampled_from(["\n\n", " ", "\n \t"]))
def test_counter_units_add_up_over_whitespace_joins(parts: list[str], sep: str) -> None:
    """What lets the builder count a joined context from the chunks' stored units."""
    joined = sep.join(parts)
    assert DEFAULT_COUNTER.units(joined) == sum(DEFAULT_COUNTER.units(p) for p in parts)
    assert DEFAULT_COUNTER.count(joined) == DEFAULT_COUNTER.tokens_for(
        DEFAULT_COUNTER.units(joined)
    )


@pytest.mark.anyio
async def test_counts_from_units_are_exact_on_the_real_module(compiled: Path) -> None:
    requests = [NAVE, req("cast fireball at the goblins"), req("we take a short rest")]
    async with await open_module("default", cache_dir=compiled) as m:
        for cache in (None, ModuleCache()):
            builder = OptimizedContextBuilder(m, cache)
            for request in requests:
                for budget in (0, 37, 300, 1000, 2000):
                    result = await builder.build_context(request, budget)
                    assert result.tokens == DEFAULT_COUNTER.count(result.text) <= budget
                    ids = [cid for cid, _ in result.sources]
                    chunks = await m.fetch_chunks(ids)
                    assert result.text == "\n\n".join(chunks[cid].text for cid in ids)


# ------------------------------------------------------------ the NPCs present


@pytest.mark.anyio
@pytest.mark.parametrize(
    "present",
    [["Skrit"], ["  SKRIT "], ["skrit > Bargaining with Skrit"], ["Marta Quell", "Skrit"]],
)
async def test_npcs_present_boost_their_chunks(compiled: Path, present: list[str]) -> None:
    """The engine's scene passes ``npcs_present``: names from the module keeper's model,
    so any case, stray blanks, or a chunk title standing for its NPC."""

    def scene(npcs: list[str]) -> AgentRequest:  # the request context as pipeline.py builds it
        return req(
            "I offer him gold for safe passage",
            action_type="roleplay",
            location="",
            npcs_present=npcs,
            session="s",
            notes="",
        )

    async with await open_module("default", cache_dir=compiled) as m:
        builder = OptimizedContextBuilder(m)
        plain = dict(await builder.rank(scene([])))
        boosted = dict(await builder.rank(scene(present)))
        exact = dict(await builder.rank(scene(["Skrit"])))
        skrit = [cid for cid, e in m.catalogue.items() if "skrit" in e.keys]
        assert "default/npcs/skrit" in skrit
        for cid in skrit:
            assert boosted[cid] >= 0.35 * 0.8  # the NPC boost
            assert boosted[cid] > plain.get(cid, 0.0)
            if len(present) == 1:  # the same name however it is spelled
                assert boosted[cid] == exact[cid]
        built = await builder.build_context(scene(present), 1500)
        assert "default/npcs/skrit" in [c for c, _ in built.sources]
        unboosted = await builder.build_context(scene([]), 1500)
        assert "default/npcs/skrit" not in [c for c, _ in unboosted.sources]
        nave = m.catalogue["default/npcs/skrit"]
        assert builder.estimate_relevance(nave, scene(present)) > builder.estimate_relevance(
            nave, scene([])
        )


# ------------------------------------------------------------ single flight


def test_concurrent_builds_fetch_each_chunk_once() -> None:
    module = FakeModule(sizes=[30] * 8, scores=[8.0, 8, 7, 7, 6, 6, 5, 5])
    cache = ModuleCache()
    builder = OptimizedContextBuilder(module, cache)
    results = []

    async def build() -> None:
        results.append(await builder.build_context(req("x"), 1000))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(build)

    trio.run(main)
    chosen = [c for c, _ in results[0].sources]
    assert len(chosen) == 8
    assert all(r.sources == results[0].sources and r.text == results[0].text for r in results)
    assert len(module.fetches) == 1  # one query, by the first build; the others waited
    assert sorted(c for f in module.fetches for c in f) == sorted(chosen)
    assert cache.statistics().entries == 8
    assert sum(r.cache_misses for r in results) == 3 * 8  # nobody found them cached


@attrs.define
class StuckModule(FakeModule):
    """The first fetch waits for ``gate`` and then fails; later ones answer."""

    gate: trio.Event = attrs.Factory(trio.Event)

    async def fetch_chunks(self, ids: Iterable[str]) -> dict[str, Chunk]:
        ids = list(ids)
        if not self.fetches:
            self.fetches.append(ids)
            await self.gate.wait()
            raise OSError("the module is gone")
        return await super().fetch_chunks(ids)


@pytest.mark.parametrize("how", ["cancelled", "failed"])
def test_a_build_waiting_for_a_fetch_that_never_lands_fetches_itself(how: str) -> None:
    got = []

    async def main() -> None:
        module = StuckModule(sizes=[30] * 4, scores=[4.0, 3, 2, 1])
        builder = OptimizedContextBuilder(module, ModuleCache())
        first = trio.CancelScope()

        async def leader() -> None:
            with first, pytest.raises(OSError):
                await builder.build_context(req("x"), 1000)

        async def follower() -> None:
            got.append(await builder.build_context(req("x"), 1000))

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(leader)
                await trio.testing.wait_all_tasks_blocked()
                assert len(module.fetches) == 1
                nursery.start_soon(follower)
                await trio.testing.wait_all_tasks_blocked()
                assert len(module.fetches) == 1  # the follower waits for the leader's fetch
                if how == "cancelled":
                    first.cancel()
                else:
                    module.gate.set()
        assert len(got) == 1 and len(got[0].sources) == 4
        chosen = sorted(c for c, _ in got[0].sources)
        assert [sorted(f) for f in module.fetches] == [chosen, chosen]
        assert builder._flights == {}

    trio.run(main)
