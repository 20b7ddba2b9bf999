"""The checks of the configuration (used by :mod:`engine.config`).

A field validator raises :class:`Invalid` naming the field and what is allowed; the
TOML structurer turns it into a :class:`~engine.errors.ConfigError` with the key path
and the value. :func:`check_config` checks what no single section can (names,
references, the agent DAG, URLs) and raises ConfigError with the full key path; it
runs whenever a ``Config`` is built, from TOML or in code.

Every number field rejects NaN and infinities, and the bounds below keep values from
overflowing where the engine converts them (MiB to bytes, minutes to seconds, a
log-normal draw): durations up to one day, sizes up to one TiB.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import attrs

from .errors import ConfigError
from .scheduling.dag import find_cycle

if TYPE_CHECKING:
    from .config import Config

__all__ = [
    "DAY_MINUTES",
    "DAY_SECONDS",
    "TIB_BYTES",
    "TIB_MIB",
    "Invalid",
    "between",
    "check_config",
    "check_keys",
    "fraction",
    "host",
    "name_problem",
    "no_nul",
    "non_empty_path",
    "non_negative",
    "number",
    "one_of",
    "port",
    "positive",
    "postgres_url",
    "postgres_url_problem",
    "redact_url",
    "url_problem",
    "variable_name",
]

DAY_SECONDS = 86_400
DAY_MINUTES = 1_440
TIB_MIB = 1_048_576
TIB_BYTES = 1_099_511_627_776

Validator = Callable[[object, "attrs.Attribute[Any]", Any], None]


class Invalid(ValueError):
    """A field's value is out of range; ``field`` is None for whole-table checks."""

    def __init__(self, field: str | None, allowed: str) -> None:
        self.field = field
        super().__init__(allowed)


