"""The engine's error vocabulary. Foreign errors are translated at the boundary."""

from __future__ import annotations

import sys
from collections.abc import Iterable

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ConfigError(EngineError, ValueError):
    """A configuration value is invalid.

    The message always names the key path, the offending value and what is allowed.
    """

    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"{key} = {value!r}: {allowed}")


class DependencyError(EngineError, ValueError):
    """A request graph is malformed (cycle, unknown dependency, duplicate id)."""

    def __init__(self, message: str, ids: Iterable[str] = ()) -> None:
        self.ids = tuple(ids)
        super().__init__(message)


class LoadError(EngineError):
    """Loading a module section failed; ``section`` names it, ``__cause__`` says why."""

    def __init__(self, section: str, message: str | None = None) -> None:
        self.section = section
        super().__init__(message or f"loading section {section!r} failed")


class ModuleError(EngineError):
    """A module source or compiled module file is missing, malformed or foreign."""


class SessionError(EngineError):
    """Session state is unusable: bad action text, unknown session, corrupt store."""


class AgentError(EngineError):
    """An agent could not produce an answer (used by the HTTP agents)."""


def lone_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error inside nested single-member groups (None if there are several):
    what a nursery wrapped, to be re-raised as itself."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        if len(error.exceptions) != 1:
            return None
        error = error.exceptions[0]
    return error
