"""The row operations of a session store, written once for every backend.

Both backends keep the same three tables (``sessions``, ``transcript``, ``state``;
see docs/state.md) and reach them through a DB-API connection whose ``execute``
returns a cursor. What differs is behind :class:`Driver`: the placeholder style,
how a transaction starts and ends, row locks, and what a driver error looks like.
Everything here runs in the store's worker thread (or on the loop with
``in_thread=False``), holding the store's connection.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from .records import ActionRow, SessionState, TranscriptEntry, turn_moved_on, unknown_session

__all__ = ["Connection", "Driver", "Rows"]


class Connection(Protocol):
    """What the row operations use of a connection (``sqlite3`` and ``psycopg`` both)."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any: ...


C = TypeVar("C", bound=Connection)


class Driver(abc.ABC, Generic[C]):
    """A backend's connection and transaction control (used under the store's lock).

    Attributes:
        where: names the store in messages (a path, or a URL without password).
        rows: the backend's SQL of the row operations.
    """

    where: str
    rows: Rows

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection and release what the store holds (idempotent)."""

    @abc.abstractmethod
    def begin(self, *, write: bool) -> C:
        """Start a transaction; return the connection it runs on (a backend may
        replace a connection it finds dead here, before anything was sent)."""

    @abc.abstractmethod
    def commit(self, conn: C) -> None: ...

    @abc.abstractmethod
    def rollback(self, conn: C) -> None: ...

    @abc.abstractmethod
    def in_transaction(self, conn: C) -> bool:
        """Whether a transaction is still open (False once the backend aborted it whole)."""

    @abc.abstractmethod
    def is_driver_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the driver's error (translated into ``SessionError``)."""

    def describe(self, exc: BaseException) -> str:
        """The text of a driver error, fit for a message (e.g. without secrets)."""
        return str(exc)

    def lock_sessions(self, conn: C, session_ids: Sequence[str]) -> None:
        """Lock these sessions' rows for the open write transaction, in one order (a
        backend whose write transaction does not exclude every other writer, as
        PostgreSQL's); default: nothing (SQLite's excludes them all)."""

    def commit_outcome_unknown(self, conn: C, exc: BaseException) -> bool:
        """Whether a failed ``COMMIT`` may have committed all the same (a lost connection)."""
        return False


class Rows:
    """The SQL of the row operations; ``?`` placeholders become ``placeholder``."""

    def __init__(self, *, placeholder: str = "?", row_lock: str = "", no_limit: Any = -1) -> None:
        self._ph = placeholder
        self._row_lock = row_lock
        self.no_limit = no_limit  # the LIMIT value that means "all rows"

    def sql(self, text: str) -> str:
        return text if self._ph == "?" else text.replace("?", self._ph)

    def insert_session(
        self, conn: Connection, session_id: str, now: float, *, if_missing: bool = False
    ) -> None:
        """A new session at turn 0; ``if_missing``: nothing if it exists already (else
        the backend's unique-key error)."""
        conn.execute(
            self.sql(
                "INSERT INTO sessions (session_id, turn, created, updated) VALUES (?, 0, ?, ?)"
                + (" ON CONFLICT (session_id) DO NOTHING" if if_missing else "")
            ),
            (session_id, now, now),
        )

    def session_row(
        self, conn: Connection, session_id: str, *, lock: bool = False
    ) -> tuple[Any, ...] | None:
        sql = "SELECT turn, created, updated FROM sessions WHERE session_id = ?"
        row: tuple[Any, ...] | None = conn.execute(
            self.sql(sql + (self._row_lock if lock else "")), (session_id,)
        ).fetchone()
        return row

    def require_session(
        self, conn: Connection, session_id: str, *, lock: bool = False
    ) -> tuple[Any, ...]:
        row = self.session_row(conn, session_id, lock=lock)
        if row is None:
            raise unknown_session(session_id)
        return row

    def load_session(self, conn: Connection, session_id: str) -> SessionState:
        state = self.find_session(conn, session_id)
        if state is None:
            raise unknown_session(session_id)
        return state

    def find_session(self, conn: Connection, session_id: str) -> SessionState | None:
        row = self.session_row(conn, session_id)
        if row is None:
            return None
        turn, created, updated = row
        rows = conn.execute(
            self.sql("SELECT key, value FROM state WHERE session_id = ? ORDER BY key"),
            (session_id,),
        ).fetchall()
        state = {key: json.loads(value) for key, value in rows}
        return SessionState(session_id, int(turn), state, float(created), float(updated))

    def session_ids(self, conn: Connection) -> list[str]:
        rows = conn.execute("SELECT session_id FROM sessions ORDER BY session_id").fetchall()
        return [str(r[0]) for r in rows]

    def count_actions(self, conn: Connection, session_id: str | None) -> int:
        if session_id is None:
            return int(conn.execute("SELECT count(*) FROM transcript").fetchone()[0])
        self.require_session(conn, session_id)
        row = conn.execute(
            self.sql("SELECT count(*) FROM transcript WHERE session_id = ?"), (session_id,)
        ).fetchone()
        return int(row[0])

    def transcript(
        self, conn: Connection, session_id: str, limit: int | None
    ) -> list[TranscriptEntry]:
        self.require_session(conn, session_id)
        rows = conn.execute(
            self.sql(
                "SELECT turn, action_text, action_type, narrative, state_changes, responses,"
                " created FROM transcript WHERE session_id = ? ORDER BY turn DESC LIMIT ?"
            ),
            (session_id, self.no_limit if limit is None else limit),
        ).fetchall()
        return [
            TranscriptEntry(
                turn=int(r[0]),
                action_text=r[1],
                action_type=r[2],
                narrative=r[3],
                state_changes=json.loads(r[4]),
                responses=json.loads(r[5]),
                created=float(r[6]),
            )
            for r in reversed(rows)
        ]

    def apply_action(self, conn: Connection, action: ActionRow, now: float) -> int:
        """Insert the transcript row, apply the state changes, bump the turn; return it.
        A session that does not exist yet is created first when the action expects
        turn 0 (its first action), in the same transaction.

        The session's row is read with the backend's row lock, so a concurrent writer
        of the same session (another process, on a shared store) waits for this
        transaction and then sees its turn.
        """
        session_id = action.session_id
        row = self.session_row(conn, session_id, lock=True)
        if row is None and action.turn_expected == 0:  # its first action creates it
            self.insert_session(conn, session_id, now, if_missing=True)
            row = self.session_row(conn, session_id, lock=True)
        if row is None:
            raise unknown_session(session_id)
        turn = int(row[0])
        if action.turn_expected is not None and turn != action.turn_expected:
            raise turn_moved_on(session_id, turn, action.turn_expected)
        new_turn = turn + 1
        conn.execute(
            self.sql(
                "INSERT INTO transcript (session_id, turn, action_text, action_type, narrative,"
                " state_changes, responses, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ),
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
        delete = self.sql("DELETE FROM state WHERE session_id = ? AND key = ?")
        upsert = self.sql(
            "INSERT INTO state (session_id, key, value) VALUES (?, ?, ?)"
            " ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value"
        )
        for key, value in action.values:
            if value is None:
                conn.execute(delete, (session_id, key))
            else:
                conn.execute(upsert, (session_id, key, value))
        conn.execute(
            self.sql("UPDATE sessions SET turn = ?, updated = ? WHERE session_id = ?"),
            (new_turn, now, session_id),
        )
        return new_turn
