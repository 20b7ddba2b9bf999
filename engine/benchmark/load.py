"""The load test: many concurrent sessions on one engine, in real time.

``run_load_test`` opens ONE engine (the configured module, simulated agents) and
plays ``sessions`` sessions concurrently. Each session plays ``actions_per_session``
actions of :data:`SCRIPT` (exploration, combat, roleplay, question, rest …), starting
at its own offset in the script so the action types are mixed at every moment.

Time:
    The run is in REAL time (the event loop's clock). The simulated agents'
    latencies are multiplied by ``time_scale`` (default 0.02: a 1 s agent call
    sleeps 20 ms), so agent waits are ``time_scale`` x the scenario's latencies.
    Players think between actions: ``think_time`` seconds on average (uniform in
    0.5..1.5 x ``think_time``, seeded; each session also starts at a random moment
    in the first ``think_time``), which is NOT scaled — it paces the offered load at
    about ``sessions / think_time`` actions per second, so 1000 sessions x 5 actions
    with the default 10 s take about a minute. ``think_time=0`` is a closed-loop
    saturation run (every session fires its next action at once): it measures
    capacity, and its latencies are mostly queueing.

Engine overhead per action (exact definition):
    For every agent of the action, its *wait* is the time from the start of its
    first ``agent_query`` span (attempt 1) to the end of its first successful one
    (a hedge that wins ends the wait); an agent without a successful span waits
    until its last span ended; an agent that never ran (skipped) waits 0. The
    *agent critical path* is the longest dependency chain of those waits through
    the action's agent DAG (``finish(a) = wait(a) + max(finish(dep))``).
    ``overhead = player_action root span duration - agent critical path``. It counts
    everything the engine adds on the path: classification, the session read,
    context building, scheduling gaps between an agent's end and its dependent's
    start, limiter queueing, and the state update. It does NOT count event-loop lag
    that delays an agent's own wake-up (that lands inside the agent's span); that
    lag is reported separately as ``agent_lag`` (span duration minus the drawn
    latency, for simulated agents).

Limiter:
    ``performance.parallelization.max_concurrent_agents`` bounds agent calls for the
    whole engine (4 by default: one player's DAG). One engine serving N players
    needs a limiter sized to its LLM capacity, so the load test raises it to
    ``max(configured, 4 x sessions)`` and says so in its result.

No loss:
    After the run every session's ``count_actions`` is compared with the actions
    whose ``player_action`` returned, and its transcript with the texts sent, in
    order, turns 1..n. ``lost = expected - stored``.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, final

import anyio
import attrs

from ..config import Config
from ..observability.profiler import OK, PerformanceProfiler, Span
from ..pipeline import ActionResult
from ..quantiles import percentile
from ..runtime import open_engine
from .options import with_overrides

__all__ = [
    "SCRIPT",
    "ActionTiming",
    "Figures",
    "LoadResult",
    "action_timing",
    "check_load_args",
    "peak_rss_bytes",
    "run_load_test",
]

#: The scripted actions a session plays, cycling from a per-session offset.
SCRIPT: tuple[str, ...] = (
    "I search the altar in the chapel ruins for traps",
    "I attack the goblin with my longsword",
    "I ask Marta Quell what happened to Brother Aldric",
    "How does grappling work?",
    "We take a short rest by the fire in the bell tower",
    "I sneak down the flooded stair and listen at the door",
    "I persuade Skrit to show us the way into the smugglers' cistern",
    "I cast fireball at the ghouls in the reliquary",
)

#: Operations reported (when they have samples), in this order.
OPERATIONS = (
    "player_action",
    "context_building",
    "agent_query",
    "state_update",
    "cache_lookup",
    "classify",
    "prefetch",
)


def check_load_args(
    sessions: int, actions_per_session: int, time_scale: float, think_time: float
) -> None:
    """The load test's counts and times, or a ``ValueError`` naming the one out of range."""
    if sessions < 1:
        raise ValueError(f"sessions must be >= 1, got {sessions}")
    if actions_per_session < 1:
        raise ValueError(f"actions_per_session must be >= 1, got {actions_per_session}")
    if not time_scale > 0 or not math.isfinite(time_scale):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    if not think_time >= 0 or not math.isfinite(think_time):
        raise ValueError(f"think_time must be a finite number >= 0, got {think_time!r}")


@attrs.frozen
class Figures:
    """Percentiles of a set of samples, in seconds (nearest rank; zeros when empty)."""

    count: int
    p50: float
    p95: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Figures:
        ordered = sorted(samples)
        if not ordered:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            len(ordered),
            percentile(ordered, 50),
            percentile(ordered, 95),
            percentile(ordered, 99),
            math.fsum(ordered) / len(ordered),
            ordered[-1],
        )

    def as_dict(self) -> dict[str, float | int]:
        return attrs.asdict(self)


@attrs.frozen
class ActionTiming:
    """One action's decomposition (seconds): ``total`` = root span duration,
    ``agents`` = agent critical path, ``overhead`` = total - agents, of which
    ``before_agents`` (root start to the first agent span) and ``state_update``."""

    total: float
    agents: float
    overhead: float
    before_agents: float
    state_update: float


