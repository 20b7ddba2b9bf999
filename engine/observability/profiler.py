"""The performance profiler: nested spans, per-operation latency sketches, targets.

``trace()`` opens a span; spans nest through a context variable, so a span opened
in a task started inside another span's nursery (trio) or task group (anyio,
asyncio) is that span's child — the context is copied when the task is started.
A span without a parent is a *root*: it decides whether its whole tree is sampled
(``sample_rate``), never half a tree. Every finished sampled span adds its duration
to its operation's :class:`~engine.observability.sketch.QuantileSketch` (bounded
memory); every finished root is handed to the listeners (span log, metrics).

Durations of every status are recorded: an ``"error"`` or ``"cancelled"`` span
still cost its caller that time, and leaving it out would flatter the tail.

The profiler is used from one event-loop thread (not thread-safe), and it does no
I/O and never awaits, so it is cancellation-safe by construction.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from ..config import DEFAULT_TARGETS, LatencyTarget
from .sketch import QuantileSketch

if TYPE_CHECKING:
    from ..config import Config

__all__ = [
    "Bottleneck",
    "OperationStats",
    "PerformanceProfiler",
    "PerformanceReport",
    "Span",
    "critical_path",
]

log = logging.getLogger(__name__)

#: Span statuses.
OK, ERROR, CANCELLED = "ok", "error", "cancelled"
_CANCELLED_TYPES: tuple[type[BaseException], ...] = (trio.Cancelled, asyncio.CancelledError)

SpanListener = Callable[["Span"], object]
SampleListener = Callable[[str, float, str], object]


@final
class Span:
    """One timed operation and its children; also the context manager that times it.

    ``start``/``end`` are readings of the profiler's clock (``end`` is None while the
    span runs). ``sampled`` is False for spans of an unsampled tree (nothing of them
    is recorded). ``attributes`` may be updated while the span is open. ``status``
    is ``"running"``, then ``"ok"``, ``"error"`` or ``"cancelled"``.

    A plain ``__slots__`` class rather than attrs: it is created on the hot path and
    a hand-written ``__init__`` that sets only what it needs is measurably cheaper.
    A span is entered once.
    """

    __slots__ = (
        "_parent",
        "_profiler",
        "_token",
        "attributes",
        "children",
        "end",
        "name",
        "sampled",
        "start",
        "status",
    )
    _parent: Span | None
    _token: contextvars.Token[Span | None] | None

    def __init__(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        start: float = 0.0,
        *,
        end: float | None = None,
        status: str = "running",
        sampled: bool = True,
        children: list[Span] | None = None,
        _profiler: PerformanceProfiler | None = None,
    ) -> None:
        self.name = name
        self.attributes = {} if attributes is None else attributes
        self.start = start
        self.end = end
        self.status = status
        self.sampled = sampled
        self.children = [] if children is None else children
        self._profiler = _profiler

    def __repr__(self) -> str:
        return (
            f"Span({self.name!r}, status={self.status!r}, duration={self.duration!r}, "
            f"children={len(self.children)})"
        )

    def __enter__(self) -> Span:
        prof = self._profiler
        if prof is None:
            raise TypeError("this span was not created by PerformanceProfiler.trace()")
        current = prof._current
        parent = current.get()
        if parent is None:
            rate = prof.sample_rate
            sampled = prof.enabled and (rate >= 1.0 or prof._rng.random() < rate)
        else:
            sampled = parent.sampled
            if sampled:
                parent.children.append(self)
        self.sampled = sampled
        self._parent = parent
        self._token = current.set(self)
        self.start = prof._clock()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        prof = self._profiler
        assert prof is not None and self._token is not None, "span exited but not entered"
        self.end = prof._clock()
        prof._current.reset(self._token)
        if exc_type is None:
            self.status = OK
        elif issubclass(exc_type, _CANCELLED_TYPES):
            self.status = CANCELLED
        else:
            self.status = ERROR
        parent = self._parent
        self._parent = self._token = self._profiler = None  # no reference cycles
        if self.sampled:
            prof._finish(self, parent is None)

    async def __aenter__(self) -> Span:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    @property
    def duration(self) -> float | None:
        """Seconds from start to end, None while running."""
        return None if self.end is None else self.end - self.start

    def walk(self) -> Iterator[Span]:
        """This span and its descendants, depth first, parents before children."""
        stack = [self]
        while stack:
            span = stack.pop()
            yield span
            stack.extend(reversed(span.children))

    def to_dict(self, origin: float | None = None) -> dict[str, Any]:
        """A JSON-ready tree: name, attributes, offset (from ``origin``, default this
        span's start), duration, status, children."""
        base = self.start if origin is None else origin
        return {
            "name": self.name,
            "attributes": dict(self.attributes),
            "offset": self.start - base,
            "duration": self.duration,
            "status": self.status,
            "children": [c.to_dict(base) for c in self.children],
        }


@attrs.frozen
class _Step:
    """A candidate of the critical path among a span's children.

    For an agent (``agent_query`` spans with an ``agent`` attribute) it is the
    winning attempt, ``ready`` the start of its first attempt (a hedge starts only
    after the hedge delay, which is not a dependency); for any other span it is the
    span itself, ``ready`` its start.
    """

    span: Span
    ready: float
    end: float
    agent: str | None


def _steps(children: Sequence[Span]) -> list[_Step]:
    """The candidates among ``children`` in the order they ended: every finished span
    that is not an agent attempt, and one step per agent call (attempt 1 and the
    hedges after it). Equal ends are ordered by start (a zero-length span that
    starts when another ends comes after it), then by position among the children."""
    keyed: list[tuple[float, float, int, _Step]] = []
    calls: list[tuple[int, str, list[Span]]] = []
    open_call: dict[str, list[Span]] = {}
    order = sorted(range(len(children)), key=lambda i: children[i].start)
    for i in order:
        child = children[i]
        agent = child.attributes.get("agent") if child.name == "agent_query" else None
        if not isinstance(agent, str):
            if child.end is not None:
                keyed.append(
                    (child.end, child.start, i, _Step(child, child.start, child.end, None))
                )
            continue
        attempts = open_call.get(agent)
        if attempts is None or child.attributes.get("attempt", 1) == 1:
            attempts = open_call[agent] = []
            calls.append((i, agent, attempts))
        attempts.append(child)
    for i, agent, attempts in calls:
        ended = [a for a in attempts if a.end is not None]
        ok = [a for a in ended if a.status == OK]
        # the first attempt to succeed won; when none did, the call ended with the last
        if ok:
            winner = min(ok, key=lambda a: a.end or 0.0)
        elif ended:
            winner = max(ended, key=lambda a: a.end or 0.0)
        else:
            continue
        assert winner.end is not None
        step = _Step(winner, attempts[0].start, winner.end, agent)
        keyed.append((winner.end, winner.start, i, step))
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]


