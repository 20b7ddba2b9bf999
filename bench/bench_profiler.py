"""Cost of the profiler: one ``trace()`` span against a bare ``perf_counter()`` pair,
and the quantile sketch against the ``ddsketch`` package (add cost, memory, accuracy).

Run: ``.venv/bin/python -m bench.bench_profiler`` (all figures from this process).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

from engine.observability.profiler import PerformanceProfiler
from engine.observability.sketch import QuantileSketch

N = 200_000
REPEATS = 7


def _best(fn: Callable[[int], None], n: int) -> float:
    """Median over REPEATS of the seconds per iteration of ``fn(n)``."""
    fn(n // 10)  # warm-up
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn(n)
        runs.append((time.perf_counter() - t0) / n)
    return statistics.median(runs)


def bare_pair(n: int) -> None:
    pc = time.perf_counter
    for _ in range(n):
        t0 = pc()
        _ = pc() - t0


def make_trace_loop(profiler: PerformanceProfiler, nested: bool) -> Callable[[int], None]:
    trace = profiler.trace

    def flat(n: int) -> None:
        for _ in range(n):
            with trace("agent_query", agent="narrator"):
                pass

    def inner(n: int) -> None:
        # a realistic tree: one root with 9 children; n counts every span
        for _ in range(n // 10):
            with trace("player_action"):
                for _ in range(9):
                    with trace("agent_query", agent="narrator"):
                        pass

    return inner if nested else flat


def bench_spans() -> None:
    bare = _best(bare_pair, N)
    print(f"bare perf_counter pair:          {bare * 1e6:6.3f} µs")
    cases = [
        ("trace() root span, sampled", PerformanceProfiler(), False),
        ("trace() tree of 10 spans, per span", PerformanceProfiler(), True),
        ("trace() root span, sample_rate=0", PerformanceProfiler(sample_rate=0.0), False),
    ]
    for label, prof, nested in cases:
        per = _best(make_trace_loop(prof, nested), N)
        print(f"{label:34s} {per * 1e6:6.3f} µs  (overhead {(per - bare) * 1e6:6.3f} µs/span)")


def bench_sketch() -> None:
    rng = random.Random(20261126)
    data = [rng.lognormvariate(0.0, 1.0) for _ in range(N)]

    def ours(n: int) -> None:
        s = QuantileSketch()
        add = s.add
        for x in data[:n]:
            add(x)

    print(f"QuantileSketch.add:              {_best(ours, N) * 1e6:6.3f} µs")
    try:
        from ddsketch import DDSketch
    except ImportError:  # pragma: no cover - optional comparison
        print("ddsketch not installed: skipped")
    else:

        def theirs(n: int) -> None:
            s = DDSketch(relative_accuracy=0.005)
            add = s.add
            for x in data[:n]:
                add(x)

        print(f"ddsketch.DDSketch.add:           {_best(theirs, N) * 1e6:6.3f} µs")


def bench_memory(total: int = 10_000_000) -> None:
    """Ten million seeded log-normal samples in one sketch: memory and accuracy."""
    rng = random.Random(7)
    sketch = QuantileSketch()
    t0 = time.perf_counter()
    for _ in range(total):
        sketch.add(rng.lognormvariate(0.0, 1.0))
    elapsed = time.perf_counter() - t0
    print(
        f"10M samples: {sketch.bucket_count} buckets, ~{sketch.memory_bytes() / 1024:.1f} KiB "
        f"(memory_bytes), {elapsed:.1f} s to add"
    )
    # against the quantiles of the distribution (LogNormal(0, 1)): this includes the
    # sampling error of 10M draws; tests compare against exact sample quantiles
    from statistics import NormalDist

    worst = 0.0
    for q in (0.5, 0.9, 0.95, 0.99, 0.999):
        truth = math.exp(NormalDist().inv_cdf(q))
        est = sketch.quantile(q)
        worst = max(worst, abs(est - truth) / truth)
        print(f"  q={q:<6} sketch {est:8.4f}  distribution {truth:8.4f}")
    print(f"  worst relative error vs distribution quantiles: {worst:.4%}")


def main() -> None:
    bench_spans()
    bench_sketch()
    bench_memory()


if __name__ == "__main__":
    main()
