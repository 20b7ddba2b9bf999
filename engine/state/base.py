"""The public API of a session store, the same on every backend.

A store has one connection, guarded by a ``threading.Lock``; every call runs its
SQL in a worker thread (``anyio.to_thread.run_sync``) behind a per-store
``CapacityLimiter(1)``, so waiting calls park on the event loop, not on threads
(``in_thread=False``: on the loop instead; ``"auto"``: on the loop while the
store's recent work was fast, see :class:`~engine.state.group_commit.WritePlacement`).
``record_action`` is group-committed (:mod:`engine.state.group_commit`). A backend supplies a :class:`Driver` (its
connection, transactions and errors) and a way to open itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs

from ..errors import SessionError
from .group_commit import (
    GroupCommit,
    Pending,
    SessionStoreStatistics,
    WritePlacement,
    acquire_if_free,
    write_batch,
)
from .records import SessionState, TranscriptEntry, action_row, check_session_id
from .rows import Connection, Driver

__all__ = ["SessionStoreBase"]

C = TypeVar("C", bound=Connection)
_T = TypeVar("_T")


@attrs.define(eq=False, repr=False)
class SessionStoreBase(Generic[C]):
    """A durable session store; open one with a backend's ``open`` or with
    ``engine.state.open_session_store``.

    Guarantees (every backend):
        * ``record_action`` is atomic: after it returns the action survives a crash
          of the engine process; if it raises or the process dies before it returns,
          either all of the action is stored or none of it.
        * Concurrent calls (many sessions, or one session from several tasks) are
          serialized on one connection; none loses another's update.
        * Concurrent ``record_action`` calls share transactions (group commit);
          one action's failure rolls back that action only and is raised in its
          caller only; one session's actions are applied in call order.
        * A cancelled call never leaves a half-written action: an action still
          queued is withdrawn unwritten; one being written is waited for (the
          worker thread is not abandoned), so its transaction commits or rolls
          back before ``Cancelled`` propagates.

    Attributes:
        shared: whether other engine processes may use the store at the same time
            (PostgreSQL). Then an engine must not trust a turn or state it read
            before: it takes the session's lease (``session_lease``) and rereads.
    """

    shared: ClassVar[bool] = False

    max_action_chars: int
    _driver: Driver[C]
    _clock: Callable[[], float]
    in_thread: bool | str = True
    _limiter: anyio.CapacityLimiter = attrs.field(factory=lambda: anyio.CapacityLimiter(1))
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _placement: WritePlacement = attrs.field(init=False)
    _commit: GroupCommit = attrs.field(init=False)

    #: whether ``in_thread="auto"`` may run work on the loop (not for network calls)
    loop_allowed: ClassVar[bool] = True
    #: an action submitted this long after the one before it (and the connection
    #: free) is written at once, without group commit's window (0: always the window)
    quiet_write_seconds: ClassVar[float] = 0.001

    def __attrs_post_init__(self) -> None:
        self._placement = WritePlacement.from_setting(
            self.in_thread, loop_allowed=self.loop_allowed
        )
        self._commit = GroupCommit(
            self._limiter,
            self._write_batch,
            self._driver.where,
            self._placement,
            quiet_after=self.quiet_write_seconds,
        )

    def __repr__(self) -> str:
        closed = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self._driver.where!r}{closed}>"

    async def aclose(self) -> None:
        """Close the connection (after calls in flight) and release what the store
        holds; idempotent, shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    def _close_sync(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._driver.close()

    # ------------------------------------------------------------------ sessions

    async def create_session(self, session_id: str) -> SessionState:
        """Create a new session at turn 0.

        Raises:
            SessionError: the id is invalid or the session already exists.
        """
        check_session_id(session_id)
        rows = self._driver.rows

        def work(conn: C) -> SessionState:
            if rows.session_row(conn, session_id) is not None:
                raise SessionError(f"session {session_id!r} already exists")
            now = self._clock()
            rows.insert_session(conn, session_id, now)
            return SessionState(session_id, 0, {}, now, now)

        return await self._run("create_session", work, write=True)

    async def ensure_session(self, session_id: str) -> SessionState:
        """Return the session, creating it at turn 0 if it does not exist (idempotent)."""
        check_session_id(session_id)
        rows = self._driver.rows

        def work(conn: C) -> SessionState:
            if rows.session_row(conn, session_id) is None:
                rows.insert_session(conn, session_id, self._clock())
            return rows.load_session(conn, session_id)

        return await self._run("ensure_session", work, write=True)

    async def find_session(self, session_id: str) -> SessionState | None:
        """The session's turn and state, or ``None`` if it does not exist (a read:
        nothing is created; its first ``record_action`` with ``turn_expected=0``
        creates it)."""
        check_session_id(session_id)
        rows = self._driver.rows
        return await self._run(
            "find_session", lambda conn: rows.find_session(conn, session_id), write=False
        )

    async def get_session(self, session_id: str) -> SessionState:
        """The session's turn and state. Raises SessionError if it does not exist."""
        check_session_id(session_id)
        rows = self._driver.rows
        return await self._run(
            "get_session", lambda conn: rows.load_session(conn, session_id), write=False
        )

    async def session_ids(self) -> list[str]:
        """Every session id, sorted."""
        return await self._run("session_ids", self._driver.rows.session_ids, write=False)

    async def count_actions(self, session_id: str | None = None) -> int:
        """Recorded actions of one session, or of all sessions when ``None``.

        Raises:
            SessionError: ``session_id`` names no session.
        """
        if session_id is not None:
            check_session_id(session_id)
        rows = self._driver.rows
        return await self._run(
            "count_actions", lambda conn: rows.count_actions(conn, session_id), write=False
        )

    @contextlib.asynccontextmanager
    async def session_lease(self, session_id: str) -> AsyncIterator[None]:
        """Hold the session's lease while the block runs: on a shared store no other
        engine process runs an action of the session meanwhile (see PostgreSQL's
        store). Here, a store only one process can open, it returns at once."""
        check_session_id(session_id)
        yield

    # ------------------------------------------------------------------ actions

    async def record_action(
        self,
        session_id: str,
        *,
        turn_expected: int | None = None,
        action_text: str,
        action_type: str,
        narrative: str,
        state_changes: Mapping[str, Any],
        responses: Mapping[str, Any],
    ) -> int:
        """Durably record one action, all-or-nothing; return its turn number.

        Concurrent calls are written together in one transaction (group commit),
        this action in its own SAVEPOINT; the call returns once that transaction
        has committed. The action inserts the transcript row, applies
        ``state_changes`` to the session's state (a value of ``None`` deletes the
        key; any other value is stored as JSON) and bumps the turn counter. Nothing
        is written when it raises.

        Args:
            turn_expected: if given, the session's current turn as the caller last
                saw it (``SessionState.turn``); a different current turn means
                another action was recorded in between, and the call fails. ``0``
                also creates the session if it does not exist yet, in the same
                transaction (its first action needs no ``ensure_session``).

        Raises:
            SessionError: empty/whitespace or too long action text, text the store
                cannot keep (a lone surrogate or a NUL character in the action text
                or type, the narrative or a state key; refused before anything is
                queued), an invalid or unknown session, a ``turn_expected``
                mismatch, values that are not JSON-serialisable, or a storage
                failure.
        """
        action = action_row(
            session_id,
            turn_expected=turn_expected,
            action_text=action_text,
            action_type=action_type,
            narrative=narrative,
            state_changes=state_changes,
            responses=responses,
            max_action_chars=self.max_action_chars,
        )
        return await self._commit.submit(action)

    async def transcript(self, session_id: str, limit: int | None = None) -> list[TranscriptEntry]:
        """The session's actions in turn order; with ``limit``, only the last ``limit``.

        Raises:
            SessionError: the session does not exist.
            ValueError: ``limit`` is negative.
        """
        check_session_id(session_id)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")
        rows = self._driver.rows
        return await self._run(
            "transcript", lambda conn: rows.transcript(conn, session_id, limit), write=False
        )

    def statistics(self) -> SessionStoreStatistics:
        """A snapshot of the group commit's counters (see ``SessionStoreStatistics``)."""
        return self._commit.statistics()

    # ------------------------------------------------------------------ plumbing

    def _write_batch(self, batch: list[Pending]) -> None:
        """Write a group-commit batch holding the connection (runs in the thread)."""
        with self._lock:
            where = self._driver.where
            if self._closed:
                for pending in batch:
                    pending.error = SessionError(
                        f"record_action: the session store {where!r} is closed"
                    )
                return
            write_batch(self._driver, batch, self._clock)

    async def _run(self, op: str, work: Callable[[C], _T], *, write: bool) -> _T:
        """Run ``work`` inside one transaction, in a worker thread or on the loop as
        the store's placement says."""

        def in_thread() -> _T:
            with self._lock:
                driver = self._driver
                if self._closed:
                    raise SessionError(f"{op}: the session store {driver.where!r} is closed")
                conn: C | None = None
                try:
                    conn = driver.begin(write=write)
                    try:
                        result = work(conn)
                    except BaseException:
                        if driver.in_transaction(conn):
                            with contextlib.suppress(Exception):
                                driver.rollback(conn)
                        raise
                    driver.commit(conn)
                    return result
                except Exception as exc:
                    if not driver.is_driver_error(exc):
                        raise
                    if conn is not None and driver.in_transaction(conn):
                        with contextlib.suppress(Exception):
                            driver.rollback(conn)
                    raise SessionError(
                        f"{op} on {driver.where!r} failed: {driver.describe(exc)}"
                    ) from exc

        placement = self._placement
        if placement.mode == "loop":
            await anyio.lowlevel.checkpoint()
            return in_thread()
        if placement.mode == "thread":
            return await anyio.to_thread.run_sync(in_thread, limiter=self._limiter)
        if not placement.in_thread():  # "auto", fast: a free connection costs no pass
            await anyio.lowlevel.checkpoint_if_cancelled()
            if acquire_if_free(self._limiter):
                try:
                    return placement.timed(in_thread)
                finally:
                    self._limiter.release()
        async with self._limiter:  # "auto": no thread holds the connection meanwhile
            if placement.in_thread():
                return await anyio.to_thread.run_sync(placement.timed, in_thread)
            return placement.timed(in_thread)