def action_timing(root: Span, depends_on: Mapping[str, Sequence[str]]) -> ActionTiming:
    """Decompose one finished ``player_action`` span tree (see the module docstring).

    Args:
        root: the action's root span (``ActionResult.span``).
        depends_on: each agent of the action → its dependencies within the action.
    """
    if root.end is None:
        raise ValueError("the action's root span has not finished")
    total = root.end - root.start
    spans: dict[str, list[Span]] = {}
    state_update = 0.0
    for span in root.walk():
        if span.name == "agent_query" and span.end is not None:
            spans.setdefault(str(span.attributes.get("agent")), []).append(span)
        elif span.name == "state_update" and span.end is not None:
            state_update += span.end - span.start
    waits: dict[str, float] = {}
    for agent, group in spans.items():
        start = min(s.start for s in group)
        ok_ends = [s.end for s in group if s.status == OK and s.end is not None]
        end = min(ok_ends) if ok_ends else max(s.end or s.start for s in group)
        waits[agent] = end - start
    finish: dict[str, float] = {}

    def finish_of(agent: str, seen: tuple[str, ...] = ()) -> float:
        if agent in finish:
            return finish[agent]
        if agent in seen:
            raise ValueError(f"dependency cycle through {agent!r}")
        deps = depends_on.get(agent, ())
        value = waits.get(agent, 0.0) + max(
            (finish_of(d, (*seen, agent)) for d in deps), default=0.0
        )
        finish[agent] = value
        return value

    agents = max((finish_of(a) for a in set(depends_on) | set(waits)), default=0.0)
    first = min((s.start for group in spans.values() for s in group), default=root.end)
    return ActionTiming(total, agents, total - agents, first - root.start, state_update)


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far, in bytes (0 where unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


@final
@attrs.frozen
class LoadResult:
    """What a load run measured. Times in seconds; see the module docstring for
    the definitions of ``overhead`` and ``agent_lag``."""

    backend: str
    sessions: int
    actions_per_session: int
    time_scale: float
    think_time: float
    max_concurrent_agents: int
    configured_max_concurrent_agents: int
    expected_actions: int
    completed_actions: int
    failed_actions: int
    stored_actions: int
    lost_actions: int
    mismatched_sessions: int  # stored count != completed, or transcript out of order
    degraded_actions: int
    wall_seconds: float
    throughput: float  # completed actions per second of wall time
    peak_rss_bytes: int
    rss_before_bytes: int  # peak RSS once the engine was open, before the load
    operations: Mapping[str, Figures]
    overhead: Figures
    agent_critical_path: Figures
    before_agents: Figures
    state_write: Figures  # the state_update span of each action
    agent_lag: Figures
    errors: tuple[str, ...]  # the first few distinct failure messages

    @property
    def no_loss(self) -> bool:
        return self.lost_actions == 0 and self.mismatched_sessions == 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in attrs.fields(LoadResult):
            value = getattr(self, field.name)
            if isinstance(value, Figures):
                value = value.as_dict()
            elif field.name == "operations":
                value = {name: f.as_dict() for name, f in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        out["no_loss"] = self.no_loss
        return out


def load_config(config: Config, sessions: int) -> Config:
    """``config`` with the agent limiter sized for ``sessions`` players (4 each)."""
    par = config.performance.parallelization
    wanted = max(par.max_concurrent_agents, 4 * sessions)
    par = attrs.evolve(par, max_concurrent_agents=wanted)
    return attrs.evolve(config, performance=attrs.evolve(config.performance, parallelization=par))


@final
@attrs.define(eq=False)
class _Tally:
    """Per-action measurements, folded in as actions finish (spans are not kept)."""

    config: Config
    time_scale: float
    progress: Callable[[int], None] | None
    completed: dict[str, list[tuple[int, str]]] = attrs.field(factory=dict)
    failed: int = 0
    degraded: int = 0
    errors: list[str] = attrs.field(factory=list)
    timings: list[ActionTiming] = attrs.field(factory=list)
    lags: list[float] = attrs.field(factory=list)

    def done(self, session_id: str, text: str, result: ActionResult) -> None:
        self.completed.setdefault(session_id, []).append((result.turn, text))
        if result.degraded:
            self.degraded += 1
        names = list(result.responses)
        chosen = set(names)
        deps = {n: tuple(d for d in self.config.agents[n].depends_on if d in chosen) for n in names}
        self.timings.append(action_timing(result.span, deps))
        self._lags(result)
        if self.progress is not None:
            self.progress(1)

    def _lags(self, result: ActionResult) -> None:
        for span in result.span.walk():
            if span.name != "agent_query" or span.status != OK or span.end is None:
                continue
            drawn = span.attributes.get("simulated_latency")
            if isinstance(drawn, float):  # what the simulated agent slept, time_scale included
                self.lags.append(span.end - span.start - drawn)

    def fail(self, exc: Exception) -> None:
        self.failed += 1
        message = f"{type(exc).__name__}: {exc}"
        if message not in self.errors and len(self.errors) < 5:
            self.errors.append(message)
        if self.progress is not None:
            self.progress(1)


async def run_load_test(
    config: Config,
    *,
    sessions: int,
    actions_per_session: int = 5,
    time_scale: float = 0.02,
    think_time: float = 10.0,
    state_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Play ``sessions`` concurrent sessions on one engine; measure and verify.

    Args:
        config: the configuration; its agent limiter is raised to ``4 x sessions``
            (see the module docstring), everything else is used as is.
        sessions: concurrent sessions (>= 1).
        actions_per_session: actions each session plays (>= 1).
        time_scale: multiplies the simulated agents' latencies (> 0).
        think_time: mean real seconds a player waits between actions (>= 0).
        state_path: the session store file; default a fresh temporary file.
        progress: called with 1 each time an action finishes (or fails).

    Raises:
        ValueError: a count or time below its minimum.
    """
    check_load_args(sessions, actions_per_session, time_scale, think_time)
    with contextlib.ExitStack() as stack:
        if state_path is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="dm-load-"))
            state_path = Path(folder) / "sessions.sqlite"
        return await _run(
            config,
            sessions,
            actions_per_session,
            time_scale,
            think_time,
            Path(state_path),
            progress,
        )


async def _run(
    config: Config,
    sessions: int,
    actions: int,
    time_scale: float,
    think_time: float,
    state_path: Path,
    progress: Callable[[int], None] | None,
) -> LoadResult:
    configured = config.performance.parallelization.max_concurrent_agents
    config = with_overrides(load_config(config, sessions), None, None, time_scale=time_scale)
    # every action's span tree is needed for its overhead: sample them all
    profiler = PerformanceProfiler(config.targets, 1.0, clock=anyio.current_time)
    tally = _Tally(config, time_scale, progress)
    run_id = uuid.uuid4().hex[:8]  # fresh session ids, also on a reused state file
    ids = [f"load-{run_id}-{i:05d}" for i in range(sessions)]
    sent: dict[str, list[str]] = {sid: [] for sid in ids}
    seed = config.simulation.seed

    async with open_engine(config, state_path=state_path, profiler=profiler) as dm:
        rss_before = peak_rss_bytes()

        async def play(index: int) -> None:
            sid = ids[index]
            rng = random.Random(f"{seed}:{index}")
            if think_time > 0:
                await anyio.sleep(rng.uniform(0.0, think_time))
            for step in range(actions):
                if step and think_time > 0:
                    await anyio.sleep(think_time * rng.uniform(0.5, 1.5))
                text = SCRIPT[(index + step) % len(SCRIPT)]
                sent[sid].append(text)
                try:
                    result = await dm.player_action(sid, text)
                except Exception as exc:  # an action failed; the others go on
                    tally.fail(exc)
                    continue
                tally.done(sid, text, result)

        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for index in range(len(ids)):
                tg.start_soon(play, index)
        wall = anyio.current_time() - started

        stored = 0
        mismatched = 0
        for sid in ids:
            done = tally.completed.get(sid, [])
            try:
                count = await dm.store.count_actions(sid)
                transcript = await dm.store.transcript(sid)
            except Exception:  # the session was never created: nothing stored
                count, transcript = 0, []
            stored += count
            recorded = [(e.turn, e.action_text) for e in transcript]
            expected_turns = list(range(1, len(done) + 1))
            if (
                count != len(done)
                or recorded != done
                or [turn for turn, _ in done] != expected_turns
            ):
                mismatched += 1
        report = profiler.get_report()

    completed = sum(len(v) for v in tally.completed.values())
    expected = sessions * actions
    operations = {
        name: Figures(count=s.count, p50=s.p50, p95=s.p95, p99=s.p99, mean=s.mean, max=s.max)
        for name in OPERATIONS
        if (s := report.operations.get(name)) is not None
    }
    timings = tally.timings
    return LoadResult(
        backend=_backend(),
        sessions=sessions,
        actions_per_session=actions,
        time_scale=time_scale,
        think_time=think_time,
        max_concurrent_agents=config.performance.parallelization.max_concurrent_agents,
        configured_max_concurrent_agents=configured,
        expected_actions=expected,
        completed_actions=completed,
        failed_actions=tally.failed,
        stored_actions=stored,
        lost_actions=expected - stored,
        mismatched_sessions=mismatched,
        degraded_actions=tally.degraded,
        wall_seconds=wall,
        throughput=completed / wall if wall > 0 else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
        rss_before_bytes=rss_before,
        operations=operations,
        overhead=Figures.of([t.overhead for t in timings]),
        agent_critical_path=Figures.of([t.agents for t in timings]),
        before_agents=Figures.of([t.before_agents for t in timings]),
        state_write=Figures.of([t.state_update for t in timings]),
        agent_lag=Figures.of(tally.lags),
        errors=tuple(tally.errors),
    )


def _backend() -> str:
    try:
        import sniffio

        return sniffio.current_async_library()
    except Exception:  # pragma: no cover - not inside an event loop
        return "unknown"
