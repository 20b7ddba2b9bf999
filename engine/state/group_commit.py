"""Group commit: concurrent ``record_action`` calls share one transaction.

One caller at a time holds the **flusher** role: it waits for the store's
connection (the batching window: callers arriving meanwhile join the queue), takes
every queued action and writes them in ONE transaction, each in its own SAVEPOINT
(:func:`write_batch`); every caller returns once the transaction holding its action
has committed. With ``quiet_after``, a caller that finds the store quiet (no other
action submitted within that many seconds before it, the connection free) writes
at once, without the window's pass through the event loop. Backend-independent: a
store supplies the connection slot (its ``CapacityLimiter``) and a function that
writes a batch with its :class:`Driver`.
See docs/state.md ("Group commit") for the design and the cancellation table.
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread
import attrs

from ..errors import SessionError
from .records import ActionRow
from .rows import Connection, Driver

__all__ = [
    "GroupCommit",
    "Pending",
    "SessionStoreStatistics",
    "WritePlacement",
    "acquire_if_free",
    "write_batch",
]

C = TypeVar("C", bound=Connection)
_T = TypeVar("_T")


@attrs.frozen
class SessionStoreStatistics:
    """A snapshot of a store's group commit (``statistics()`` of either backend).

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


#: ``"auto"`` writes on the loop while the store's recent work took under this long
FAST_WORK_SECONDS = 0.001


