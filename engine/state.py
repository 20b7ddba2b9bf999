"""Durable session state: one SQLite file (WAL), each player action all-or-nothing.

The store keeps, per session, a turn counter, a transcript row per action and a
key/value table of game state that agents change. ``record_action`` writes all
three atomically, so after any crash a session's turn counter equals its number of
transcript rows and every recorded action's state changes are applied.

Concurrent ``record_action`` calls are group-committed: one caller (the flusher)
writes every queued action in ONE transaction, each in its own SAVEPOINT, and each
caller returns once the transaction holding its action has committed.

All SQLite work runs in a worker thread (``anyio.to_thread.run_sync``) on a single
connection guarded by a lock; a per-store ``CapacityLimiter(1)`` keeps waiting
calls on the event loop instead of parking one thread each.

Usage::

    async with SessionStore.open(path) as store:
        state = await store.ensure_session("s1")
        turn = await store.record_action("s1", action_text=..., action_type=..., ...)

See ``docs/state.md`` for the schema and the durability guarantees.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, final

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs

from .config import StateConfig
from .errors import SessionError
from .session_file import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    ActionRow,
    SessionState,
    StoreLock,
    TranscriptEntry,
    apply_action,
    connect,
    load_session,
    require_session,
    session_row,
)

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "SessionState",
    "SessionStore",
    "SessionStoreStatistics",
    "TranscriptEntry",
]

MAX_SESSION_ID_CHARS = 200
DEFAULT_MAX_ACTION_CHARS = 2000

_T = TypeVar("_T")


@attrs.frozen
class SessionStoreStatistics:
    """A snapshot of a store's group commit (``SessionStore.statistics()``).

    Attributes:
        batches: write transactions run by ``record_action`` flushes so far.
        actions_written: actions committed by them (failed actions excluded).
        largest_batch: most actions taken into one transaction (failed ones included).
        pending: actions queued now, not yet taken into a transaction.
        withdrawn: actions removed from the queue unwritten because their caller
            was cancelled.
        flushing: whether a caller holds the flusher role now.
    """

    batches: int
    actions_written: int
    largest_batch: int
    pending: int
    withdrawn: int
    flushing: bool


class _Phase(enum.Enum):
    QUEUED = "queued"  # in the queue, nobody will write it unless it is taken
    PROMOTED = "promoted"  # still queued, and its caller holds the flusher role
    TAKEN = "taken"  # in a batch being written; the write will finish
    DONE = "done"  # written or failed: ``result`` or ``error`` is set
    WITHDRAWN = "withdrawn"  # its caller was cancelled while it was queued


@attrs.define(eq=False)
class _Pending:
    """One queued action and its caller's wake-up (set once: promoted, or done)."""

    action: ActionRow
    phase: _Phase = _Phase.QUEUED
    result: int | None = None
    error: BaseException | None = None
    wakeup: anyio.Event = attrs.field(factory=anyio.Event)


