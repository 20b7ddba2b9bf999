"""Unit tests of LazyLoadManager against a fake in-memory module."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import attrs
import pytest

from engine.config import LazyLoadingConfig
from engine.content.cache import ModuleCache
from engine.content.lazy import LazyLoadManager, UnknownSectionError
from engine.errors import LoadError


@attrs.frozen
class Content:
    section: str
    version: int
    parts: tuple[str, ...]


class FakeModule:
    """The module protocol with controllable latency and failures.

    A section is built part by part (``parts`` sleeps), so a manager that exposed a
    section before its load finished would show an incomplete ``Content``.
    """

    def __init__(
        self,
        name: str = "m",
        sections: tuple[str, ...] = ("npcs", "locations", "encounters", "rules"),
        latency: float = 0.01,
        parts: int = 4,
    ) -> None:
        self.name = name
        self.sections = sections
        self.latency: dict[str, float] = dict.fromkeys(sections, latency)
        self.parts = parts
        self.fail_next: Counter[str] = Counter()
        self.calls: list[tuple[float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self.completed: set[int] = set()  # ids of every Content returned
        self.versions: Counter[str] = Counter()
        self.running: Counter[str] = Counter()
        self.max_running = 0

    def section_names(self) -> list[str]:
        return list(self.sections)

    async def load_section(self, name: str) -> Content:
        if name not in self.sections:
            raise KeyError(name)
        self.calls.append((anyio.current_time(), name))
        self.running[name] += 1
        self.max_running = max(self.max_running, sum(self.running.values()))
        try:
            parts: list[str] = []
            for i in range(self.parts):
                await anyio.sleep(self.latency[name] / self.parts)
                parts.append(f"{name}:{i}")
            if self.fail_next[name] > 0:
                self.fail_next[name] -= 1
                self.failures.append((anyio.current_time(), name))
                raise OSError(f"disk error reading {name}")
            self.versions[name] += 1
            content = Content(name, self.versions[name], tuple(parts))
            self.completed.add(id(content))
            return content
        finally:
            self.running[name] -= 1

    def is_complete(self, content: Any) -> bool:
        return (
            isinstance(content, Content)
            and id(content) in self.completed
            and len(content.parts) == self.parts
        )


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_LazyLoadManager_ensure_loaded_loads_and_caches() -> None:
    module = FakeModule(latency=1.0)
    cache = ModuleCache()
    async with LazyLoadManager(module, cache) as lazy:
        t0 = anyio.current_time()
        got = await lazy.ensure_loaded("npcs", "locations", "npcs")
        assert anyio.current_time() - t0 == 1.0  # concurrently
        assert list(got) == ["npcs", "locations"]
        assert all(module.is_complete(c) for c in got.values())
        assert lazy.is_loaded("npcs") and lazy.is_loaded("locations")
        assert not lazy.is_loaded("rules")
        assert cache.get("module:m:npcs") is got["npcs"]
        again = await lazy.ensure_loaded("npcs")
        assert again["npcs"] is got["npcs"]
    assert len(module.calls) == 2


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_LazyLoadManager_ensure_loaded_waits_for_background_load() -> None:
    module = FakeModule(latency=3.0)
    async with LazyLoadManager(module) as lazy:
        assert lazy.load_background("rules") is True
        assert lazy.load_background("rules") is False  # already pending
        await anyio.sleep(1)
        assert not lazy.is_loaded("rules")
        got = await lazy.ensure_loaded("rules")
        assert anyio.current_time() == 3.0  # waited for the in-flight load, not returned early
        assert lazy.is_loaded("rules") and module.is_complete(got["rules"])
        assert lazy.load_background("rules") is False  # cached
    assert [s for _t, s in module.calls] == ["rules"]
    assert lazy.cache.statistics().coalesced == 1


@pytest.mark.anyio
async def test_LazyLoadManager_unknown_section_is_a_clear_error() -> None:
    module = FakeModule()
    async with LazyLoadManager(module) as lazy:
        with pytest.raises(UnknownSectionError, match=r"'dragons'.*known: encounters") as info:
            await lazy.ensure_loaded("npcs", "dragons")
        assert isinstance(info.value, KeyError) and isinstance(info.value, LoadError)
        assert info.value.sections == ("dragons",)
        with pytest.raises(UnknownSectionError):
            lazy.load_background("dragons")
    assert module.calls == []  # nothing loads when a name is wrong


@pytest.mark.anyio
async def test_LazyLoadManager_failure_raises_LoadError_and_next_call_retries() -> None:
    module = FakeModule()
    module.fail_next["npcs"] = 1
    async with LazyLoadManager(module) as lazy:
        with pytest.raises(LoadError) as info:
            await lazy.ensure_loaded("locations", "npcs")
        assert info.value.section == "npcs" and "npcs" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)
        assert lazy.is_loaded("locations") and not lazy.is_loaded("npcs")
        got = await lazy.ensure_loaded("npcs")
        assert module.is_complete(got["npcs"])
    assert lazy.cache.statistics().load_errors == 1


@pytest.mark.anyio
async def test_LazyLoadManager_background_failure_is_remembered_not_raised() -> None:
    module = FakeModule()
    module.fail_next["rules"] = 1
    async with LazyLoadManager(module) as lazy:
        lazy.load_background("rules")
        await anyio.sleep(0.1)
        assert lazy.statistics().failed_background == ("rules",)
        assert lazy.statistics().pending_background == ()
        await lazy.ensure_loaded("rules")  # retries
        lazy.load_background("npcs")
        await anyio.sleep(0.1)
        assert lazy.statistics().failed_background == ("rules",)


@pytest.mark.anyio
async def test_LazyLoadManager_load_background_outside_async_with_raises() -> None:
    lazy = LazyLoadManager(FakeModule())
    with pytest.raises(RuntimeError, match="async with"):
        lazy.load_background("npcs")
    async with lazy:
        pass
    with pytest.raises(RuntimeError, match="async with"):
        lazy.load_background("npcs")
    assert (await lazy.ensure_loaded("npcs"))["npcs"].section == "npcs"  # works outside


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_LazyLoadManager_exit_cancels_background_loads_cleanly() -> None:
    module = FakeModule(latency=10.0)
    async with LazyLoadManager(module) as lazy:
        for section in module.sections:
            lazy.load_background(section)
        await anyio.sleep(1)
    assert anyio.current_time() == 1.0  # exit did not wait for the loads
    assert sum(module.running.values()) == 0
    assert lazy.statistics().pending_background == ()
    assert not any(lazy.is_loaded(s) for s in module.sections)
    assert lazy.cache._flights == {}


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_LazyLoadManager_limits_concurrent_loads() -> None:
    module = FakeModule(latency=1.0, sections=tuple(f"s{i}" for i in range(7)))
    async with LazyLoadManager(module, max_concurrent_loads=2) as lazy:
        for section in module.sections[:5]:
            lazy.load_background(section)
        await lazy.ensure_loaded(*module.sections)
        assert anyio.current_time() == 4.0  # 7 loads, 2 at a time
    assert module.max_running == 2


@pytest.mark.anyio
async def test_LazyLoadManager_reloads_an_evicted_section() -> None:
    module = FakeModule()
    cache = ModuleCache()
    async with LazyLoadManager(module, cache) as lazy:
        first = (await lazy.ensure_loaded("npcs"))["npcs"]
        assert cache.invalidate("module:m:npcs")
        assert not lazy.is_loaded("npcs")
        second = (await lazy.ensure_loaded("npcs"))["npcs"]
        assert second.version == first.version + 1


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_LazyLoadManager_cancelled_ensure_hands_the_load_to_a_waiter() -> None:
    module = FakeModule(latency=4.0)
    async with LazyLoadManager(module) as lazy:
        results: list[Any] = []

        async def waiter() -> None:
            results.append(await lazy.ensure_loaded("npcs"))

        async with anyio.create_task_group() as tg:
            with anyio.move_on_after(1):
                tg.start_soon(waiter)
                await lazy.ensure_loaded("npcs")  # the runner; cancelled at t=1
        assert anyio.current_time() == 5.0  # the waiter restarted the load at t=1
        assert module.is_complete(results[0]["npcs"])


def test_LazyLoadManager_priority_rule_configured_then_learned_next() -> None:
    module = FakeModule(sections=("encounters", "monsters", "rules", "npcs", "locations"))
    lazy = LazyLoadManager.from_config(module, LazyLoadingConfig())
    # configured: combat -> encounters, monsters, rules, conditions (absent here)
    assert lazy.get_load_priority("combat") == ["encounters", "monsters", "rules"]
    # learn: combat is followed by roleplay twice, by rest once
    for action in ["roleplay", "combat", "roleplay", "combat", "rest", "combat"]:
        lazy.record_action(action)
    assert lazy.get_load_priority("combat", record=False) == [
        "encounters",
        "monsters",
        "rules",
        "npcs",
        "locations",
    ]
    assert lazy.get_load_priority("unknown-type", record=False) == ["locations", "npcs"]
    assert lazy.get_load_priority("system", record=False) == []
    assert lazy.statistics().actions_recorded == 7


def test_LazyLoadManager_get_load_priority_records_by_default() -> None:
    module = FakeModule()
    lazy = LazyLoadManager(module, priorities={"a": ["npcs"], "b": ["rules"], "other": []})
    assert lazy.get_load_priority("a") == ["npcs"]
    assert lazy.get_load_priority("b") == ["rules"]
    assert lazy.get_load_priority("a") == ["npcs", "rules"]  # a -> b learned


def test_LazyLoadManager_rejects_bad_limit() -> None:
    with pytest.raises(ValueError, match="max_concurrent_loads"):
        LazyLoadManager(FakeModule(), max_concurrent_loads=0)
