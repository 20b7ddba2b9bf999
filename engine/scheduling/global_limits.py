"""Global LLM-call limits shared by many engine processes, kept in Redis.

:class:`RedisLimiter` bounds, across every process that uses the same Redis and
limiter ``name``, how many LLM calls run at once and how many calls and tokens start
per minute. The engine holds one :meth:`RedisLimiter.slot` per agent call, inside the
process's own limits (the executor's ``CapacityLimiter`` and the per-server limits).

Guarantees:

* **Bounded concurrency, across processes.** At most ``max_concurrent`` leases exist
  at any instant in Redis (one atomic Lua script admits, on Redis's own clock
  ``TIME``). A lease is a sorted-set member whose score is its expiry; the holder's
  process renews its leases every ``lease_seconds / 3`` while they are held.
* **Leases die with their holder.** A process that is SIGKILLed, frozen or cut off
  from Redis stops renewing; its slots expire at most ``lease_seconds`` after its
  last renewal and are reclaimed by the next admission attempt. The price: a live holder that cannot renew for
  ``lease_seconds`` (Redis unreachable that long, a stalled event loop) loses its
  lease and the global bound can be exceeded by it until it ends; such leases are
  counted as ``lost`` in :meth:`RedisLimiter.statistics`.
* **Rates (GCRA).** Requests per minute and tokens per minute are enforced with the
  generic cell rate algorithm, one theoretical-arrival-time key per rate, checked
  and advanced in the same script as the concurrency slot, so a call is counted
  when it actually starts. In any window of ``W`` seconds at most
  ``burst + W * rate / 60`` requests (tokens) are admitted. A call whose token cost
  exceeds ``tokens_burst`` is admitted only when the token bucket is full and then
  leaves a debt that later calls wait for, so the long-run rate still holds.
* **Waiting, and fairness between processes.** A call that cannot be admitted
  waits: for a rate, as long as the script says (plus up to 2 ms of jitter); for a
  slot, until a holder in this process releases one or a jittered backoff (5 ms
  doubling to 50 ms) expires; then it asks Redis again. A call that finds nobody of
  its process waiting asks Redis at once, beside other such calls (their admissions
  go out together on the one multiplexed connection), and is admitted only if every
  head queued in Redis (below) could have a slot too; refused, it takes no place
  there and joins its process's queue. Within a process waiters are
  served FIFO and only the head of that queue asks Redis. The heads of the waiting
  processes queue in Redis (a sorted set of tickets, ordered by when each head first
  asked, dropped when not refreshed for ``min(lease_seconds, 2 s)``), and a slot
  goes to a head only if every head queued before it can have one too. So freed
  slots go to the waiting processes in turn: a process with a backlog (whose own
  releases wake its own waiters at once) cannot starve the others. It is not FIFO
  across all individual waiters. A head waiting for a rate keeps its place (and so
  one free slot); heads behind it may take the other free slots, and with smaller
  token costs the token budget too. A slot freed in another process is noticed at
  the next poll, so under contention a hand-off between processes leaves the slot
  idle for up to 50 ms (25 ms on average).
* **Spare leases (opt-in: ``spare_leases``).** Without rates, a process may keep up
  to ``spare_leases`` leases admitted ahead of need, so that a call takes one at
  once instead of waiting for Redis's answer. They are real leases (the global bound
  counts them; they are renewed and die with their holder like the others) and are
  admitted in the background, in one script call once half of them are used, as
  newcomers: only when every head queued in Redis could have a slot too, so a
  process never takes a spare while another one waits. A call takes a spare only
  when nobody of its process is queued. A call's lease is kept as a spare instead of
  being released (no Redis call at all) while spares are short, nobody of its
  process is queued and Redis said within the last 50 ms that no process's head
  waits; past those 50 ms the release goes to Redis and the keeper asks again, and
  an admission this process is refused stops the keeping at once. The price, when
  the limit binds: for up to 50 ms after another process's head began waiting, a
  process may go on starting calls on its spares (those admitted before, and leases
  kept), and a spare left unused is given back after 50 ms, so it delays another
  process by at most that long beyond the calls started on spares.
* **Cancellation-safe.** A lease id is chosen before the admission script runs and
  each admission call is shielded (bounded by ``redis_timeout``), so its outcome is
  always known: a caller cancelled while waiting holds nothing, and a caller
  cancelled at any point after the script admitted it releases the lease before
  the cancellation propagates, and never runs its block (not even when the
  admission, or a spare, came in the instant it was cancelled). Release is
  idempotent (``ZREM``) and also gives up the caller's place in the queue.
* **Leaving a slot does not wait for Redis.** The release is queued on the
  limiter's connection with no reply asked for, and the caller goes on at once.
  Redis runs one connection's commands in order, so this limiter's next admission
  or count already sees the slot free. Other processes see it free once Redis has
  read the release. The release script is sent as text (EVAL), so it runs even
  when Redis has lost its scripts. Leaving the limiter waits until Redis has run
  every release it sent. A release that cannot be sent on that connection (none is
  usable) waits for a new connection, as before.
* **Failures are loud.** An unreachable Redis at :meth:`RedisLimiter.connect` raises
  :class:`GlobalLimitUnavailable` naming the URL (without its password). When Redis
  goes away mid-run, :meth:`RedisLimiter.slot` raises :class:`GlobalLimitUnavailable`
  too, and the executor turns it into the agent's ``ERROR`` response: the limiter
  never falls back to local limits, because N processes each admitting on their own
  would exceed the shared budget N-fold, and that budget (a provider's rate limit,
  a cost ceiling) is the reason the limiter exists. A release or renewal that fails
  does not fail the call: the lease then expires after ``lease_seconds``. A release
  sent without a reply fails unheard, with the same outcome.

Every process that shares a ``name`` must use the same limits: each admission is
judged with the caller's ``max_concurrent`` and rates.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import secrets
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar, final
from urllib.parse import parse_qsl, urlencode, urlsplit

import anyio
import anyio.abc
import attrs
import coredis
import coredis.exceptions

from ..errors import EngineError, lone_error
from .redis_scripts import (
    ADMIT,
    ADMIT_SPARES,
    COUNT,
    REDIS_ERRORS,
    RELEASE,
    RENEW,
    close_buffers_on_failed_connect,
)

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    from exceptiongroup import BaseExceptionGroup

__all__ = [
    "GlobalLimitError",
    "GlobalLimitUnavailable",
    "GlobalLimiterStatistics",
    "Lease",
    "RedisLimiter",
    "scrub_url",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: First and last delay (seconds) of the backoff while every slot is taken.
_BACKOFF_MIN = 0.005
_BACKOFF_MAX = 0.05
#: Longest life of a waiting process's place in the queue without a new poll.
_TICKET_SECONDS = 2.0
#: Jitter added to a rate wait, so that processes told the same instant spread out.
_RATE_JITTER = 0.002
#: A spare lease not taken within this long is given back (seconds).
_SPARE_IDLE = 0.05


class GlobalLimitError(EngineError):
    """The global limiter failed; ``url`` (password removed) and ``name`` say which."""

    def __init__(self, message: str, *, url: str, name: str) -> None:
        self.url = url
        self.name = name
        super().__init__(message)


class GlobalLimitUnavailable(GlobalLimitError, ConnectionError):
    """Redis could not be reached (at connect, or by a call mid-run)."""


@attrs.frozen
class Lease:
    """One admission, as yielded by :meth:`RedisLimiter.slot`.

    Attributes:
        id: the lease's member in Redis (``None`` without a concurrency bound).
        admitted_at: when the script admitted the call (for a spare lease: the
            spare), on Redis's clock (Unix s).
        waited: seconds spent waiting for admission (this process's clock).
        tokens: the token cost charged.
    """

    id: str | None
    admitted_at: float
    waited: float
    tokens: int


@attrs.frozen
class GlobalLimiterStatistics:
    """A snapshot of one limiter (one process's view; Redis holds the global one).

    Attributes:
        held: slots this limiter holds now.
        waiting: calls waiting for admission now.
        acquired: admissions so far.
        waited: admissions that had to wait (for a rate or a slot).
        wait_seconds: total time spent waiting by admitted and abandoned calls.
        rate_limited: admission attempts refused by a rate.
        full: admission attempts refused because every slot was taken.
        reclaimed: expired leases (of dead or cut-off holders) this limiter removed.
        lost: own leases that had expired before they could be renewed.
        errors: Redis calls that failed (admission, renewal, release).
        spares: spare leases held now, unused (``held`` counts them too).
        from_spares: admissions served by a spare lease (``acquired`` counts them).
        kept: leases kept as spares when their call ended, instead of released.
    """

    held: int
    waiting: int
    acquired: int
    waited: int
    wait_seconds: float
    rate_limited: int
    full: int
    reclaimed: int
    lost: int
    errors: int
    spares: int = 0
    from_spares: int = 0
    kept: int = 0


@attrs.frozen
class _Attempt:
    admitted: bool
    rate_wait: float
    reclaimed: int
    now: float
    full: bool


def scrub_url(url: str) -> str:
    """``url`` without secrets: user info becomes ``***``, password-like query values too.

    >>> scrub_url("redis://:hunter2@cache:6379/0")
    'redis://***@cache:6379/0'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        secret = ("pass", "secret", "token", "auth", "user")
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if any(s in k.lower() for s in secret) else v) for k, v in pairs],
            safe="*",
        )
    scrubbed = f"{parts.scheme}://{netloc}{parts.path}" if parts.scheme else netloc + parts.path
    return (
        scrubbed + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    )


