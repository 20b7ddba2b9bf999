"""Configuration: a frozen, validated tree of attrs classes loaded from TOML.

Every field has a default, so an empty file is a valid configuration and a partial
file overrides only what it names (the latency targets merge per percentile).
``load_config`` raises :class:`~engine.errors.ConfigError` naming the key path, the
bad value and what is allowed; nothing half-validated is ever returned.
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from .config_checks import (
    DAY_MINUTES,
    DAY_SECONDS,
    TIB_BYTES,
    TIB_MIB,
    Invalid,
    between,
    check_config,
    check_keys,
    fraction,
    host,
    no_nul,
    non_empty_path,
    non_negative,
    number,
    one_of,
    port,
    positive,
    postgres_url,
    redis_url,
    variable_name,
)
from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "ACTION_TYPES",
    "OPERATIONS",
    "AgentConfig",
    "CacheConfig",
    "Config",
    "GcConfig",
    "HedgingConfig",
    "LatencyModel",
    "LatencyTarget",
    "LazyLoadingConfig",
    "ModuleConfig",
    "MonitoringConfig",
    "ParallelizationConfig",
    "PerformanceConfig",
    "ProfilingConfig",
    "PromptConfig",
    "ServerConfig",
    "SimulationConfig",
    "StateConfig",
    "load_config",
    "parse_config",
]

#: The operation names used by the profiler and the targets table.
OPERATIONS = (
    "player_action",
    "first_token",
    "context_building",
    "agent_query",
    "state_update",
    "cache_lookup",
)
#: The action types the classifier can produce ("other" is the fallback).
ACTION_TYPES = ("combat", "exploration", "roleplay", "question", "rest", "system", "other")
BACKENDS = ("simulated", "openai", "anthropic")
#: What an agent answers: free text, or a structured ruling or scene (agents/schemas.py).
OUTPUT_KINDS = ("text", "ruling", "scene")
#: Prompt layouts (agents/prompts.py): most stable part first, or the player's text first.
PROMPT_LAYOUTS = ("stable_first", "action_first")
#: Prompt-cache hints an OpenAI-compatible server understands.
PROMPT_CACHE_HINTS = ("auto", "off", "llama.cpp", "openai")

T = TypeVar("T")


def _frozen_map(value: Mapping[str, Any]) -> Mapping[str, Any]:
    # typed with Any: the attrs plugin takes a converter's parameter type as the
    # field's __init__ type, and a generic one cannot be solved there
    return types.MappingProxyType(dict(value))


# Bounds of the number fields (see config_checks): durations up to one day, sizes up
# to one TiB, a log-normal sigma small enough that exp() cannot overflow.
_seconds = number(0, DAY_SECONDS, low_open=True, unit="seconds, at most one day")
_rate = number(0, 1e12, unit="per minute; 0 = no limit")
_seconds_or_zero = number(0, DAY_SECONDS, unit="seconds, at most one day")
#: the hedging tracker keeps an agent's last 200 latencies (scheduling/hedging.py)
_P95_WINDOW = 200
#: field metadata: the names a table's keys may take (checked before its values)
_OPERATION_KEYS = {"keys": ("operation", OPERATIONS)}
_ACTION_KEYS = {"keys": ("action type", ACTION_TYPES)}


# --------------------------------------------------------------------------- sections


@attrs.frozen
class LatencyTarget:
    """Latency goals of one operation, in seconds; p50 <= p95 <= p99."""

    p50: float = attrs.field(validator=_seconds)
    p95: float = attrs.field(validator=_seconds)
    p99: float = attrs.field(validator=_seconds)

    def __attrs_post_init__(self) -> None:
        if not self.p50 <= self.p95 <= self.p99:
            raise Invalid(
                None,
                f"percentiles must not decrease (p50 {self.p50} <= p95 {self.p95} <= p99 {self.p99})",
            )

    def as_dict(self) -> dict[str, float]:
        return {"p50": self.p50, "p95": self.p95, "p99": self.p99}


DEFAULT_TARGETS: Mapping[str, LatencyTarget] = _frozen_map(
    {
        "player_action": LatencyTarget(3.0, 10.0, 15.0),
        "first_token": LatencyTarget(1.0, 2.5, 4.0),
        "context_building": LatencyTarget(0.5, 1.5, 3.0),
        "agent_query": LatencyTarget(1.0, 3.0, 5.0),
        "state_update": LatencyTarget(0.1, 0.3, 0.5),
        "cache_lookup": LatencyTarget(0.005, 0.020, 0.050),
    }
)


@attrs.frozen
class ProfilingConfig:
    enabled: bool = True
    sample_rate: float = attrs.field(default=1.0, validator=fraction)


@attrs.frozen
class ParallelizationConfig:
    max_concurrent_agents: int = attrs.field(default=4, validator=positive)
    agent_timeout_seconds: float = attrs.field(default=5.0, validator=_seconds)
    action_deadline_seconds: float = attrs.field(default=10.0, validator=_seconds)
    # one budget of LLM calls shared by every engine process (Redis); "" = per process
    redis_url: str = attrs.field(default="", validator=redis_url)
    global_max_concurrent_agents: int = attrs.field(default=0, validator=non_negative)
    global_requests_per_minute: float = attrs.field(default=0.0, validator=_rate)
    global_tokens_per_minute: float = attrs.field(default=0.0, validator=_rate)
    global_lease_seconds: float = attrs.field(default=10.0, validator=_seconds)
    # leases each process keeps admitted ahead of need (no Redis round trip per call)
    global_spare_leases: int = attrs.field(default=0, validator=non_negative)

    def __attrs_post_init__(self) -> None:
        spares = self.global_spare_leases
        if not spares:
            return
        if self.global_requests_per_minute or self.global_tokens_per_minute:
            raise Invalid(
                "global_spare_leases",
                "must be 0 with global_requests_per_minute or global_tokens_per_minute "
                "(a rate counts a call when it is admitted)",
            )
        if not 0 < spares <= self.global_max_concurrent_agents:
            raise Invalid(
                "global_spare_leases",
                f"must be at most global_max_concurrent_agents "
                f"({self.global_max_concurrent_agents}), which must not be 0",
            )


@attrs.frozen
class HedgingConfig:
    enabled: bool = True
    budget_fraction: float = attrs.field(default=0.1, validator=fraction)
    min_samples: int = attrs.field(
        default=20,
        validator=between(0, _P95_WINDOW, "the running p95 keeps an agent's last 200 calls"),
    )


@attrs.frozen
class CacheConfig:
    max_size_mb: float = attrs.field(
        default=50.0, validator=number(0, TIB_MIB, low_open=True, unit="MiB, at most 1 TiB")
    )
    ttl_minutes: float = attrs.field(
        default=30.0,
        validator=number(0, DAY_MINUTES, low_open=True, unit="minutes, at most one day"),
    )
    preload_enabled: bool = True


def _default_priorities() -> Mapping[str, tuple[str, ...]]:
    return _frozen_map(
        {
            "combat": ("encounters", "monsters", "rules", "conditions"),
            "exploration": ("locations", "encounters", "rules"),
            "roleplay": ("npcs", "locations"),
            "question": ("rules", "spells", "conditions"),
            "rest": ("rules", "locations"),
            "system": (),
            "other": ("locations", "npcs"),
        }
    )


@attrs.frozen
class LazyLoadingConfig:
    enabled: bool = True
    background_load: bool = True
    max_concurrent_loads: int = attrs.field(default=4, validator=positive)
    priorities: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=_default_priorities, converter=_frozen_map, metadata=_ACTION_KEYS
    )


@attrs.frozen
class MonitoringConfig:
    span_log_path: str = attrs.field(default="", validator=no_nul)  # empty: no span log
    span_log_max_bytes: int = attrs.field(
        default=10_000_000, validator=between(1, TIB_BYTES, "bytes, at most 1 TiB")
    )
    # every rotation renames each backup in turn
    span_log_backups: int = attrs.field(default=3, validator=between(0, 1000, "rotated files kept"))
    metrics_enabled: bool = True
    metrics_host: str = attrs.field(default="127.0.0.1", validator=host)
    metrics_port: int = attrs.field(default=0, validator=port)  # 0: no endpoint


@attrs.frozen
class PromptConfig:
    layout: str = attrs.field(default="stable_first", validator=one_of(*PROMPT_LAYOUTS))
    # the module's opening passages at the head of every prompt (0: none)
    synopsis_tokens: int = attrs.field(default=0, validator=between(0, 4000, "tokens"))


@attrs.frozen
class GcConfig:
    # young collections every this many net allocations while the engine is open;
    # 0: Python's own (700). See engine/gc_tuning.py.
    young_threshold: int = attrs.field(
        default=50_000, validator=between(0, 10_000_000, "allocations; 0: Python's own")
    )


@attrs.frozen
class PerformanceConfig:
    profiling: ProfilingConfig = attrs.field(factory=ProfilingConfig)
    parallelization: ParallelizationConfig = attrs.field(factory=ParallelizationConfig)
    hedging: HedgingConfig = attrs.field(factory=HedgingConfig)
    cache: CacheConfig = attrs.field(factory=CacheConfig)
    lazy_loading: LazyLoadingConfig = attrs.field(factory=LazyLoadingConfig)
    monitoring: MonitoringConfig = attrs.field(factory=MonitoringConfig)
    prompts: PromptConfig = attrs.field(factory=PromptConfig)
    gc: GcConfig = attrs.field(factory=GcConfig)
    targets: Mapping[str, LatencyTarget] = attrs.field(
        factory=lambda: DEFAULT_TARGETS, converter=_frozen_map, metadata=_OPERATION_KEYS
    )


@attrs.frozen
class LatencyModel:
    """Simulated LLM latency of one call.

    LogNormal(``ttft_median_seconds``, ``ttft_sigma``) time to first token, plus the
    prefill of the prompt (``prefill_seconds_per_token`` for each token the server has
    not cached, ``cached_prefill_fraction`` of that for each cached one), plus output
    tokens x ``inter_token_seconds``. With probability ``straggler_probability`` the
    call stalls: its latency is multiplied by ``straggler_factor``. A prompt prefix is
    cached once a prompt of at least ``prompt_cache_min_tokens`` was sent within
    ``prompt_cache_ttl_seconds``, in steps of ``prompt_cache_step_tokens``.
    """

    ttft_median_seconds: float = attrs.field(default=0.5, validator=_seconds)
    # exp(sigma x a normal draw) must not overflow
    ttft_sigma: float = attrs.field(default=0.6, validator=number(0, 10))
    inter_token_seconds: float = attrs.field(default=0.01, validator=_seconds_or_zero)
    straggler_probability: float = attrs.field(default=0.0, validator=fraction)
    straggler_factor: float = attrs.field(default=5.0, validator=number(0, 1000, low_open=True))
    prefill_seconds_per_token: float = attrs.field(default=0.0, validator=_seconds_or_zero)
    cached_prefill_fraction: float = attrs.field(default=1.0, validator=fraction)
    prompt_cache_min_tokens: int = attrs.field(default=1024, validator=non_negative)
    prompt_cache_step_tokens: int = attrs.field(default=128, validator=positive)
    prompt_cache_ttl_seconds: float = attrs.field(default=300.0, validator=_seconds_or_zero)


def _default_scenarios() -> Mapping[str, LatencyModel]:
    return _frozen_map(
        {
            # calibrated so the slowest agent (narrator, 150 tokens) sits at the per-agent
            # target: p50 1.0 s, p95 2.6 s, p99 4.5 s; the others are faster
            "targets": LatencyModel(0.4, 0.95, 0.004, 0.01, 3.0),
            # calibrated to hosted-LLM measurements: TTFT p50 ~0.7 s, p99 several x p50,
            # ~80 output tokens/s, occasional stalls
            # plus prefill: ~0.11 ms per uncached prompt token and 13 % of that for a
            # cached one (docs/benchmarks.md derives both from Anthropic's published
            # prompt-caching latencies); caches start at 1 024 tokens, in 128-token
            # steps, and live 5 minutes (OpenAI's and Anthropic's documented rules)
            "hosted": LatencyModel(0.7, 0.5, 0.0125, 0.03, 6.0, 0.00011, 0.13, 1024, 128, 300.0),
        }
    )


@attrs.frozen
class ServerConfig:
    """An LLM server that several agents may share (``agents.<name>.server``).

    ``max_concurrent`` bounds the calls in flight to it (its own limiter, besides the
    engine-wide one): llama.cpp's Python server runs one request at a time and keeps
    one prompt in its cache, so its agents should queue rather than thrash it.
    ``prompt_cache`` says which cache hint to send: ``llama.cpp`` (``cache_prompt``),
    ``openai`` (``prompt_cache_key``, one per session), ``off``, or ``auto`` (``openai``
    for api.openai.com, ``llama.cpp`` for any other OpenAI-compatible URL). Anthropic
    agents always mark their stable prefix with ``cache_control``.
    """

    base_url: str = ""
    api_key_env: str = attrs.field(default="", validator=no_nul)
    max_concurrent: int = attrs.field(default=4, validator=positive)
    prompt_cache: str = attrs.field(default="auto", validator=one_of(*PROMPT_CACHE_HINTS))


@attrs.frozen
class AgentConfig:
    """One LLM-backed agent: how it is reached and where it sits in the DAG."""

    backend: str = attrs.field(default="simulated", validator=one_of(*BACKENDS))
    depends_on: tuple[str, ...] = ()
    timeout_seconds: float = attrs.field(default=5.0, validator=_seconds)
    budget_tokens: int = attrs.field(default=1000, validator=non_negative)  # 0: no module text
    output_tokens: int = attrs.field(default=100, validator=positive)
    hedge_after: float | str = "off"
    output: str = attrs.field(default="text", validator=one_of(*OUTPUT_KINDS))
    narrates: bool = False  # its text is part of the narrative streamed to the player
    from_retrieval: bool = False  # answer from the retrieved text; the model only without any
    # HTTP backends only
    server: str = ""  # a [servers.<name>] table (then base_url and api_key_env stay empty)
    base_url: str = ""
    model: str = ""
    api_key_env: str = attrs.field(default="", validator=no_nul)
    max_tokens: int = attrs.field(default=400, validator=positive)
    prompt: str = ""

    def __attrs_post_init__(self) -> None:
        h = self.hedge_after
        if h not in ("off", "p95") if isinstance(h, str) else not 0 < h <= DAY_SECONDS:
            raise Invalid(
                "hedge_after", 'must be "off", "p95" or a number of seconds > 0 and <= 86400'
            )
        if self.server and self.base_url:
            raise Invalid("base_url", "must be empty when server names a [servers.*] table")
        if self.server and self.api_key_env:
            raise Invalid("api_key_env", "must be empty when server names a [servers.*] table")


def _default_agents() -> Mapping[str, AgentConfig]:
    # The DAG and output budgets that won in docs/performance-tuning.md: the archivist
    # answers from retrieval, rulings and scenes are short structured answers, and the
    # narrator writes in two streamed parts (the attempt and the scene before the
    # ruling, the outcome after it). See docs/architecture.md.
    return _frozen_map(
        {
            # retrieval answers at once: nothing to hedge
            "archivist": AgentConfig(budget_tokens=1500, output_tokens=80, from_retrieval=True),
            "module_keeper": AgentConfig(
                budget_tokens=1200,
                output_tokens=40,
                hedge_after="p95",
                output="scene",
                max_tokens=120,
            ),
            "arbiter": AgentConfig(
                depends_on=("archivist",),
                budget_tokens=1500,
                output_tokens=30,
                hedge_after="p95",
                output="ruling",
                max_tokens=100,
            ),
            "narrator_opening": AgentConfig(
                budget_tokens=1200,
                output_tokens=45,
                hedge_after="p95",
                narrates=True,
                max_tokens=90,
            ),
            "narrator": AgentConfig(
                depends_on=("arbiter",),
                budget_tokens=1500,
                output_tokens=70,
                hedge_after="p95",
                narrates=True,
                max_tokens=160,
            ),
        }
    )


def _default_actions() -> Mapping[str, tuple[str, ...]]:
    full = ("archivist", "module_keeper", "arbiter", "narrator_opening", "narrator")
    return _frozen_map(
        {
            "combat": full,
            "exploration": full,
            "roleplay": ("archivist", "module_keeper", "narrator_opening", "narrator"),
            "question": ("archivist", "narrator"),
            "rest": ("module_keeper", "arbiter", "narrator_opening", "narrator"),
            "system": ("module_keeper",),
            "other": ("archivist", "module_keeper", "narrator_opening", "narrator"),
        }
    )


@attrs.frozen
class ModuleConfig:
    # "default", "srd", or a path to an adventure folder
    name: str = attrs.field(default="default", validator=non_empty_path)
    include_srd: bool = True
    # where compiled modules live; empty: ~/.cache/dm-engine
    cache_dir: str = attrs.field(default="", validator=no_nul)
    query_in_thread: bool = False  # module queries on the loop (true: in a worker thread)


def _true_false_or_auto(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bool) and value != "auto":
        raise Invalid(attr.name, 'must be true, false or "auto"')


@attrs.frozen
class StateConfig:
    # SQLite session store; empty: in <cache_dir>/sessions.sqlite
    path: str = attrs.field(default="", validator=no_nul)
    max_action_chars: int = attrs.field(default=2000, validator=positive)
    synchronous: str = attrs.field(default="FULL", validator=one_of("FULL", "NORMAL"))
    # store work: "auto" (on the loop while it is fast), true (worker threads), false (loop)
    write_in_thread: bool | str = attrs.field(default="auto", validator=_true_false_or_auto)
    # PostgreSQL session store shared by engine processes; empty: the SQLite store
    url: str = attrs.field(default="", validator=postgres_url)
    password_env: str = attrs.field(default="", validator=variable_name)  # holds the password
    # a PostgreSQL session's lease: how long a killed engine can block the session
    session_lease_seconds: float = attrs.field(
        default=30.0, validator=number(1.0, 3600.0, unit="seconds")
    )

    def __attrs_post_init__(self) -> None:
        if self.url and self.path:
            raise Invalid(
                "path", "must be empty when url is set (path names the SQLite store's file)"
            )
        if self.password_env and not self.url:
            raise Invalid("password_env", "is only read for a PostgreSQL store: set url too")


@attrs.frozen
class SimulationConfig:
    """The simulated agents: their latency scenario, the seed of their draws, and
    ``time_scale``, which multiplies every simulated latency (the load test and
    ``dm-engine play --time-scale`` shrink real time with it; HTTP agents ignore it;
    ``0`` makes every simulated call answer at once)."""

    scenario: str = "targets"
    seed: int = 20261126
    time_scale: float = attrs.field(
        default=1.0, validator=number(0, 1000, unit="x the scenario's latencies; 0: no latency")
    )


@attrs.frozen
class Config:
    """The whole configuration; see ``config.toml`` for every key with its meaning."""

    performance: PerformanceConfig = attrs.field(factory=PerformanceConfig)
    agents: Mapping[str, AgentConfig] = attrs.field(factory=_default_agents, converter=_frozen_map)
    actions: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=_default_actions, converter=_frozen_map, metadata=_ACTION_KEYS
    )
    scenarios: Mapping[str, LatencyModel] = attrs.field(
        factory=_default_scenarios, converter=_frozen_map
    )
    servers: Mapping[str, ServerConfig] = attrs.field(factory=dict, converter=_frozen_map)
    module: ModuleConfig = attrs.field(factory=ModuleConfig)
    state: StateConfig = attrs.field(factory=StateConfig)
    simulation: SimulationConfig = attrs.field(factory=SimulationConfig)

    def __attrs_post_init__(self) -> None:
        # here, not in parse_config, so that configs built in code (attrs.evolve
        # included) are checked as a whole too
        check_config(self)

    @property
    def targets(self) -> Mapping[str, LatencyTarget]:
        return self.performance.targets

    def agents_for(self, action_type: str) -> tuple[str, ...]:
        """The agents that answer ``action_type`` (``other`` when it has no entry)."""
        return self.actions.get(action_type, self.actions.get("other", ()))

    def latency_model(self) -> LatencyModel:
        return self.scenarios[self.simulation.scenario]

    def server_of(self, agent: str) -> ServerConfig:
        """The server ``agents.<agent>`` calls: its ``[servers.*]`` table, or one made of
        the agent's own ``base_url``/``api_key_env`` with the engine-wide concurrency."""
        spec = self.agents[agent]
        if spec.server:
            return self.servers[spec.server]
        return ServerConfig(
            base_url=spec.base_url,
            api_key_env=spec.api_key_env,
            max_concurrent=self.performance.parallelization.max_concurrent_agents,
        )