def _check_text(what: str, text: str) -> None:
    """Refuse text that UTF-8 cannot encode (lone surrogates): SQLite would fail to
    bind it mid-transaction. One ``encode`` per string, no copy kept."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SessionError(
            f"{what} contains {text[exc.start : exc.end]!r} at index {exc.start}, a lone "
            "surrogate that UTF-8 cannot encode; the store keeps UTF-8 text only"
        ) from None


def _check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str):
        raise SessionError(f"session id must be a str, got {type(session_id).__name__}")
    if not session_id.strip():
        raise SessionError("session id must not be empty or whitespace")
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise SessionError(
            f"session id is {len(session_id)} characters long; the limit is {MAX_SESSION_ID_CHARS}"
        )
    if "\x00" in session_id:
        raise SessionError("session id must not contain NUL characters")
    _check_text("session id", session_id)
    return session_id


def _to_json(what: str, value: Mapping[str, Any], *, sql_keys: bool = False) -> str:
    """``value`` as JSON (ASCII: a lone surrogate becomes an escape); ``sql_keys``:
    its keys are also bound to SQL as text, so they must be UTF-8-encodable."""
    if not isinstance(value, Mapping):
        raise SessionError(f"{what} must be a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise SessionError(f"{what} keys must be non-empty strings, got {key!r}")
        if sql_keys:
            _check_text(f"{what} key", key)
    try:
        return json.dumps(dict(value), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SessionError(f"{what} is not JSON-serialisable: {exc}") from None


@final
@attrs.define(eq=False, repr=False)
class SessionStore:
    """The durable session store; open it with ``async with SessionStore.open(path)``.

    Guarantees:
        * ``record_action`` is atomic: after it returns the action
          survives a crash of the process (and, with ``synchronous="FULL"``, the
          default, a power loss on honest disks); if it raises or the process dies
          before it returns, either all of the action is stored or none of it.
        * Concurrent calls (many sessions, or one session from several tasks) are
          serialized on one connection; none loses another's update.
        * Concurrent ``record_action`` calls share transactions (group commit);
          one action's failure rolls back that action only and is raised in its
          caller only; one session's actions are applied in call order.
        * A cancelled call never leaves a half-written action: an action still
          queued is withdrawn unwritten; one being written is waited for (the
          worker thread is not abandoned), so its transaction commits or rolls
          back before ``Cancelled`` propagates.
    """

    path: Path
    max_action_chars: int
    _conn: sqlite3.Connection
    _limiter: anyio.CapacityLimiter
    _clock: Callable[[], float]
    in_thread: bool = True
    _file_lock: StoreLock | None = attrs.field(default=None, kw_only=True)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    # group commit: queued actions in submission order (a dict: O(1) withdrawal)
    _queue: dict[_Pending, None] = attrs.field(factory=dict, init=False)
    _flushing: bool = attrs.field(default=False, init=False)
    # the flusher already holds ``_limiter``; this one only carries its thread job
    _flush_limiter: anyio.CapacityLimiter = attrs.field(
        factory=lambda: anyio.CapacityLimiter(1), init=False
    )
    _batches: int = attrs.field(default=0, init=False)
    _written: int = attrs.field(default=0, init=False)
    _largest: int = attrs.field(default=0, init=False)
    _withdrawn: int = attrs.field(default=0, init=False)

    def __repr__(self) -> str:
        return f"<SessionStore {str(self.path)!r}{' closed' if self._closed else ''}>"

    # ------------------------------------------------------------------ opening

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_action_chars: int = DEFAULT_MAX_ACTION_CHARS,
        synchronous: Literal["NORMAL", "FULL"] = "FULL",
        clock: Callable[[], float] = time.time,
        in_thread: bool = True,
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
            in_thread: run SQLite work in a worker thread (False: on the event loop,
                for mock-clock runs, where a thread wait lets autojump advance
                virtual time in the middle of a write).

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
        if isinstance(max_action_chars, bool) or not isinstance(max_action_chars, int):
            raise TypeError("max_action_chars must be an int")
        if max_action_chars < 1:
            raise ValueError(f"max_action_chars must be >= 1, got {max_action_chars}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        file = Path(path)
        conn, lock = await anyio.to_thread.run_sync(connect, file, synchronous)
        store = cls(
            file, max_action_chars, conn, anyio.CapacityLimiter(1), clock, in_thread, file_lock=lock
        )
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
        created if missing)."""
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

    async def aclose(self) -> None:
        """Close the connection (after calls in flight), then release the store's lock;
        idempotent, shielded from cancellation."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    def _close_sync(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._conn.close()
                finally:
                    if self._file_lock is not None:
                        self._file_lock.release()

    # ------------------------------------------------------------------ sessions

    async def create_session(self, session_id: str) -> SessionState:
        """Create a new session at turn 0.

        Raises:
            SessionError: the id is invalid or the session already exists.
        """
        _check_session_id(session_id)

        def work(conn: sqlite3.Connection) -> SessionState:
            if session_row(conn, session_id) is not None:
                raise SessionError(f"session {session_id!r} already exists")
            now = self._clock()
            conn.execute(
                "INSERT INTO sessions (session_id, turn, created, updated) VALUES (?, 0, ?, ?)",
                (session_id, now, now),
            )
            return SessionState(session_id, 0, {}, now, now)

        return await self._run("create_session", work, write=True)

    async def ensure_session(self, session_id: str) -> SessionState:
        """Return the session, creating it at turn 0 if it does not exist (idempotent)."""
        _check_session_id(session_id)

        def work(conn: sqlite3.Connection) -> SessionState:
            if session_row(conn, session_id) is None:
                now = self._clock()
                conn.execute(
                    "INSERT INTO sessions (session_id, turn, created, updated) VALUES (?, 0, ?, ?)",
                    (session_id, now, now),
                )
            return load_session(conn, session_id)

        return await self._run("ensure_session", work, write=True)

    async def get_session(self, session_id: str) -> SessionState:
        """The session's turn and state. Raises SessionError if it does not exist."""
        _check_session_id(session_id)
        return await self._run(
            "get_session", lambda conn: load_session(conn, session_id), write=False
        )

    async def session_ids(self) -> list[str]:
        """Every session id, sorted."""
        return await self._run(
            "session_ids",
            lambda conn: [
                r[0] for r in conn.execute("SELECT session_id FROM sessions ORDER BY session_id")
            ],
            write=False,
        )

    async def count_actions(self, session_id: str | None = None) -> int:
        """Recorded actions of one session, or of all sessions when ``None``.

        Raises:
            SessionError: ``session_id`` names no session.
        """
        if session_id is None:
            return await self._run(
                "count_actions",
                lambda conn: int(conn.execute("SELECT count(*) FROM transcript").fetchone()[0]),
                write=False,
            )
        _check_session_id(session_id)

        def work(conn: sqlite3.Connection) -> int:
            require_session(conn, session_id)
            row = conn.execute(
                "SELECT count(*) FROM transcript WHERE session_id = ?", (session_id,)
            ).fetchone()
            return int(row[0])

        return await self._run("count_actions", work, write=False)

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
        has committed. The action inserts the transcript row, applies ``state_changes`` to the
        session's state (a value of ``None`` deletes the key; any other value is
        stored as JSON) and bumps the turn counter. Nothing is written when it raises.

        Args:
            turn_expected: if given, the session's current turn as the caller last
                saw it (``SessionState.turn``); a different current turn means
                another action was recorded in between, and the call fails.

        Raises:
            SessionError: empty/whitespace or too long action text, text UTF-8
                cannot encode (a lone surrogate in the action text or type, the
                narrative or a state key; refused before anything is queued), an
                invalid or unknown session, a ``turn_expected`` mismatch, values that
                are not JSON-serialisable, or a storage failure.
        """
        _check_session_id(session_id)
        if not isinstance(action_text, str):
            raise SessionError(f"action text must be a str, got {type(action_text).__name__}")
        if not action_text.strip():
            raise SessionError("action text is empty; say what your character does")
        if len(action_text) > self.max_action_chars:
            raise SessionError(
                f"action text is {len(action_text)} characters long; "
                f"the limit is {self.max_action_chars}"
            )
        if not isinstance(action_type, str) or not action_type:
            raise SessionError(f"action type must be a non-empty str, got {action_type!r}")
        if not isinstance(narrative, str):
            raise SessionError(f"narrative must be a str, got {type(narrative).__name__}")
        _check_text("action text", action_text)
        _check_text("action type", action_type)
        _check_text("narrative", narrative)
        action = ActionRow(
            session_id=session_id,
            turn_expected=turn_expected,
            action_text=action_text,
            action_type=action_type,
            narrative=narrative,
            changes_json=_to_json("state_changes", state_changes, sql_keys=True),
            responses_json=_to_json("responses", responses),
            # serialize each value once, here, so the thread only does SQL
            values=tuple(
                (key, None if value is None else json.dumps(value, sort_keys=True))
                for key, value in state_changes.items()
            ),
        )
        return await self._submit(_Pending(action))

    async def transcript(self, session_id: str, limit: int | None = None) -> list[TranscriptEntry]:
        """The session's actions in turn order; with ``limit``, only the last ``limit``.

        Raises:
            SessionError: the session does not exist.
            ValueError: ``limit`` is negative.
        """
        _check_session_id(session_id)
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0 or None, got {limit}")

        def work(conn: sqlite3.Connection) -> list[TranscriptEntry]:
            require_session(conn, session_id)
            rows = conn.execute(
                "SELECT turn, action_text, action_type, narrative, state_changes, responses,"
                " created FROM transcript WHERE session_id = ? ORDER BY turn DESC LIMIT ?",
                (session_id, -1 if limit is None else limit),
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

        return await self._run("transcript", work, write=False)

    # ------------------------------------------------------------------ group commit

    def statistics(self) -> SessionStoreStatistics:
        """A snapshot of the group commit's counters (see ``SessionStoreStatistics``)."""
        return SessionStoreStatistics(
            batches=self._batches,
            actions_written=self._written,
            largest_batch=self._largest,
            pending=len(self._queue),
            withdrawn=self._withdrawn,
            flushing=self._flushing,
        )

    async def _submit(self, pending: _Pending) -> int:
        """Queue ``pending``; flush it (as the flusher) or wait until a flusher has.

        Bookkeeping is synchronous and all-or-nothing; every await undoes it when
        cancelled: a queued (or promoted) action is withdrawn unwritten, handing the
        flusher role on; a taken action is waited for (shielded), since its
        transaction will commit or roll back whatever the caller does.
        """
        self._queue[pending] = None
        if not self._flushing:
            self._flushing = True
            pending.phase = _Phase.PROMOTED
        try:
            if pending.phase is _Phase.QUEUED:
                await pending.wakeup.wait()  # set when promoted or done
            if pending.phase is _Phase.PROMOTED:
                await self._flush()
        except BaseException:
            with anyio.CancelScope(shield=True):
                if pending.phase in (_Phase.QUEUED, _Phase.PROMOTED):
                    self._withdraw(pending)
                elif pending.phase is _Phase.TAKEN:  # in another flusher's transaction
                    await pending.wakeup.wait()
            raise
        assert pending.phase is _Phase.DONE
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _flush(self) -> None:
        """Write every queued action in ONE transaction; the caller is the flusher.

        Waiting for the connection (``_limiter``) is the batching window: actions
        queued meanwhile join the batch. Cancellation before the batch is taken
        leaves everything queued (the caller withdraws); after it, the write runs
        shielded to the end and ``Cancelled`` is raised afterwards.
        """
        if self.in_thread:
            await self._limiter.acquire()
        else:
            await anyio.lowlevel.checkpoint()  # let callers of this loop pass join
        batch = list(self._queue)
        self._queue.clear()
        for pending in batch:
            pending.phase = _Phase.TAKEN
        self._batches += 1
        self._largest = max(self._largest, len(batch))
        try:
            with anyio.CancelScope(shield=True):
                if self.in_thread:
                    await anyio.to_thread.run_sync(
                        self._write_batch, batch, limiter=self._flush_limiter
                    )
                else:
                    self._write_batch(batch)
        finally:
            if self.in_thread:
                self._limiter.release()
            for pending in batch:
                if pending.result is None and pending.error is None:  # the thread raised
                    pending.error = SessionError(
                        f"record_action on {str(self.path)!r} failed: the write was interrupted"
                    )
                self._written += pending.error is None
                pending.phase = _Phase.DONE
                pending.wakeup.set()
            self._handoff()
        await anyio.lowlevel.checkpoint_if_cancelled()

    def _withdraw(self, pending: _Pending) -> None:
        """Remove a cancelled caller's queued action; pass on its flusher role."""
        del self._queue[pending]
        promoted = pending.phase is _Phase.PROMOTED
        pending.phase = _Phase.WITHDRAWN
        self._withdrawn += 1
        if promoted:
            self._handoff()

    def _handoff(self) -> None:
        """The flusher role is free: give it to the oldest queued caller, if any."""
        for first in self._queue:
            first.phase = _Phase.PROMOTED
            first.wakeup.set()
            return
        self._flushing = False

    def _write_batch(self, batch: list[_Pending]) -> None:
        """One transaction; each action in its own SAVEPOINT (runs in the thread).

        Sets each action's ``result`` or ``error``. An action's own failure rolls back
        that action only; a failure of the transaction itself (BEGIN, COMMIT, or an
        error that makes SQLite roll everything back, such as a full disk) fails every
        action of the batch and writes none.
        """
        where = str(self.path)
        with self._lock:
            if self._closed:
                for pending in batch:
                    pending.error = SessionError(
                        f"record_action: the session store {where!r} is closed"
                    )
                return
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                for pending in batch:
                    conn.execute("SAVEPOINT action")
                    try:
                        pending.result = apply_action(conn, pending.action, self._clock())
                    except Exception as exc:
                        if not conn.in_transaction:
                            raise  # SQLite rolled the whole transaction back
                        conn.execute("ROLLBACK TO action")
                        pending.error = exc
                        if isinstance(exc, sqlite3.Error):
                            pending.error = SessionError(
                                f"record_action on {where!r} failed: {exc}"
                            )
                            pending.error.__cause__ = exc
                    conn.execute("RELEASE action")
                conn.commit()
            except BaseException as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.rollback()
                for pending in batch:
                    if pending.error is None:  # written in the transaction rolled back
                        pending.result = None
                        pending.error = SessionError(
                            f"record_action on {where!r} failed: {exc} "
                            f"(the whole batch of {len(batch)} actions was rolled back)"
                        )
                        pending.error.__cause__ = exc
                if not isinstance(exc, Exception):
                    raise

    # ------------------------------------------------------------------ plumbing

    async def _run(self, op: str, work: Callable[[sqlite3.Connection], _T], *, write: bool) -> _T:
        """Run ``work`` in a worker thread inside one transaction (IMMEDIATE for writes)."""

        def in_thread() -> _T:
            with self._lock:
                if self._closed:
                    raise SessionError(f"{op}: the session store {str(self.path)!r} is closed")
                conn = self._conn
                try:
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    try:
                        result = work(conn)
                    except BaseException:
                        conn.rollback()
                        raise
                    conn.commit()
                    return result
                except sqlite3.Error as exc:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.rollback()
                    raise SessionError(f"{op} on {str(self.path)!r} failed: {exc}") from exc

        if not self.in_thread:
            await anyio.lowlevel.checkpoint()
            return in_thread()
        return await anyio.to_thread.run_sync(in_thread, limiter=self._limiter)