def critical_path(root: Span, depends_on: Mapping[str, Iterable[str]] | None = None) -> list[Span]:
    """The spans that determined ``root``'s end, outermost first.

    From a span's end, walk back through its children: the child that ended last
    (before the current cut) is critical, the cut moves to its start, repeat; then
    recurse into each critical child. Unfinished children are ignored.

    Agent calls are told apart from their hedges: the ``agent_query`` spans of one
    call (same ``agent``; ``attempt`` 1, then 2 for a hedge) count as one step. The
    winning attempt (the first to end ``ok``) is on the path, a losing one never is,
    and the cut moves to the start of the *first* attempt, when the agent was
    admitted: a hedge starts after the hedge delay, and whatever ended just before
    it did not hold it up.

    Args:
        root: the span tree (e.g. a ``player_action``).
        depends_on: agent name → the agents whose outputs it waits for, as
            configured (``{n: a.depends_on for n, a in config.agents.items()}``).
            An agent named here is preceded on the path by its dependency that
            ended last (among those in the tree), rather than by whichever span
            ended last before it started; an agent with no dependency in the tree
            by the last span before it that is not an agent (``context_building``).
            Agents not named, and every agent when it is None, are inferred from
            the timing as above. (Waiting for a free agent slot is not a
            dependency: the spans do not show it.)
    """
    path = [root]
    if root.end is None:
        return path
    steps = _steps(root.children)

    def last_before(below: int, cut: float, agents: Iterable[str] | None = None) -> int:
        """The index under ``below`` of the last step that ended by ``cut`` (-1: none);
        with ``agents``, only steps of those agents or, if none, of no agent."""
        wanted = None if agents is None else set(agents)
        fallback = -1
        for i in range(below - 1, -1, -1):
            st = steps[i]
            if st.end > cut:
                continue
            if wanted is None or st.agent in wanted:
                return i
            if fallback < 0 and st.agent is None:
                fallback = i
        return fallback

    chosen: list[_Step] = []
    i = last_before(len(steps), root.end)
    while i >= 0:
        step = steps[i]
        chosen.append(step)
        deps = None if depends_on is None or step.agent is None else depends_on.get(step.agent)
        i = last_before(i, step.ready, deps)
    for step in reversed(chosen):
        path.extend(critical_path(step.span, depends_on))
    return path


@final
@attrs.frozen
class OperationStats:
    """Latency statistics of one operation, in seconds.

    ``met`` is None when the operation has no target, else whether every percentile
    is within its target.
    """

    operation: str
    count: int
    mean: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float
    errors: int
    cancelled: int
    target: LatencyTarget | None
    met: bool | None


