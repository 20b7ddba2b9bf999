"""One engine process of the multi-process load test: ``python -m engine.benchmark.worker``.

The coordinator (:mod:`engine.benchmark.processes`) starts N of these with
``--config FILE`` (the shared PostgreSQL session store and the Redis limiter) and
sends them player actions. Each worker opens one engine — the configured module,
simulated agents, the configured session store (``--state-path``: a SQLite file
instead, for a one-process run) — and plays every action it is sent, concurrently.

Protocol: JSON, one object per line (UTF-8, ``\\n``-terminated).

* **stdin**, from the coordinator: ``{"id": int, "session": str, "text": str}`` — one
  player action. End of input: finish the actions in flight, answer them, close the
  engine, send ``bye``, exit 0.
* **stdout**, to the coordinator, in any order:

  - ``{"ready": true, "pid": int, "cpu": float}`` once the engine is open (nothing
    comes before; ``cpu``: the process's CPU seconds so far);
  - ``{"id", "ok": true, "turn", "degraded", "total", "agents", "overhead",
    "before_agents", "state_update", "outside", "lags"}`` — the action was stored
    (the ``player_action`` call returned); times in seconds, as
    :class:`~engine.benchmark.load.ActionTiming`; ``outside`` the time the call
    spent outside its ``player_action`` span (the session's lock and lease);
    ``lags`` the agent wake-up lags (``{"id", "ok": true, "turn", "measure_error"}``
    when the measurement itself failed);
  - ``{"id", "ok": false, "error": "Type: message"}`` — ``player_action`` raised;
  - ``{"bye": true, "peak_rss": int, "calls": int, "cpu": float}`` last, after end
    of input.
* **the calls file** (``--calls-file PATH``, appended to): every agent call (a
  simulated model call, inside its global limiter slot when there is one) as two
  lines, ``s CALL TIME`` before the call runs and ``e CALL TIME`` right after it
  ended, ``TIME`` on the wall clock (``time.time()``). A process killed mid-call
  leaves its open calls behind in the file, which the coordinator reads once the
  process has exited. A file, not the pipe: the coordinator is not woken for each
  call (through the pipe, a loaded two-process run's overhead p95 was 1.3-1.7
  times as high in 4 of 5 pairs, docs/scale-out.md).

Every line is written with one blocking ``os.write`` call on the event loop (no
await, so two tasks' lines never interleave). Anything else the process prints goes
to stderr: fd 1 is redirected there once the protocol's own copy of it is taken.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, final

import anyio
import attrs

from ..agents.base import Agent, AgentRequest
from ..agents.retrieval import RetrievalFirstAgent
from ..agents.simulated import PromptCacheModel, SimulatedAgent
from ..config import Config
from ..observability.profiler import PerformanceProfiler
from ..pipeline import DungeonMaster
from ..runtime import open_engine
from .load import _Tally, load_config, peak_rss_bytes
from .options import with_overrides

__all__ = ["CallLog", "RecordedAgent", "main", "read_calls", "serve"]


@final
@attrs.define(eq=False)
class _Out:
    """Writes protocol lines to a file descriptor, whole, at once."""

    fd: int

    def send(self, message: Mapping[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


@final
@attrs.define(eq=False)
class CallLog:
    """Writes every agent call's start and end (wall clock) to the calls file
    (``fd``; None: the calls are only counted)."""

    fd: int | None
    _ids: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    count: int = attrs.field(default=0, init=False)

    def start(self) -> int:
        call = next(self._ids)
        self.count += 1
        self._write(b"s %d %r\n" % (call, time.time()))
        return call

    def end(self, call: int) -> None:
        self._write(b"e %d %r\n" % (call, time.time()))

    def _write(self, line: bytes) -> None:
        if self.fd is not None:
            os.write(self.fd, line)  # a regular file: whole, or an error


def read_calls(path: str | os.PathLike[str]) -> tuple[list[tuple[float, float]], list[float]]:
    """A calls file's finished calls (``(start, end)``) and the starts of the calls
    still open (a killed process's); a line cut short is ignored."""
    open_calls: dict[bytes, float] = {}
    finished: list[tuple[float, float]] = []
    with open(path, "rb") as file:
        for line in file:
            parts = line.split()
            if not line.endswith(b"\n") or len(parts) != 3:
                continue
            kind, call, when = parts
            try:
                at = float(when)
            except ValueError:
                continue
            if kind == b"s":
                open_calls[call] = at
            elif kind == b"e" and (start := open_calls.pop(call, None)) is not None:
                finished.append((start, at))
    return finished, list(open_calls.values())


@final
@attrs.define(eq=False)
class RecordedAgent:
    """Runs ``inner`` between a start and an end report of :class:`CallLog`.

    The engine wraps it in the global limiter's slot (``[performance.parallelization]
    redis_url``), so the reported interval lies inside the time the slot was held."""

    inner: Agent
    calls: CallLog

    async def run(self, request: AgentRequest, inputs: Mapping[str, Any]) -> Any:
        call = self.calls.start()
        try:
            return await self.inner.run(request, inputs)
        finally:
            self.calls.end(call)


def recorded_agents(config: Config, time_scale: float, calls: CallLog) -> dict[str, Agent]:
    """The configured agents as ``open_engine`` builds simulated ones (one shared
    simulated prompt cache; ``from_retrieval`` answers first), each call recorded.

    Raises:
        ValueError: an agent is not simulated (the load test plays simulated agents).
    """
    prompt_cache = PromptCacheModel.from_model(config.latency_model())
    agents: dict[str, Agent] = {}
    for name, spec in config.agents.items():
        if spec.backend != "simulated":
            raise ValueError(
                f"agent {name!r} has backend {spec.backend!r}: the multi-process load test "
                "plays simulated agents only"
            )
        simulated = SimulatedAgent.from_config(name, config, time_scale, prompt_cache)
        agent: Agent = RecordedAgent(simulated, calls)
        if spec.from_retrieval:
            agent = RetrievalFirstAgent(agent)
        agents[name] = agent
    return agents


async def _requests(fd: int) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects read from ``fd``, one per line, until end of input."""
    os.set_blocking(fd, False)
    pending = b""
    while True:
        await anyio.wait_readable(fd)
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                print(f"worker: not a JSON request: {line[:200]!r}", file=sys.stderr)
                continue
            if isinstance(message, dict):
                yield message


async def _answer(dm: DungeonMaster, tally: _Tally, request: Mapping[str, Any], out: _Out) -> None:
    rid = request.get("id")
    session, text = request.get("session"), request.get("text")
    try:
        if not isinstance(session, str) or not isinstance(text, str):
            raise TypeError("a request needs a str session and a str text")
        called = anyio.current_time()
        result = await dm.player_action(session, text)
        elapsed = anyio.current_time() - called
    except Exception as exc:  # the action failed; report it, go on with the others
        out.send({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    reply: dict[str, Any] = {"id": rid, "ok": True, "turn": result.turn}
    try:  # the load test's own per-action measurements (no await: nothing interleaves)
        lags_before = len(tally.lags)
        tally.done(session, text, result)
        timing = tally.timings.pop()
        lags = tally.lags[lags_before:]
        del tally.lags[lags_before:]
        tally.completed.clear()
        reply.update(attrs.asdict(timing), degraded=result.degraded, lags=lags)
        # the call outside its root span: the session's lock and lease (taken, waited
        # for, given back) — not part of the load test's overhead
        reply["outside"] = max(0.0, elapsed - timing.total)
    except Exception as exc:  # the action is stored all the same: say so
        reply["measure_error"] = f"{type(exc).__name__}: {exc}"
    out.send(reply)


async def serve(
    config: Config,
    *,
    sessions: int = 1,
    time_scale: float = 0.02,
    state_path: str | None = None,
    requests_fd: int = 0,
    replies_fd: int = 1,
    calls_fd: int | None = None,
) -> None:
    """Open the engine and answer the requests on ``requests_fd`` until end of input.

    Args:
        config: the configuration; its local agent limiter is sized for ``sessions``
            players as the single-process load test does (``load_config``).
        sessions: the players of the whole run (any of them may come to this process).
        time_scale: multiplies the simulated agents' latencies.
        state_path: a SQLite session store file instead of ``[state]``.
        requests_fd, replies_fd: the protocol's input and output.
        calls_fd: the calls file, open for appending (None: calls only counted).
    """
    config = load_config(config, sessions)
    out = _Out(replies_fd)
    calls = CallLog(calls_fd)
    agents = recorded_agents(config, time_scale, calls)
    # every action's span tree is needed for its overhead: sample them all
    profiler = PerformanceProfiler(config.targets, 1.0, clock=anyio.current_time)
    tally = _Tally(config, time_scale, None)
    # the agents are built here (scaled by time_scale): the engine builds none
    async with open_engine(config, agents=agents, state_path=state_path, profiler=profiler) as dm:
        out.send({"ready": True, "pid": os.getpid(), "cpu": time.process_time()})
        async with anyio.create_task_group() as tg:
            async for request in _requests(requests_fd):
                tg.start_soon(_answer, dm, tally, request, out)
    cpu = time.process_time()  # every thread of the process
    out.send({"bye": True, "peak_rss": peak_rss_bytes(), "calls": calls.count, "cpu": cpu})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.benchmark.worker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="configuration file (default: the built-in defaults)")
    parser.add_argument("--time-scale", type=float, default=0.02)
    parser.add_argument("--sessions", type=int, default=1, help="players of the whole run")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--scenario", choices=("targets", "hosted"), default=None)
    parser.add_argument("--state-path", default=None, help="a SQLite session store file")
    parser.add_argument("--backend", choices=("trio", "asyncio"), default="trio")
    parser.add_argument("--calls-file", default=None, help="where agent calls are logged")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..config import load_config as read_config
    from ..errors import ConfigError

    args = _parser().parse_args(argv)
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        print(f"{args.config or '<defaults>'}: {exc}", file=sys.stderr)
        return 1
    config = with_overrides(config, args.scenario, args.seed)
    # the protocol owns the original stdout; stray prints go to stderr
    replies = os.dup(1)
    os.dup2(2, 1)
    calls = None
    if args.calls_file is not None:
        calls = os.open(args.calls_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    anyio.run(
        lambda: serve(
            config,
            sessions=max(1, args.sessions),
            time_scale=args.time_scale,
            state_path=args.state_path,
            requests_fd=0,
            replies_fd=replies,
            calls_fd=calls,
        ),
        backend=args.backend,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover - the coordinator runs it
    sys.exit(main())
