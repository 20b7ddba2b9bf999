"""Context building over the full SRD module: speed, naive baseline, cold start, compile.

Run: ``.venv/bin/python -m bench.bench_context`` (``--rounds N`` for more samples,
``--no-rss`` to skip the fresh-process memory runs).

Reports, with a 2 000-token budget, for both store modes (``query_in_thread`` True:
queries in a worker thread, the default; False: on the event loop):

* SRD compile time and file size (a cold compile into a temporary cache folder);
* p50/p95 of ``OptimizedContextBuilder.build_context`` (without and with a warm
  ``ModuleCache``; "cold": everything the store keeps dropped before each build, so
  every build runs its FTS5 queries, as for the store's very first text; "new text":
  the 202 player actions of tests/content/data in turn, none searched before,
  everything the store keeps dropped at the start of each pass (the process's memos
  of query texts too), so each text pays for the phrases the earlier ones did not
  use, as in play; "new text, warm store": the even-numbered of those texts, timed
  after the store has served the odd-numbered ones, as in a game under way) and of
  ``ModuleStore.search`` alone, against the naive baseline in the same process: the
  previous design's full scan, every chunk held in memory
  and scored by counting the query's keywords (3+ letters) in it, then the same
  greedy selection. Two variants of the baseline: lower-casing every chunk per query
  (as issue 5 measured it) and lower-cased once when loaded (the stronger one; the
  ratios that count are against it);
* cold start to the first built context, time (median) and ``tracemalloc`` peak:

  - lazy (by name): ``open_module("srd", cache_dir=...)``, which checks the SRD
    files' fingerprint (a stat of each of ~1 200 files) before opening the compiled
    file, then one ``build_context``;
  - lazy (file): ``open_module(<compiled .sqlite>)``, opened as is, then one build;
  - eager (JSON): the previous design, no compiled store: parse every SRD JSON file
    into chunks, lower-case them, naive build;
  - eager (store): open the compiled module, read every section's chunks into
    memory, lower-case them, naive build.

  ``tracemalloc`` sees Python objects only, not SQLite's own page cache, so each start
  is also run in a fresh interpreter reporting its peak RSS growth after imports.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
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
#: player actions as typed (the recall sets' first column), for the "new text" stream
ACTIONS_DATA = Path(__file__).resolve().parent.parent / "tests" / "content" / "data"
_WORD = re.compile(r"[a-z0-9]+")
T = TypeVar("T")
Lowered = list[tuple[str, Chunk]]


def request(text: str, action_type: str) -> AgentRequest:
    return AgentRequest(
        id="q", agent="arbiter", context={"action": text, "action_type": action_type}
    )


def player_actions() -> list[str]:
    """The recall sets' player actions, each once, in file order."""
    out: dict[str, None] = {}
    for path in sorted(ACTIONS_DATA.glob("recall_*.tsv")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                out[line.split("\t", 1)[0]] = None
    return list(out)


def _greedy(scored: list[tuple[int, str, Chunk]], budget: int) -> list[str]:
    scored.sort(key=lambda s: (-s[0], s[1]))
    left, out = budget, []
    for _, _, c in scored:
        if c.tokens <= left:
            out.append(c.text)
            left -= c.tokens
    return out


def naive_context(chunks: list[Chunk], text: str, budget: int) -> list[str]:
    """Full scan as issue 5 measured it: lower-case and count keywords in every chunk."""
    terms = [w for w in _WORD.findall(text.lower()) if len(w) > 2]
    scored = []
    for c in chunks:
        body = c.text.lower()
        score = sum(body.count(t) for t in terms)
        if score:
            scored.append((score, c.id, c))
    return _greedy(scored, budget)


def lower_all(chunks: list[Chunk]) -> Lowered:
    """The load step of the stronger baseline: each chunk's text lower-cased once."""
    return [(c.text.lower(), c) for c in chunks]


def naive_lowered(lowered: Lowered, text: str, budget: int) -> list[str]:
    """The same full scan over text lower-cased at load (same result, less work)."""
    terms = [w for w in _WORD.findall(text.lower()) if len(w) > 2]
    scored = []
    for body, c in lowered:
        score = sum(body.count(t) for t in terms)
        if score:
            scored.append((score, c.id, c))
    return _greedy(scored, budget)


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


def cold_starts(cache_dir: Path, compiled: Path) -> dict[str, Callable[[], Awaitable[None]]]:
    """The cold starts compared, each from nothing in memory to one built context."""
    text, action_type = QUERIES[2]

    async def lazy_by_name() -> None:
        async with await open_module("srd", cache_dir=cache_dir) as m:
            await OptimizedContextBuilder(m).build_context(request(text, action_type), BUDGET)

    async def lazy_file() -> None:
        async with await open_module(compiled) as m:
            await OptimizedContextBuilder(m).build_context(request(text, action_type), BUDGET)

    async def eager_json() -> None:  # no compiled store at all: parse the JSON
        naive_lowered(lower_all(list(srd_chunks(find_srd_dir()))), text, BUDGET)

    async def eager_store() -> None:
        async with await open_module(compiled) as m:
            naive_lowered(lower_all(await load_all(m)), text, BUDGET)

    return {
        "lazy (by name)": lazy_by_name,
        "lazy (file)": lazy_file,
        "eager (JSON)": eager_json,
        "eager (store)": eager_store,
    }


def _rss_child(cache_dir: str, compiled: str, name: str) -> None:
    """In a fresh interpreter: peak RSS growth of one cold start (Linux only), after
    imports and a first worker-thread trip, with the peak reset just before."""
    import sqlite3

    import anyio.to_thread

    async def warm_up() -> None:  # the lazy imports of a first run, without its data
        await anyio.to_thread.run_sync(lambda: sqlite3.connect(":memory:").close())

    trio.run(warm_up)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to now

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise LookupError(field)

    before = status("VmRSS")
    trio.run(cold_starts(Path(cache_dir), Path(compiled))[name])
    print(json.dumps({"rss": status("VmHWM") - before}))


def rss_growth(cache_dir: Path, compiled: Path, name: str) -> int:
    code = (
        "import sys; from bench.bench_context import _rss_child; "
        "_rss_child(sys.argv[1], sys.argv[2], sys.argv[3])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(cache_dir), str(compiled), name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return int(json.loads(out.strip().splitlines()[-1])["rss"])


async def steady_state(
    cache_dir: Path, in_thread: bool, rounds: int, everything: list[Chunk], lowered: Lowered
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {
        "builder": [],
        "builder, cold": [],
        "builder, new text": [],
        "builder, new text, warm store": [],
        "builder+cache": [],
        "builder+cache, new text": [],
        "search": [],
        "naive": [],
        "naive (lowered)": [],
        "naive (lowered), new text": [],
    }
    stream = [request(text, "other") for text in player_actions()]
    async with (
        await open_module("srd", cache_dir=cache_dir, query_in_thread=in_thread) as store,
        await open_module("srd", cache_dir=cache_dir, query_in_thread=in_thread) as cold_store,
    ):
        plain = OptimizedContextBuilder(store)
        cold = OptimizedContextBuilder(cold_store)  # its store forgets all before each
        cached = OptimizedContextBuilder(store, ModuleCache())
        # the engine's own set-up (engine/runtime.py): the builder with a ModuleCache
        cold_cached = OptimizedContextBuilder(cold_store, ModuleCache())
        reqs = [request(*q) for q in QUERIES]
        for r in reqs:  # warm-up: first calls, cache fill
            await plain.build_context(r, BUDGET)
            await cold.build_context(r, BUDGET)
            await cached.build_context(r, BUDGET)
        # each round runs every method over all queries in turn: methods alternate
        # across rounds (machine noise is shared) without one's memory traffic (the
        # naive scan reads 1.2 MB) landing right before each call of another
        for _ in range(rounds):
            for r in reqs:
                samples["builder"].append(
                    (await timed(lambda r=r: plain.build_context(r, BUDGET)))[1]
                )
            for r in reqs:  # a text the store has not searched for yet
                cold_store.forget_searches()
                samples["builder, cold"].append(
                    (await timed(lambda r=r: cold.build_context(r, BUDGET)))[1]
                )
            cold_store.forget_searches()  # the stream starts from nothing kept
            for r in stream:
                samples["builder, new text"].append(
                    (await timed(lambda r=r: cold.build_context(r, BUDGET)))[1]
                )
            # a store that has served other player texts (the odd-numbered ones) since
            # it opened, as in a running game; the even-numbered ones, never seen, timed
            cold_store.forget_searches()
            for r in stream[1::2]:
                await cold.build_context(r, BUDGET)
            for r in stream[::2]:
                samples["builder, new text, warm store"].append(
                    (await timed(lambda r=r: cold.build_context(r, BUDGET)))[1]
                )
            for r in reqs:
                samples["builder+cache"].append(
                    (await timed(lambda r=r: cached.build_context(r, BUDGET)))[1]
                )
            cold_store.forget_searches()
            cold_cached.cache = ModuleCache()  # nor any chunk text
            for r in stream:
                samples["builder+cache, new text"].append(
                    (await timed(lambda r=r: cold_cached.build_context(r, BUDGET)))[1]
                )
            for r in reqs:
                action = r.context["action"]
                samples["search"].append((await timed(lambda a=action: store.search(a, 40)))[1])
            for r in reqs:
                t0 = time.perf_counter()
                naive_context(everything, r.context["action"], BUDGET)
                samples["naive"].append(time.perf_counter() - t0)
            for r in reqs:
                t0 = time.perf_counter()
                naive_lowered(lowered, r.context["action"], BUDGET)
                samples["naive (lowered)"].append(time.perf_counter() - t0)
            for r in stream:
                t0 = time.perf_counter()
                naive_lowered(lowered, r.context["action"], BUDGET)
                samples["naive (lowered), new text"].append(time.perf_counter() - t0)
    return samples


async def main(rounds: int, rss: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        t0 = time.perf_counter()
        m = await open_module("srd", cache_dir=cache_dir)
        compile_s = time.perf_counter() - t0
        compiled = m.path
        catalogue = await m.load_catalogue()
        await m.aclose()
        print(
            f"SRD compile: {compile_s:.2f} s, {compiled.stat().st_size / 1e6:.2f} MB, "
            f"file {compiled.name}"
        )
        tokens = sum(e.tokens for e in catalogue.values())
        print(f"  chunks: {len(catalogue)}; tokens: {tokens}")

        # ---- cold start (file compiled): time without tracemalloc, memory with it
        starts = cold_starts(cache_dir, compiled)
        cold: dict[str, tuple[float, int]] = {}
        for name, fn in starts.items():
            await fn()  # first run: imports and OS file cache, not measured
            t = statistics.median([(await timed(fn))[1] for _ in range(7)])
            tracemalloc.start()
            await fn()
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            cold[name] = (t, peak)
        rss_of = {name: rss_growth(cache_dir, compiled, name) for name in starts} if rss else {}
        print("cold start to first context (median of 7; tracemalloc peak; fresh-process RSS):")
        for name, (t, peak) in cold.items():
            line = f"  {name:15s} {t * 1e3:7.1f} ms  {peak / 1e6:6.2f} MB"
            if rss:
                line += f"  RSS +{rss_of[name] / 1e6:5.1f} MB"
            if name.startswith("eager"):
                for lazy in ("lazy (by name)", "lazy (file)"):
                    lt, lp = cold[lazy]
                    line += f"\n      vs {lazy}: {t / lt:.1f}x time, {peak / lp:.1f}x memory"
                    if rss and rss_of[lazy] > 0:
                        line += f", {rss_of[name] / rss_of[lazy]:.1f}x RSS"
            print(line)

        async with await open_module(compiled) as em:
            everything = await load_all(em)
        lowered = lower_all(everything)

        # ---- steady state, both store modes
        for in_thread in (True, False):
            samples = await steady_state(cache_dir, in_thread, rounds, everything, lowered)
            n, m = len(samples["naive"]), len(samples["builder, new text"])
            print(
                f"build_context, budget {BUDGET}, query_in_thread={in_thread}, {n} samples "
                f"each ({m} of the new texts):"
            )
            for name, s in samples.items():
                print(
                    f"  {name:30s} p50 {pct(s, 50) * 1e3:7.3f} ms  p95 {pct(s, 95) * 1e3:7.3f} ms"
                    f"  mean {statistics.fmean(s) * 1e3:7.3f} ms"
                )
            for base in ("naive", "naive (lowered)"):
                for name in ("builder", "builder, cold", "builder+cache"):
                    b, s = samples[base], samples[name]
                    print(
                        f"  {base} / {name}: p50 {pct(b, 50) / pct(s, 50):.1f}x, "
                        f"p95 {pct(b, 95) / pct(s, 95):.1f}x, "
                        f"mean {statistics.fmean(b) / statistics.fmean(s):.1f}x"
                    )
            # the naive scan's samples of the even-numbered texts, for the warm store
            naive_new = samples["naive (lowered), new text"]
            texts = len(player_actions())
            naive_even = [t for k, t in enumerate(naive_new) if k % texts % 2 == 0]
            for name, naive in (
                ("builder, new text", naive_new),
                ("builder+cache, new text", naive_new),
                ("builder, new text, warm store", naive_even),
            ):
                b, s = naive, samples[name]
                print(
                    f"  naive (lowered) / {name} (same texts): p50 "
                    f"{pct(b, 50) / pct(s, 50):.1f}x, p95 {pct(b, 95) / pct(s, 95):.1f}x, "
                    f"mean {statistics.fmean(b) / statistics.fmean(s):.1f}x"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process runs")
    args = parser.parse_args()
    trio.run(main, args.rounds, not args.no_rss)
