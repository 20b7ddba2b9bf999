"""A size-aware LRU + TTL cache of module content with single-flight loading.

Guarantees (see ``docs/cache.md``):

* The sum of entry sizes never exceeds ``max_size_bytes``; a value larger than the
  whole cache is refused. Eviction pops the LRU head: O(1) amortised per put.
* Entries expire ``ttl_minutes`` after they were stored, on the event loop's clock
  (what ``anyio.current_time()`` returns, read without its per-call dispatch: see
  ``_now``). Expired entries are never returned, and every
  operation first reclaims all expired entries (the expiry queue is in store
  order, so this is a pop from its head: no background task, no scan).
* ``get_or_load`` is single flight: concurrent misses on one key share one loader
  call. If the task running the loader is cancelled, the oldest remaining waiter
  takes the load over with its own loader; nobody hangs, nobody is cancelled who
  was not cancelled itself.
* ``put``/``invalidate``/``invalidate_pattern``/``clear`` supersede a load in
  flight for a matching key: its result still goes to its waiters but is not
  stored, and later callers start a fresh load.
* Stats are exact; ``clear`` does not reset them (they are lifetime counters).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import sys
import warnings
from asyncio import BaseEventLoop, get_running_loop
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from threading import get_ident
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol, final

import anyio
import anyio.lowlevel
import attrs
import sniffio

from ..errors import LoadError

if TYPE_CHECKING:
    from ..config import CacheConfig

__all__ = ["CacheStats", "ModuleCache", "ModuleSource", "estimate_size", "section_key"]

_MIB = 1024 * 1024
_ATOMS = (str, bytes, bytearray, int, float, complex, bool, type(None))
_SEQUENCES = (list, tuple, set, frozenset, deque)


class ModuleSource(Protocol):
    """What the cache and the lazy loader need of an adventure module."""

    @property
    def name(self) -> str: ...

    def section_names(self) -> list[str]: ...

    async def load_section(self, name: str) -> Any: ...


def section_key(module_name: str, section: str) -> str:
    """The cache key of a module section: ``module:<module>:<section>``."""
    return f"module:{module_name}:{section}"


def estimate_size(value: object) -> int:
    """Deep size of ``value`` in bytes, as ``sys.getsizeof`` sums.

    Follows ``dict`` keys and values, the items of ``list``/``tuple``/``set``/
    ``frozenset``/``deque``, an object's ``__dict__`` and the fields of attrs
    classes; strings, bytes and numbers are leaves. Each object is counted once per
    value (shared sub-objects are not double counted; objects shared *between*
    entries are counted in each). Anything else counts its shallow size only.
    """
    seen: set[int] = set()
    total = 0
    stack: list[object] = [value]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, _ATOMS):
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, _SEQUENCES):
            stack.extend(obj)
        elif attrs.has(cls := type(obj)):
            stack.extend(getattr(obj, f.name) for f in attrs.fields(cls))
        else:
            d = getattr(obj, "__dict__", None)
            if isinstance(d, dict):
                stack.append(d)
    return total


def _asyncio_time() -> float:
    """What anyio's asyncio backend returns; notes a loop whose clock is monotonic()."""
    global _monotonic_loop
    loop = get_running_loop()
    if type(loop).time is _BASE_LOOP_TIME and hasattr(loop, "_thread_id"):
        _monotonic_loop = loop
    return loop.time()


def _no_clock_yet() -> float:
    raise RuntimeError("no clock resolved yet")


def _resolve_clock() -> Callable[[], float]:
    """The running event loop's clock function: ``sniffio`` names the library, whose
    public API reads its clock (the same values as ``anyio.current_time()``).

    Raises:
        RuntimeError: no event loop runs in this thread.
    """
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        raise RuntimeError(
            "ModuleCache needs a running event loop (trio or asyncio): "
            "its TTL runs on anyio.current_time()"
        ) from None
    if library == "trio":
        import trio  # already loaded: it runs this thread

        return trio.current_time  # a MockClock's virtual time in tests
    if library == "asyncio":
        return _asyncio_time
    return anyio.current_time  # any other backend: anyio's own dispatch


#: The clock of the last event loop the cache ran in. Each works only inside its
#: own kind of loop and raises ``RuntimeError`` anywhere else (trio's outside a trio
#: run, asyncio's without a running asyncio loop in this thread), which is when it
#: is resolved anew: a hit pays one call, not anyio's backend lookup per read.
_clock: Callable[[], float] = _no_clock_yet

