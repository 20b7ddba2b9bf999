"""The PostgreSQL store's driver: its transactions, errors, reconnection, and the
pipelined fast path of a group-commit batch.

A batch is first applied with ONE statement per action (a data-modifying CTE that
locks the session, checks ``turn_expected``, bumps the turn, inserts the
transcript row and applies the state changes), all sent in one psycopg pipeline:
one round trip for the batch instead of ~7 per action. An unknown session or a
``turn_expected`` mismatch is not an error there (the statement changes nothing
and says so), so only a real failure (a constraint, a trigger, the server) breaks
the pipeline; the batch's savepoint is then rolled back and ``write_batch`` runs
the usual one-SAVEPOINT-per-action loop, which isolates the failing action.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from ..errors import SessionError
from .group_commit import Pending
from .postgres_schema import Scrubber
from .rows import Driver, Rows

__all__ = ["PostgresDriver"]

_APPLY = """
WITH cur AS (
    SELECT turn FROM sessions WHERE session_id = %(sid)s FOR UPDATE
), bumped AS (
    UPDATE sessions SET turn = cur.turn + 1, updated = %(now)s FROM cur
    WHERE sessions.session_id = %(sid)s
      AND (%(expected)s::integer IS NULL OR cur.turn = %(expected)s::integer)
    RETURNING sessions.turn
), logged AS (
    INSERT INTO transcript (session_id, turn, action_text, action_type, narrative,
                            state_changes, responses, created)
    SELECT %(sid)s, turn, %(text)s, %(type)s, %(narrative)s, %(changes)s, %(responses)s,
           %(now)s
    FROM bumped RETURNING turn
), gone AS (
    DELETE FROM state WHERE session_id = %(sid)s AND key = ANY(%(deleted)s::text[])
      AND EXISTS (SELECT 1 FROM logged)
), kept AS (
    INSERT INTO state (session_id, key, value)
    SELECT %(sid)s, k, v FROM unnest(%(keys)s::text[], %(values)s::text[]) AS c (k, v)
    WHERE EXISTS (SELECT 1 FROM logged)
    ON CONFLICT (session_id, key) DO UPDATE SET value = excluded.value
)
SELECT (SELECT turn FROM cur), (SELECT turn FROM logged)
"""

_LOCK = "SELECT 1 FROM sessions WHERE session_id = ANY(%s) ORDER BY session_id FOR UPDATE"
_ACTIVE = (psycopg.pq.TransactionStatus.INTRANS, psycopg.pq.TransactionStatus.INERROR)


class PostgresDriver(Driver["psycopg.Connection[Any]"]):
    rows = Rows(placeholder="%s", row_lock=" FOR UPDATE", no_limit=None)

    def __init__(
        self,
        url: str,
        conn: psycopg.Connection[Any],
        reconnect: Callable[[], psycopg.Connection[Any]],
        scrub: Scrubber,
    ) -> None:
        self.where = url
        self._conn = conn
        self._reconnect = reconnect
        self._scrub = scrub

    def _connection(self) -> psycopg.Connection[Any]:
        """The connection; a broken one (server restart, network) is replaced."""
        if self._conn.closed or self._conn.broken:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = self._reconnect()
        return self._conn

    def close(self) -> None:
        self._conn.close()

    def begin(self, *, write: bool) -> psycopg.Connection[Any]:
        """BEGIN; a connection found dead by it (the server restarted or dropped it
        since the last call) is replaced once: nothing of this transaction was sent."""
        sql = "BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
        conn = self._connection()
        try:
            conn.execute(sql)
        except psycopg.OperationalError:
            if not conn.broken:
                raise
            conn = self._connection()
            conn.execute(sql)
        return conn

    def commit(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("COMMIT")

    def rollback(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("ROLLBACK")

    def in_transaction(self, conn: psycopg.Connection[Any]) -> bool:
        return not conn.closed and conn.info.transaction_status in _ACTIVE

    def is_driver_error(self, exc: BaseException) -> bool:
        return isinstance(exc, psycopg.Error)

    def describe(self, exc: BaseException) -> str:
        return self._scrub(str(exc))

    def apply_batch(
        self,
        conn: psycopg.Connection[Any],
        batch: Sequence[Pending],
        clock: Callable[[], float],
    ) -> bool:
        """The whole batch in one pipeline, after the lock of its sessions; False
        (nothing changed but the lock) if a statement failed, or if a session's first
        action (``turn_expected`` 0) found no session: the savepoint path creates it,
        in the batch's order. On success the savepoint stays open: COMMIT ends it."""
        try:
            cursors = []
            with conn.pipeline():
                # every batch locks its sessions in one order: two engines' batches
                # never deadlock; the lock is taken before the savepoint, so it holds
                # for the savepoint path too
                conn.execute(_LOCK, (sorted({p.action.session_id for p in batch}),))
                conn.execute("SAVEPOINT batch")
                for pending in batch:
                    action = pending.action
                    kept = [(k, v) for k, v in action.values if v is not None]
                    cursor = conn.cursor()
                    cursor.execute(
                        _APPLY,
                        {
                            "sid": action.session_id,
                            "now": clock(),
                            "expected": action.turn_expected,
                            "text": action.action_text,
                            "type": action.action_type,
                            "narrative": action.narrative,
                            "changes": action.changes_json,
                            "responses": action.responses_json,
                            "deleted": [k for k, v in action.values if v is None],
                            "keys": [k for k, _ in kept],
                            "values": [v for _, v in kept],
                        },
                    )
                    cursors.append(cursor)
            outcomes = [cursor.fetchone() for cursor in cursors]
        except psycopg.Error as failed:
            if not self.in_transaction(conn):
                raise  # the connection is gone: the whole batch fails
            try:
                conn.execute("ROLLBACK TO SAVEPOINT batch")
            except psycopg.Error:
                raise failed from None  # the lock itself failed: so does the batch
            conn.execute("RELEASE SAVEPOINT batch")
            return False
        if any(
            (outcome is None or outcome[0] is None) and pending.action.turn_expected == 0
            for pending, outcome in zip(batch, outcomes, strict=True)
        ):
            conn.execute("ROLLBACK TO SAVEPOINT batch")
            conn.execute("RELEASE SAVEPOINT batch")
            return False
        for pending, outcome in zip(batch, outcomes, strict=True):
            current, new = outcome if outcome is not None else (None, None)
            sid = pending.action.session_id
            if new is not None:
                pending.result = int(new)
            elif current is None:
                pending.error = SessionError(f"unknown session {sid!r}")
            else:
                pending.error = SessionError(
                    f"session {sid!r} is at turn {current}, not {pending.action.turn_expected}: "
                    "another action was recorded in between"
                )
        return True

    def commit_outcome_unknown(self, conn: psycopg.Connection[Any], exc: BaseException) -> bool:
        return conn.closed or conn.broken
