"""The multi-process load test: N engine processes, one shared state, one killed.

``run_process_load_test`` starts ``processes`` engine workers
(``python -m engine.benchmark.worker``, see :mod:`engine.benchmark.worker` for the
protocol), all reading the same configuration file: the PostgreSQL session store
(``[state] url``) they share and, when set, the Redis limiter
(``[performance.parallelization] redis_url``) that bounds their agent calls
together. It then plays the single-process load test's sessions against them
(same :data:`~engine.benchmark.load.SCRIPT`, same per-session offsets, seeds and
think time as :func:`~engine.benchmark.load.run_load_test`), sending **each action to
a random live process** — no session affinity, so consecutive actions of one session
usually run in different processes and only the store's session lease keeps them in
order.

The kill:
    Once half of the actions were sent (``kill=True`` and at least two processes),
    the process with the most actions in flight is SIGKILLed (``os.kill`` by PID).
    Its in-flight actions were never reported done: their outcome is *unknown* —
    stored or not, both are correct, never twice. Their players do not resend them
    (that could store an action twice); they go on with their next action through
    the processes left. A reply the killed process wrote before it died still
    counts (it is read from the pipe until end of file).

Verification (after every process ended, through a session store of the configured
backend, per session: transcript and ``count_actions``):
    * ``lost``: actions reported done that are not stored at the turn they reported;
    * ``duplicate_actions``: stored entries that match no action of the session in
      the order sent (a second copy, an action reported failed, a stranger);
    * ``mismatched_sessions``: sessions with a lost or duplicate action, with a
      transcript that is not a subsequence of the actions in the order the player
      sent them (every action reported done in it, at its turn; actions of unknown
      outcome may or may not be in it), turns not 1..n, or a count that differs
      from the transcript.

Concurrency of agent calls:
    Every worker writes each agent call's start and end on the wall clock
    (``time.time()``; one machine, so one clock) to a calls file of its own as they
    happen; the coordinator reads the files once the processes have exited (so it
    is not woken for every call). The maximum number of calls running at once over
    all processes is computed from those intervals (a call of the killed process
    that never ended counts as running until the kill).
    ``max_concurrent_agent_calls`` must not exceed ``global_max_concurrent_agents``
    when the Redis limiter is configured.

Per action, each worker measures the engine overhead exactly as the single-process
load test does (:func:`~engine.benchmark.load.action_timing` on the action's span
tree); the coordinator also measures each action's round trip (request sent to
reply read, so IPC and the worker's queueing included).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, final

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import Config, load_config
from ..errors import lone_error
from ..state import open_session_store
from .load import SCRIPT, ActionTiming, Figures, _backend, check_load_args
from .load import load_config as sized_for
from .options import add_figures, figures_table, with_overrides
from .worker import read_calls

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "DONE",
    "FAILED",
    "UNKNOWN",
    "ProcessLoadResult",
    "SentAction",
    "SessionCheck",
    "check_session",
    "max_concurrent",
    "process_table",
    "run_process_load_test",
    "run_processes_command",
]

DONE: Final = "done"
FAILED: Final = "failed"
UNKNOWN: Final = "unknown"

#: Seconds a worker may take to open its engine (a first run compiles the module).
READY_TIMEOUT = 180.0
#: Seconds a worker may take to finish and exit once its input is closed.
EXIT_TIMEOUT = 60.0
_TIMING_FIELDS = tuple(f.name for f in attrs.fields(ActionTiming))


# --------------------------------------------------------------------------- verification


@attrs.frozen
class SentAction:
    """One action a player sent, in order: its text, its outcome as the player saw it
    (``done``: reported stored, at ``turn``; ``failed``: reported not done;
    ``unknown``: no answer — its process died or it timed out)."""

    text: str
    outcome: str
    turn: int = 0


@attrs.frozen
class SessionCheck:
    """One session's verdict (see the module docstring)."""

    stored: int
    lost: int
    duplicates: int
    unknown_stored: int
    in_order: bool

    @property
    def ok(self) -> bool:
        return self.in_order and self.lost == 0 and self.duplicates == 0