# --------------------------------------------------------------------------- parsing


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a TOML file; ``None`` gives the built-in defaults.

    Raises:
        ConfigError: the file is missing, not TOML, or a value is invalid.
    """
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("<file>", str(p), "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", str(p), f"cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("<file>", str(p), f"is not valid TOML ({exc})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise ConfigError("<file>", str(p), "is nested too deeply to parse") from None
    return parse_config(raw)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate a parsed TOML document (a dict) into a :class:`Config`."""
    raw = dict(raw)
    perf = raw.get("performance")
    if isinstance(perf, Mapping) and "targets" in perf:
        raw["performance"] = {**perf, "targets": _merge_targets(perf["targets"])}
    try:
        config: Config = _structure(Config, raw, "")
    except RecursionError:  # only a dict built in code can be this deep
        raise ConfigError("<root>", "...", "is nested too deeply") from None
    return config


def _merge_targets(raw: object) -> object:
    if not isinstance(raw, Mapping):
        return raw  # the structurer reports the type error
    merged: dict[str, object] = {k: v.as_dict() for k, v in DEFAULT_TARGETS.items()}
    for op, table in raw.items():
        if isinstance(table, Mapping) and op in merged:
            base = merged[op]
            assert isinstance(base, dict)
            merged[op] = {**base, **table}
        else:
            merged[op] = table  # an unknown operation: the structurer reports it
    return merged