def positive(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:  # NaN fails too
        raise Invalid(attr.name, "must be > 0")


def non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not value >= 0:
        raise Invalid(attr.name, "must be >= 0")


def fraction(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise Invalid(attr.name, "must be between 0.0 and 1.0")


def number(low: float, high: float, *, low_open: bool = False, unit: str = "") -> Validator:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    above = f"> {low}" if low_open else f">= {low}"
    allowed = f"must be a finite number {above} and <= {high}{f' ({unit})' if unit else ''}"

    def check(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
        ok = low < value <= high if low_open else low <= value <= high
        if not ok or not math.isfinite(value):
            raise Invalid(attr.name, allowed)

    return check


def between(low: int, high: int, why: str) -> Validator:
    """An integer in ``[low, high]``; ``why`` says where the bounds come from."""

    def check(_inst: object, attr: attrs.Attribute[Any], value: int) -> None:
        if not low <= value <= high:
            raise Invalid(attr.name, f"must be between {low} and {high} ({why})")

    return check


def one_of(*allowed: str) -> Validator:
    def check(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
        if value not in allowed:
            raise Invalid(attr.name, f"must be one of {', '.join(map(repr, allowed))}")

    return check


def port(_inst: object, attr: attrs.Attribute[Any], value: int) -> None:
    if not 0 <= value <= 65535:
        raise Invalid(attr.name, "must be a TCP port between 0 and 65535")


def host(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if not value.strip() or "\x00" in value:
        raise Invalid(attr.name, "must be a host name or IP address (not empty)")


def no_nul(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    if "\x00" in value:
        raise Invalid(attr.name, "must not contain a NUL character")


def non_empty_path(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    no_nul(_inst, attr, value)
    if not value.strip():
        raise Invalid(attr.name, "must not be empty")


def redis_url(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    """Empty (no global limits), or a ``redis://``, ``rediss://`` or ``unix://`` URL."""
    no_nul(_inst, attr, value)
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        raise Invalid(attr.name, 'must be "" or a redis://host:port/db (rediss://, unix://) URL')


def url_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL with a host, or None."""
    allowed = "must be an http:// or https:// URL with a host"
    if not url.startswith(("http://", "https://")) or not url.isprintable() or " " in url:
        return allowed
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return allowed
    return None if parts.hostname else allowed


_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_NO_PASSWORD = (
    "must not contain a password: put the password in an environment variable and "
    "name that variable in [state] password_env"
)


def redact_url(url: str) -> str:
    """``url`` with any password (``user:password@`` or ``password=`` in the query)
    replaced by ``***``: what a message may show of a URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "***" if ("@" in url or "password" in url.lower()) else url
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
    path = re.sub(r"(?i)(password=)[^&#]*", r"\1***", path)
    return f"{scheme}{sep}{netloc}{slash}{path}"


def postgres_url_problem(url: str) -> str | None:
    """Why ``url`` is not a password-free PostgreSQL URL
    (``postgresql://user@host:port/database``), or None."""
    allowed = (
        "must be a PostgreSQL URL such as postgresql://user@host:5432/database "
        "(or empty for the embedded SQLite store)"
    )
    if not url.startswith(_POSTGRES_SCHEMES):
        return allowed
    try:
        parts = urlsplit(url)
        has_password = parts.password is not None or any(
            key.lower() == "password" for key, _ in parse_qsl(parts.query)
        )
    except ValueError:
        return allowed
    if has_password or "password=" in url.lower():
        return _NO_PASSWORD
    if not url.isprintable() or " " in url:
        return allowed
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return allowed
    return None


def postgres_url(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    """``[state] url``: empty, or a PostgreSQL URL without a password. Raises the
    ConfigError itself, showing the URL with its password redacted (an ``Invalid``
    would be reported with the raw value)."""
    problem = postgres_url_problem(value) if value else None
    if problem:
        raise ConfigError(f"state.{attr.name}", redact_url(value), problem)


def variable_name(_inst: object, attr: attrs.Attribute[Any], value: str) -> None:
    """Empty, or the name of an environment variable (letters, digits, ``_``)."""
    if value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        raise Invalid(
            attr.name, "must be the name of an environment variable (letters, digits and _)"
        )


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an agent or a server, or None."""
    if not name.strip() or not name.isprintable():
        return "a name must not be empty, only whitespace, or hold control characters"
    return None


# --------------------------------------------------------------------------- whole config


def check_keys(path: str, table: Mapping[str, Any], what: str, allowed: tuple[str, ...]) -> None:
    """Every key of ``table`` (at ``path``) is one of ``allowed`` (``what`` names them)."""
    for key, item in table.items():
        if key not in allowed:
            raise ConfigError(
                f"{path}.{key}", item, f"unknown {what}; allowed: {', '.join(allowed)}"
            )


def check_config(config: Config) -> None:
    """What no single section can check: names, references, the agent DAG, URLs."""
    from .config import ACTION_TYPES, OPERATIONS  # engine.config imports this module

    check_keys("performance.targets", config.performance.targets, "operation", OPERATIONS)
    priorities = config.performance.lazy_loading.priorities
    check_keys("performance.lazy_loading.priorities", priorities, "action type", ACTION_TYPES)
    check_keys("actions", config.actions, "action type", ACTION_TYPES)
    for table, names in (("agents", config.agents), ("servers", config.servers)):
        for name in names:
            problem = name_problem(name)
            if problem:
                raise ConfigError(f"{table}.{name}", name, problem)
    _check_graph(config)
    for name, agent in config.agents.items():
        if agent.server and agent.server not in config.servers:
            raise ConfigError(
                f"agents.{name}.server",
                agent.server,
                f"no such [servers.*] table; known: {sorted(config.servers)}",
            )
        if agent.backend != "simulated" and not agent.model:
            raise ConfigError(
                f"agents.{name}.model", "", f"must name the model when backend = {agent.backend!r}"
            )
    urls = [(f"agents.{n}.base_url", a.base_url) for n, a in config.agents.items()]
    urls += [(f"servers.{n}.base_url", s.base_url) for n, s in config.servers.items()]
    for key, url in urls:
        problem = url_problem(url) if url else None
        if problem:
            raise ConfigError(key, url, problem)
    _check_actions(config, ACTION_TYPES)
    if config.simulation.scenario not in config.scenarios:
        raise ConfigError(
            "simulation.scenario",
            config.simulation.scenario,
            f"unknown scenario; known: {sorted(config.scenarios)}",
        )


def _check_graph(config: Config) -> None:
    names = set(config.agents)
    for name, agent in config.agents.items():
        for dep in agent.depends_on:
            if dep not in names:
                raise ConfigError(
                    f"agents.{name}.depends_on", dep, f"unknown agent; known: {sorted(names)}"
                )
        if name in agent.depends_on:
            raise ConfigError(f"agents.{name}.depends_on", name, "an agent cannot depend on itself")
    cycle = find_cycle({n: a.depends_on for n, a in config.agents.items()})
    if cycle:
        raise ConfigError(
            f"agents.{cycle[0]}.depends_on",
            list(config.agents[cycle[0]].depends_on),
            f"dependency cycle {' -> '.join(cycle)}",
        )


def _check_actions(config: Config, action_types: tuple[str, ...]) -> None:
    """Every action type is answered by at least one known agent, each named once."""
    names = set(config.agents)
    for action, agents in config.actions.items():
        for agent_name in agents:
            if agent_name not in names:
                raise ConfigError(
                    f"actions.{action}", agent_name, f"unknown agent; known: {sorted(names)}"
                )
        if not agents:
            raise ConfigError(
                f"actions.{action}",
                [],
                "must name at least one agent (every action type needs one)",
            )
        if len(set(agents)) != len(agents):
            raise ConfigError(f"actions.{action}", list(agents), "must name each agent once")
    if "other" not in config.actions:
        unanswered = [a for a in action_types if a not in config.actions]
        if unanswered:
            raise ConfigError(
                "actions",
                sorted(config.actions),
                f"every action type must have at least one agent: {', '.join(unanswered)} "
                "have no entry and there is no 'other' entry to fall back on",
            )