def check_session(
    sent: Sequence[SentAction], transcript: Sequence[tuple[int, str]], count: int
) -> SessionCheck:
    """Check a session's stored ``transcript`` (``(turn, text)`` in turn order) and
    ``count_actions`` against the actions its player ``sent``, in order.

    The actions reported done anchor the transcript at the turns they reported (in the
    order sent, those turns must increase). Between two anchors (and before the first,
    after the last) the stored entries must be a subsequence of the actions of unknown
    outcome sent between them; an entry that is not is a duplicate (or a failed
    action, or a stranger)."""
    turns = [turn for turn, _ in transcript]
    in_order = turns == list(range(1, len(transcript) + 1)) and count == len(transcript)
    by_turn = dict(transcript)
    lost = duplicates = unknown_stored = 0
    previous_turn = 0
    unknown: list[str] = []  # unknown actions sent since the last done one

    def segment(first: int, last: int) -> None:
        """Match the entries of turns first..last to ``unknown``, in order."""
        nonlocal duplicates, unknown_stored
        position = 0
        for turn in range(first, last + 1):
            if turn not in by_turn:
                continue
            text = by_turn[turn]
            while position < len(unknown) and unknown[position] != text:
                position += 1
            if position == len(unknown):
                duplicates += 1
            else:
                unknown_stored += 1
                position += 1

    for action in sent:
        if action.outcome == UNKNOWN:
            unknown.append(action.text)
        elif action.outcome == DONE:
            if action.turn <= previous_turn:
                in_order = False
                lost += by_turn.get(action.turn) != action.text
                continue
            segment(previous_turn + 1, action.turn - 1)
            lost += by_turn.get(action.turn) != action.text
            previous_turn = action.turn
            unknown = []
    segment(previous_turn + 1, max(turns, default=0))
    return SessionCheck(len(transcript), lost, duplicates, unknown_stored, in_order)