@final
@attrs.define(eq=False, repr=False)
class RedisLimiter:
    """Global concurrency, request-rate and token-rate limits in Redis.

    Open one with :meth:`connect` (it owns the Redis client and the lease renewal
    task) and hold :meth:`slot` around each LLM call. See the module docstring for
    the guarantees. Not for use across event loops: it lives in the loop that
    entered :meth:`connect`.

    Attributes:
        url: the Redis URL with its password removed (for messages and metrics).
        name: the limiter's name; processes that share it share the limits.
        max_concurrent: leases held at once across processes (``None``: no bound).
        requests_per_minute: call starts per minute (``None``: no limit).
        tokens_per_minute: tokens per minute, as estimated by the callers (``None``:
            no limit).
        requests_burst: calls that may start at once after a quiet spell.
        tokens_burst: tokens that may be spent at once after a quiet spell.
        lease_seconds: how long a lease outlives its last renewal.
        redis_timeout: the longest one Redis call may take.
        spare_leases: leases kept admitted ahead of need (0: none).
    """

    url: str
    name: str
    max_concurrent: int | None
    requests_per_minute: float | None
    tokens_per_minute: float | None
    requests_burst: int
    tokens_burst: int
    lease_seconds: float
    redis_timeout: float
    spare_leases: int
    _client: coredis.Redis[bytes] = attrs.field(alias="client")
    _keys: tuple[str, ...] = attrs.field(alias="keys")
    _admit_script: Any = attrs.field(init=False)
    _spares_script: Any = attrs.field(init=False)
    _release_script: Any = attrs.field(init=False)
    _renew_script: Any = attrs.field(init=False)
    _count_script: Any = attrs.field(init=False)
    _leases: dict[str, None] = attrs.field(init=False, factory=dict)
    # FIFO; an uncontended acquisition does not yield to the event loop (a checkpoint
    # for cancellation still), the admission's Redis call yields anyway.
    _queue: anyio.Lock = attrs.field(init=False, factory=lambda: anyio.Lock(fast_acquire=True))
    _connection: Any = attrs.field(init=False, default=None)
    _released: anyio.Event = attrs.field(init=False, factory=anyio.Event)
    _closed: bool = attrs.field(init=False, default=False)
    _random: random.Random = attrs.field(init=False, factory=random.Random)
    _lease_prefix: str = attrs.field(init=False)
    _lease_serial: int = attrs.field(init=False, default=0)
    _ticket_seconds: float = attrs.field(init=False)
    _slot_args: tuple[int, ...] = attrs.field(init=False)
    _rate_args: tuple[int | float, ...] = attrs.field(init=False)
    _waiting: int = attrs.field(init=False, default=0)
    _queued: int = attrs.field(init=False, default=0)  # callers in ``_queue``'s path
    _acquired: int = attrs.field(init=False, default=0)
    _waited: int = attrs.field(init=False, default=0)
    _wait_seconds: float = attrs.field(init=False, default=0.0)
    _rate_limited: int = attrs.field(init=False, default=0)
    _full: int = attrs.field(init=False, default=0)
    _reclaimed: int = attrs.field(init=False, default=0)
    _lost: int = attrs.field(init=False, default=0)
    _errors: int = attrs.field(init=False, default=0)
    # spare leases: (lease id, Redis's admission time, local time admitted), oldest first
    _spares: deque[tuple[str, float, float]] = attrs.field(init=False, factory=deque)
    _spares_wanted: bool = attrs.field(init=False, default=False)  # a call came since a refusal
    _spares_due: anyio.Event = attrs.field(init=False, factory=anyio.Event)  # wakes the keeper
    _from_spares: int = attrs.field(init=False, default=0)
    # until when (local time) Redis's last word says no process's head waits: a
    # finished call's lease may be kept as a spare until then
    _clear_until: float = attrs.field(init=False, default=-math.inf)
    _confirm_wanted: bool = attrs.field(init=False, default=False)  # ask Redis again
    _redis_clock: float = attrs.field(init=False, default=0.0)  # Redis's time - local time
    _kept: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._admit_script = self._client.register_script(ADMIT)
        self._spares_script = self._client.register_script(ADMIT_SPARES)
        self._release_script = self._client.register_script(RELEASE)
        self._renew_script = self._client.register_script(RENEW)
        self._count_script = self._client.register_script(COUNT)
        host = socket.gethostname().replace(":", "_")
        self._lease_prefix = f"{host}:{os.getpid()}:{secrets.token_hex(4)}"
        self._ticket_seconds = min(self.lease_seconds, _TICKET_SECONDS)
        self._slot_args = (
            self.max_concurrent or 0,
            round(self.lease_seconds * 1e6),
            round(self._ticket_seconds * 1e6),
        )
        self._rate_args = (
            _interval_us(self.requests_per_minute),
            self.requests_burst,
            1,
            _interval_us(self.tokens_per_minute),
            self.tokens_burst,
        )

    def __repr__(self) -> str:
        return (
            f"<RedisLimiter {self.name!r} at {self.url} max_concurrent={self.max_concurrent} "
            f"held={len(self._leases)}>"
        )

    # ------------------------------------------------------------------ lifetime

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        url: str,
        *,
        name: str = "llm",
        max_concurrent: int | None = None,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        requests_burst: int | None = None,
        tokens_burst: int | None = None,
        lease_seconds: float = 10.0,
        redis_timeout: float = 2.0,
        key_prefix: str = "dm-engine:limits",
        spare_leases: int = 0,
    ) -> AsyncIterator[RedisLimiter]:
        """Connect to Redis and run the limiter until the block ends.

        ``async with RedisLimiter.connect(url, max_concurrent=8) as limiter: ...``

        Args:
            url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` or
                ``unix://[[user]:password@]/path/to/socket?db=0``.
            name: the limits' name; every process using it shares them.
            max_concurrent: LLM calls running at once across processes; ``None`` or
                0: no concurrency bound.
            requests_per_minute: call starts per minute; ``None`` or 0: no limit.
            tokens_per_minute: tokens (the callers' estimates) per minute; ``None`` or
                0: no limit.
            requests_burst: calls that may start back to back after a quiet spell
                (default: one second's worth, at least 1).
            tokens_burst: tokens that may be spent back to back after a quiet spell
                (default: one second's worth, at least 1).
            lease_seconds: a lease's lifetime without renewal; renewed every third.
            redis_timeout: the longest a single Redis call may take (connecting included).
            key_prefix: prefix of the Redis keys (``<prefix>:{<name>}:slots`` ...).
            spare_leases: leases to keep admitted ahead of need, at most
                ``max_concurrent``; only without rates (a rate counts a call when it is
                admitted). See the module docstring for what they cost other processes.

        Raises:
            ValueError: a bad argument (before connecting).
            GlobalLimitUnavailable: Redis cannot be reached.
            GlobalLimitError: Redis refused the connection (e.g. a wrong password).

        On leaving, the renewal task stops and leases still held are released. An
        error raised inside the block leaves it as itself, not in an exception group.
        """
        max_concurrent = max_concurrent or None
        requests_per_minute = requests_per_minute or None
        tokens_per_minute = tokens_per_minute or None
        _check_positive("max_concurrent", max_concurrent)
        _check_positive("requests_per_minute", requests_per_minute)
        _check_positive("tokens_per_minute", tokens_per_minute)
        _check_positive("requests_burst", requests_burst)
        _check_positive("tokens_burst", tokens_burst)
        _check_positive("lease_seconds", lease_seconds)
        _check_positive("redis_timeout", redis_timeout)
        for key, count in [
            ("max_concurrent", max_concurrent),
            ("requests_burst", requests_burst),
            ("tokens_burst", tokens_burst),
        ]:
            if count is not None and not isinstance(count, int):
                raise ValueError(f"{key} must be a whole number (or None), got {count!r}")
        if isinstance(spare_leases, bool) or not isinstance(spare_leases, int):
            raise ValueError(f"spare_leases must be a whole number, got {spare_leases!r}")
        if spare_leases < 0:
            raise ValueError(f"spare_leases must be >= 0, got {spare_leases!r}")
        if spare_leases and (requests_per_minute or tokens_per_minute):
            raise ValueError(
                f"spare_leases ({spare_leases}) needs no requests_per_minute and no "
                "tokens_per_minute: a rate counts a call when it is admitted"
            )
        if spare_leases and (max_concurrent is None or spare_leases > max_concurrent):
            raise ValueError(
                f"spare_leases ({spare_leases}) must be at most max_concurrent ({max_concurrent})"
            )
        if not name or any(c in name for c in "{}"):
            raise ValueError(f"name must be non-empty without braces, got {name!r}")
        safe_url = scrub_url(url)
        scheme = urlsplit(url).scheme if "://" in url else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a redis://, rediss:// or unix:// URL: {safe_url!r}")
        client: coredis.Redis[bytes] = coredis.Redis.from_url(
            url, connect_timeout=redis_timeout, stream_timeout=redis_timeout
        )
        close_buffers_on_failed_connect(client)
        tag = "{" + name + "}"  # one hash slot: the admission script spans all five keys
        keys = tuple(f"{key_prefix}:{tag}:{k}" for k in ("slots", "queue", "tickets", "rpm", "tpm"))
        closing = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                try:
                    await tg.start(_serve, client, closing)
                    limiter = cls(
                        url=safe_url,
                        name=name,
                        max_concurrent=max_concurrent,
                        requests_per_minute=requests_per_minute,
                        tokens_per_minute=tokens_per_minute,
                        requests_burst=requests_burst or _per_second(requests_per_minute),
                        tokens_burst=tokens_burst or _per_second(tokens_per_minute),
                        lease_seconds=lease_seconds,
                        redis_timeout=redis_timeout,
                        spare_leases=spare_leases,
                        client=client,
                        keys=keys,
                    )
                    await limiter._call(client.ping(), "connecting")
                    try:
                        async with anyio.create_task_group() as renewal:
                            renewal.start_soon(limiter._renew_forever)
                            if spare_leases:
                                renewal.start_soon(limiter._keep_spares)
                            try:
                                yield limiter
                            finally:
                                renewal.cancel_scope.cancel()
                    finally:  # the tasks have ended: no admission is in flight
                        await limiter._close()
                finally:
                    closing.set()
        except BaseExceptionGroup as group:
            lone = lone_error(group)
            if lone is None:
                raise
            raise lone from None

    # ------------------------------------------------------------------ public API

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int = 0) -> AsyncIterator[Lease]:
        """Wait for the rates and a slot, hold it for the block, release it on exit
        (sent to Redis without waiting for its answer; see the module docstring).

        Args:
            tokens: the call's token cost for ``tokens_per_minute`` (e.g. the prompt's
                estimated tokens plus the maximum output tokens); 0: not charged.

        Raises:
            GlobalLimitUnavailable: Redis could not be reached (or did not answer
                within ``redis_timeout``) while admitting.
            GlobalLimitError: Redis refused the admission script.
            RuntimeError: the limiter is closed.
        """
        lease = await self._admit(tokens)
        try:
            # Admitted in the instant the caller was cancelled (the admission is
            # shielded, and a spare is taken without waiting): leave, do not run.
            await anyio.lowlevel.checkpoint_if_cancelled()
            yield lease
        finally:
            lease_id = lease.id
            if lease_id is not None and not (
                self._keep_as_spare(lease_id) or self._send_release(lease_id)
            ):
                await self._release(lease_id)

    def statistics(self) -> GlobalLimiterStatistics:
        """What this limiter holds and has done (see :class:`GlobalLimiterStatistics`)."""
        return GlobalLimiterStatistics(
            held=len(self._leases),
            waiting=self._waiting,
            acquired=self._acquired,
            waited=self._waited,
            wait_seconds=self._wait_seconds,
            rate_limited=self._rate_limited,
            full=self._full,
            reclaimed=self._reclaimed,
            lost=self._lost,
            errors=self._errors,
            spares=len(self._spares),
            from_spares=self._from_spares,
            kept=self._kept,
        )

    async def held_globally(self) -> int:
        """Unexpired leases in Redis now, held by every process sharing ``name``."""
        self._check_open()
        count = await self._call(
            self._evalsha(self._count_script, self._keys[:1], ()), "counting leases"
        )
        return int(count)

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the global limiter {self.name!r} is closed")

    def _new_lease_id(self) -> str:
        self._lease_serial += 1
        return f"{self._lease_prefix}:{self._lease_serial}"

    async def _admit(self, tokens: int) -> Lease:
        self._check_open()
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self.spare_leases:
            if self._spares and not self._queued:  # nobody of this process is ahead
                spare, admitted_at, _ = self._spares.popleft()
                self._acquired += 1
                self._from_spares += 1
                self._want_spares()
                return Lease(spare, admitted_at, 0.0, tokens)
            self._want_spares()
        lease_id = self._new_lease_id() if self.max_concurrent else None
        start = anyio.current_time()
        asked = False  # whether an admission script may have run for lease_id
        waited = False
        self._waiting += 1
        try:
            attempt = None
            if not self._queued:  # nobody of this process waits: ask at once, beside others
                asked = True
                attempt = await self._try_admit(lease_id, tokens, queue=False)
                waited = not attempt.admitted
                if waited:
                    self._count_refusal(attempt)
            if attempt is None or not attempt.admitted:
                self._queued += 1
                try:
                    async with self._queue:  # FIFO within the process; only the head polls
                        backoff = _BACKOFF_MIN
                        while True:
                            asked = True
                            attempt = await self._try_admit(lease_id, tokens, queue=True)
                            if attempt.admitted:
                                break
                            waited = True
                            self._count_refusal(attempt)
                            backoff = await self._wait_after(attempt, lease_id is not None, backoff)
                finally:
                    self._queued -= 1
        except BaseException:
            # Cancelled or failed, perhaps after the script admitted us: hold nothing.
            if lease_id is not None and asked:
                await self._release(lease_id)
            raise
        finally:
            self._waiting -= 1
            if waited:
                self._wait_seconds += anyio.current_time() - start
        self._acquired += 1
        self._waited += waited
        return Lease(lease_id, attempt.now, anyio.current_time() - start, tokens)

    def _count_refusal(self, attempt: _Attempt) -> None:
        self._clear_until = -math.inf  # the limit binds: keep no finished call's lease
        if attempt.rate_wait > 0:
            self._rate_limited += 1
        else:
            self._full += 1

    async def _wait_after(self, refused: _Attempt, queued: bool, backoff: float) -> float:
        """Wait before the head asks again; return the next backoff. For a rate, as
        long as the script said (a queued head asks again before its ticket expires);
        for a slot, until a holder of this process releases one or the jittered
        backoff expires."""
        if refused.rate_wait > 0:
            delay = refused.rate_wait + self._random.uniform(0, _RATE_JITTER)
            if queued:
                delay = min(delay, self._ticket_seconds / 3)
            await anyio.sleep(delay)
            return backoff
        delay = min(backoff * self._random.uniform(0.5, 1.0), self._ticket_seconds / 3)
        with anyio.move_on_after(delay):
            await self._released.wait()  # a local release: ask again now
        return min(backoff * 2, _BACKOFF_MAX)

    async def _try_admit(self, lease_id: str | None, tokens: int, *, queue: bool) -> _Attempt:
        """One run of the admission script, shielded: its outcome is always known.
        ``queue``: as a waiting process's head, which keeps its place in the queue of
        heads in Redis; else as a newcomer, which takes no place there."""
        args = (lease_id or "", *self._slot_args, int(queue), *self._rate_args, tokens)
        with anyio.CancelScope(shield=True):
            reply = await self._call(
                self._evalsha(self._admit_script, self._keys, args), "admitting a call"
            )
        admitted, wait_us, reclaimed, _held, now_us, full = (int(x) for x in reply)
        self._reclaimed += reclaimed
        if admitted and lease_id is not None:
            self._leases[lease_id] = None
        return _Attempt(bool(admitted), wait_us / 1e6, reclaimed, now_us / 1e6, bool(full))

    def _send_release(self, lease_id: str) -> bool:
        """Queue the lease's release on the connection in use, asking Redis for no
        reply, so the caller goes on at once; ``False`` when no connection is usable
        (then ``_release`` must wait for one).

        Redis runs a connection's commands in order, so this limiter's later calls
        (an admission, ``held_globally``) see the slot free; other clients see it free
        once Redis has read the release. The release sends its script's text (EVAL): a
        Redis that lost its scripts still runs it, and a failure nobody hears of leaves
        the lease to expire after ``lease_seconds``.
        """
        self._leases.pop(lease_id, None)
        if self._closed:
            return True
        connection = self._connection
        if connection is None or not connection.usable:
            return False
        try:
            connection.create_request(b"EVAL", RELEASE, 3, *self._keys[:3], lease_id, noreply=True)
        except REDIS_ERRORS:
            return False
        self._wake_waiters()
        return True

    async def _release(self, lease_id: str) -> None:
        """Remove the lease (idempotent, shielded); failures only count as errors."""
        self._leases.pop(lease_id, None)
        if self._closed:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._call(
                    self._evalsha(self._release_script, self._keys[:3], (lease_id,)), "releasing"
                )
            except GlobalLimitError as exc:
                log.warning("%s; the lease expires in %gs", exc, self.lease_seconds)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        """A slot was given back: this process's waiters ask Redis again now."""
        released, self._released = self._released, anyio.Event()
        released.set()

    def _keep_as_spare(self, lease_id: str) -> bool:
        """Keep a finished call's lease as a spare instead of releasing it: only while
        spares are short, nobody of this process is queued and Redis said no process's
        head waits (within ``_SPARE_IDLE``); past that, the keeper is asked to find out
        and the lease is released. True when kept."""
        if len(self._spares) >= self.spare_leases or self._queued or lease_id not in self._leases:
            return False
        now = anyio.current_time()
        if now >= self._clear_until:
            self._confirm_wanted = True
            self._spares_due.set()
            return False
        if not self._spares:
            self._spares_due.set()  # the keeper may sleep with no spare to give back
        self._spares.append((lease_id, now + self._redis_clock, now))
        self._kept += 1
        return True

    def _want_spares(self) -> None:
        """A call came: the keeper tops the spares up once half are used (or after a
        refusal, at the next call)."""
        self._spares_wanted = True
        if len(self._spares) <= self.spare_leases // 2:
            self._spares_due.set()

    async def _keep_spares(self) -> None:
        """Keep up to ``spare_leases`` leases admitted ahead of need while calls come,
        topped up in one script call once half are used; give back those unused for
        ``_SPARE_IDLE``. Admitted as newcomers: only with a slot left for every head
        queued in Redis."""
        while True:
            self._give_back_idle_spares()
            deficit = self.spare_leases - len(self._spares)
            low = len(self._spares) <= self.spare_leases // 2
            # short of spares after calls came; or, asked whether leases may be kept,
            # only that question (no new spares while calls may have stopped)
            count = deficit if low and self._spares_wanted else 0
            if (count or (self._confirm_wanted and deficit > 0)) and not self._queued:
                self._spares_wanted = self._confirm_wanted = False
                if await self._admit_spares(count) < count:
                    await anyio.sleep(_BACKOFF_MIN)  # full (or heads waiting): not at once
                continue
            due = self._spares_due = anyio.Event()
            idle = self._spares[0][2] + _SPARE_IDLE - anyio.current_time() if self._spares else None
            with anyio.move_on_after(math.inf if idle is None else max(idle, 0.0)):
                await due.wait()

    async def _admit_spares(self, count: int) -> int:
        """Admit up to ``count`` spare leases in one script call (shielded: if its
        outcome is unknown, every id it sent is released); how many were admitted.
        When Redis says no process's head waits, finished calls' leases may be kept as
        spares for ``_SPARE_IDLE`` from when this script call was sent."""
        ids = [self._new_lease_id() for _ in range(count)]
        args = (self._slot_args[0], self._slot_args[1], *ids)
        sent = anyio.current_time()
        try:
            with anyio.CancelScope(shield=True):
                reply = await self._call(
                    self._evalsha(self._spares_script, self._keys[:3], args), "admitting spares"
                )
        except GlobalLimitError as exc:  # the calls' own admissions report it
            log.debug("global limiter %r: no spare leases: %s", self.name, exc)
            for lease_id in ids:  # some may have been admitted: give them back
                if not self._send_release(lease_id):
                    break  # no connection: those expire on their own
            return 0
        admitted, reclaimed, now_us, heads_waiting = (int(x) for x in reply)
        self._reclaimed += reclaimed
        stamp = anyio.current_time()
        self._redis_clock = now_us / 1e6 - stamp
        self._clear_until = -math.inf if heads_waiting else sent + _SPARE_IDLE
        for lease_id in ids[:admitted]:
            self._leases[lease_id] = None
            self._spares.append((lease_id, now_us / 1e6, stamp))
        return admitted

    def _give_back_idle_spares(self) -> None:
        """Release the spares unused for ``_SPARE_IDLE`` (oldest first)."""
        limit = anyio.current_time() - _SPARE_IDLE
        while self._spares and self._spares[0][2] <= limit:
            # without a usable connection the release is not sent: the lease expires
            self._send_release(self._spares.popleft()[0])
            self._spares_wanted = False  # fewer calls came than spares: none again until one

    async def _renew_forever(self) -> None:
        """Extend every held lease every ``lease_seconds / 3`` (one script call)."""
        lease_us = round(self.lease_seconds * 1e6)
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            if not self._leases:
                continue
            ids = list(self._leases)
            try:
                lost = await self._call(
                    self._renew_script(keys=[self._keys[0]], args=[lease_us, *ids]),
                    "renewing leases",
                )
            except GlobalLimitError as exc:
                log.warning("%s; retrying in %gs", exc, self.lease_seconds / 3)
                continue
            for raw in lost:
                lease_id = raw.decode() if isinstance(raw, bytes) else str(raw)
                if lease_id in self._leases:  # not released meanwhile: it had expired
                    del self._leases[lease_id]
                    self._lost += 1
                    self._spares = deque(s for s in self._spares if s[0] != lease_id)
                    log.warning(
                        "global limiter %r: lease %s expired before renewal", self.name, lease_id
                    )

    async def _close(self) -> None:
        """Release what is still held (bounded, shielded); later releases do nothing.

        Releases sent without a reply are waited for first: a reply on the connection
        they went on (the one in use) comes after Redis has run them."""
        connection = self._connection
        if connection is not None and connection.usable and not self._closed:
            with anyio.CancelScope(shield=True):
                try:
                    await self._call(connection.create_request(b"PING"), "closing")
                except (GlobalLimitError, *REDIS_ERRORS) as exc:
                    log.warning("%s; unanswered releases expire in %gs", exc, self.lease_seconds)
        if self._leases and not self._closed:
            ids = list(self._leases)
            with anyio.CancelScope(shield=True):
                try:
                    await self._call(self._client.zrem(self._keys[0], ids), "closing")
                except GlobalLimitError as exc:
                    log.warning("%s; %d leases expire in %gs", exc, len(ids), self.lease_seconds)
        self._leases.clear()
        self._spares.clear()
        self._closed = True

    async def _evalsha(self, script: Any, keys: tuple[str, ...], args: tuple[Any, ...]) -> Any:
        """Run ``script`` by EVALSHA, one round trip, loading it once if Redis lacks it.

        The hot path (admission and release) bypasses coredis's command layer (command
        objects, retry policy, telemetry span, response callback), which cost about as
        much again as the connection's own round trip, and its pool checkout (a lock
        that yields to the event loop): it queues the request on the connection it used
        last, while that one is usable, else on one taken from the pool and given back
        at once, as coredis does for a non-blocking command (a connection multiplexes
        requests; this client is the limiter's own and sends no blocking command that
        could hold one up). A ``NoScriptError`` (Redis restarted or ``SCRIPT FLUSH``)
        loads the script and retries once; EVALSHA of a missing script has no effect,
        so the retry cannot apply it twice.
        """
        for attempt in range(2):
            connection = self._connection
            if connection is None or not connection.usable:
                pool: Any = self._client.connection_pool
                connection = self._connection = await pool.get_connection()
                pool.release(connection)
            request = connection.create_request(
                b"EVALSHA", script.sha, len(keys), *keys, *args, decode=False
            )
            try:
                return await request
            except coredis.exceptions.NoScriptError:
                if attempt:
                    raise
                await self._client.script_load(script.script)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call(self, request: Awaitable[T], doing: str) -> T:
        """Await one Redis call within ``redis_timeout``; translate its failures."""
        try:
            with anyio.fail_after(self.redis_timeout):
                return await request
        except REDIS_ERRORS as exc:
            self._errors += 1
            where = f"global limiter {self.name!r} at {self.url}"
            if not isinstance(exc, coredis.exceptions.RedisError) or isinstance(
                exc, coredis.exceptions.ConnectionError
            ):
                reason = "no answer within" if isinstance(exc, TimeoutError) else "cannot reach"
                detail = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):
                    detail = f"{self.redis_timeout:g}s"
                raise GlobalLimitUnavailable(
                    f"{where}: {reason} Redis ({doing}): {detail}", url=self.url, name=self.name
                ) from exc
            raise GlobalLimitError(
                f"{where}: Redis failed ({doing}): {type(exc).__name__}: {exc}",
                url=self.url,
                name=self.name,
            ) from exc


async def _serve(
    client: coredis.Redis[bytes],
    closing: anyio.Event,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``client`` open until ``closing`` is set, whatever is cancelled meanwhile.

    coredis runs each connection's reader and writer in the task group of the
    ``async with client:`` block. Entered in the caller's task, that group would be
    cancelled together with the caller's scope, and the shielded releases of the
    holders being cancelled with it would find their connection gone. Shielded here,
    the connections outlive every holder; ``connect`` sets ``closing`` last.
    """
    with anyio.CancelScope(shield=True):
        async with client:
            task_status.started()
            await closing.wait()


def _check_positive(key: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{key} must be > 0 (or None), got {value!r}")


def _per_second(per_minute: float | None) -> int:
    return max(1, math.ceil(per_minute / 60)) if per_minute else 1


def _interval_us(per_minute: float | None) -> float:
    """Microseconds per unit at ``per_minute`` units per minute (0: no limit)."""
    return 60e6 / per_minute if per_minute else 0.0
