"""The shared backend: session state in PostgreSQL, for many engine processes.

Same contract as the SQLite store (one transaction per group-commit batch; one
action's failure fails that action alone; nothing reported done is lost; turn
counters equal transcript rows; ``turn_expected`` compare-and-set), plus **session
leases**: ``async with store.session_lease(session_id)`` holds a row of
``session_leases`` that only one holder at a time can have, so engine processes
never run actions of one session at the same time.

Three connections. Two *lanes* are driven from the event loop with libpq's
non-blocking API (:mod:`engine.state.postgres_lane`; psycopg's async API is
asyncio-only, and the engine runs on trio too): one runs the single statements that
need no transaction, the leases' (their commits do not wait for the WAL flush) and
``find_session``'s read, the ones called together in one round trip (a lease's take
reads the session's row in its round trip, for the holder's first ``find_session``);
the other runs
each group-commit batch as one pipelined transaction, two round trips
(:mod:`engine.state.postgres_batch`).
The main connection runs everything else with psycopg's blocking API in a worker
thread, behind the same lock and ``CapacityLimiter(1)`` as SQLite's — and a batch
whose pipelined transaction failed, again with one SAVEPOINT per action. See
docs/state.md ("PostgreSQL").

Usage::

    async with PostgresSessionStore.open("postgresql://dm@db:5432/dm",
                                         password=os.environ["DM_PG_PASSWORD"]) as store:
        async with store.session_lease("s1"):
            state = await store.ensure_session("s1")
            await store.record_action("s1", turn_expected=state.turn, ...)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, ClassVar, Literal, final

import anyio
import anyio.to_thread
import attrs
import psycopg

from ..config import StateConfig
from ..config_checks import postgres_url_problem, redact_url
from ..errors import SessionError
from .base import SessionStoreBase
from .group_commit import Pending, WritePlacement
from .postgres_batch import write_on_lane
from .postgres_driver import PostgresDriver
from .postgres_lane import Lane, LaneResult
from .postgres_schema import Scrubber, connect, prepare
from .records import DEFAULT_MAX_ACTION_CHARS, SessionState, check_session_id
from .sqlite import validated

__all__ = ["DEFAULT_LEASE_SECONDS", "PostgresSessionStore"]

DEFAULT_LEASE_SECONDS = 30.0
# waiting for a lease: the first poll after ~5 ms, doubling to ~100 ms, each jittered
_FIRST_POLL = 0.005
_MAX_POLL = 0.1

# Take the lease if it is free, expired, or already held by this holder; the server's
# clock decides expiry, so the engines' clocks need not agree. The clock is read once:
# a lease taken over starts no earlier than the instant its predecessor expired.
_TAKE = b"""
INSERT INTO session_leases AS l (session_id, holder, expires_at)
VALUES ($1::text, $2::text, clock_timestamp() + make_interval(secs => $3::float8))
ON CONFLICT (session_id) DO UPDATE
    SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE l.holder = excluded.holder
        OR l.expires_at <= excluded.expires_at - make_interval(secs => $3::float8)