@final
@attrs.frozen
class Bottleneck:
    """One operation over its target: the percentile with the worst overshoot."""

    operation: str
    percentile: str  # "p50", "p95" or "p99"
    observed: float
    target: float

    @property
    def ratio(self) -> float:
        return self.observed / self.target

    def __str__(self) -> str:
        return (
            f"{self.operation}: {self.percentile} {self.observed:.3f} s > target "
            f"{self.target:.3f} s ({self.ratio:.2f}x)"
        )


@final
@attrs.frozen
class PerformanceReport:
    """A snapshot of every operation with samples, in name order."""

    operations: Mapping[str, OperationStats]
    bottlenecks: tuple[Bottleneck, ...]

    def __getitem__(self, operation: str) -> OperationStats:
        return self.operations[operation]

    @property
    def all_met(self) -> bool:
        return not self.bottlenecks


def _merge_targets(targets: Mapping[str, LatencyTarget] | None) -> dict[str, LatencyTarget]:
    merged = dict(DEFAULT_TARGETS)
    if targets:
        merged.update(targets)
    return merged


@final
@attrs.define(eq=False, repr=False)
class PerformanceProfiler:
    """Traces spans and keeps bounded-memory latency statistics per operation.

    Args:
        targets: latency targets per operation; merged over ``DEFAULT_TARGETS``
            (an operation named here replaces only that operation's target).
        sample_rate: fraction of root spans whose whole tree is recorded, 0.0..1.0.
        enabled: False makes ``trace`` and ``record`` record nothing.
        seed: seeds the sampling decisions (reproducible sampling).
        clock: the time source, default ``time.perf_counter``; pass
            ``anyio.current_time`` to record virtual latencies under a mock clock.
        alpha: relative accuracy of the per-operation sketches.
    """

    targets: Mapping[str, LatencyTarget] = attrs.field(default=None, converter=_merge_targets)
    sample_rate: float = attrs.field(default=1.0)
    enabled: bool = attrs.field(default=True, kw_only=True)
    seed: int | None = attrs.field(default=None, kw_only=True)
    clock: Callable[[], float] = attrs.field(default=time.perf_counter, kw_only=True)
    alpha: float = attrs.field(default=0.005, kw_only=True)

    _clock: Callable[[], float] = attrs.field(init=False)
    _rng: random.Random = attrs.field(init=False)
    _current: contextvars.ContextVar[Span | None] = attrs.field(init=False)
    _sketches: dict[str, QuantileSketch] = attrs.field(factory=dict, init=False)
    _statuses: dict[tuple[str, str], int] = attrs.field(factory=dict, init=False)
    _slowest: dict[str, Span] = attrs.field(factory=dict, init=False)
    _listeners: list[SpanListener] = attrs.field(factory=list, init=False)
    _sample_listeners: list[SampleListener] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be between 0.0 and 1.0, got {self.sample_rate!r}")
        self._clock = self.clock
        self._rng = random.Random(self.seed)
        self._current = contextvars.ContextVar(f"dm_engine_span_{id(self):x}", default=None)

    def __repr__(self) -> str:
        return (
            f"PerformanceProfiler(operations={sorted(self._sketches)}, "
            f"sample_rate={self.sample_rate}, enabled={self.enabled})"
        )

    @classmethod
    def from_config(cls, config: Config, **kwargs: Any) -> PerformanceProfiler:
        """A profiler with the targets, ``sample_rate`` and ``enabled`` of ``config``;
        ``kwargs`` (e.g. ``clock``, ``seed``) are passed through."""
        profiling = config.performance.profiling
        kwargs.setdefault("enabled", profiling.enabled)
        return cls(config.targets, profiling.sample_rate, **kwargs)

    # ------------------------------------------------------------------ tracing

    def trace(self, operation: str, **attributes: Any) -> Span:
        """A context manager (``with`` or ``async with``) timing ``operation``.

        It returns (and ``with`` yields) the :class:`Span`; the span's parent is the span current in this
        context. On exit the status is ``"ok"``, ``"error"`` (an exception) or
        ``"cancelled"`` (trio.Cancelled / asyncio.CancelledError); the exception
        always propagates.
        """
        return Span(operation, attributes, _profiler=self)

    def current_span(self) -> Span | None:
        """The innermost open span of this context, if any."""
        return self._current.get()

    def record(self, operation: str, seconds: float, status: str = OK) -> None:
        """Record one latency sample directly (no span, no sampling decision).

        Raises:
            ValueError: ``seconds`` is negative or not finite.
        """
        if not self.enabled:
            return
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        self._add(operation, seconds, status)

    def _add(self, operation: str, seconds: float, status: str) -> None:
        sketch = self._sketches.get(operation)
        if sketch is None:
            sketch = self._sketches[operation] = QuantileSketch(alpha=self.alpha)
        sketch.add(seconds)
        if status != OK:
            key = (operation, status)
            self._statuses[key] = self._statuses.get(key, 0) + 1
        for sample_listener in self._sample_listeners:
            sample_listener(operation, seconds, status)

    def _finish(self, span: Span, is_root: bool) -> None:
        assert span.end is not None
        duration = span.end - span.start
        self._add(span.name, max(duration, 0.0), span.status)
        if not is_root:
            return
        slowest = self._slowest.get(span.name)
        if slowest is None or duration > (slowest.duration or 0.0):
            self._slowest[span.name] = span
        for listener in self._listeners:
            try:
                listener(span)
            except Exception:
                log.exception("span listener %r failed", listener)

    # ------------------------------------------------------------------ listeners

    def add_listener(self, listener: SpanListener) -> Callable[[], None]:
        """Call ``listener(root_span)`` for every finished sampled root span.

        Listeners run synchronously on the event loop; they must be quick (buffer,
        never block). An exception in a listener is logged, not raised. Returns a
        function that removes the listener.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def add_sample_listener(self, listener: SampleListener) -> Callable[[], None]:
        """Call ``listener(operation, seconds, status)`` for every recorded sample
        (finished sampled spans and :meth:`record`). Returns a remover."""
        self._sample_listeners.append(listener)
        return lambda: self._sample_listeners.remove(listener)

    # ------------------------------------------------------------------ queries

    @property
    def operations(self) -> list[str]:
        """Operations with at least one sample, sorted."""
        return sorted(self._sketches)

    def count(self, operation: str) -> int:
        """Samples recorded for ``operation`` (0 if none)."""
        sketch = self._sketches.get(operation)
        return 0 if sketch is None else sketch.count

    def sketch(self, operation: str) -> QuantileSketch | None:
        """The live sketch of ``operation`` (read it, do not add to it)."""
        return self._sketches.get(operation)

    def slowest_trace(self, operation: str = "player_action") -> Span | None:
        """The slowest finished sampled root span named ``operation`` (kept, one per name)."""
        return self._slowest.get(operation)

    def get_percentile(self, operation: str, p: float) -> float:
        """The ``p``-th percentile (0..100) of ``operation``'s latency, in seconds.

        Raises:
            KeyError: no sample of ``operation`` was recorded.
            ValueError: ``p`` is outside 0..100.
        """
        if not 0.0 <= p <= 100.0:
            raise ValueError(f"percentile must be between 0 and 100, got {p!r}")
        sketch = self._sketches.get(operation)
        if sketch is None:
            raise KeyError(f"no samples recorded for operation {operation!r}")
        return sketch.quantile(p / 100.0)

    def get_report(self) -> PerformanceReport:
        """Count, mean, min, max, p50/p95/p99 and the target verdict of each operation."""
        ops: dict[str, OperationStats] = {}
        for name in sorted(self._sketches):
            s = self._sketches[name]
            p50, p95, p99 = s.quantile(0.5), s.quantile(0.95), s.quantile(0.99)
            target = self.targets.get(name)
            met = None
            if target is not None:
                met = p50 <= target.p50 and p95 <= target.p95 and p99 <= target.p99
            ops[name] = OperationStats(
                operation=name,
                count=s.count,
                mean=s.mean,
                min=s.min,
                max=s.max,
                p50=p50,
                p95=p95,
                p99=p99,
                errors=self._statuses.get((name, ERROR), 0),
                cancelled=self._statuses.get((name, CANCELLED), 0),
                target=target,
                met=met,
            )
        return PerformanceReport(ops, tuple(self.bottlenecks()))

    def bottlenecks(self) -> list[Bottleneck]:
        """Operations over a target, worst overshoot ratio first; for each, the
        percentile with the largest ratio (ties: the higher percentile)."""
        found: list[Bottleneck] = []
        for name, sketch in self._sketches.items():
            target = self.targets.get(name)
            if target is None:
                continue
            worst: Bottleneck | None = None
            for label, q, limit in (
                ("p99", 0.99, target.p99),
                ("p95", 0.95, target.p95),
                ("p50", 0.50, target.p50),
            ):
                observed = sketch.quantile(q)
                if observed > limit:
                    b = Bottleneck(name, label, observed, limit)
                    if worst is None or b.ratio > worst.ratio:
                        worst = b
            if worst is not None:
                found.append(worst)
        found.sort(key=lambda b: (-b.ratio, b.operation))
        return found

    def identify_bottlenecks(self) -> list[str]:
        """``bottlenecks()`` as sentences, e.g.
        ``"agent_query: p99 6.200 s > target 5.000 s (1.24x)"``."""
        return [str(b) for b in self.bottlenecks()]

    def reset(self) -> None:
        """Forget every sample and kept span (listeners stay)."""
        self._sketches.clear()
        self._statuses.clear()
        self._slowest.clear()
