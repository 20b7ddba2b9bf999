"""Configuration: the shipped file equals the defaults; bad input names key, value, reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import engine
from engine.config import parse_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_equals_builtin_defaults() -> None:
    assert engine.load_config(ROOT / "config.toml") == engine.Config()


def test_config_is_frozen() -> None:
    config = engine.Config()
    with pytest.raises(AttributeError):
        config.performance = None  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.agents["x"] = None  # type: ignore[index]


def test_partial_targets_merge_with_defaults() -> None:
    config = parse_config({"performance": {"targets": {"player_action": {"p95": 8.0}}}})
    target = config.targets["player_action"]
    assert (target.p50, target.p95, target.p99) == (3.0, 8.0, 15.0)
    assert config.targets["agent_query"] == engine.Config().targets["agent_query"]


def test_new_operation_target_is_added() -> None:
    config = parse_config({"performance": {"targets": {"dice": {"p50": 1, "p95": 2, "p99": 3}}}})
    assert config.targets["dice"].p99 == 3.0
    assert "player_action" in config.targets


def test_integers_accepted_for_floats() -> None:
    config = parse_config({"performance": {"cache": {"max_size_mb": 8}}})
    assert config.performance.cache.max_size_mb == 8.0


def test_agents_for_falls_back_to_other() -> None:
    config = engine.Config()
    assert config.agents_for("no-such-type") == config.actions["other"]


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"bogus": 1}, "bogus", "unknown key"),
    (
        {"performance": {"profiling": {"sample_rate": 1.5}}},
        "performance.profiling.sample_rate",
        "between 0.0 and 1.0",
    ),
    (
        {"performance": {"profiling": {"sample_rate": -0.1}}},
        "performance.profiling.sample_rate",
        "between 0.0 and 1.0",
    ),
    (
        {"performance": {"profiling": {"enabled": "yes"}}},
        "performance.profiling.enabled",
        "true or false",
    ),
    ({"performance": {"cache": {"max_size_mb": -5}}}, "performance.cache.max_size_mb", "> 0"),
    (
        {"performance": {"cache": {"max_size_mb": "big"}}},
        "performance.cache.max_size_mb",
        "a number",
    ),
    ({"performance": {"cache": {"ttl_minutes": 0}}}, "performance.cache.ttl_minutes", "> 0"),
    ({"performance": {"cache": {"colour": "red"}}}, "performance.cache.colour", "unknown key"),
    (
        {"performance": {"parallelization": {"max_concurrent_agents": 2.5}}},
        "performance.parallelization.max_concurrent_agents",
        "an integer",
    ),
    (
        {"performance": {"parallelization": {"max_concurrent_agents": 0}}},
        "performance.parallelization.max_concurrent_agents",
        "> 0",
    ),
    (
        {"performance": {"parallelization": {"agent_timeout_seconds": True}}},
        "performance.parallelization.agent_timeout_seconds",
        "a number",
    ),
    (
        {"performance": {"targets": {"agent_query": {"p50": 4.0}}}},
        "performance.targets.agent_query",
        "must not decrease",
    ),
    (
        {"performance": {"targets": {"agent_query": {"p95": 9.0}}}},
        "performance.targets.agent_query",
        "must not decrease",
    ),
    (
        {"performance": {"targets": {"new_op": {"p50": 1.0}}}},
        "performance.targets.new_op",
        "missing keys",
    ),
    ({"performance": {"targets": "fast"}}, "performance.targets", "a table"),
    (
        {"performance": {"lazy_loading": {"priorities": {"combat": "monsters"}}}},
        "performance.lazy_loading.priorities.combat",
        "a list",
    ),
    (
        {"agents": {"narrator": {"depends_on": ["ghost"]}}},
        "agents.narrator.depends_on",
        "unknown agent",
    ),
    (
        {"agents": {"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}}, "actions": {}},
        "depends_on",
        "dependency cycle",
    ),
    ({"agents": {"a": {"depends_on": ["a"]}}, "actions": {}}, "agents.a.depends_on", "itself"),
    ({"agents": {"narrator": {"backend": "gpt"}}}, "agents.narrator.backend", "one of"),
    ({"agents": {"narrator": {"hedge_after": "p99"}}}, "agents.narrator.hedge_after", '"p95"'),
    ({"agents": {"narrator": {"hedge_after": -1}}}, "agents.narrator.hedge_after", "seconds > 0"),
    ({"agents": {"narrator": {"depends_on": "arbiter"}}}, "agents.narrator.depends_on", "a list"),
    ({"actions": {"combat": ["narrator", "bard"]}}, "actions.combat", "unknown agent"),
    ({"simulation": {"scenario": "moon"}}, "simulation.scenario", "unknown scenario"),
    (
        {"scenarios": {"targets": {"straggler_probability": 2}}},
        "scenarios.targets.straggler_probability",
        "between",
    ),
    ({"state": {"max_action_chars": 0}}, "state.max_action_chars", "> 0"),
    ({"state": {"synchronous": "OFF"}}, "state.synchronous", "one of"),
]


@pytest.mark.parametrize(("raw", "key", "reason"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_config_names_key_value_and_reason(raw: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(engine.ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert key in info.value.key
    assert reason in message
    assert repr(info.value.value) in message


def test_bad_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[performance\n")
    with pytest.raises(engine.ConfigError, match="not valid TOML"):
        engine.load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(engine.ConfigError, match="no such file"):
        engine.load_config(tmp_path / "nope.toml")