def max_concurrent(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` open at one instant (an interval ending
    exactly when another starts does not overlap it)."""
    events: list[tuple[float, int]] = []
    for start, end in intervals:
        if end >= start:
            events.append((start, 1))
            events.append((end, -1))
    events.sort()  # at equal times ends (-1) come first
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# --------------------------------------------------------------------------- workers


@final
@attrs.define(eq=False)
class _Pending:
    """A request sent to a worker, waiting for its reply (None: unknown)."""

    event: anyio.Event = attrs.field(factory=anyio.Event)
    reply: dict[str, Any] | None = None
    delivered: bool = False  # written into the worker's stdin


@final
@attrs.define(eq=False)
class _Worker:
    index: int
    process: anyio.abc.Process
    outbox: MemoryObjectSendStream[tuple[bytes, _Pending]]
    inbox: MemoryObjectReceiveStream[tuple[bytes, _Pending]]
    pending: dict[int, _Pending] = attrs.field(factory=dict)
    live: bool = False  # ready and neither killed nor exited: actions may go to it
    ready: anyio.Event = attrs.field(factory=anyio.Event)
    settled: anyio.Event = attrs.field(factory=anyio.Event)  # ready, or exited first
    exited: anyio.Event = attrs.field(factory=anyio.Event)
    calls_file: Path | None = None  # where it logs its agent calls
    killed_at: float | None = None  # wall clock
    ended_at: float | None = None  # wall clock: its output ended
    intervals: list[tuple[float, float]] = attrs.field(factory=list)
    ready_cpu: float = 0.0
    bye: dict[str, Any] | None = None
    completed: int = 0
    stderr: deque[str] = attrs.field(factory=lambda: deque(maxlen=20))

    @property
    def pid(self) -> int:
        return self.process.pid

    def run_cpu(self) -> float:
        """CPU seconds from ready to exit (0 when it never said bye)."""
        return float(self.bye.get("cpu", 0.0)) - self.ready_cpu if self.bye else 0.0

    def load_calls(self) -> None:
        """Its agent calls, from its calls file (after it exited): a call still open
        ran until the kill (or until its output ended)."""
        if self.calls_file is None or not self.calls_file.exists():
            return
        finished, still_open = read_calls(self.calls_file)
        end = self.killed_at if self.killed_at is not None else self.ended_at or time.time()
        self.intervals = finished + [(start, end) for start in still_open]

    def in_flight(self) -> int:
        return sum(1 for p in self.pending.values() if p.delivered)

    def handle(self, message: dict[str, Any]) -> None:
        if "id" in message:
            pending = self.pending.pop(message["id"], None)
            if pending is not None:
                pending.reply = message
                pending.event.set()
        elif message.get("ready"):
            self.ready_cpu = float(message.get("cpu", 0.0))
            self.live = True
            self.ready.set()
            self.settled.set()
        elif message.get("bye"):
            self.bye = message

    def ended(self) -> None:
        """End of its output: every request still waiting has an unknown outcome."""
        self.live = False
        self.ended_at = time.time()
        for pending in self.pending.values():
            pending.event.set()
        self.pending.clear()
        self.exited.set()
        self.settled.set()


async def _read_replies(worker: _Worker) -> None:
    stdout = worker.process.stdout
    assert stdout is not None
    rest = b""
    try:
        async for chunk in stdout:
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                if line:
                    worker.handle(json.loads(line))
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
    finally:
        worker.ended()


async def _read_stderr(worker: _Worker) -> None:
    stderr = worker.process.stderr
    assert stderr is not None
    rest = b""
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        async for chunk in stderr:
            *lines, rest = (rest + chunk).split(b"\n")
            worker.stderr.extend(line.decode(errors="replace") for line in lines)
    if rest:
        worker.stderr.append(rest.decode(errors="replace"))


async def _send_requests(worker: _Worker) -> None:
    """Write queued requests to the worker, as many at once as are waiting; close
    its input when the outbox is closed."""
    stdin = worker.process.stdin
    assert stdin is not None
    async with worker.inbox:
        async for first in worker.inbox:
            batch = [first]
            with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                while True:
                    batch.append(worker.inbox.receive_nowait())
            try:
                await stdin.send(b"".join(line for line, _ in batch))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                break  # the process is gone: its reader settles what is pending
            for _, pending in batch:
                pending.delivered = True
    with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
        await stdin.aclose()


def worker_command(
    config_path: str | None,
    *,
    sessions: int,
    time_scale: float,
    seed: int | None,
    scenario: str | None,
    backend: str,
    state_path: str | None = None,
) -> list[str]:
    """The command line of one worker process."""
    command = [sys.executable, "-m", "engine.benchmark.worker", "--backend", backend]
    command += ["--sessions", str(sessions), "--time-scale", repr(time_scale)]
    if config_path is not None:
        command += ["--config", str(config_path)]
    if seed is not None:
        command += ["--seed", str(seed)]
    if scenario is not None:
        command += ["--scenario", scenario]
    if state_path is not None:
        command += ["--state-path", state_path]
    return command


# --------------------------------------------------------------------------- the result


@final
@attrs.frozen
class ProcessLoadResult:
    """What a multi-process load run measured. Times in seconds."""

    backend: str
    processes: int
    killed_processes: int
    crashed_processes: int  # processes that died without being killed
    sessions: int
    actions_per_session: int
    time_scale: float
    think_time: float
    state: str  # "postgresql" or "sqlite"
    max_concurrent_agents: int  # each process's local limiter (raised as load.py does)
    global_max_concurrent_agents: int  # 0: no global limiter (no redis_url)
    expected_actions: int
    completed_actions: int  # reported done
    failed_actions: int  # reported not done
    unknown_actions: int  # no answer: in flight in a process when it died
    unknown_stored: int  # of those, stored
    stored_actions: int
    lost_actions: int  # reported done, not stored
    duplicate_actions: int
    mismatched_sessions: int
    degraded_actions: int
    actions_per_process: tuple[int, ...]  # completed, by process
    wall_seconds: float
    throughput: float  # completed actions per second of wall time
    kill_after_seconds: float | None
    agent_calls: int
    max_concurrent_agent_calls: int  # over all processes at once
    peak_rss_bytes: tuple[int, ...]  # by process (0: killed before it could say)
    cpu_seconds: tuple[float, ...]  # CPU time by process from ready to exit (0: killed)
    overhead: Figures
    agent_critical_path: Figures
    before_agents: Figures
    state_write: Figures
    agent_lag: Figures
    lease: Figures  # player_action outside its root span: the session's lock and lease
    round_trip: Figures  # the coordinator's request-to-reply time of done actions
    errors: tuple[str, ...]

    @property
    def no_loss(self) -> bool:
        return self.lost_actions == 0 and self.mismatched_sessions == 0

    @property
    def limit_respected(self) -> bool:
        limit = self.global_max_concurrent_agents
        return limit == 0 or self.max_concurrent_agent_calls <= limit

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in attrs.fields(ProcessLoadResult):
            value = getattr(self, field.name)
            if isinstance(value, Figures):
                value = value.as_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        out["no_loss"] = self.no_loss
        out["limit_respected"] = self.limit_respected
        return out


@final
@attrs.define(eq=False)
class _Tally:
    progress: Callable[[int], None] | None
    sent: dict[str, list[SentAction]] = attrs.field(factory=dict)
    degraded: int = 0
    timings: list[ActionTiming] = attrs.field(factory=list)
    lags: list[float] = attrs.field(factory=list)
    outside: list[float] = attrs.field(factory=list)
    round_trips: list[float] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)
    sent_count: int = 0

    def record(self, sid: str, text: str, reply: dict[str, Any] | None, rtt: float) -> None:
        if reply is None:
            action = SentAction(text, UNKNOWN)
        elif reply.get("ok"):
            action = SentAction(text, DONE, int(reply["turn"]))
            self.degraded += bool(reply.get("degraded"))
            self.round_trips.append(rtt)
            if "measure_error" in reply:
                self.error(f"measuring a done action: {reply['measure_error']}")
            else:
                self.timings.append(ActionTiming(*(float(reply[k]) for k in _TIMING_FIELDS)))
                self.lags.extend(float(x) for x in reply.get("lags", ()))
                self.outside.append(float(reply.get("outside", 0.0)))
        else:
            action = SentAction(text, FAILED)
            self.error(str(reply.get("error", "unknown error")))
        self.sent.setdefault(sid, []).append(action)
        if self.progress is not None:
            self.progress(1)

    def error(self, message: str) -> None:
        if message not in self.errors and len(self.errors) < 8:
            self.errors.append(message)


# --------------------------------------------------------------------------- the run


async def run_process_load_test(
    config_path: str | os.PathLike[str] | None,
    *,
    processes: int,
    sessions: int,
    actions_per_session: int = 5,
    time_scale: float = 0.02,
    think_time: float = 10.0,
    seed: int | None = None,
    scenario: str | None = None,
    kill: bool = True,
    worker_backend: str = "trio",
    request_timeout: float = 120.0,
    progress: Callable[[int], None] | None = None,
) -> ProcessLoadResult:
    """Play ``sessions`` sessions on ``processes`` engine processes; kill one midway;
    verify and measure (see the module docstring).

    Args:
        config_path: the configuration file every process reads (None: the defaults,
            usable with ``processes=1`` only); ``[state] url`` must name PostgreSQL
            when ``processes > 1``.
        processes: engine worker processes (>= 1).
        sessions, actions_per_session, time_scale, think_time: as
            :func:`~engine.benchmark.load.run_load_test`.
        seed, scenario: override ``[simulation]`` (in every process).
        kill: SIGKILL one process once half of the actions were sent (needs two).
        worker_backend: the workers' event loop ("trio" or "asyncio").
        request_timeout: seconds a player waits for a reply before its action's
            outcome is unknown.
        progress: called with 1 each time an action's outcome is known.

    Raises:
        ValueError: a count or time below its minimum, or several processes on a
            store they cannot share.
        ConfigError: the configuration file is invalid.
        RuntimeError: a worker did not start (its stderr's last lines included).
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    check_load_args(sessions, actions_per_session, time_scale, think_time)
    path = None if config_path is None else str(config_path)
    config = with_overrides(load_config(path), scenario, seed)
    if processes > 1 and not config.state.url:
        raise ValueError(
            f"{processes} processes need a session store they can share: set [state] url "
            f"to a PostgreSQL database in {path or 'the configuration'} (a SQLite store "
            "refuses a second process)"
        )
    with contextlib.ExitStack() as stack:
        calls_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dm-calls-")))
        state_path = None
        if not config.state.url:  # one process on SQLite: a fresh file, as load.py
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="dm-load-"))
            state_path = str(Path(folder) / "sessions.sqlite")
        command = worker_command(
            path,
            sessions=sessions,
            time_scale=time_scale,
            seed=seed,
            scenario=scenario,
            backend=worker_backend,
            state_path=state_path,
        )
        try:
            return await _run(
                config,
                command,
                processes=processes,
                sessions=sessions,
                actions=actions_per_session,
                time_scale=time_scale,
                think_time=think_time,
                kill=kill and processes > 1,
                state_path=state_path,
                calls_dir=calls_dir,
                request_timeout=request_timeout,
                progress=progress,
            )
        except BaseExceptionGroup as group:  # a worker that did not start, alone
            lone = lone_error(group)
            if lone is None:
                raise
            raise lone from None


async def _run(
    config: Config,
    command: list[str],
    *,
    processes: int,
    sessions: int,
    actions: int,
    time_scale: float,
    think_time: float,
    kill: bool,
    state_path: str | None,
    calls_dir: Path,
    request_timeout: float,
    progress: Callable[[int], None] | None,
) -> ProcessLoadResult:
    seed = config.simulation.seed
    run_id = uuid.uuid4().hex[:8]  # fresh session ids on a store that outlives runs
    ids = [f"load-{run_id}-{i:05d}" for i in range(sessions)]
    tally = _Tally(progress)
    route = random.Random(f"{seed}:route")
    request_ids = itertools.count()
    workers: list[_Worker] = []
    half_sent = anyio.Event()
    players_done = anyio.Event()
    kill_after: list[float] = []
    started = 0.0

    async def ask(worker: _Worker, sid: str, text: str) -> dict[str, Any] | None:
        rid = next(request_ids)
        pending = _Pending()
        line = json.dumps({"id": rid, "session": sid, "text": text}).encode() + b"\n"
        worker.pending[rid] = pending
        try:
            worker.outbox.send_nowait((line, pending))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            worker.pending.pop(rid, None)
            return {"ok": False, "error": "the engine process was gone before the action"}
        with anyio.move_on_after(request_timeout) as scope:
            await pending.event.wait()
        if scope.cancelled_caught:
            worker.pending.pop(rid, None)
            tally.error(f"an action got no answer within {request_timeout:g} s")
        return pending.reply

    async def play(index: int) -> None:
        sid = ids[index]
        rng = random.Random(f"{seed}:{index}")  # the single-process test's draws
        if think_time > 0:
            await anyio.sleep(rng.uniform(0.0, think_time))
        for step in range(actions):
            if step and think_time > 0:
                await anyio.sleep(think_time * rng.uniform(0.5, 1.5))
            text = SCRIPT[(index + step) % len(SCRIPT)]
            live = [w for w in workers if w.live]
            if not live:
                tally.record(sid, text, {"ok": False, "error": "no engine process left"}, 0.0)
                continue
            worker = route.choice(live)
            tally.sent_count += 1
            if tally.sent_count * 2 >= sessions * actions:
                half_sent.set()
            sent_at = anyio.current_time()
            reply = await ask(worker, sid, text)
            if reply is not None and reply.get("ok"):
                worker.completed += 1
            tally.record(sid, text, reply, anyio.current_time() - sent_at)

    async def killer() -> None:
        await half_sent.wait()
        while not players_done.is_set():
            live = [w for w in workers if w.live]
            if len(live) < 2:
                return  # never the last one
            victim = max(live, key=_Worker.in_flight)
            if victim.in_flight():
                victim.live = False
                victim.killed_at = time.time()
                os.kill(victim.pid, signal.SIGKILL)
                kill_after.append(anyio.current_time() - started)
                return
            await anyio.sleep(0.001)  # wait until a live process has an action in flight

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(_end_all, workers)  # no process outlives the run
        tg = await stack.enter_async_context(anyio.create_task_group())
        for index in range(processes):
            calls_file = calls_dir / f"calls-{index}.log"
            process = await anyio.open_process(
                [*command, "--calls-file", str(calls_file)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            outbox, inbox = anyio.create_memory_object_stream[tuple[bytes, _Pending]](math.inf)
            worker = _Worker(index, process, outbox, inbox, calls_file=calls_file)
            workers.append(worker)
            tg.start_soon(_read_replies, worker)
            tg.start_soon(_read_stderr, worker)
            tg.start_soon(_send_requests, worker)
        await _wait_ready(workers)

        started = anyio.current_time()
        async with anyio.create_task_group() as players:
            if kill:
                players.start_soon(killer)
            async with anyio.create_task_group() as sessions_tg:
                for index in range(sessions):
                    sessions_tg.start_soon(play, index)
            players_done.set()
            half_sent.set()  # the killer stops waiting (when half was never sent)
        wall = anyio.current_time() - started

        for worker in workers:  # end of input: each finishes, says bye and exits
            worker.outbox.close()
        with anyio.move_on_after(EXIT_TIMEOUT):
            for worker in workers:
                await worker.exited.wait()
        for worker in workers:
            if not worker.exited.is_set():
                tally.error(f"process {worker.pid} did not exit within {EXIT_TIMEOUT:g} s")
                os.kill(worker.pid, signal.SIGKILL)
            await worker.process.wait()
            worker.load_calls()
            if worker.killed_at is None and (worker.process.returncode or worker.bye is None):
                tally.error(
                    f"process {worker.pid} ended with {worker.process.returncode}: "
                    + " | ".join(list(worker.stderr)[-3:])
                )

    checks = await _verify(config, state_path, ids, tally.sent)
    killed = sum(1 for w in workers if w.killed_at is not None)
    crashed = sum(1 for w in workers if w.killed_at is None and w.bye is None)
    all_sent = [a for actions_sent in tally.sent.values() for a in actions_sent]
    completed = sum(1 for a in all_sent if a.outcome == DONE)
    timings = tally.timings
    par = config.performance.parallelization
    local = sized_for(config, sessions).performance.parallelization.max_concurrent_agents
    return ProcessLoadResult(
        backend=_backend(),
        processes=processes,
        killed_processes=killed,
        crashed_processes=crashed,
        sessions=sessions,
        actions_per_session=actions,
        time_scale=time_scale,
        think_time=think_time,
        state="postgresql" if config.state.url else "sqlite",
        max_concurrent_agents=local,
        global_max_concurrent_agents=par.global_max_concurrent_agents if par.redis_url else 0,
        expected_actions=sessions * actions,
        completed_actions=completed,
        failed_actions=sum(1 for a in all_sent if a.outcome == FAILED),
        unknown_actions=sum(1 for a in all_sent if a.outcome == UNKNOWN),
        unknown_stored=sum(c.unknown_stored for c in checks),
        stored_actions=sum(c.stored for c in checks),
        lost_actions=sum(c.lost for c in checks),
        duplicate_actions=sum(c.duplicates for c in checks),
        mismatched_sessions=sum(1 for c in checks if not c.ok),
        degraded_actions=tally.degraded,
        actions_per_process=tuple(w.completed for w in workers),
        wall_seconds=wall,
        throughput=completed / wall if wall > 0 else 0.0,
        kill_after_seconds=kill_after[0] if kill_after else None,
        agent_calls=sum(len(w.intervals) for w in workers),
        max_concurrent_agent_calls=max_concurrent(i for w in workers for i in w.intervals),
        peak_rss_bytes=tuple(int((w.bye or {}).get("peak_rss", 0)) for w in workers),
        cpu_seconds=tuple(w.run_cpu() for w in workers),
        overhead=Figures.of([t.overhead for t in timings]),
        agent_critical_path=Figures.of([t.agents for t in timings]),
        before_agents=Figures.of([t.before_agents for t in timings]),
        state_write=Figures.of([t.state_update for t in timings]),
        agent_lag=Figures.of(tally.lags),
        lease=Figures.of(tally.outside),
        round_trip=Figures.of(tally.round_trips),
        errors=tuple(tally.errors),
    )


async def _wait_ready(workers: Sequence[_Worker]) -> None:
    """Wait until every worker opened its engine; raise if one exits first."""
    with anyio.move_on_after(READY_TIMEOUT) as scope:
        for worker in workers:
            await worker.settled.wait()
            if not worker.ready.is_set():
                with anyio.move_on_after(2):  # let its stderr drain
                    await worker.process.wait()
                raise RuntimeError(
                    f"engine process {worker.pid} exited ({worker.process.returncode}) "
                    "before it was ready: " + "\n".join(worker.stderr)
                )
    if scope.cancelled_caught:
        raise RuntimeError(f"an engine process was not ready within {READY_TIMEOUT:g} s")


async def _end_all(workers: Sequence[_Worker]) -> None:
    """Close every outbox; SIGKILL and reap every process still running (after an
    error or a cancellation; a normal run has ended them all already)."""
    with anyio.CancelScope(shield=True):
        for worker in workers:
            worker.outbox.close()
            if worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            with anyio.move_on_after(10):
                await worker.process.aclose()


async def _verify(
    config: Config,
    state_path: str | None,
    ids: Sequence[str],
    sent: dict[str, list[SentAction]],
) -> list[SessionCheck]:
    """Every session's check, read through a store of the configured backend."""
    checks: list[SessionCheck] = []
    async with open_session_store(config.state, config.module.cache_dir, path=state_path) as store:
        for sid in ids:
            try:
                count = await store.count_actions(sid)
                transcript = await store.transcript(sid)
            except Exception:  # the session was never created: nothing stored
                count, transcript = 0, []
            entries = [(entry.turn, entry.action_text) for entry in transcript]
            checks.append(check_session(sent.get(sid, []), entries, count))
    return checks


# --------------------------------------------------------------------------- the command


def process_table(result: ProcessLoadResult) -> Table:
    """Per-action figures of a multi-process run, in milliseconds."""
    table = figures_table(
        f"load test — {result.processes} processes, {result.sessions} sessions x "
        f"{result.actions_per_session} actions, {result.state}, time scale "
        f"{result.time_scale:g}, think time {result.think_time:g} s (real time, ms)"
    )
    rows = (
        ("engine overhead / action", result.overhead, "bold"),
        ("  of which before the agents", result.before_agents, ""),
        ("  of which the state update", result.state_write, ""),
        ("agent critical path / action", result.agent_critical_path, ""),
        ("agent wake-up lag / call", result.agent_lag, ""),
        ("session lock + lease / action (outside the span)", result.lease, ""),
        ("round trip / action (coordinator)", result.round_trip, ""),
    )
    for name, f, style in rows:
        add_figures(table, name, f, style)
    return table


def _summary(result: ProcessLoadResult, goal: float) -> list[str]:
    mib = 1024 * 1024
    loss = "[green]none[/green]" if result.no_loss else "[red]LOST OR OUT OF ORDER[/red]"
    killed = (
        f"killed {result.killed_processes} after {result.kill_after_seconds:.1f} s"
        if result.kill_after_seconds is not None
        else "none killed"
    )
    limit = result.global_max_concurrent_agents
    if limit:
        verdict = "[green]kept[/green]" if result.limit_respected else "[red]EXCEEDED[/red]"
        agents = f"global limit {limit}: {verdict}"
    else:
        agents = "no global limit (no redis_url): each process limits its own calls"
    rss = ", ".join(f"{r / mib:.0f}" for r in result.peak_rss_bytes)
    met = result.overhead.p95 < goal
    lines = [
        f"processes: {result.processes}, {killed}, crashed {result.crashed_processes}; "
        f"actions done per process: {list(result.actions_per_process)}; peak RSS MiB: {rss}",
        f"throughput: [bold]{result.throughput:.1f}[/bold] actions/s over "
        f"{result.wall_seconds:.1f} s",
        f"actions: {result.expected_actions} expected, {result.completed_actions} done, "
        f"{result.failed_actions} failed, {result.unknown_actions} unknown (in a killed "
        f"process; {result.unknown_stored} of them stored), {result.stored_actions} stored; "
        f"lost {result.lost_actions}, duplicates {result.duplicate_actions}, sessions out "
        f"of order {result.mismatched_sessions}; loss: {loss}; degraded: "
        f"{result.degraded_actions}",
        f"agent calls: {result.agent_calls}, at most [bold]"
        f"{result.max_concurrent_agent_calls}[/bold] at once across processes; {agents}",
        f"engine overhead p95 {result.overhead.p95 * 1e3:.2f} ms vs goal "
        f"{goal * 1e3:.2f} ms: " + ("[green]met[/green]" if met else "[red]missed[/red]"),
    ]
    lines.extend(f"[red]error:[/red] {e}" for e in result.errors)
    return lines


def run_processes_command(args: argparse.Namespace, goal: float) -> int:
    """``dm-engine bench --load --processes N``: run, print, write ``load.json``.

    Returns 1 when an action was lost or out of order, or the global agent limit was
    exceeded (and, with ``args.fail_on_miss``, when the overhead p95 is not below
    ``goal``); 2 when the run cannot start; else 0. Reads ``args.config`` (resolved
    as the CLI does), ``processes``, ``sessions``, ``actions``, ``time_scale``,
    ``think_time``, ``seed``, ``scenario``, ``backend``, ``out``.
    """
    from ..cli import _config_path
    from .options import environment

    console = Console()
    processes = int(args.processes)
    sessions = 1000 if args.sessions is None else int(args.sessions)
    actions = int(getattr(args, "actions", None) or 5)
    time_scale = float(getattr(args, "time_scale", None) or 0.02)
    think = getattr(args, "think_time", None)
    think_time = 10.0 if think is None else float(think)
    config_path = _config_path(getattr(args, "config", None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(
            f"{sessions} sessions on {processes} processes (real time)", total=sessions * actions
        )

        async def main() -> ProcessLoadResult:
            return await run_process_load_test(
                config_path,
                processes=processes,
                sessions=sessions,
                actions_per_session=actions,
                time_scale=time_scale,
                think_time=think_time,
                seed=args.seed,
                scenario=args.scenario,
                worker_backend=args.backend,
                progress=lambda n: bar.advance(task, n),
            )

        try:
            result = anyio.run(main, backend=args.backend)
        except (ValueError, RuntimeError) as exc:
            console.print(f"[red]{exc}[/red]")
            return 2

    console.print(process_table(result))
    for line in _summary(result, goal):
        console.print(line)
    config = with_overrides(load_config(config_path), args.scenario, args.seed)
    payload: dict[str, Any] = {
        "environment": environment(config, args.backend),
        "load": result.as_dict(),
        "overhead_goal_p95": goal,
        "overhead_goal_met": result.overhead.p95 < goal,
    }
    path = out / "load.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {path}")
    if not result.no_loss or not result.limit_respected:
        return 1
    if getattr(args, "fail_on_miss", False) and not payload["overhead_goal_met"]:
        return 1
    return 0
