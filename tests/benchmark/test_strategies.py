"""The scheduling comparison: same draws for every strategy, eager == critical path."""

from __future__ import annotations

import attrs
import pytest

from engine.benchmark.strategies import action_requests, compare_strategies, run_virtual
from engine.config import Config
from engine.quantiles import percentile


@pytest.mark.parametrize("scenario", ["targets", "hosted"])
def test_strategies_on_the_same_draws(scenario: str) -> None:
    config = Config()
    config = attrs.evolve(config, simulation=attrs.evolve(config.simulation, scenario=scenario))
    results = run_virtual(compare_strategies, config, 200)
    seq, barrier, eager = results["sequential"], results["level_barrier"], results["eager"]
    bound = results["critical_path"]
    # eager dispatch reaches the physical limit exactly (virtual time, no noise;
    # only float rounding of the clock's absolute times differs)
    exact = pytest.approx((bound.p50, bound.p95, bound.p99, bound.mean), rel=1e-12)
    assert (eager.p50, eager.p95, eager.p99, eager.mean) == exact
    # every action: sequential >= barrier >= eager, so the aggregates order too
    assert seq.mean >= barrier.mean >= eager.mean
    assert barrier.mean > eager.mean  # the default DAG has a fast chain beside a slow sibling
    assert seq.agent_calls == barrier.agent_calls == eager.agent_calls == 200 * 4
    hedged = results["eager_hedged"]
    assert eager.agent_calls < hedged.agent_calls <= eager.agent_calls * 1.1 + 1


def test_strategy_draws_are_reproducible() -> None:
    config = Config()
    a = run_virtual(compare_strategies, config, 50)
    b = run_virtual(compare_strategies, config, 50)
    assert a == b


def test_action_requests_follow_config() -> None:
    config = Config()
    requests = action_requests(config, "roleplay", "k")
    assert [r.agent for r in requests] == list(config.actions["roleplay"])
    narrator = next(r for r in requests if r.agent == "narrator")
    # arbiter is not part of roleplay, so that dependency is dropped
    assert config.agents["narrator"].depends_on == ("arbiter",)
    assert narrator.depends_on == ()
    combat = {r.agent: r.depends_on for r in action_requests(config, "combat", "k")}
    assert combat["narrator"] == ("arbiter",) and combat["arbiter"] == ("archivist",)


def test_percentile_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50, 95, 99)
    assert percentile([], 50) == 0.0
    assert percentile([3.0], 99) == 3.0
