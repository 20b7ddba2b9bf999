"""Open-loop runs of the multi-process load test: 1 process against 2 (docs/scale-out.md).

Run: ``.venv/bin/python -m bench.bench_scale --config FILE --plan 120:1,240:2,180:1``

``FILE`` names the PostgreSQL and Redis URLs, as for ``dm-engine --config FILE bench
--load --processes N`` (its password variable set in the environment). Each entry
``RATE:N`` of the plan runs N engine processes playing ``5 x RATE`` sessions of 6
actions with a think time of 5 s (RATE actions/s offered at the peak), no process
killed, the entries one after another in the given order (alternate 1 and 2
processes: the machine's speed drifts). Per run it prints the throughput, the
engine overhead p50 / p95, the state update, session lease and agents' wake-up lag
p95, the player's round trip p50 / p95, lost and mismatched actions, and CPU per
action: the engine processes', the coordinator's (this process) and, with
``--server-cpu``, PostgreSQL's and Redis's (every process of this machine named
``postgres*`` or ``redis*``, read from ``/proc``: Linux, servers on this host).
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
from pathlib import Path

import anyio

from engine.benchmark.processes import ProcessLoadResult, run_process_load_test

SESSIONS_PER_RATE = 5  # sessions = 5 x RATE: with a think time of 5 s, RATE actions/s
ACTIONS = 6
THINK_TIME = 5.0


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
        f" | p95: state {r.state_write.p95 * ms:.2f} lease {r.lease.p95 * ms:.2f}"
        f" lag {r.agent_lag.p95 * ms:.2f}"
        f" | round trip p50 {r.round_trip.p50 * ms:.1f} p95 {r.round_trip.p95 * ms:.1f}"
        f" | lost {r.lost_actions} mismatched {r.mismatched_sessions}"
        f" | CPU ms/action: {per_action}"
    )


def _plan(text: str) -> list[tuple[float, int]]:
    try:
        plan = [(float(rate), int(n)) for rate, n in (e.split(":") for e in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RATE:N,RATE:N,..., got {text!r}") from None
    if not plan or any(rate <= 0 or n < 1 for rate, n in plan):
        raise argparse.ArgumentTypeError(f"rates must be > 0 and processes >= 1: {text!r}")
    return plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="names the PostgreSQL and Redis URLs")
    parser.add_argument("--plan", type=_plan, required=True, help="RATE:N,RATE:N,...")
    parser.add_argument("--server-cpu", action="store_true", help="PostgreSQL's and Redis's CPU")
    args = parser.parse_args()
    for rate, n in args.plan:
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


if __name__ == "__main__":
    main()
