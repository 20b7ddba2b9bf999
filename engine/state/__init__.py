"""Durable session state: a turn counter, a transcript and key/value game state per
session, each player action recorded all-or-nothing.

Two backends with one contract (:class:`SessionStoreBase`):

* :class:`SessionStore` — one SQLite file (WAL), one engine process at a time; the
  embedded default (``[state] url = ""``).
* :class:`PostgresSessionStore` — PostgreSQL, shared by many engine processes, which
  serialize each session's actions with ``session_lease`` (``[state] url =
  "postgresql://user@host:port/db"``, password from ``[state] password_env``).

:func:`open_session_store` picks one from ``[state]``. See ``docs/state.md``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..config import StateConfig
from .base import SessionStoreBase
from .group_commit import SessionStoreStatistics
from .records import SessionState, TranscriptEntry
from .sqlite import SessionStore
from .sqlite_file import APPLICATION_ID, SCHEMA_VERSION

if TYPE_CHECKING:
    from .postgres import PostgresSessionStore

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "AnySessionStore",
    "PostgresSessionStore",
    "SessionState",
    "SessionStore",
    "SessionStoreBase",
    "SessionStoreStatistics",
    "TranscriptEntry",
    "open_session_store",
]

#: A session store of either backend (what the pipeline holds).
AnySessionStore = SessionStoreBase[Any]


def open_session_store(
    config: StateConfig,
    cache_dir: str | os.PathLike[str] = "",
    *,
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> contextlib.AbstractAsyncContextManager[AnySessionStore]:
    """The session store ``[state]`` names, as an async context manager::

        async with open_session_store(config.state, config.module.cache_dir) as store:
            ...

    * ``path`` given: the SQLite store in that file (``open_engine(state_path=...)``),
      whatever ``url`` says;
    * ``config.url`` set: the PostgreSQL store there, with the password from the
      environment variable ``config.password_env`` names (``environ``, default
      ``os.environ``);
    * else the SQLite store at ``config.path``, or ``<cache_dir>/sessions.sqlite``.

    Raises:
        SessionError: as the backend's ``open`` (on entering), or the password's
            environment variable is not set (at once).
    """
    if path is not None:
        return SessionStore.open(
            path,
            max_action_chars=config.max_action_chars,
            synchronous="NORMAL" if config.synchronous == "NORMAL" else "FULL",
            in_thread=config.write_in_thread,
        )
    if config.url:
        from .postgres import PostgresSessionStore  # psycopg is loaded only when used

        return PostgresSessionStore.from_config(config, environ)
    return SessionStore.from_config(config, cache_dir)


def __getattr__(name: str) -> Any:
    # ``engine.state.PostgresSessionStore`` without importing psycopg for SQLite users
    if name == "PostgresSessionStore":
        from .postgres import PostgresSessionStore

        return PostgresSessionStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
