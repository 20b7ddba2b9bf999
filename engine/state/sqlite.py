"""The embedded backend: one SQLite file (WAL), one engine process at a time.

Usage::

    async with SessionStore.open(path) as store:
        state = await store.ensure_session("s1")
        turn = await store.record_action("s1", action_text=..., action_type=..., ...)

See ``docs/state.md`` for the schema and the durability guarantees.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal, final

import anyio
import anyio.to_thread
import attrs

from ..config import StateConfig
from ..errors import SessionError
from .base import SessionStoreBase
from .group_commit import WritePlacement
from .records import DEFAULT_MAX_ACTION_CHARS
from .rows import Driver, Rows
from .sqlite_file import StoreLock, connect

__all__ = ["SessionStore"]


class _SqliteDriver(Driver[sqlite3.Connection]):
    rows = Rows()

    def __init__(self, path: Path, conn: sqlite3.Connection, file_lock: StoreLock) -> None:
        self.where = str(path)
        self._conn = conn
        self._file_lock: StoreLock | None = file_lock

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            lock, self._file_lock = self._file_lock, None
            if lock is not None:
                lock.release()

    def begin(self, *, write: bool) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        return self._conn

    def commit(self, conn: sqlite3.Connection) -> None:
        conn.commit()

    def rollback(self, conn: sqlite3.Connection) -> None:
        conn.rollback()

    def in_transaction(self, conn: sqlite3.Connection) -> bool:
        return conn.in_transaction

    def is_driver_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)


def validated(max_action_chars: object) -> int:
    """``max_action_chars`` checked (an int >= 1)."""
    if isinstance(max_action_chars, bool) or not isinstance(max_action_chars, int):
        raise TypeError("max_action_chars must be an int")
    if max_action_chars < 1:
        raise ValueError(f"max_action_chars must be >= 1, got {max_action_chars}")
    return max_action_chars


@final
@attrs.define(eq=False, repr=False)
class SessionStore(SessionStoreBase[sqlite3.Connection]):
    """The SQLite session store; open it with ``async with SessionStore.open(path)``.

    Besides the guarantees of every store (``SessionStoreBase``): durable against
    power loss too with ``synchronous="FULL"`` (the default) on honest disks, and
    one engine process per store (``StoreLock``), so ``session_lease`` returns at
    once and ``shared`` is False.
    """

    path: Path = attrs.field(kw_only=True)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_action_chars: int = DEFAULT_MAX_ACTION_CHARS,
        synchronous: Literal["NORMAL", "FULL"] = "FULL",
        clock: Callable[[], float] = time.time,
        in_thread: bool | str = "auto",
    ) -> AsyncIterator[SessionStore]:
        """Open (creating if missing or empty) the store at ``path``; close it on exit.

        Args:
            path: the SQLite file. Its folder must exist (it is not created) and be
                writable: the engine creates ``<path>.lock`` in it, SQLite the
                ``-wal`` and ``-shm`` files.
            max_action_chars: longest accepted action text.
            synchronous: ``"FULL"`` fsyncs the WAL on every commit (durable against
                power loss); ``"NORMAL"`` does not (durable against a crash of the
                process only, which is all SIGKILL can do).
            clock: wall-clock source of the persisted ``created``/``updated`` times.
            in_thread: ``"auto"`` (default): SQLite work on the event loop while the
                store's recent calls took under 1 ms, in a worker thread otherwise
                (``WritePlacement``); True: always in a worker thread; False: always
                on the loop (mock-clock runs, where a thread wait lets autojump
                advance virtual time in the middle of a write).

        Raises:
            SessionError: the file is not SQLite, is corrupt, or is an SQLite file
                of something else (other tables, ``application_id`` or schema
                version) — the file is then left exactly as it was; the path is a
                folder or its folder does not exist; the engine cannot write the
                store (read-only file, folder or ``-wal``/``-shm``: a write is tried
                and rolled back at open); or another ``SessionStore``, in this
                process or another, has the store open (one engine process per
                SQLite store: ``StoreLock``, held until ``aclose``).
        """
        validated(max_action_chars)
        WritePlacement.from_setting(in_thread)  # a bad value fails before anything opens
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        file = Path(path)
        conn, lock = await anyio.to_thread.run_sync(connect, file, synchronous)
        store = cls(max_action_chars, _SqliteDriver(file, conn, lock), clock, in_thread, path=file)
        try:
            yield store
        finally:
            await store.aclose()

    @classmethod
    def from_config(
        cls, config: StateConfig, cache_dir: str | os.PathLike[str] = ""
    ) -> contextlib.AbstractAsyncContextManager[SessionStore]:
        """``open`` the store named by ``[state]``: ``config.path``, else
        ``<cache_dir>/sessions.sqlite`` (``cache_dir`` empty: ``~/.cache/dm-engine``,
        created if missing). ``[state] url`` is not looked at: see
        ``engine.state.open_session_store``."""
        if config.path:
            path = Path(config.path).expanduser()
        else:
            base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache/dm-engine"
            try:
                base.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SessionError(
                    f"session store folder {str(base)!r} cannot be created ({exc}); "
                    "set the [state] path or the module cache_dir to a writable folder"
                ) from exc
            path = base / "sessions.sqlite"
        return cls.open(
            path,
            max_action_chars=config.max_action_chars,
            synchronous="NORMAL" if config.synchronous == "NORMAL" else "FULL",
            in_thread=config.write_in_thread,
        )
