"""The PostgreSQL store's lanes: connections driven from the event loop with libpq's
non-blocking API (psycopg's ``pq``), with no worker thread.

The store keeps two: one runs the statements that need no transaction of their own
(the session leases' take, renewal and release, and ``find_session``'s read), each
autocommit, on a connection whose ``synchronous_commit`` is off; the other runs the
group-commit batches, each ONE transaction of pipelined statements (``transaction``),
with the store's ``synchronous`` setting. Either way a statement costs no hand-off to
a worker thread (on trio about 0.15 ms of CPU each, several times the statement's own
client cost), and the statements sent together share one round trip.

Guarantees:
    * Statements run in the order their callers came (FIFO), a transaction's alone;
      ``execute`` calls made while a pipeline is under way go together in the next one
      (one round trip and one wake-up of the loop for all of them under load), each
      still its own transaction.
    * What was sent runs to its end even if its caller is cancelled (the wait for the
      results is shielded), so the connection stays in step and the outcome is known
      (``execute_each`` hands it to the caller's ``unheard``); a caller cancelled
      while still waiting for its turn sends nothing.
    * A connection found dead (the server restarted or dropped it) is replaced,
      connecting in a worker thread, and the statements sent again, once — but never
      a ``COMMIT``: ``execute``'s statements must be idempotent, and a transaction's
      statements are sent again only before its ``COMMIT`` was.
    * Errors are ``SessionError`` naming the operation and the URL, the driver's text
      scrubbed of the password; a transaction whose ``COMMIT`` was lost with the
      connection raises ``CommitOutcomeUnknown``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, final

import anyio
import anyio.to_thread
import attrs
import psycopg
from psycopg import abc, pq
from psycopg.adapt import PyFormat, Transformer

from ..errors import SessionError
from .postgres_schema import Scrubber

__all__ = ["CommitOutcomeUnknown", "Lane", "LaneResult", "Statement"]

_OK = (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK)
#: a statement (``$1``, ``$2`` … for its parameters) and its parameters: Python values,
#: sent as text with psycopg's adapters (a list becomes an array, ``None`` NULL)
Statement = tuple[bytes, Sequence[Any]]


class CommitOutcomeUnknown(SessionError):
    """The connection was lost while a transaction's ``COMMIT`` was under way: the
    server may have committed it or not."""


@final
@attrs.frozen
class LaneResult:
    """A statement's rows (each value as text, ``None`` for NULL) and the rows it
    changed (``UPDATE``, ``DELETE``, ``INSERT``; 0 for a read)."""

    rows: list[tuple[str | None, ...]]
    changed: int

    @classmethod
    def of(cls, result: pq.abc.PGresult) -> LaneResult:
        rows = [
            tuple(
                None if v is None else v.decode()
                for v in (result.get_value(r, c) for c in range(result.nfields))
            )
            for r in range(result.ntuples)
        ]
        return cls(rows, result.command_tuples or 0)


@attrs.define(eq=False)
class _Call:
    """One ``execute`` call: queued, then taken into a pipeline, then done."""

    op: str
    statement: Statement
    taken: bool = False
    promoted: bool = False  # its caller sends the next pipeline
    result: pq.abc.PGresult | None = None
    error: SessionError | None = None
    wakeup: anyio.Event = attrs.field(factory=anyio.Event)  # promoted, or done
    done: anyio.Event = attrs.field(factory=anyio.Event)


@final
@attrs.define(eq=False)
class Lane:
    """One connection driven from the loop; ``await Lane.open(...)``, then ``execute``
    or ``transaction``, then ``aclose``."""

    where: str  # the URL, without a password (safe to show)
    _connect: Callable[[], psycopg.Connection[Any]]
    _scrub: Scrubber
    _conn: psycopg.Connection[Any]
    _lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    # statement text -> its prepared name on the current connection
    _prepared: dict[bytes, bytes] = attrs.field(factory=dict, init=False)
    _names: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    _dumper: abc.Transformer = attrs.field(factory=Transformer, init=False)
    # ``execute`` calls not yet sent, in call order, and whether a caller sends them
    _queue: dict[_Call, None] = attrs.field(factory=dict, init=False)
    _sending: bool = attrs.field(default=False, init=False)
    #: pipelines sent so far (one round trip each; a transaction sends two)
    pipelines: int = attrs.field(default=0, init=False)

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

    async def execute(self, op: str, sql: bytes, params: Sequence[Any]) -> LaneResult:
        """Run one statement, autocommit. Statements called while a pipeline is under
        way are sent together in the next one (one round trip), each still its own
        transaction: one's failure fails it alone.

        Raises:
            SessionError: the lane is closed, the statement failed, or the server
                could not be reached (twice).
        """
        (outcome,) = await self.execute_each(op, [(sql, params)])
        if isinstance(outcome, SessionError):
            raise outcome
        return outcome

    async def execute_each(
        self,
        op: str,
        statements: Sequence[Statement],
        *,
        unheard: Callable[[list[LaneResult | SessionError]], Awaitable[None]] | None = None,
    ) -> list[LaneResult | SessionError]:
        """Run ``statements`` in order in one pipeline, each autocommit, as ``execute``
        would one after another (a later one sees what an earlier one committed), and
        return each one's outcome: its result, or the ``SessionError`` it failed with
        (one's failure fails it alone). Cancelled before they were sent, none runs;
        after, all run to their end, and their outcomes go to ``unheard`` (awaited,
        shielded, before the cancellation goes on), so a caller can undo what they
        did."""
        if not statements:
            return []
        calls = [_Call(op, statement) for statement in statements]
        for call in calls:  # queued together: always taken into one pipeline together
            self._queue[call] = None
        lead = calls[0]
        if not self._sending:
            self._sending = lead.promoted = True
        try:
            if not lead.promoted:
                await lead.wakeup.wait()  # promoted, or done by another caller's pipeline
            if not lead.taken:
                await self._send_queued()
        except BaseException:
            with anyio.CancelScope(shield=True):
                if lead.taken:
                    await lead.done.wait()  # sent: their outcomes come, whatever we do
                    if unheard is not None:
                        await unheard([self._outcome(call) for call in calls])
                else:
                    for call in calls:
                        self._withdraw(call)  # never sent
            raise
        return [self._outcome(call) for call in calls]

    def _outcome(self, call: _Call) -> LaneResult | SessionError:
        if call.error is not None:
            return call.error
        assert call.result is not None
        if call.result.status not in _OK:
            return self._error(call.op, call.result.get_error_message())
        return LaneResult.of(call.result)

    async def _send_queued(self) -> None:
        """Send every queued call in one pipeline (the caller was promoted), then pass
        the role on to the oldest call queued meanwhile."""
        async with self._lock:  # a transaction may hold the connection
            batch = list(self._queue)
            self._queue.clear()
            for call in batch:
                call.taken = True
            try:
                with anyio.CancelScope(shield=True):
                    await self._run_calls(batch)
            finally:
                for call in batch:
                    call.done.set()
                    call.wakeup.set()
                self._hand_off()

    async def _run_calls(self, batch: list[_Call]) -> None:
        """Send the calls' statements, each followed by its own sync (its own
        transaction); set each call's result or error."""
        if self._closed:
            for call in batch:
                call.error = self._closed_error(call.op)
            return
        try:
            results = await self._send_on_live([call.statement for call in batch], each=True)
        except psycopg.Error as exc:  # the connection failed (or a value could not be sent)
            for call in batch:
                call.error = self._error(call.op, str(exc))
            return
        for call, result in zip(batch, results, strict=True):
            call.result = result

    def _withdraw(self, call: _Call) -> None:
        """Remove a cancelled caller's unsent call; pass on its sender role."""
        del self._queue[call]
        if call.promoted:
            self._hand_off()

    def _hand_off(self) -> None:
        """The sender role is free: give it to the oldest queued call, if any."""
        for first in self._queue:
            first.promoted = True
            first.wakeup.set()
            return
        self._sending = False

    async def transaction(self, op: str, statements: Sequence[Statement]) -> list[LaneResult]:
        """Run ``statements`` in ONE transaction and commit it: two round trips
        (``BEGIN`` and the statements in one pipeline, then ``COMMIT``).

        Raises:
            SessionError: the lane is closed, or a statement or the ``COMMIT``
                failed; nothing was written (the transaction was rolled back).
            CommitOutcomeUnknown: the connection was lost during the ``COMMIT``.
        """
        async with self._lock:
            with anyio.CancelScope(shield=True):
                self._check_open(op)
                try:
                    results = await self._send_on_live([(b"BEGIN", ()), *statements])
                except psycopg.OperationalError as exc:
                    raise self._error(op, str(exc)) from None
                failed = next((r for r in results if r.status not in _OK), None)
                if failed is None:
                    failed = await self._commit(op)
                if failed is not None:
                    await self._roll_back()
        if failed is not None:
            raise self._error(op, failed.get_error_message())
        return [LaneResult.of(r) for r in results[1:]]

    async def aclose(self) -> None:
        """Close the connection after the call in flight; idempotent."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self._closed = True
                self._conn.close()

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise self._closed_error(op)

    def _closed_error(self, op: str) -> SessionError:
        return SessionError(f"{op}: the session store {self.where!r} is closed")

    async def _commit(self, op: str) -> pq.abc.PGresult | None:
        """COMMIT; None when it committed, else its failed result (then nothing was).

        Raises:
            CommitOutcomeUnknown: the connection was lost (it is closed).
        """
        try:
            (result,) = await self._send(self._conn.pgconn, [(b"COMMIT", ())])
        except psycopg.OperationalError as exc:
            self._conn.close()
            raise CommitOutcomeUnknown(
                f"{op} on {self.where!r} failed: the connection was lost while committing "
                f"({self._scrub(str(exc).strip())})"
            ) from None
        return None if result.status in _OK else result

    async def _roll_back(self) -> None:
        """End a failed transaction; a connection that cannot is closed (and replaced
        at the next call)."""
        conn = self._conn
        if conn.pgconn.transaction_status == pq.TransactionStatus.IDLE:
            return
        with contextlib.suppress(psycopg.OperationalError):
            (result,) = await self._send(conn.pgconn, [(b"ROLLBACK", ())])
            if result.status in _OK:
                return
        conn.close()

    async def _send_on_live(
        self, statements: Sequence[Statement], *, each: bool = False
    ) -> list[pq.abc.PGresult]:
        """Send on a live connection; when the connection dies meanwhile, send once
        more on a new one (raise ``OperationalError`` if that fails too)."""
        for last_try in (False, True):
            conn = self._conn
            if _dead(conn):
                conn.close()
                self._prepared.clear()
                self._conn = conn = await anyio.to_thread.run_sync(self._ready, self._connect)
            try:
                return await self._send(conn.pgconn, statements, each=each)
            except psycopg.OperationalError:
                if last_try or not _dead(conn):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _send(
        self, pgconn: pq.abc.PGconn, statements: Sequence[Statement], *, each: bool = False
    ) -> list[pq.abc.PGresult]:
        """Send ``statements`` in one pipeline, each prepared on this connection the
        first time it is sent (the server then parses and plans it once), and return
        one result per statement: a failed one, and the ones the server then skipped,
        are failed results. ``each``: a sync after every statement, so each is its own
        transaction and a failure skips nothing else. Raise ``OperationalError`` when
        the connection fails."""
        dump = self._dumper.dump_sequence
        values = [dump(params, [PyFormat.TEXT] * len(params)) for _, params in statements]
        prepared = self._prepared
        fresh: dict[bytes, bytes] = {}
        sent: list[bytes | None] = []  # per result: the statement it prepared, or None
        pgconn.enter_pipeline_mode()
        try:
            for (sql, _), params in zip(statements, values, strict=True):
                name = prepared.get(sql) or fresh.get(sql)
                if name is None:
                    name = fresh[sql] = b"dm_lane_%d" % next(self._names)
                    pgconn.send_prepare(name, sql)
                    sent.append(sql)
                pgconn.send_query_prepared(name, params)
                sent.append(None)
                if each:
                    pgconn.pipeline_sync()
            if not each:
                pgconn.pipeline_sync()
            self.pipelines += 1
            results = await self._results(pgconn, len(statements) if each else 1)
        finally:
            with contextlib.suppress(psycopg.OperationalError):
                pgconn.exit_pipeline_mode()  # fails only with the connection
        for first, result in zip(sent, results, strict=True):
            if first is not None and result.status in _OK:
                prepared[first] = fresh[first]
        return [result for first, result in zip(sent, results, strict=True) if first is None]

    async def _results(self, pgconn: pq.abc.PGconn, syncs: int) -> list[pq.abc.PGresult]:
        """Flush the pipeline and read its results up to its last of ``syncs`` syncs
        (a connection the server is closing counts as failed: it is then BAD)."""
        fd = pgconn.socket
        while pgconn.flush():
            await anyio.wait_writable(fd)
        results: list[pq.abc.PGresult] = []
        last: pq.abc.PGresult | None = None
        while True:
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:  # the end of one statement's results
                    if last is None:
                        break  # nothing more has arrived yet
                    results.append(last)
                    last = None
                elif result.status == pq.ExecStatus.PIPELINE_SYNC:
                    syncs -= 1
                    if not syncs:
                        return results
                elif result.status not in _OK and pgconn.status == pq.ConnStatus.BAD:
                    raise psycopg.OperationalError(result.get_error_message())
                else:
                    last = result
            await anyio.wait_readable(fd)

    def _error(self, op: str, message: str) -> SessionError:
        return SessionError(f"{op} on {self.where!r} failed: {self._scrub(message.strip())}")


def _dead(conn: psycopg.Connection[Any]) -> bool:
    """Whether the connection is closed or failed (the server restarted or dropped it)."""
    return conn.closed or conn.broken or conn.pgconn.status == pq.ConnStatus.BAD