_BASE_LOOP_TIME = BaseEventLoop.time  # time.monotonic(), the stdlib loops' clock
#: The last asyncio loop seen running whose clock is the stdlib's ``time.monotonic()``.
#: ``get`` reads ``time.monotonic()`` directly while that loop runs in the calling
#: thread (``BaseEventLoop`` sets ``_thread_id`` for exactly that span): on Python
#: 3.11 ``asyncio.get_running_loop()`` makes a ``getpid()`` system call, a third of a hit.
_monotonic_loop: Any = None


def _now() -> float:
    """The running event loop's time (``anyio.current_time()``).

    Raises:
        RuntimeError: no event loop runs in this thread.
    """
    global _clock
    try:
        return _clock()
    except RuntimeError:
        _clock = _resolve_clock()
        return _clock()


def _positive(_inst: object, attr: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attr.name} must be > 0, got {value!r}")


@attrs.frozen
class CacheStats:
    """A snapshot of a :class:`ModuleCache`.

    ``hits + misses`` is the number of lookups (``get`` and ``get_or_load``);
    ``coalesced`` counts ``get_or_load`` misses that joined a load in flight;
    ``loads`` counts loader calls (take-overs included), ``load_errors`` those that
    raised; ``evictions`` counts entries dropped for room, ``expirations`` those
    dropped by TTL.
    """

    hits: int
    misses: int
    hit_rate: float
    evictions: int
    expirations: int
    loads: int
    coalesced: int
    load_errors: int
    entries: int
    size_bytes: int
    max_size_bytes: int


@attrs.define(eq=False, slots=True)
class _Entry:
    value: Any
    size: int
    expires: float


@attrs.define(eq=False, slots=True)
class _Waiter:
    loader: Callable[[], Awaitable[Any]]
    event: anyio.Event = attrs.field(factory=anyio.Event)
    promoted: bool = False  # woken to take the load over


@attrs.define(eq=False, slots=True)
class _Flight:
    """One load of one key, shared by every caller that missed while it ran."""

    key: str
    stale: bool = False  # superseded: hand the result out, do not store it
    done: bool = False
    value: Any = None
    error: BaseException | None = None
    waiters: dict[_Waiter, None] = attrs.field(factory=dict)  # FIFO, O(1) removal


