"""Configuration: the shipped file equals the defaults; bad input names key, value, reason."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

import engine
import engine.config
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


def test_target_of_an_unknown_operation_is_rejected() -> None:
    # a misspelt operation would otherwise set a target nothing measures
    with pytest.raises(engine.ConfigError, match="unknown operation; allowed: player_action"):
        parse_config({"performance": {"targets": {"dice": {"p50": 1, "p95": 2, "p99": 3}}}})


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
        "unknown operation",
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
    (
        {"performance": {"parallelization": {"global_spare_leases": -1}}},
        "performance.parallelization.global_spare_leases",
        ">= 0",
    ),
    (
        {"performance": {"parallelization": {"global_spare_leases": 2}}},
        "performance.parallelization.global_spare_leases",
        "at most global_max_concurrent_agents (0)",
    ),
    (
        {
            "performance": {
                "parallelization": {"global_spare_leases": 5, "global_max_concurrent_agents": 4}
            }
        },
        "performance.parallelization.global_spare_leases",
        "at most global_max_concurrent_agents (4)",
    ),
    (
        {
            "performance": {
                "parallelization": {
                    "global_spare_leases": 2,
                    "global_max_concurrent_agents": 4,
                    "global_requests_per_minute": 600.0,
                }
            }
        },
        "performance.parallelization.global_spare_leases",
        "must be 0 with global_requests_per_minute",
    ),
    ({"state": {"max_action_chars": 0}}, "state.max_action_chars", "> 0"),
    (
        {"performance": {"gc": {"young_threshold": -1}}},
        "performance.gc.young_threshold",
        "0: Python's own",
    ),
    ({"state": {"synchronous": "OFF"}}, "state.synchronous", "one of"),
    ({"state": {"write_in_thread": "sometimes"}}, "state.write_in_thread", 'true, false or "auto"'),
    ({"state": {"write_in_thread": 1}}, "state.write_in_thread", "true or false or a string"),
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


# --------------------------------------------------------------------------- hardening
# Everything that would fail at open or at the first action is rejected up front.

NAN, INF = float("nan"), float("inf")
HTTP_AGENT = {"backend": "openai", "model": "m"}

HARDENED: list[tuple[dict[str, Any], str, str]] = [
    # NaN, infinities and huge values
    (
        {"performance": {"parallelization": {"action_deadline_seconds": NAN}}},
        "performance.parallelization.action_deadline_seconds",
        "<= 86400",
    ),
    ({"agents": {"narrator": {"timeout_seconds": NAN}}}, "agents.narrator.timeout_seconds", "> 0"),
    ({"agents": {"narrator": {"hedge_after": NAN}}}, "agents.narrator.hedge_after", "<= 86400"),
    ({"agents": {"narrator": {"hedge_after": INF}}}, "agents.narrator.hedge_after", "<= 86400"),
    ({"performance": {"cache": {"ttl_minutes": NAN}}}, "performance.cache.ttl_minutes", "1440"),
    (
        {"scenarios": {"targets": {"ttft_median_seconds": NAN}}},
        "scenarios.targets.ttft_median_seconds",
        "finite",
    ),
    ({"performance": {"cache": {"max_size_mb": 1e308}}}, "performance.cache.max_size_mb", "1 TiB"),
    ({"performance": {"cache": {"max_size_mb": INF}}}, "performance.cache.max_size_mb", "finite"),
    (
        {"performance": {"cache": {"max_size_mb": 10**400}}},
        "performance.cache.max_size_mb",
        "finite",
    ),
    ({"scenarios": {"targets": {"ttft_sigma": 1e300}}}, "scenarios.targets.ttft_sigma", "<= 10"),
    (
        {"performance": {"targets": {"player_action": {"p99": INF}}}},
        "performance.targets.player_action.p99",
        "86400",
    ),
    (
        {"performance": {"monitoring": {"span_log_backups": 10**12}}},
        "performance.monitoring.span_log_backups",
        "between 0 and 1000",
    ),
    (
        {"performance": {"hedging": {"min_samples": 201}}},
        "performance.hedging.min_samples",
        "between 0 and 200",
    ),
    ({"simulation": {"seed": 2**64}}, "simulation.seed", "64-bit"),
    # the metrics endpoint
    (
        {"performance": {"monitoring": {"metrics_port": 70000}}},
        "performance.monitoring.metrics_port",
        "between 0 and 65535",
    ),
    (
        {"performance": {"monitoring": {"metrics_port": -1}}},
        "performance.monitoring.metrics_port",
        "between 0 and 65535",
    ),
    (
        {"performance": {"monitoring": {"metrics_host": ""}}},
        "performance.monitoring.metrics_host",
        "not empty",
    ),
    # NUL characters (os and sqlite reject them at open)
    (
        {"performance": {"monitoring": {"span_log_path": "a\x00b"}}},
        "performance.monitoring.span_log_path",
        "NUL",
    ),
    ({"module": {"cache_dir": "a\x00b"}}, "module.cache_dir", "NUL"),
    ({"module": {"name": "a\x00b"}}, "module.name", "NUL"),
    ({"module": {"name": ""}}, "module.name", "must not be empty"),
    ({"state": {"path": "a\x00b"}}, "state.path", "NUL"),
    ({"agents": {"narrator": {"api_key_env": "K\x00"}}}, "agents.narrator.api_key_env", "NUL"),
    ({"agents": {"narrator": {"prompt": "\x00"}}}, "agents.narrator.prompt", "NUL"),
    # HTTP agents and servers
    (
        {"agents": {"narrator": {"backend": "openai"}}},
        "agents.narrator.model",
        "must name the model when backend = 'openai'",
    ),
    (
        {"agents": {"narrator": {"backend": "anthropic", "model": ""}}},
        "agents.narrator.model",
        "must name the model",
    ),
    (
        {"agents": {"narrator": {**HTTP_AGENT, "base_url": "localhost:8080"}}},
        "agents.narrator.base_url",
        "http:// or https://",
    ),
    (
        {"servers": {"gpu": {"base_url": "ftp://x"}}},
        "servers.gpu.base_url",
        "http:// or https://",
    ),
    ({"servers": {"gpu": {"base_url": "http://"}}}, "servers.gpu.base_url", "with a host"),
    ({"servers": {"gpu": {"base_url": "http://h:99999"}}}, "servers.gpu.base_url", "https://"),
    ({"servers": {"gpu": {"base_url": "http://a b"}}}, "servers.gpu.base_url", "https://"),
    ({"servers": {" ": {}}}, "servers. ", "must not be empty, only whitespace"),
    ({"agents": {"": {}}}, "agents.", "must not be empty"),
    ({"agents": {"a\tb": {}}}, "agents.a\tb", "control characters"),
    (
        {"agents": {"narrator": {"server": "gpu"}}},
        "agents.narrator.server",
        "no such [servers.*] table",
    ),
    # structures
    ({"performance": 3}, "performance", "must be a table"),
    ({"performance": True}, "performance", "must be a table"),
    ({"performance": "ab"}, "performance", "must be a table"),
    ({"performance": {"targets": {"player_action": 3}}}, "player_action", "must be a table"),
    ({"agents": 3}, "agents", "must be a table"),
    ({"agents": {"narrator": 3}}, "agents.narrator", "must be a table"),
    ({"actions": []}, "actions", "must be a table"),
    # misspelt names
    (
        {"performance": {"targets": {"plyer_action": {"p95": 8.0}}}},
        "performance.targets.plyer_action",
        "unknown operation; allowed: player_action, first_token",
    ),
    (
        {"performance": {"lazy_loading": {"priorities": {"combt": ["rules"]}}}},
        "performance.lazy_loading.priorities.combt",
        "unknown action type; allowed: combat, exploration",
    ),
    (
        {"actions": {"combt": ["narrator"]}},
        "actions.combt",
        "unknown action type; allowed: combat, exploration",
    ),
    # action types without agents
    ({"actions": {"combat": []}}, "actions.combat", "must name at least one agent"),
    ({"actions": {"system": []}}, "actions.system", "must name at least one agent"),
    (
        {"actions": {"combat": ["narrator", "narrator"]}},
        "actions.combat",
        "must name each agent once",
    ),
    (
        {"actions": {"combat": ["narrator"]}},
        "actions",
        "every action type must have at least one agent: exploration",
    ),
]


@pytest.mark.parametrize(
    ("raw", "key", "reason"), HARDENED, ids=[f"{h[1]}:{h[2]}" for h in HARDENED]
)
def test_hardened_config_names_key_value_and_reason(
    raw: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(engine.ConfigError) as info:
        parse_config(raw)
    message = str(info.value)
    assert key in info.value.key
    assert reason in message
    assert repr(info.value.value) in message


def _float_fields(section: Any, path: str = "") -> list[str]:
    """Key paths of every float field under the attrs instance ``section``, through the
    first entry of each table of sections (agents.archivist, scenarios.targets, ...)."""
    hints = typing.get_type_hints(type(section))
    found: list[str] = []
    for field in attrs.fields(type(section)):
        hint, value, sub = hints[field.name], getattr(section, field.name), path + field.name
        if float in (hint, *typing.get_args(hint)):
            found.append(sub)
        elif attrs.has(type(value)):
            found += _float_fields(value, f"{sub}.")
        elif isinstance(value, Mapping) and value and attrs.has(type(next(iter(value.values())))):
            name, first = next(iter(value.items()))
            found += _float_fields(first, f"{sub}.{name}.")
    return found


FLOAT_FIELDS = _float_fields(engine.Config())


def _nested(path: str, value: object) -> dict[str, Any]:
    raw: Any = value
    for part in reversed(path.split(".")):
        raw = {part: raw}
    return dict(raw)


def test_float_fields_are_all_found() -> None:
    assert len(FLOAT_FIELDS) >= 19
    assert "agents.archivist.hedge_after" in FLOAT_FIELDS
    assert "performance.targets.player_action.p50" in FLOAT_FIELDS
    assert "scenarios.targets.ttft_sigma" in FLOAT_FIELDS


@pytest.mark.parametrize("path", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [NAN, INF, -INF, 1e308], ids=["nan", "inf", "-inf", "1e308"])
def test_every_float_is_finite_and_bounded(path: str, value: float) -> None:
    with pytest.raises(engine.ConfigError) as info:
        parse_config(_nested(path, value))
    assert info.value.key == path
    assert repr(value) in str(info.value)


def test_nan_is_rejected_from_toml_text(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[performance.parallelization]\naction_deadline_seconds = nan\n")
    with pytest.raises(engine.ConfigError, match=r"action_deadline_seconds = nan: .*86400"):
        engine.load_config(path)


def test_upper_bounds_are_accepted() -> None:
    config = parse_config(
        {
            "performance": {
                "cache": {"max_size_mb": 1_048_576, "ttl_minutes": 1440},
                "parallelization": {"action_deadline_seconds": 86400},
                "monitoring": {"metrics_port": 65535, "span_log_backups": 1000},
                "hedging": {"min_samples": 200},
            },
            "agents": {"narrator": {"hedge_after": 86400}},
            "actions": {"other": ["narrator"]},
        }
    )
    assert int(config.performance.cache.max_size_mb * 2**20) == 2**40


def test_deeply_nested_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("[agents.narrator]\ndepends_on = " + "[" * 10_000 + "]" * 10_000 + "\n")
    with pytest.raises(engine.ConfigError, match="nested too deeply") as info:
        engine.load_config(path)
    assert info.value.key == "<file>"
    assert info.value.value == str(path)


def test_deeply_nested_dict_is_a_config_error() -> None:
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(engine.ConfigError, match="nested too deeply"):
        parse_config({"agents": {"narrator": {"depends_on": deep}}})


def test_other_answers_the_action_types_without_an_entry() -> None:
    config = parse_config({"actions": {"combat": ["narrator"], "other": ["archivist"]}})
    assert config.agents_for("rest") == ("archivist",)


# --------------------------------------------------------------------------- built in code


def test_config_built_in_code_is_checked_as_a_whole() -> None:
    cyclic = {
        "a": engine.config.AgentConfig(depends_on=("b",)),
        "b": engine.config.AgentConfig(depends_on=("a",)),
    }
    with pytest.raises(engine.ConfigError, match="dependency cycle"):
        engine.Config(agents=cyclic, actions={"other": ("a", "b")})
    with pytest.raises(engine.ConfigError, match="unknown agent") as info:
        engine.Config(agents={"a": engine.config.AgentConfig(depends_on=("ghost",))})
    assert info.value.key == "agents.a.depends_on"


def test_evolve_is_checked_and_keeps_valid_configs() -> None:
    config = engine.Config()
    same = attrs.evolve(config)
    assert same == config
    narrator = attrs.evolve(config.agents["narrator"], depends_on=("arbiter", "module_keeper"))
    changed = attrs.evolve(config, agents={**config.agents, "narrator": narrator})
    assert changed.agents["narrator"].depends_on == ("arbiter", "module_keeper")
    with pytest.raises(engine.ConfigError, match=r"actions\.combat"):
        attrs.evolve(config, actions={**config.actions, "combat": ()})
    with pytest.raises(engine.ConfigError, match=r"agents\.narrator\.model"):
        attrs.evolve(config, agents={**config.agents, "narrator": attrs.evolve(
            narrator, backend="anthropic")})  # fmt: skip
    with pytest.raises(engine.ConfigError, match=r"simulation\.scenario"):
        attrs.evolve(config, simulation=engine.config.SimulationConfig(scenario="moon"))


def test_parse_config_messages_match_code_built_ones() -> None:
    raw = {"agents": {"a": {"depends_on": ["a"]}}, "actions": {"other": ["a"]}}
    with pytest.raises(engine.ConfigError) as parsed:
        parse_config(raw)
    with pytest.raises(engine.ConfigError) as built:
        engine.Config(
            agents={"a": engine.config.AgentConfig(depends_on=("a",))}, actions={"other": ("a",)}
        )
    assert str(parsed.value) == str(built.value)
    assert str(parsed.value) == "agents.a.depends_on = 'a': an agent cannot depend on itself"
