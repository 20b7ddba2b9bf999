"""The PostgreSQL store's lane: single statements on a second connection, sent with
libpq's non-blocking API on the event loop, with no worker thread.

The store runs the statements that need no transaction of its own here: the session
leases' take, renewal and release, and ``find_session``'s read. Each statement is
autocommit (it commits alone; this connection's ``synchronous_commit`` is off) and
costs one round trip, with no hand-off to a worker thread (on trio about 0.15 ms of
CPU each, several times the statement's own client cost).

Guarantees:
    * Statements run one at a time, in the order their callers came (FIFO).
    * A statement that was sent runs to its end even if its caller is cancelled
      (the wait for its result is shielded), so its outcome is known and the
      connection stays in step; a caller cancelled while still waiting for its turn
      sends nothing.
    * A connection found dead (the server restarted or dropped it) is replaced,
      connecting in a worker thread, and the statement sent again, once. Lane
      statements must therefore be idempotent.
    * Errors are ``SessionError`` naming the operation and the URL, the driver's
      text scrubbed of the password.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, final

import anyio
import anyio.to_thread
import attrs
import psycopg
from psycopg import pq

from ..errors import SessionError
from .postgres_schema import Scrubber

__all__ = ["Lane", "LaneResult"]

_OK = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)


@final
@attrs.frozen
class LaneResult:
    """A statement's rows (each value as text, ``None`` for NULL) and the rows it
    changed (``UPDATE``, ``DELETE``, ``INSERT``; 0 for a read)."""

    rows: list[tuple[str | None, ...]]
    changed: int


@final
@attrs.define(eq=False)
class Lane:
    """One connection for single statements; ``await Lane.open(...)``, then
    ``execute``, then ``aclose``."""

    where: str  # the URL, without a password (safe to show)
    _connect: Callable[[], psycopg.Connection[Any]]
    _scrub: Scrubber
    _conn: psycopg.Connection[Any]
    _lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    # statement text -> its prepared name on the current connection
    _prepared: dict[bytes, bytes] = attrs.field(factory=dict, init=False)

    @classmethod
    async def open(
        cls, where: str, connect: Callable[[], psycopg.Connection[Any]], scrub: Scrubber
    ) -> Lane:
        """Connect (in a worker thread) with ``connect``, which must return an
        autocommit connection; ``where`` names it in errors.

        Raises:
            SessionError: as ``connect`` does.
        """
        return cls(where, connect, scrub, await anyio.to_thread.run_sync(cls._ready, connect))

    @staticmethod
    def _ready(connect: Callable[[], psycopg.Connection[Any]]) -> psycopg.Connection[Any]:
        conn = connect()
        try:
            conn.execute("SET client_encoding TO 'UTF8'")
        except BaseException:
            conn.close()
            raise
        conn.pgconn.nonblocking = 1
        return conn

    async def execute(self, op: str, sql: bytes, params: Sequence[str]) -> LaneResult:
        """Run one statement (``$1``, ``$2`` … for ``params``, sent as text).

        Raises:
            SessionError: the lane is closed, the statement failed, or the server
                could not be reached (twice).
        """
        values = [p.encode() for p in params]
        async with self._lock:
            with anyio.CancelScope(shield=True):
                if self._closed:
                    raise SessionError(f"{op}: the session store {self.where!r} is closed")
                result = await self._send_on_live(op, sql, values)
        if result.status not in _OK:
            raise self._error(op, result.get_error_message())
        rows = [
            tuple(
                None if v is None else v.decode()
                for v in (result.get_value(r, c) for c in range(result.nfields))
            )
            for r in range(result.ntuples)
        ]
        return LaneResult(rows, result.command_tuples or 0)

    async def aclose(self) -> None:
        """Close the connection after the statement in flight; idempotent."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self._closed = True
                self._conn.close()

    async def _send_on_live(self, op: str, sql: bytes, values: list[bytes]) -> pq.abc.PGresult:
        """Send on a live connection; when the connection dies meanwhile, send once
        more on a new one."""
        for last_try in (False, True):
            conn = self._conn
            if _dead(conn):
                conn.close()
                self._prepared.clear()
                self._conn = conn = await anyio.to_thread.run_sync(self._ready, self._connect)
            try:
                return await self._send(conn.pgconn, sql, values)
            except psycopg.OperationalError as exc:
                if last_try or not _dead(conn):
                    raise self._error(op, str(exc)) from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _send(
        self, pgconn: pq.abc.PGconn, sql: bytes, values: list[bytes]
    ) -> pq.abc.PGresult:
        """Run one statement, prepared on this connection the first time it is sent (the
        server then parses and plans it once); raise ``OperationalError`` when the
        connection fails, or return the server's error as a failed result."""
        name = self._prepared.get(sql)
        if name is None:
            name = b"dm_lane_%d" % len(self._prepared)
            pgconn.send_prepare(name, sql)
            prepared = await self._result(pgconn)
            if prepared.status not in _OK:
                return prepared
            self._prepared[sql] = name
        pgconn.send_query_prepared(name, values)
        return await self._result(pgconn)

    async def _result(self, pgconn: pq.abc.PGconn) -> pq.abc.PGresult:
        """Flush what was sent and read its result (a connection the server is closing
        counts as failed: it is then BAD)."""
        fd = pgconn.socket
        while pgconn.flush():
            await anyio.wait_writable(fd)
        while True:
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
            await anyio.wait_readable(fd)
        last = None
        while (result := pgconn.get_result()) is not None:
            last = result
        if last is None:
            raise psycopg.OperationalError("the server sent no result")
        if last.status not in _OK and pgconn.status == pq.ConnStatus.BAD:
            raise psycopg.OperationalError(last.get_error_message())
        return last

    def _error(self, op: str, message: bytes | str) -> SessionError:
        text = message.decode(errors="replace") if isinstance(message, bytes) else message
        return SessionError(f"{op} on {self.where!r} failed: {self._scrub(text.strip())}")


def _dead(conn: psycopg.Connection[Any]) -> bool:
    """Whether the connection is closed or failed (the server restarted or dropped it)."""
    return conn.closed or conn.broken or conn.pgconn.status == pq.ConnStatus.BAD
