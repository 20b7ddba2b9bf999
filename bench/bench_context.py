"""Context building over the full SRD module: speed, naive baseline, cold start, compile.

Run: ``.venv/bin/python -m bench.bench_context`` (add ``--rounds N`` for more samples).

Reports, with a 2 000-token budget:

* SRD compile time and file size (a cold compile into a temporary cache folder);
* p50/p95 of ``OptimizedContextBuilder.build_context`` (without and with a warm
  ``ModuleCache``) against a naive baseline in the same process: every chunk held in
  memory and scored by counting the query's keywords in it (the previous design's
  full scan), then the same greedy selection;
* cold start to the first built context: lazy (open the module's catalogue, build)
  against eager (open, load every section into memory, build), time and
  ``tracemalloc`` peak.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from engine.agents.base import AgentRequest
from engine.content.cache import ModuleCache
from engine.content.context import OptimizedContextBuilder
from engine.content.sources import Chunk, find_srd_dir, srd_chunks
from engine.content.store import ModuleStore, open_module

BUDGET = 2000
QUERIES = [
    ("how does grappling work", "question"),
    ("what does a dragon's frightful presence do", "question"),
    ("cast fireball at the goblins", "combat"),
    ("I try to shove the orc prone", "combat"),
    ("what happens when I drop to 0 hit points", "question"),
    ("we take a short rest", "rest"),
    ("I cast magic missile at the skeleton", "combat"),
    ("I hold person on the cult fanatic", "combat"),
    ("how strong is an ogre", "question"),
    ("we fight the giant spider and its web", "combat"),
    ("how much does a longsword cost", "question"),
    ("what does a bag of holding do", "question"),
    ("I hide behind the pillar", "exploration"),
    ("can I swim underwater in combat", "question"),
    ("I drink a potion of healing", "other"),
    ("the ghoul claws me, am I paralyzed", "combat"),
]
_WORD = re.compile(r"[a-z0-9]+")
T = TypeVar("T")


def request(text: str, action_type: str) -> AgentRequest:
    return AgentRequest(
        id="q", agent="arbiter", context={"action": text, "action_type": action_type}
    )


def naive_context(chunks: list[Chunk], text: str, budget: int) -> list[str]:
    """Full scan: score every chunk by keyword occurrences, then greedy selection."""
    terms = [w for w in _WORD.findall(text.lower()) if len(w) > 2]
    scored = []
    for c in chunks:
        body = c.text.lower()
        score = sum(body.count(t) for t in terms)
        if score:
            scored.append((score, c.id, c))
    scored.sort(key=lambda s: (-s[0], s[1]))
    left, out = budget, []
    for _, _, c in scored:
        if c.tokens <= left:
            out.append(c.text)
            left -= c.tokens
    return out


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


async def timed(fn: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    t0 = time.perf_counter()
    value = await fn()
    return value, time.perf_counter() - t0


async def load_all(m: ModuleStore) -> list[Chunk]:
    out: list[Chunk] = []
    for s in m.section_names():
        out.extend((await m.load_section(s)).chunks)
    return out


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        t0 = time.perf_counter()
        m = await open_module("srd", cache_dir=cache_dir)
        compile_s = time.perf_counter() - t0
        size = m.path.stat().st_size
        await m.aclose()
        print(f"SRD compile: {compile_s:.2f} s, {size / 1e6:.2f} MB, file {m.path.name}")
        print(
            f"  chunks: {len(m.catalogue)}; tokens: {sum(e.tokens for e in m.catalogue.values())}"
        )

        # ---- cold start (file compiled): time without tracemalloc, memory with it
        async def lazy_start() -> None:
            async with await open_module("srd", cache_dir=cache_dir) as lm:
                await OptimizedContextBuilder(lm).build_context(request(*QUERIES[2]), BUDGET)

        async def eager_start() -> None:
            async with await open_module("srd", cache_dir=cache_dir) as em:
                naive_context(await load_all(em), QUERIES[2][0], BUDGET)

        async def eager_json_start() -> None:  # no compiled store at all: parse the JSON
            naive_context(list(srd_chunks(find_srd_dir())), QUERIES[2][0], BUDGET)

        starts = {
            "lazy": lazy_start,
            "eager (store)": eager_start,
            "eager (JSON)": eager_json_start,
        }
        cold: dict[str, tuple[float, int]] = {}
        for name, fn in starts.items():
            t = statistics.median([(await timed(fn))[1] for _ in range(5)])
            tracemalloc.start()
            await fn()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            cold[name] = (t, peak)
        print("cold start to first context (median of 5; tracemalloc peak):")
        lazy_t, lazy_p = cold["lazy"]
        for name, (t, peak) in cold.items():
            print(
                f"  {name:14s} {t * 1e3:7.1f} ms  {peak / 1e6:6.2f} MB"
                + (
                    f"   vs lazy: {t / lazy_t:.1f}x time, {peak / lazy_p:.1f}x memory"
                    if name != "lazy"
                    else ""
                )
            )
        async with await open_module("srd", cache_dir=cache_dir) as em:
            everything = await load_all(em)

        # ---- steady state
        async with await open_module("srd", cache_dir=cache_dir) as store:
            plain = OptimizedContextBuilder(store)
            cached = OptimizedContextBuilder(store, ModuleCache())
            reqs = [request(*q) for q in QUERIES]
            for r in reqs:  # warm-up: first calls, cache fill
                await plain.build_context(r, BUDGET)
                await cached.build_context(r, BUDGET)
            samples: dict[str, list[float]] = {
                "builder": [],
                "builder+cache": [],
                "naive": [],
                "search": [],
            }
            for _ in range(rounds):
                for r in reqs:
                    samples["builder"].append(
                        (await timed(lambda r=r: plain.build_context(r, BUDGET)))[1]
                    )
                    samples["builder+cache"].append(
                        (await timed(lambda r=r: cached.build_context(r, BUDGET)))[1]
                    )
                    samples["search"].append(
                        (await timed(lambda r=r: store.search(r.context["action"], 40)))[1]
                    )
                    t0 = time.perf_counter()
                    naive_context(everything, r.context["action"], BUDGET)
                    samples["naive"].append(time.perf_counter() - t0)
        n = len(samples["naive"])
        print(f"build_context, budget {BUDGET}, {n} samples each:")
        for name, s in samples.items():
            print(
                f"  {name:14s} p50 {pct(s, 50) * 1e3:7.2f} ms  p95 {pct(s, 95) * 1e3:7.2f} ms  "
                f"mean {statistics.fmean(s) * 1e3:7.2f} ms"
            )
        for name in ("builder", "builder+cache"):
            print(
                f"  naive / {name}: p50 {pct(samples['naive'], 50) / pct(samples[name], 50):.0f}x, "
                f"p95 {pct(samples['naive'], 95) / pct(samples[name], 95):.0f}x"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    trio.run(main, args.rounds)