@final
# on_setattr=NO_OP: no validating __setattr__, which made every counter update ~10x slower
@attrs.define(eq=False, repr=False, on_setattr=attrs.setters.NO_OP)
class ModuleCache:
    """Size-bounded LRU cache with TTL and single-flight loads.

    Args:
        max_size_mb: budget in MiB (``max_size_bytes = max_size_mb * 2**20``).
        ttl_minutes: lifetime of an entry from the moment it is stored.

    ``get``/``put``/``in``/``get_or_load``/``preload`` read the loop's clock and so
    must run inside an event loop (``RuntimeError`` naming the cause otherwise);
    ``invalidate``/``invalidate_pattern``/``clear``/``statistics`` also work outside
    one (they then skip the expiry sweep). ``statistics()`` is named as the other
    objects' (the executor, the lazy loader, the session store, anyio's limiters);
    ``get_stats()`` is its deprecated alias.
    """

    max_size_mb: float = attrs.field(default=50.0, validator=_positive)
    ttl_minutes: float = attrs.field(default=30.0, validator=_positive)
    _max_bytes: int = attrs.field(init=False)
    _ttl: float = attrs.field(init=False)
    _lru: OrderedDict[str, _Entry] = attrs.field(init=False, factory=OrderedDict)
    _by_expiry: OrderedDict[str, _Entry] = attrs.field(init=False, factory=OrderedDict)
    _next_expiry: float = attrs.field(init=False, default=float("inf"))
    _size: int = attrs.field(init=False, default=0)
    _flights: dict[str, _Flight] = attrs.field(init=False, factory=dict)
    _hits: int = attrs.field(init=False, default=0)
    _misses: int = attrs.field(init=False, default=0)
    _evictions: int = attrs.field(init=False, default=0)
    _expirations: int = attrs.field(init=False, default=0)
    _loads: int = attrs.field(init=False, default=0)
    _coalesced: int = attrs.field(init=False, default=0)
    _load_errors: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        self._max_bytes = int(self.max_size_mb * _MIB)
        self._ttl = self.ttl_minutes * 60.0

    @classmethod
    def from_config(cls, config: CacheConfig) -> ModuleCache:
        """A cache sized by ``config.performance.cache``."""
        return cls(max_size_mb=config.max_size_mb, ttl_minutes=config.ttl_minutes)

    def __repr__(self) -> str:
        return (
            f"<ModuleCache {len(self._lru)} entries, {self._size}/{self._max_bytes} bytes, "
            f"ttl {self._ttl:g}s>"
        )

    # ------------------------------------------------------------------ sync API

    def get(self, key: str) -> Any:
        """The live value of ``key`` (marked most recently used), or None. O(1)."""
        loop = _monotonic_loop  # _now(), inlined: this is the hot path
        if loop is not None and loop._thread_id == get_ident():
            now = monotonic()  # that loop's time(), without finding the loop
        else:
            try:
                now = _clock()
            except RuntimeError:
                now = _now()  # another kind of loop (or none: the explanatory error)
        if now >= self._next_expiry:
            self._sweep(now)
        entry = self._lru.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._lru.move_to_end(key)
        self._hits += 1
        return entry.value

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` holds a live value; no stats, no LRU change."""
        self._sweep(_now())
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, key: str, value: Any, size: int | None = None) -> bool:
        """Store ``value``, evicting least recently used entries for room.

        ``size`` defaults to :func:`estimate_size`. A value larger than the whole
        cache is not stored (and any old value of ``key`` is dropped): returns
        False. A load of ``key`` in flight is superseded (its result is not stored).
        """
        if size is None:
            size = estimate_size(value)
        elif size < 0:
            raise ValueError(f"size must be >= 0, got {size!r}")
        self._supersede(key)
        return self._store(key, value, size, _now())

    def invalidate(self, key: str) -> bool:
        """Drop ``key``; True if a live value was stored. A load in flight is superseded."""
        self._sweep_if_running()
        self._supersede(key)
        return self._remove(key)

    def invalidate_pattern(self, pattern: str) -> int:
        """Drop every key matching the glob ``pattern``; returns how many were stored."""
        self._sweep_if_running()
        match = re.compile(fnmatch.translate(pattern)).match
        for key in [k for k in self._flights if match(k)]:
            self._supersede(key)
        doomed = [k for k in self._lru if match(k)]
        for key in doomed:
            self._remove(key)
        return len(doomed)

    def clear(self) -> None:
        """Drop every entry and supersede every load in flight. Stats are kept."""
        self._sweep_if_running()  # so entries past their TTL count as expirations
        for key in list(self._flights):
            self._supersede(key)
        self._lru.clear()
        self._by_expiry.clear()
        self._size = 0
        self._next_expiry = float("inf")

    def statistics(self) -> CacheStats:
        """An exact snapshot (expired entries reclaimed first when a loop runs)."""
        self._sweep_if_running()
        lookups = self._hits + self._misses
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            hit_rate=self._hits / lookups if lookups else 0.0,
            evictions=self._evictions,
            expirations=self._expirations,
            loads=self._loads,
            coalesced=self._coalesced,
            load_errors=self._load_errors,
            entries=len(self._lru),
            size_bytes=self._size,
            max_size_bytes=self._max_bytes,
        )

    def get_stats(self) -> CacheStats:
        """Deprecated alias of :meth:`statistics` (the name docs/api.md gave before)."""
        warnings.warn(
            "ModuleCache.get_stats() is deprecated; use ModuleCache.statistics()",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.statistics()

    # ------------------------------------------------------------------ async API

    async def get_or_load(self, key: str, loader: Callable[[], Awaitable[Any]]) -> Any:
        """The value of ``key``, loading it with ``loader()`` on a miss.

        Concurrent misses share one loader call and all get its value or its
        exception; a failure is not cached. The result is stored unless a put,
        invalidate or clear of ``key`` happened while it loaded.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        now = _now()
        if now >= self._next_expiry:
            self._sweep(now)
        entry = self._lru.get(key)
        if entry is not None:
            self._lru.move_to_end(key)
            self._hits += 1
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return entry.value
        self._misses += 1
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight(key)
            return await self._run(flight, loader)
        self._coalesced += 1
        return await self._wait(flight, loader)

    async def preload(
        self, module: ModuleSource, priority_keys: Iterable[str], *, max_concurrent: int = 4
    ) -> int:
        """Load the named sections of ``module`` concurrently, most urgent first.

        ``priority_keys`` are section names or full keys
        (``module:<name>:<section>``), most urgent first. Sections already cached
        are skipped; at most ``max_concurrent`` loads run at once and they start
        in the given order. Returns how many sections were fetched (not skipped).

        Raises:
            LoadError: a section failed to load (the first failing one in priority
                order, chained to its cause); the other loads still complete.
        """
        prefix = section_key(module.name, "")
        sections = [k[len(prefix) :] if k.startswith(prefix) else k for k in priority_keys]
        sections = list(dict.fromkeys(sections))
        limiter = anyio.CapacityLimiter(max_concurrent)
        failures: dict[str, BaseException] = {}
        loaded = 0

        async def load(section: str, token: object) -> None:
            nonlocal loaded
            try:
                key = section_key(module.name, section)
                if key not in self:
                    await self.get_or_load(key, lambda: module.load_section(section))
                    loaded += 1
            except Exception as exc:
                failures[section] = exc
            finally:
                limiter.release_on_behalf_of(token)

        async with anyio.create_task_group() as tg:
            for section in sections:
                if section_key(module.name, section) in self:
                    continue
                token = object()
                await limiter.acquire_on_behalf_of(token)  # FIFO: start in priority order
                tg.start_soon(load, section, token)
        for section in sections:
            if section in failures:
                raise LoadError(section) from failures[section]
        return loaded

    # ------------------------------------------------------------------ internals

    async def _run(self, flight: _Flight, loader: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``loader`` for ``flight`` in this task; hand it over if cancelled."""
        self._loads += 1
        try:
            value = await loader()
        except Exception as exc:
            self._load_errors += 1
            self._finish(flight, None, exc)
            raise
        except BaseException:
            self._hand_over(flight)  # cancelled (or interrupted): not a load failure
            raise
        self._finish(flight, value, None)
        return value

    async def _wait(self, flight: _Flight, loader: Callable[[], Awaitable[Any]]) -> Any:
        waiter = _Waiter(loader)
        flight.waiters[waiter] = None
        try:
            await waiter.event.wait()
        except BaseException:
            # Cancelled while queued: just leave. Cancelled after being promoted but
            # before running (possible on asyncio): pass the load on.
            flight.waiters.pop(waiter, None)
            if waiter.promoted:
                self._hand_over(flight)
            raise
        if waiter.promoted:
            return await self._run(flight, waiter.loader)
        if flight.error is not None:
            raise flight.error
        return flight.value

    def _hand_over(self, flight: _Flight) -> None:
        """The runner gave up: promote the oldest waiter, or drop the flight."""
        if flight.waiters:
            waiter = next(iter(flight.waiters))
            del flight.waiters[waiter]
            waiter.promoted = True
            waiter.event.set()
            return
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]

    def _finish(self, flight: _Flight, value: Any, error: BaseException | None) -> None:
        flight.done = True
        flight.value = value
        flight.error = error
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if error is None and not flight.stale:
            self._store(flight.key, value, estimate_size(value), _now())
        waiters = list(flight.waiters)
        flight.waiters.clear()
        for waiter in waiters:
            waiter.event.set()

    def _supersede(self, key: str) -> None:
        flight = self._flights.pop(key, None)
        if flight is not None:
            flight.stale = True

    def _store(self, key: str, value: Any, size: int, now: float) -> bool:
        self._sweep(now)
        self._remove(key)
        if size > self._max_bytes:
            return False
        lru = self._lru
        while self._size + size > self._max_bytes:
            old_key, old = lru.popitem(last=False)
            del self._by_expiry[old_key]
            self._size -= old.size
            self._evictions += 1
        entry = _Entry(value, size, now + self._ttl)
        lru[key] = entry
        self._by_expiry[key] = entry
        self._size += size
        if entry.expires < self._next_expiry:
            self._next_expiry = entry.expires
        return True

    def _remove(self, key: str) -> bool:
        entry = self._lru.pop(key, None)
        if entry is None:
            return False
        del self._by_expiry[key]
        self._size -= entry.size
        return True

    def _sweep_if_running(self) -> None:
        """Sweep when a loop runs; outside one (e.g. final reporting) skip it."""
        with contextlib.suppress(RuntimeError):
            self._sweep(_now())

    def _sweep(self, now: float) -> None:
        """Reclaim every expired entry (all TTLs are equal: pop the store-order head)."""
        if now < self._next_expiry:
            return
        by_expiry = self._by_expiry
        while by_expiry:
            key, entry = next(iter(by_expiry.items()))
            if entry.expires > now:
                self._next_expiry = entry.expires
                return
            del by_expiry[key]
            del self._lru[key]
            self._size -= entry.size
            self._expirations += 1
        self._next_expiry = float("inf")
