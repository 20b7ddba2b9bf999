"""Open-loop runs of the multi-process load test: 1 process against 2 (docs/scale-out.md).

Run: ``.venv/bin/python -m bench.bench_scale --config FILE --plan 120:1,240:2,180:1``

``FILE`` names the PostgreSQL and Redis URLs, as for ``dm-engine --config FILE bench
--load --processes N`` (its password variable set in the environment). Each entry
``RATE:N`` of the plan runs N engine processes playing ``5 x RATE`` sessions of 6
actions with a think time of 5 s (RATE actions/s offered at the peak), no process
killed, the entries one after another in the given order (alternate 1 and 2
processes: the machine's speed drifts). Per run it prints the throughput, the
engine overhead p50 / p95, the p95 of the overhead before the agents, of the state
update, of the session lease and of the agents' wake-up lag, the player's round
trip p50 / p95, lost and mismatched actions, and CPU per action: the engine
processes', the coordinator's (this process) and, with
``--server-cpu``, PostgreSQL's and Redis's (every process of this machine named
``postgres*`` or ``redis*``, read from ``/proc``: Linux, servers on this host).

With ``--repeat K`` the plan runs K times over (sweep after sweep). At the end it
prints each point's medians (throughput and overhead p95, each the median of its
runs) and the issue's goal, read off those medians: for every point of 2 processes,
the throughput of 1 process at the same overhead p95, interpolated linearly on the
1-process frontier (the 1-process points that no other 1-process point beats with
more throughput at an overhead p95 no higher), and their ratio against 1.7. A
2-process p95 below every 1-process point's gives a lower bound of the ratio, one
above them all an upper bound (1 process's throughput at a given p95 cannot fall as
the p95 grows).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import resource
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import anyio
import attrs

from engine.benchmark.processes import ProcessLoadResult, run_process_load_test

SESSIONS_PER_RATE = 5  # sessions = 5 x RATE: with a think time of 5 s, RATE actions/s
ACTIONS = 6
THINK_TIME = 5.0
GOAL = 1.7  # 2 processes' throughput over 1 process's, at the same overhead p95


def server_cpu_seconds(prefix: str) -> float:
    """CPU seconds (user + system, children included) of every process whose name
    starts with ``prefix``, from ``/proc`` (0 where it cannot be read)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith(prefix):
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        total += sum(int(f) for f in fields[11:15]) / ticks
    return total


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _line(rate: float, n: int, r: ProcessLoadResult, cpu: dict[str, float]) -> str:
    ms = 1e3
    per_action = "  ".join(f"{k} {v / r.completed_actions * ms:.2f}" for k, v in cpu.items())
    return (
        f"{rate:g}/s offered, {n} process{'es' if n > 1 else ''}: {r.throughput:.1f} actions/s"
        f" | overhead p50 {r.overhead.p50 * ms:.2f} p95 {r.overhead.p95 * ms:.2f}"
        f" | p95: before agents {r.before_agents.p95 * ms:.2f} state {r.state_write.p95 * ms:.2f}"
        f" lease {r.lease.p95 * ms:.2f}"
        f" lag {r.agent_lag.p95 * ms:.2f}"
        f" | round trip p50 {r.round_trip.p50 * ms:.1f} p95 {r.round_trip.p95 * ms:.1f}"
        f" | lost {r.lost_actions} mismatched {r.mismatched_sessions}"
        f" | CPU ms/action: {per_action}"
    )


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _plan(text: str) -> list[tuple[float, int]]:
    try:
        plan = [(float(rate), int(n)) for rate, n in (e.split(":") for e in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE:N,RATE:N,..., got {text!r}") from None
    if not plan or any(rate <= 0 or n < 1 for rate, n in plan):
        raise argparse.ArgumentTypeError(f"rates must be > 0 and processes >= 1: {text!r}")
    return plan


@attrs.frozen
class Point:
    """One entry of the plan, over its runs: medians of throughput (actions/s) and of
    the engine overhead p95 (seconds)."""

    rate: float
    processes: int
    runs: int
    throughput: float
    p95: float


@attrs.frozen
class Reading:
    """The goal read at a point of 2 processes: ``one`` is 1 process's throughput at
    the point's overhead p95; ``bound`` says whether the ratio is that value
    (``"="``), at least it (``">="``: the p95 lies below the 1-process curve, whose
    lowest point stands in) or at most it (``"<="``: beyond the curve)."""

    point: Point
    one: float
    bound: str

    @property
    def ratio(self) -> float:
        return self.point.throughput / self.one

    @property
    def met(self) -> bool | None:
        """Whether the goal is met (None: the bound cannot tell)."""
        reached = self.ratio >= GOAL
        if self.bound == ">=" and not reached:  # at least a ratio below the goal
            return None
        if self.bound == "<=" and reached:  # at most a ratio above the goal
            return None
        return reached


def medians(runs: Iterable[tuple[float, int, float, float]]) -> list[Point]:
    """``(rate, processes, throughput, overhead p95)`` runs, grouped by plan entry in
    their first order, as medians."""
    groups: dict[tuple[float, int], list[tuple[float, float]]] = {}
    for rate, n, throughput, p95 in runs:
        groups.setdefault((rate, n), []).append((throughput, p95))
    return [
        Point(
            rate,
            n,
            len(values),
            statistics.median(t for t, _ in values),
            statistics.median(p for _, p in values),
        )
        for (rate, n), values in groups.items()
    ]


def frontier(points: Sequence[Point]) -> list[Point]:
    """The points no other beats (more throughput at an overhead p95 no higher),
    by increasing p95 (and so increasing throughput)."""
    best: list[Point] = []
    for point in sorted(points, key=lambda p: (p.p95, -p.throughput)):
        if not best or point.throughput > best[-1].throughput:
            best.append(point)
    return best


def read_goal(points: Sequence[Point]) -> list[Reading]:
    """The goal at each point of 2 processes, read on the 1-process frontier."""
    curve = frontier([p for p in points if p.processes == 1])
    readings: list[Reading] = []
    if not curve:
        return readings
    for point in (p for p in points if p.processes == 2):
        x = point.p95
        if x < curve[0].p95:
            readings.append(Reading(point, curve[0].throughput, ">="))
        elif x >= curve[-1].p95:
            readings.append(Reading(point, curve[-1].throughput, "<="))
        else:
            low, high = next((a, b) for a, b in itertools.pairwise(curve) if a.p95 <= x < b.p95)
            share = (x - low.p95) / (high.p95 - low.p95)
            one = low.throughput + share * (high.throughput - low.throughput)
            readings.append(Reading(point, one, "="))
    return readings


def _summary(points: Sequence[Point]) -> list[str]:
    ms = 1e3
    lines = ["medians:"]
    for p in points:
        lines.append(
            f"  {p.rate:g}/s offered, {p.processes} process{'es' if p.processes > 1 else ''}"
            f" ({p.runs} run{'s' if p.runs > 1 else ''}): {p.throughput:.1f} actions/s,"
            f" overhead p95 {p.p95 * ms:.2f} ms"
        )
    readings = read_goal(points)
    if readings:
        lines.append(f"goal: 2 processes >= {GOAL:g} x 1 process at the same overhead p95")
    for r in readings:
        verdict = {True: "met", False: "missed", None: "undecided"}[r.met]
        where = {
            "=": "interpolated",
            ">=": "below the 1-process curve: its lowest point",
            "<=": "beyond the 1-process curve: its highest point",
        }[r.bound]
        lines.append(
            f"  at {r.point.p95 * ms:.2f} ms: 2 processes {r.point.throughput:.1f}/s, 1 process"
            f" {r.one:.1f}/s ({where}): ratio {r.bound} {r.ratio:.2f}: {verdict}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="names the PostgreSQL and Redis URLs")
    parser.add_argument("--plan", type=_plan, required=True, help="RATE:N,RATE:N,...")
    parser.add_argument("--server-cpu", action="store_true", help="PostgreSQL's and Redis's CPU")
    parser.add_argument("--repeat", type=_count, default=1, help="run the plan K times over")
    args = parser.parse_args()
    runs: list[tuple[float, int, float, float]] = []
    for rate, n in args.plan * args.repeat:
        before = {"coordinator": _own_cpu()}
        if args.server_cpu:
            before |= {"postgres": server_cpu_seconds("postgres")}
            before |= {"redis": server_cpu_seconds("redis")}
        run = functools.partial(
            run_process_load_test,
            args.config,
            processes=n,
            sessions=int(SESSIONS_PER_RATE * rate),
            actions_per_session=ACTIONS,
            think_time=THINK_TIME,
            kill=False,
        )
        result = anyio.run(run, backend="trio")
        cpu = {"engine": sum(result.cpu_seconds), "coordinator": _own_cpu()}
        if args.server_cpu:
            cpu |= {"postgres": server_cpu_seconds("postgres")}
            cpu |= {"redis": server_cpu_seconds("redis")}
        spent = {k: v - before.get(k, 0.0) for k, v in cpu.items()}
        print(_line(rate, n, result, spent), flush=True)
        runs.append((rate, n, result.throughput, result.overhead.p95))
    print("\n".join(_summary(medians(runs))), flush=True)


if __name__ == "__main__":
    main()
