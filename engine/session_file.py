"""The session store's SQLite file: its schema, opening and checking a file, and the
synchronous row operations that ``SessionStore`` runs off the event loop.

A file is ours when its ``application_id`` and ``user_version`` say so and
``PRAGMA quick_check`` passes; an empty file is initialised; anything else is
refused before a single byte is written.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import attrs

from .errors import SessionError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "ActionRow",
    "SessionState",
    "TranscriptEntry",
    "apply_action",
    "connect",
    "load_session",
    "require_session",
    "session_row",
]

#: ``PRAGMA application_id`` of a session store ("dmS1"); other SQLite files are foreign.
APPLICATION_ID = 0x646D5331
#: ``PRAGMA user_version`` of the schema below; another version is refused, never migrated.
SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLES = frozenset({"sessions", "transcript", "state"})
_SCHEMA = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    turn       INTEGER NOT NULL CHECK (turn >= 0),
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE TABLE transcript (
    session_id    TEXT NOT NULL REFERENCES sessions(session_id),
    turn          INTEGER NOT NULL CHECK (turn >= 1),
    action_text   TEXT NOT NULL,
    action_type   TEXT NOT NULL,
    narrative     TEXT NOT NULL,
    state_changes TEXT NOT NULL,
    responses     TEXT NOT NULL,
    created       REAL NOT NULL,
    PRIMARY KEY (session_id, turn)
);
CREATE TABLE state (
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (session_id, key)
);
"""


@attrs.frozen
class SessionState:
    """A snapshot of one session: ``turn`` actions recorded so far, and its state."""

    session_id: str
    turn: int
    state: dict[str, Any]
    created: float  # wall-clock seconds since the epoch (persisted across processes)
    updated: float


@attrs.frozen
class TranscriptEntry:
    """One recorded action, exactly as ``record_action`` received it."""

    turn: int
    action_text: str
    action_type: str
    narrative: str
    state_changes: dict[str, Any]
    responses: dict[str, Any]
    created: float


@attrs.frozen
class ActionRow:
    """A validated ``record_action`` call, serialized so the thread only does SQL."""

    session_id: str
    turn_expected: int | None
    action_text: str
    action_type: str
    narrative: str
    changes_json: str
    responses_json: str
    values: tuple[tuple[str, str | None], ...]  # state key -> JSON value, None deletes


def apply_action(conn: sqlite3.Connection, action: ActionRow, now: float) -> int:
    """Insert the transcript row, apply the state changes, bump the turn; return it."""
    session_id = action.session_id
    turn = int(require_session(conn, session_id)[0])
    if action.turn_expected is not None and turn != action.turn_expected:
        raise SessionError(
            f"session {session_id!r} is at turn {turn}, not {action.turn_expected}: "
            "another action was recorded in between"
        )
    new_turn = turn + 1
    conn.execute(
        "INSERT INTO transcript (session_id, turn, action_text, action_type, narrative,"
        " state_changes, responses, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            session_id,
            new_turn,
            action.action_text,
            action.action_type,
            action.narrative,
            action.changes_json,
            action.responses_json,
            now,
        ),
    )
    for key, value in action.values:
        if value is None:
            conn.execute("DELETE FROM state WHERE session_id = ? AND key = ?", (session_id, key))
        else:
            conn.execute(
                "INSERT INTO state (session_id, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value",
                (session_id, key, value),
            )
    conn.execute(
        "UPDATE sessions SET turn = ?, updated = ? WHERE session_id = ?",
        (new_turn, now, session_id),
    )
    return new_turn


def session_row(conn: sqlite3.Connection, session_id: str) -> tuple[Any, ...] | None:
    row: tuple[Any, ...] | None = conn.execute(
        "SELECT turn, created, updated FROM sessions WHERE session_id = ?", (session_id,)
    ).fetchone()
    return row


def require_session(conn: sqlite3.Connection, session_id: str) -> tuple[Any, ...]:
    row = session_row(conn, session_id)
    if row is None:
        raise SessionError(f"unknown session {session_id!r}")
    return row


def load_session(conn: sqlite3.Connection, session_id: str) -> SessionState:
    turn, created, updated = require_session(conn, session_id)
    state = {
        key: json.loads(value)
        for key, value in conn.execute(
            "SELECT key, value FROM state WHERE session_id = ? ORDER BY key", (session_id,)
        )
    }
    return SessionState(session_id, int(turn), state, float(created), float(updated))


# --------------------------------------------------------------------------- opening


def connect(path: Path, synchronous: str) -> sqlite3.Connection:
    """Open and validate (or initialise) the file; refuse foreign files untouched."""
    where = str(path)
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        header = b""
    except OSError as exc:
        raise SessionError(f"session store {where!r} cannot be read: {exc}") from exc
    if header and header != _SQLITE_MAGIC:
        raise SessionError(f"session store {where!r} is not an SQLite database; refusing to use it")
    try:
        conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False, timeout=10.0)
    except sqlite3.Error as exc:
        raise SessionError(f"session store {where!r} cannot be opened: {exc}") from exc
    try:
        # Only reads until the file is known to be ours (or empty): a foreign file is untouched.
        fresh = _inspect(conn, where)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SessionError(f"session store {where!r} cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        if fresh:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # another process may have initialised it meanwhile
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            _inspect(conn, where)
        return conn
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.Error):
            raise SessionError(f"session store {where!r} is unusable: {exc}") from exc
        raise


def _inspect(conn: sqlite3.Connection, where: str) -> bool:
    """Check the file is our store; True if it is an empty database to initialise."""
    try:
        tables = {
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not str(r[0]).startswith("sqlite_")
        }
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        check = None
        if not tables and app_id == 0 and version == 0:
            return True
        if app_id == APPLICATION_ID and version == SCHEMA_VERSION:
            check = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        raise SessionError(f"session store {where!r} is corrupt or not a database: {exc}") from exc
    if app_id != APPLICATION_ID:
        raise SessionError(
            f"session store {where!r} is an SQLite file of another application "
            f"(application_id {app_id:#x}, tables {sorted(tables)}); refusing to use it"
        )
    if version != SCHEMA_VERSION:
        raise SessionError(
            f"session store {where!r} has schema version {version}; "
            f"this engine reads version {SCHEMA_VERSION} only"
        )
    if missing := _TABLES - tables:
        raise SessionError(f"session store {where!r} lacks tables {sorted(missing)}")
    if check != ["ok"]:
        detail = "; ".join((check or [])[:3])
        raise SessionError(f"session store {where!r} is corrupt: {detail}")
    return False