RETURNING l.holder
"""
_RENEW = b"""
UPDATE session_leases SET expires_at = clock_timestamp() + make_interval(secs => $1::float8)
WHERE session_id = $2::text AND holder = $3::text
"""
_RELEASE = b"DELETE FROM session_leases WHERE session_id = $1::text AND holder = $2::text"
# The lane's commits need not wait for the WAL flush (``synchronous_commit`` off):
# after a server crash a lease taken, renewed or released in the last moments may
# read as it was before. Leases expire anyway, and a session's actions stay safe
# through ``turn_expected``: an action run by a second holder fails its
# compare-and-set instead of taking a turn. Saves two WAL flushes per action (take
# and release), which the action waited for.
_LANE_SYNCHRONOUS = "NORMAL"
# A session and its state in one statement (one snapshot, no transaction needed).
_FIND = b"""
SELECT s.turn, s.created, s.updated, st.key, st.value
FROM sessions s LEFT JOIN state st ON st.session_id = s.session_id
WHERE s.session_id = $1::text ORDER BY st.key
"""


@final
@attrs.define(eq=False, repr=False)
class PostgresSessionStore(SessionStoreBase["psycopg.Connection[Any]"]):
    """The PostgreSQL session store; ``async with PostgresSessionStore.open(url)``.

    Attributes:
        url: the server's URL, without a password (safe to show).
        lease_seconds: how long a lease lasts without renewal: the longest a killed
            engine blocks the sessions it was serving.
    """

    shared: ClassVar[bool] = True
    loop_allowed: ClassVar[bool] = False  # a network call may hang: "auto" means threads
    quiet_write_seconds: ClassVar[float] = 0.0  # its writes wait on the network: batch them

    url: str = attrs.field(kw_only=True)
    lease_seconds: float = attrs.field(kw_only=True)
    _lane: Lane = attrs.field(kw_only=True)  # see the module docstring
    _commit_lane: Lane = attrs.field(kw_only=True)
    _holder: str = attrs.field(
        init=False,
        factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}",
    )
    _leases: itertools.count[int] = attrs.field(init=False, factory=itertools.count)
    # per session: a FIFO lock for this store's waiters (one of them polls the server)
    _waiting: dict[str, tuple[anyio.Lock, int]] = attrs.field(init=False, factory=dict)
    # per session held here: its row as read right after the lease was taken, until
    # the first ``find_session`` (or the lease's end) uses it up
    _found: dict[str, LaneResult] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._commit.write_first = self._write_on_lane

    async def _write_on_lane(self, batch: list[Pending]) -> bool:
        return await write_on_lane(self._commit_lane, batch, self._clock)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        url: str,
        *,
        password: str | None = None,
        max_action_chars: int = DEFAULT_MAX_ACTION_CHARS,
        synchronous: Literal["NORMAL", "FULL"] = "FULL",
        clock: Callable[[], float] = time.time,
        in_thread: bool | str = True,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        connect_timeout: float = 10.0,
    ) -> AsyncIterator[PostgresSessionStore]:
        """Connect to the store at ``url`` (creating its tables in an empty schema);
        close the connection on exit.

        Args:
            url: ``postgresql://user@host:port/database`` — no password in it.
            password: the login's password (``None``: libpq's own means, such as
                ``~/.pgpass``). It is never shown: errors name the URL only.
            synchronous: ``"FULL"`` (``synchronous_commit = on``): a commit waits
                for the server's WAL flush, so a returned action survives a crash
                of the server too; ``"NORMAL"`` (``off``): it survives a crash of
                the engine, not of the server.
            lease_seconds: see ``session_lease``.
            connect_timeout: seconds to wait for the server at (re)connection.

        Raises:
            ValueError: a bad argument, such as a URL holding a password.
            SessionError: the server cannot be reached or refuses the login; the
                schema holds our table names but is not our store, has another
                schema version or lacks tables; the login cannot write the tables.
        """
        validated(max_action_chars)
        WritePlacement.from_setting(in_thread)  # a bad value fails before connecting
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        problem = postgres_url_problem(url) if isinstance(url, str) else "must be a str"
        if problem:
            raise ValueError(f"url {redact_url(str(url))!r} {problem}")
        if not (isinstance(lease_seconds, (int, float)) and 0 < lease_seconds < math.inf):
            raise ValueError(f"lease_seconds must be a number > 0, got {lease_seconds!r}")
        scrub = Scrubber(password)

        def reconnect() -> psycopg.Connection[Any]:
            return connect(
                url, password, scrub, synchronous=synchronous, connect_timeout=connect_timeout
            )

        def first() -> psycopg.Connection[Any]:
            conn = reconnect()
            try:
                prepare(conn, url, scrub)
            except BaseException:
                conn.close()
                raise
            return conn

        def reconnect_lane() -> psycopg.Connection[Any]:
            return connect(
                url, password, scrub, synchronous=_LANE_SYNCHRONOUS, connect_timeout=connect_timeout
            )

        conn = await anyio.to_thread.run_sync(first)
        lanes: list[Lane] = []
        try:
            lanes.append(await Lane.open(url, reconnect_lane, scrub))
            lanes.append(await Lane.open(url, reconnect, scrub))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for lane in lanes:
                    await lane.aclose()
            conn.close()
            raise
        store = cls(
            max_action_chars,
            PostgresDriver(url, conn, reconnect, scrub),
            clock,
            in_thread,
            url=url,
            lease_seconds=float(lease_seconds),
            lane=lanes[0],
            commit_lane=lanes[1],
        )
        try:
            yield store
        finally:
            await store.aclose()

    @classmethod
    def from_config(
        cls, config: StateConfig, environ: Mapping[str, str] | None = None
    ) -> contextlib.AbstractAsyncContextManager[PostgresSessionStore]:
        """``open`` the store of ``[state] url``, with the password from the
        environment variable ``[state] password_env`` names (if any).

        Raises:
            SessionError: that variable is not set, or is empty.
        """
        environ = os.environ if environ is None else environ
        password = None
        if config.password_env:
            password = environ.get(config.password_env)
            if not password:
                raise SessionError(
                    f"the environment variable {config.password_env} named by [state] "
                    f"password_env is {'empty' if password == '' else 'not set'}; set it to "
                    f"the password of the PostgreSQL session store {config.url!r}"
                )
        return cls.open(
            config.url,
            password=password,
            max_action_chars=config.max_action_chars,
            synchronous="NORMAL" if config.synchronous == "NORMAL" else "FULL",
            in_thread=config.write_in_thread,
            lease_seconds=config.session_lease_seconds,
        )

    # ------------------------------------------------------------------ leases

    @contextlib.asynccontextmanager
    async def session_lease(self, session_id: str) -> AsyncIterator[None]:
        """Hold the session's lease while the block runs; wait for it first.

        While one holder (a task of any engine process on this store) has the
        lease, every other waits: this store's tasks in FIFO order, other
        processes by polling with a short jittered backoff. The holder renews the
        lease every ``lease_seconds / 3`` in the background and deletes it on
        exit, also on error or cancellation. A holder killed without deleting it
        blocks the session until it expires: ``lease_seconds`` at most.

        If the lease is lost while held — renewals failed for ``lease_seconds``
        (the server was unreachable, the process stalled) and another holder took
        the expired lease — the block is cancelled and ``SessionError`` raised:
        two holders may then have overlapped, which is why an action must also
        pass the turn it read under the lease as ``record_action``'s
        ``turn_expected`` (the stale one then fails instead of taking a turn).

        Raises:
            SessionError: the id is invalid, the lease was lost, or the server
                failed while taking it.
        """
        check_session_id(session_id)
        lock, refs = self._waiting.get(session_id, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._waiting[session_id] = (lock, refs + 1)
        try:
            async with lock:
                token = await self._take(session_id)
                try:
                    lost: list[str] = []
                    body = anyio.CancelScope()
                    error: BaseException | None = None
                    # the body's own exception is kept out of the task group (which
                    # would wrap it in an exception group) and re-raised below
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(self._renew, session_id, token, body, lost)
                        try:
                            with body:
                                yield
                        except BaseException as exc:
                            error = exc
                        finally:
                            tg.cancel_scope.cancel()
                    if error is not None and (not lost or not isinstance(error, Exception)):
                        raise error
                    if lost:
                        raise SessionError(lost[0]) from error
                finally:
                    self._found.pop(session_id, None)
                    with anyio.CancelScope(shield=True):
                        await self._give_back(session_id, token)
        finally:
            lock, refs = self._waiting[session_id]
            if refs == 1:
                del self._waiting[session_id]
            else:
                self._waiting[session_id] = (lock, refs - 1)

    async def _take(self, session_id: str) -> str:
        """Poll until the lease is ours; return its holder token. The session's row
        is read in the same round trip, right after the take (its own statement, so
        it sees every commit made before the lease was ours), for the holder's first
        ``find_session``. A take sent, then unheard because its caller was cancelled,
        runs to its end; a lease it took is given back at once."""
        token = f"{self._holder}#{next(self._leases)}"
        delay = _FIRST_POLL

        async def unheard(outcomes: list[LaneResult | SessionError]) -> None:
            took = outcomes[0]
            if isinstance(took, LaneResult) and took.rows:  # taken: not left to expire
                await self._give_back(session_id, token)

        while True:
            took, found = await self._lane.execute_each(
                "session_lease",
                [(_TAKE, (session_id, token, self.lease_seconds)), (_FIND, (session_id,))],
                unheard=unheard,
            )
            if isinstance(took, SessionError):
                raise took
            if took.rows:
                if isinstance(found, LaneResult):  # else find_session reads it again
                    self._found[session_id] = found
                return token
            await anyio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, _MAX_POLL)

    async def _renew(
        self, session_id: str, token: str, body: anyio.CancelScope, lost: list[str]
    ) -> None:
        """Extend the lease every ``lease_seconds / 3``; on loss cancel ``body``."""
        confirmed = time.monotonic()
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            sent = time.monotonic()

            try:
                renewed = await self._lane.execute(
                    "session_lease", _RENEW, (self.lease_seconds, session_id, token)
                )
                ours = renewed.changed == 1
            except SessionError as exc:
                if time.monotonic() - confirmed < self.lease_seconds:
                    continue  # try again; the lease has not expired yet
                lost.append(
                    f"the lease on session {session_id!r} could not be renewed for "
                    f"{self.lease_seconds:g} s ({exc}); another engine may run the session"
                )
                body.cancel()
                return
            if ours:
                confirmed = sent
                continue
            lost.append(
                f"the lease on session {session_id!r} was lost: it expired before it was "
                "renewed and another engine took it"
            )
            body.cancel()
            return

    async def _give_back(self, session_id: str, token: str) -> None:
        """Delete the lease if it is still ours (a failure leaves it to expire)."""

        with contextlib.suppress(SessionError):
            await self._lane.execute("session_lease", _RELEASE, (session_id, token))

    # ------------------------------------------------------------------ the lane

    async def find_session(self, session_id: str) -> SessionState | None:
        """As every store's (see ``SessionStoreBase``), in one statement on the lane;
        the first call of a lease's holder uses the row read with the take instead (no
        round trip: nobody else may have written the session since)."""
        check_session_id(session_id)
        found = self._found.pop(session_id, None)  # read when this holder took the lease
        if found is None:
            found = await self._lane.execute("find_session", _FIND, (session_id,))
        rows = found.rows
        if not rows:
            return None
        turn, created, updated = (str(v) for v in rows[0][:3])  # NOT NULL columns
        state = {key: json.loads(str(value)) for *_, key, value in rows if key is not None}
        return SessionState(session_id, int(turn), state, float(created), float(updated))

    async def aclose(self) -> None:
        """Close the three connections (after the statements in flight); idempotent."""
        with anyio.CancelScope(shield=True):
            await self._lane.aclose()
            await self._commit_lane.aclose()
            await super().aclose()