@attrs.define(eq=False)
class WritePlacement:
    """Where a store's work runs: in a worker thread, on the event loop, or ``"auto"``.

    ``"auto"`` runs it on the loop while the recent calls were fast (a moving average
    under ``fast_seconds``; a slower call counts in full at once, faster ones pull
    it down by a tenth each), in a worker thread otherwise. Under load a worker
    thread's round trip costs a busy loop more than an fsync of a local disk, but a
    slow disk must not stall every session: one slow call sends the work to threads
    at once; a 5 ms call keeps it there for about 16 fast calls, a 30 ms one for
    about 32. The work is timed wherever it runs.
    """

    mode: Literal["thread", "loop", "auto"]
    fast_seconds: float = FAST_WORK_SECONDS
    average: float = 0.0  # seconds, as described above

    @classmethod
    def from_setting(cls, in_thread: bool | str, *, loop_allowed: bool = True) -> WritePlacement:
        """From a store's ``in_thread`` (True, False or ``"auto"``); without
        ``loop_allowed`` (network calls, which may hang) ``"auto"`` means threads."""
        if in_thread == "auto":
            return cls("auto" if loop_allowed else "thread")
        if isinstance(in_thread, bool):
            return cls("thread" if in_thread else "loop")
        raise ValueError(f"in_thread must be True, False or 'auto', got {in_thread!r}")

    @property
    def may_use_threads(self) -> bool:
        """Whether some work may run in a thread (callers then hold the connection slot)."""
        return self.mode != "loop"

    def in_thread(self) -> bool:
        """Whether the next piece of work runs in a worker thread."""
        if self.mode == "auto":
            return self.average >= self.fast_seconds
        return self.mode == "thread"

    def observe(self, seconds: float) -> None:
        """Record how long a piece of work took (in whichever place it ran)."""
        if seconds >= self.average:
            self.average = seconds
        else:
            self.average = 0.9 * self.average + 0.1 * seconds

    def timed(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` here and now, observing its duration (also when it raises)."""
        timer = _work_timer
        t0 = timer()
        try:
            return work()
        finally:
            self.observe(timer() - t0)


#: what ``WritePlacement.timed`` measures work with (a test replaces it, so that
#: "fast" and "slow" do not depend on the speed of the machine running it)
_work_timer: Callable[[], float] = time.perf_counter


class Phase(enum.Enum):
    QUEUED = "queued"  # in the queue, nobody will write it unless it is taken
    PROMOTED = "promoted"  # still queued, and its caller holds the flusher role
    TAKEN = "taken"  # in a batch being written; the write will finish
    DONE = "done"  # written or failed: ``result`` or ``error`` is set
    WITHDRAWN = "withdrawn"  # its caller was cancelled while it was queued


@attrs.define(eq=False)
class Pending:
    """One queued action and its caller's wake-up (set once: promoted, or done)."""

    action: ActionRow
    phase: Phase = Phase.QUEUED
    result: int | None = None
    error: BaseException | None = None
    wakeup: anyio.Event = attrs.field(factory=anyio.Event)


@attrs.define(eq=False)
class GroupCommit:
    """The queue and the flusher role of one store.

    Args:
        limiter: the store's connection slot, which every store call holds while it
            uses the connection; the flusher holds it from before it takes the batch
            until the batch is written.
        write: writes a batch, setting each action's ``result`` or ``error`` (in a
            worker thread or on the loop, as ``placement`` says).
        where: names the store in messages.
        placement: where batches are written (the store's; it times them).
        write_first: a backend's own way to write a batch on the loop, tried before
            ``write`` without holding ``limiter``: it sets each action's ``result``
            or ``error`` and returns True, or writes nothing and returns False (then
            ``write`` runs). PostgreSQL's: one pipelined transaction on a
            connection of its own.
        quiet_after: a caller that becomes the flusher when it submits, with no
            other action submitted within this many seconds before it and the
            connection free, writes at once (no batching window: it would only
            delay a lone action by a pass of a busy loop). Actions submitted closer
            together still share the window. 0: always the window.
    """

    limiter: anyio.CapacityLimiter
    write: Callable[[list[Pending]], None]
    where: str
    placement: WritePlacement = attrs.field(factory=lambda: WritePlacement("thread"))
    write_first: Callable[[list[Pending]], Awaitable[bool]] | None = None
    quiet_after: float = 0.0
    _last_submit: float = attrs.field(default=-math.inf, init=False)
    # queued actions in submission order (a dict: O(1) withdrawal)
    _queue: dict[Pending, None] = attrs.field(factory=dict, init=False)
    _flushing: bool = attrs.field(default=False, init=False)
    # the flusher already holds ``limiter``; this one only carries its thread job
    _thread_slot: anyio.CapacityLimiter = attrs.field(
        factory=lambda: anyio.CapacityLimiter(1), init=False
    )
    _batches: int = attrs.field(default=0, init=False)
    _written: int = attrs.field(default=0, init=False)
    _largest: int = attrs.field(default=0, init=False)
    _withdrawn: int = attrs.field(default=0, init=False)

    def statistics(self) -> SessionStoreStatistics:
        return SessionStoreStatistics(
            batches=self._batches,
            actions_written=self._written,
            largest_batch=self._largest,
            pending=len(self._queue),
            withdrawn=self._withdrawn,
            flushing=self._flushing,
        )

    async def submit(self, action: ActionRow) -> int:
        """Queue ``action``; flush it (as the flusher) or wait until a flusher has.

        Bookkeeping is synchronous and all-or-nothing; every await undoes it when
        cancelled: a queued (or promoted) action is withdrawn unwritten, handing the
        flusher role on; a taken action is waited for (shielded), since its
        transaction will commit or roll back whatever the caller does.
        """
        pending = Pending(action)
        now = anyio.current_time()
        # the flusher at once, and nobody submitted just before it: no window
        quiet = not self._flushing and now - self._last_submit >= self.quiet_after > 0
        self._last_submit = now
        self._queue[pending] = None
        if not self._flushing:
            self._flushing = True
            pending.phase = Phase.PROMOTED
        try:
            if pending.phase is Phase.QUEUED:
                await pending.wakeup.wait()  # set when promoted or done
            if pending.phase is Phase.PROMOTED:
                await self._flush(window=not quiet)
        except BaseException:
            with anyio.CancelScope(shield=True):
                if pending.phase in (Phase.QUEUED, Phase.PROMOTED):
                    self._withdraw(pending)
                elif pending.phase is Phase.TAKEN:  # in another flusher's transaction
                    await pending.wakeup.wait()
            raise
        assert pending.phase is Phase.DONE
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _flush(self, *, window: bool = True) -> None:
        """Write every queued action in ONE transaction; the caller is the flusher.

        Waiting for the connection (``limiter``; with ``write_first``, one pass of
        the loop) is the batching window: actions queued meanwhile join the batch.
        Without ``window`` the batch is taken at once when the connection is free.
        Cancellation before the batch is taken leaves everything queued (the caller
        withdraws); after it, the write runs shielded to the end and ``Cancelled``
        is raised afterwards.
        """
        placement = self.placement
        # no thread may hold the connection (``write_first`` needs none)
        holds_slot = placement.may_use_threads and self.write_first is None
        if not window:
            await anyio.lowlevel.checkpoint_if_cancelled()
            # a call holding the connection is waited for, as a window
            window = holds_slot and not acquire_if_free(self.limiter)
        if window:
            if holds_slot:
                await self.limiter.acquire()  # a checkpoint: callers of this loop pass join
            else:
                await anyio.lowlevel.checkpoint()  # let callers of this loop pass join
        batch = list(self._queue)
        self._queue.clear()
        for pending in batch:
            pending.phase = Phase.TAKEN
        self._batches += 1
        self._largest = max(self._largest, len(batch))
        try:
            with anyio.CancelScope(shield=True):
                if self.write_first is None or not await self.write_first(batch):
                    if not holds_slot and placement.may_use_threads:
                        await self.limiter.acquire()
                        holds_slot = True
                    if placement.in_thread():
                        await anyio.to_thread.run_sync(
                            placement.timed, lambda: self.write(batch), limiter=self._thread_slot
                        )
                    else:
                        placement.timed(lambda: self.write(batch))
        finally:
            if holds_slot:
                self.limiter.release()
            for pending in batch:
                if pending.result is None and pending.error is None:  # the write raised
                    pending.error = SessionError(
                        f"record_action on {self.where!r} failed: the write was interrupted"
                    )
                self._written += pending.error is None
                pending.phase = Phase.DONE
                pending.wakeup.set()
            self._handoff()
        await anyio.lowlevel.checkpoint_if_cancelled()

    def _withdraw(self, pending: Pending) -> None:
        """Remove a cancelled caller's queued action; pass on its flusher role."""
        del self._queue[pending]
        promoted = pending.phase is Phase.PROMOTED
        pending.phase = Phase.WITHDRAWN
        self._withdrawn += 1
        if promoted:
            self._handoff()

    def _handoff(self) -> None:
        """The flusher role is free: give it to the oldest queued caller, if any."""
        for first in self._queue:
            first.phase = Phase.PROMOTED
            first.wakeup.set()
            return
        self._flushing = False


def acquire_if_free(limiter: anyio.CapacityLimiter) -> bool:
    """Take a token of ``limiter`` now if one is free (no pass through the loop)."""
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        return False
    return True


def write_batch(driver: Driver[C], batch: list[Pending], clock: Callable[[], float]) -> None:
    """One transaction; each action in its own SAVEPOINT (runs holding the connection).

    Sets each action's ``result`` or ``error``. The batch's sessions are locked
    first (``Driver.lock_sessions``). An action's own failure rolls back that action
    only; a failure of the transaction itself (BEGIN, COMMIT, or an
    error after which the backend aborted the whole transaction, such as a full
    disk or a lost connection) fails every action of the batch and writes none —
    except that when a COMMIT is lost with the connection, PostgreSQL may have
    committed it: the message then says the outcome is unknown.
    """
    where = driver.where
    committing = False
    conn: C | None = None
    try:
        conn = driver.begin(write=True)
        driver.lock_sessions(conn, sorted({p.action.session_id for p in batch}))
        for pending in batch:
            conn.execute("SAVEPOINT action")
            try:
                pending.result = driver.rows.apply_action(conn, pending.action, clock())
            except Exception as exc:
                if not driver.in_transaction(conn):
                    raise  # the backend aborted the whole transaction
                conn.execute("ROLLBACK TO SAVEPOINT action")
                pending.error = exc
                if driver.is_driver_error(exc):
                    pending.error = SessionError(
                        f"record_action on {where!r} failed: {driver.describe(exc)}"
                    )
                    pending.error.__cause__ = exc
            conn.execute("RELEASE SAVEPOINT action")
        committing = True
        driver.commit(conn)
    except BaseException as exc:
        if conn is not None and driver.in_transaction(conn):
            with contextlib.suppress(Exception):
                driver.rollback(conn)
        if committing and conn is not None and driver.commit_outcome_unknown(conn, exc):
            what = (
                f"the connection was lost while committing the batch of {len(batch)} "
                "actions: whether they were stored is unknown; reread the session"
            )
        else:
            what = f"the whole batch of {len(batch)} actions was rolled back"
        for pending in batch:
            if pending.error is None:  # written in the transaction rolled back
                pending.result = None
                pending.error = SessionError(
                    f"record_action on {where!r} failed: {driver.describe(exc)} ({what})"
                )
                pending.error.__cause__ = exc
        if not isinstance(exc, Exception):
            raise