def _type_name(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}s"
    if origin in (Mapping, dict):
        return "a table"
    if attrs.has(tp):
        return "a table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return str(tp)


_INT64 = (-(2**63), 2**63 - 1)  # TOML's integer range


def _structure(tp: Any, value: Any, path: str) -> Any:
    """Turn TOML data into ``tp``, raising ConfigError with the key path on mismatch."""
    origin = typing.get_origin(tp)
    if attrs.has(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(path or "<root>", value, "must be a table")
        fields = {f.name: f for f in attrs.fields(tp)}
        hints = typing.get_type_hints(tp)
        kwargs: dict[str, Any] = {}
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if key not in fields:
                raise ConfigError(sub, item, f"unknown key; allowed keys: {', '.join(fields)}")
            if "keys" in fields[key].metadata and isinstance(item, Mapping):
                check_keys(sub, item, *fields[key].metadata["keys"])
            kwargs[key] = _structure(hints[key], item, sub)
        missing = [n for n, f in fields.items() if f.default is attrs.NOTHING and n not in kwargs]
        if missing:
            raise ConfigError(path or "<root>", dict(value), f"missing keys: {', '.join(missing)}")
        try:
            return tp(**kwargs)
        except Invalid as exc:
            if exc.field is None:
                raise ConfigError(path or "<root>", dict(value), str(exc)) from None
            sub = f"{path}.{exc.field}" if path else exc.field
            bad = value.get(exc.field, attrs.fields_dict(tp)[exc.field].default)
            raise ConfigError(sub, bad, str(exc)) from None
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, value, f"must be {_type_name(tp)}")
        return tuple(_structure(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict):
        _key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(path, value, "must be a table")
        return {k: _structure(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _structure(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(path, value, f"must be {_type_name(tp)}")
    if tp is float:
        # NaN and infinities pass here: every float field's validator rejects them
        # with its bounds in the message
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, value, "must be a number")
        try:
            return float(value)
        except OverflowError:  # an integer beyond 1e308
            raise ConfigError(path, value, "must be a finite number") from None
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, value, "must be an integer")
        if not _INT64[0] <= value <= _INT64[1]:
            raise ConfigError(path, value, "must be an integer in TOML's 64-bit range")
        return value
    if tp in (bool, str):
        if not isinstance(value, tp):
            raise ConfigError(path, value, f"must be {_type_name(tp)}")
        if isinstance(value, str) and "\x00" in value:
            raise ConfigError(path, value, "must not contain a NUL character")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # pragma: no cover
