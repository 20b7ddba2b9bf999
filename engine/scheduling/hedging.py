"""Hedged requests: when to send a second attempt, and how many we can afford.

"The Tail at Scale" (Dean & Barroso, 2013): send a second copy of a request once the
first has been outstanding longer than the 95th-percentile latency, use whichever
answers first, cancel the other. A budget (a token bucket, like gRPC's hedging
throttle) caps the extra load: every call earns ``budget_fraction`` of a token, a
hedge spends one, so hedges never exceed ``budget_fraction`` x calls.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import final

import attrs

from ..config import Config
from ..quantiles import nearest_rank

__all__ = ["HedgePolicy", "HedgeStatistics"]

HedgeAfter = float | str  # seconds, "p95" or "off"


@attrs.frozen
class HedgeStatistics:
    calls: int
    hedges_sent: int
    hedges_won: int
    tokens: float


@final
@attrs.define(eq=False)
class _RunningP95:
    """The p95 of an agent's last ``size`` latencies, refreshed every ``refresh_every`` adds."""

    size: int = 200
    refresh_every: int = 16
    _window: deque[float] = attrs.field(init=False)
    _count: int = attrs.field(default=0, init=False)
    _value: float | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._window = deque(maxlen=self.size)

    def add(self, seconds: float) -> None:
        self._window.append(seconds)
        self._count += 1
        if self._value is None or self._count % self.refresh_every == 0:
            ordered = sorted(self._window)
            self._value = ordered[nearest_rank(0.95, len(ordered))]

    def value(self, min_samples: int) -> float | None:
        return self._value if len(self._window) >= min_samples else None


@final
@attrs.define(eq=False)
class HedgePolicy:
    """Per-agent hedge delays plus the shared hedge budget.

    Args:
        hedge_after: agent name -> seconds, ``"p95"`` (the agent's running p95 of
            recent calls, once ``min_samples`` are known) or ``"off"``. Agents not
            named are never hedged.
        budget_fraction: hedges may not exceed this fraction of calls.
        min_samples: observations needed before ``"p95"`` hedging starts.
        p95_source: optional override of the running p95 (e.g. the profiler's).
    """

    hedge_after: Mapping[str, HedgeAfter]
    budget_fraction: float = 0.1
    min_samples: int = 20
    max_tokens: float = 10.0
    p95_source: Callable[[str], float | None] | None = None
    _tokens: float = attrs.field(default=0.0, init=False)
    _calls: int = attrs.field(default=0, init=False)
    _sent: int = attrs.field(default=0, init=False)
    _won: int = attrs.field(default=0, init=False)
    _p95: dict[str, _RunningP95] = attrs.field(factory=dict, init=False)

    @classmethod
    def from_config(cls, config: Config) -> HedgePolicy | None:
        """The policy of ``config``, or None when hedging is disabled."""
        hedging = config.performance.hedging
        if not hedging.enabled:
            return None
        return cls(
            hedge_after={name: a.hedge_after for name, a in config.agents.items()},
            budget_fraction=hedging.budget_fraction,
            min_samples=hedging.min_samples,
        )

    def delay_for(self, agent: str) -> float | None:
        """Seconds to wait before hedging a call of ``agent``; None: do not hedge."""
        setting = self.hedge_after.get(agent, "off")
        if setting == "off":
            return None
        if setting == "p95":
            if self.p95_source is not None:
                value = self.p95_source(agent)
            else:
                tracker = self._p95.get(agent)
                value = None if tracker is None else tracker.value(self.min_samples)
            # an agent that answers at once (e.g. from retrieval) is never worth a hedge
            return value if value is not None and value > 0 else None
        assert isinstance(setting, float | int)
        return float(setting)

    def on_call(self) -> None:
        """A call started: it earns its share of the budget."""
        self._calls += 1
        self._tokens = min(self.max_tokens, self._tokens + self.budget_fraction)

    def try_spend(self) -> bool:
        """Take one hedge from the budget; False when the budget is exhausted."""
        if self._tokens < 1.0 - 1e-9:  # tolerate float drift of n x budget_fraction
            return False
        self._tokens -= 1.0
        self._sent += 1
        return True

    def observe(self, agent: str, seconds: float) -> None:
        """Record a successful attempt's latency (feeds ``"p95"`` delays)."""
        tracker = self._p95.get(agent)
        if tracker is None:
            tracker = self._p95[agent] = _RunningP95()
        tracker.add(seconds)

    def record_hedge_win(self) -> None:
        """The hedge answered before the first attempt."""
        self._won += 1

    def statistics(self) -> HedgeStatistics:
        return HedgeStatistics(self._calls, self._sent, self._won, self._tokens)
