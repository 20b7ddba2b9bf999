"""Throughput and latency of ``SessionStore.record_action`` under many concurrent sessions.

Run: ``.venv/bin/python -m bench.bench_state`` (``--sessions N --actions K``,
``--busy T`` to add T tasks that keep the event loop busy, ``--rounds R``,
``--on-loop`` for ``in_thread=False``; ``--url postgresql://user@host:port/db``
with ``--password-env NAME`` for the PostgreSQL store instead of SQLite).

Real time on trio: ``--sessions`` tasks each record ``--actions`` actions one after
the other (the pipeline serializes a session's actions), all sessions at once,
through ONE store in a fresh temporary file (PostgreSQL: new sessions of their own
in the given database); sessions are created beforehand and are not timed. Reported per ``synchronous`` mode: wall time, actions per second,
and p50/p95/p99/max of the latency of each ``record_action`` call (around the
``await``, so it includes queueing, the thread hop and the fsync). With ``--busy``,
T extra tasks each burn ~0.2 ms of CPU per loop pass, like the engine's context
building does, so each loop pass is slower (the load test's situation).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio

from engine.state import AnySessionStore, PostgresSessionStore, SessionStore

NARRATIVE = "The blade bites deep and the goblin staggers back. " * 14  # ~700 bytes


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


@contextlib.contextmanager
def _store(
    url: str, password: str | None, sync: str, in_thread: bool
) -> Iterator[AbstractAsyncContextManager[AnySessionStore]]:
    """A fresh SQLite store in a temporary folder, or the PostgreSQL store at ``url``."""
    if url:
        yield PostgresSessionStore.open(
            url,
            password=password,
            synchronous=sync,  # type: ignore[arg-type]
            in_thread=in_thread,
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield SessionStore.open(
            Path(tmp) / "s.sqlite",
            synchronous=sync,  # type: ignore[arg-type]
            in_thread=in_thread,
        )


async def _run(
    opener: AbstractAsyncContextManager[AnySessionStore],
    sessions: int,
    actions: int,
    busy: int,
) -> dict[str, Any]:
    latencies: list[float] = []
    prefix = uuid.uuid4().hex[:8]  # PostgreSQL: this run's own sessions
    async with opener as store:
        for i in range(sessions):
            await store.ensure_session(f"{prefix}-s{i}")

        async def session(sid: str) -> None:
            for turn in range(actions):
                t0 = time.perf_counter()
                await store.record_action(
                    sid,
                    turn_expected=turn,
                    action_text=f"I attack the goblin ({turn})",
                    action_type="combat",
                    narrative=NARRATIVE,
                    state_changes={"hp": turn, "round": turn},
                    responses={"narrator": {"tokens": 200}, "arbiter": {"roll": 14}},
                )
                latencies.append(time.perf_counter() - t0)

        async def burner(done: trio.Event) -> None:
            while not done.is_set():
                end = time.perf_counter() + 0.0002
                while time.perf_counter() < end:
                    pass
                await trio.lowlevel.checkpoint()

        done = trio.Event()
        async with trio.open_nursery() as outer:
            for _ in range(busy):
                outer.start_soon(burner, done)
            t0 = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i in range(sessions):
                    nursery.start_soon(session, f"{prefix}-s{i}")
            wall = time.perf_counter() - t0
            done.set()
        for i in range(0, sessions, max(1, sessions // 10)):
            assert await store.count_actions(f"{prefix}-s{i}") == actions
        stats_fn = getattr(store, "statistics", None)
        stats = stats_fn() if stats_fn is not None else None
    latencies.sort()
    return {
        "wall": wall,
        "rate": len(latencies) / wall,
        "p50": _percentile(latencies, 0.50) * 1e3,
        "p95": _percentile(latencies, 0.95) * 1e3,
        "p99": _percentile(latencies, 0.99) * 1e3,
        "max": latencies[-1] * 1e3,
        "batches": getattr(stats, "batches", None),
        "largest": getattr(stats, "largest_batch", None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--actions", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="extra CPU-burning tasks")
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode (median shown)")
    parser.add_argument(
        "--on-loop", action="store_true", help="in_thread=False: store work on the event loop"
    )
    parser.add_argument("--url", default="", help="a PostgreSQL URL (no password) instead")
    parser.add_argument("--password-env", default="", help="variable holding its password")
    args = parser.parse_args()
    password = os.environ.get(args.password_env) if args.password_env else None
    print(
        f"{args.sessions} sessions x {args.actions} record_action, "
        f"{'PostgreSQL' if args.url else 'SQLite'}, trio, busy tasks {args.busy}, "
        f"{'on the loop' if args.on_loop else 'in a thread'}, median of {args.rounds} runs; "
        "latency in ms"
    )
    for sync in ("FULL", "NORMAL"):
        runs = []
        for _ in range(args.rounds):
            with _store(args.url, password, sync, not args.on_loop) as opener:
                runs.append(trio.run(_run, opener, args.sessions, args.actions, args.busy))
        med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "rate", "p50", "p95")}
        med |= {k: statistics.median(r[k] for r in runs) for k in ("p99", "max")}
        batches = [r["batches"] for r in runs]
        extra = (
            ""
            if batches[0] is None
            else f"  batches {statistics.median(batches):.0f}"
            f"  largest {max(r['largest'] for r in runs)}"
        )
        print(
            f"{sync:6}  wall {med['wall']:.2f} s  {med['rate']:.0f} actions/s"
            f"  p50 {med['p50']:.1f}  p95 {med['p95']:.1f}  p99 {med['p99']:.1f}"
            f"  max {med['max']:.1f}{extra}"
        )


if __name__ == "__main__":
    main()
