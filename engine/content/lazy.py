"""Lazy loading of module sections: policy on top of the :class:`ModuleCache`.

The cache is the storage (an evicted section is simply loaded again on demand) and
its single flight is the coordination: a foreground ``ensure_loaded`` of a section
whose background load is in flight joins that load instead of starting a second
one or returning early. Every ``module.load_section`` call runs under one
``CapacityLimiter(max_concurrent_loads)``, foreground and background alike.

Priority rule (``get_load_priority``): the configured sections of the action type
(``[performance.lazy_loading.priorities]``, ``other`` for an unknown type), then
the configured sections of the most likely *next* action type, learned as
first-order transition counts over the recorded sequence of action types (ties
broken by name); sections the module does not have are left out, duplicates keep
their first place.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, final

import anyio
import anyio.abc
import anyio.lowlevel
import attrs

from ..errors import LoadError
from .cache import ModuleCache, ModuleSource, section_key

if TYPE_CHECKING:
    from ..config import LazyLoadingConfig

__all__ = ["LazyLoadManager", "LazyLoadStatistics", "UnknownSectionError"]


class UnknownSectionError(LoadError, KeyError):
    """Section names the module does not have; raised before anything is loaded."""

    def __init__(self, sections: Sequence[str], known: Iterable[str]) -> None:
        self.sections = tuple(sections)
        self.known = tuple(sorted(known))
        super().__init__(
            self.sections[0],
            f"unknown section(s) {', '.join(map(repr, self.sections))}; "
            f"known: {', '.join(self.known) or '(none)'}",
        )

    def __str__(self) -> str:  # not KeyError's repr-quoting
        return str(self.args[0])


@attrs.frozen
class LazyLoadStatistics:
    """A snapshot: background loads scheduled and not finished, and failed ones."""

    pending_background: tuple[str, ...]
    failed_background: tuple[str, ...]
    actions_recorded: int


def _default_priorities() -> Mapping[str, Sequence[str]]:
    from ..config import LazyLoadingConfig

    return LazyLoadingConfig().priorities


@final
@attrs.define(eq=False, repr=False, init=False)
class LazyLoadManager:
    """Loads module sections on demand and in the background.

    Use as ``async with manager:`` to own the background nursery; leaving it
    cancels unfinished background loads. ``ensure_loaded``/``is_loaded``/
    ``get_load_priority`` also work outside it; ``load_background`` does not.
    """

    _module: ModuleSource
    _cache: ModuleCache
    _priorities: Mapping[str, Sequence[str]]
    _max_concurrent: int
    _background_enabled: bool
    _known: frozenset[str] | None = None
    _limiter: anyio.CapacityLimiter | None = None
    _tg: anyio.abc.TaskGroup | None = None
    _pending: set[str] = attrs.Factory(set)
    _failed: dict[str, BaseException] = attrs.Factory(dict)
    _transitions: dict[str, dict[str, int]] = attrs.Factory(dict)
    _last_action: str | None = None
    _actions: int = 0

    def __init__(
        self,
        module: ModuleSource,
        cache: ModuleCache | None = None,
        *,
        priorities: Mapping[str, Sequence[str]] | None = None,
        max_concurrent_loads: int = 4,
        background: bool = True,
    ) -> None:
        if max_concurrent_loads < 1:
            raise ValueError(f"max_concurrent_loads must be >= 1, got {max_concurrent_loads!r}")
        self.__attrs_init__(
            module,
            ModuleCache() if cache is None else cache,
            _default_priorities() if priorities is None else priorities,
            max_concurrent_loads,
            background,
        )

    @classmethod
    def from_config(
        cls, module: ModuleSource, config: LazyLoadingConfig, cache: ModuleCache | None = None
    ) -> LazyLoadManager:
        """A manager set up by ``config.performance.lazy_loading``."""
        return cls(
            module,
            cache,
            priorities=config.priorities,
            max_concurrent_loads=config.max_concurrent_loads,
            background=config.enabled and config.background_load,
        )

    @property
    def cache(self) -> ModuleCache:
        return self._cache

    @property
    def module(self) -> ModuleSource:
        return self._module

    def __repr__(self) -> str:
        return f"<LazyLoadManager {self._module.name!r} pending={sorted(self._pending)}>"

    # ------------------------------------------------------------------ lifetime

    async def __aenter__(self) -> LazyLoadManager:
        if self._tg is not None:
            raise RuntimeError("LazyLoadManager is already entered")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        tg = self._tg
        assert tg is not None
        tg.cancel_scope.cancel()  # unfinished background loads are abandoned
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            self._tg = None
            # A task cancelled before it first ran (asyncio) never reaches its finally.
            self._pending.clear()

    # ------------------------------------------------------------------ queries

    def is_loaded(self, section: str) -> bool:
        """Whether ``section``'s content is in the cache now (never half-loaded)."""
        self._check((section,))
        return section_key(self._module.name, section) in self._cache

    def get_load_priority(self, action_type: str, *, record: bool = True) -> list[str]:
        """The sections to preload for ``action_type``, most urgent first.

        See the module docstring for the rule. With ``record`` (the default) the
        action is first appended to the learned sequence (as ``record_action``):
        call this once per player action, or call ``record_action`` instead.
        """
        if record:
            self.record_action(action_type)
        known = self._known_sections()
        ranked = dict.fromkeys(s for s in self._configured(action_type) if s in known)
        counts = self._transitions.get(action_type)
        if counts:
            likely = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
            ranked.update(dict.fromkeys(s for s in self._configured(likely) if s in known))
        return list(ranked)

    def record_action(self, action_type: str) -> None:
        """Append ``action_type`` to the sequence the next-action prediction learns from."""
        if self._last_action is not None:
            row = self._transitions.setdefault(self._last_action, {})
            row[action_type] = row.get(action_type, 0) + 1
        self._last_action = action_type
        self._actions += 1

    def statistics(self) -> LazyLoadStatistics:
        return LazyLoadStatistics(
            pending_background=tuple(sorted(self._pending)),
            failed_background=tuple(sorted(self._failed)),
            actions_recorded=self._actions,
        )

    # ------------------------------------------------------------------ loading

    async def ensure_loaded(self, *sections: str) -> dict[str, Any]:
        """Load every named section (joining loads already in flight); their contents.

        Returns when each section has been loaded (or found cached) by this call;
        a section may of course be evicted or invalidated again afterwards.

        Raises:
            UnknownSectionError: a name is not a section of the module (nothing loads).
            LoadError: a section failed to load (the first in argument order),
                chained to the loader's exception; the next call retries it.
        """
        self._check(sections)
        unique = list(dict.fromkeys(sections))
        results: dict[str, Any] = {}
        failures: dict[str, Exception] = {}

        async def one(section: str) -> None:
            try:
                results[section] = await self._load(section)
            except Exception as exc:
                failures[section] = exc

        if not unique:
            await anyio.lowlevel.checkpoint()
        elif len(unique) == 1:
            await one(unique[0])
        else:
            async with anyio.create_task_group() as tg:
                for section in unique:
                    tg.start_soon(one, section)
        for section in unique:
            if section in failures:
                raise LoadError(section) from failures[section]
        return {s: results[s] for s in unique}

    def load_background(self, section: str) -> bool:
        """Start loading ``section`` in the manager's nursery; returns at once.

        Returns True if a load was scheduled, False if the section is cached, a
        background load of it is already pending, or background loading is off.
        A failed background load is remembered (``statistics``) and retried by the
        next ``ensure_loaded``; it never disturbs the nursery.

        Raises:
            RuntimeError: called outside ``async with manager:``.
            UnknownSectionError: not a section of the module.
        """
        tg = self._tg
        if tg is None:
            raise RuntimeError("LazyLoadManager.load_background() needs `async with manager:`")
        self._check((section,))
        if not self._background_enabled or section in self._pending or self.is_loaded(section):
            return False
        self._pending.add(section)
        tg.start_soon(self._background, section, name=f"load_background({section!r})")
        return True

    async def _background(self, section: str) -> None:
        try:
            await self._load(section)
        except Exception as exc:
            self._failed[section] = exc
        else:
            self._failed.pop(section, None)
        finally:
            self._pending.discard(section)

    async def _load(self, section: str) -> Any:
        key = section_key(self._module.name, section)
        return await self._cache.get_or_load(key, functools.partial(self._fetch, section))

    async def _fetch(self, section: str) -> Any:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._max_concurrent)
        async with self._limiter:
            return await self._module.load_section(section)

    # ------------------------------------------------------------------ helpers

    def _known_sections(self) -> frozenset[str]:
        if self._known is None:
            self._known = frozenset(self._module.section_names())
        return self._known

    def _check(self, sections: Iterable[str]) -> None:
        known = self._known_sections()
        unknown = [s for s in sections if s not in known]
        if unknown:
            raise UnknownSectionError(unknown, known)

    def _configured(self, action_type: str) -> Sequence[str]:
        p = self._priorities
        return p.get(action_type, p.get("other", ()))
