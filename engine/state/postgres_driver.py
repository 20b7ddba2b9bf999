"""The PostgreSQL store's driver: the transactions of its main connection (in a
worker thread), errors, reconnection, and the sessions' lock of a group-commit batch
on the one-SAVEPOINT-per-action path (which runs when the batch's pipelined
transaction on the commit lane failed: see ``postgres_batch``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from .postgres_schema import Scrubber
from .rows import Driver, Rows

__all__ = ["PostgresDriver"]

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

    def lock_sessions(self, conn: psycopg.Connection[Any], session_ids: Sequence[str]) -> None:
        """``SELECT … ORDER BY session_id FOR UPDATE``: two engines' batches never
        deadlock on their sessions."""
        conn.execute(_LOCK, (list(session_ids),))

    def commit_outcome_unknown(self, conn: psycopg.Connection[Any], exc: BaseException) -> bool:
        return conn.closed or conn.broken
