"""SpanLog: one JSON line per root tree, torn-line tolerant reading, size rotation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.config import parse_config
from engine.observability.profiler import PerformanceProfiler
from engine.observability.spanlog import SpanLog, read_span_log


def listing(directory: Path, max_bytes: int = 2000) -> dict[str, int]:
    """File name -> 1 if its size is in (0, max_bytes], else 0."""
    return {p.name: int(0 < p.stat().st_size <= max_bytes) for p in directory.iterdir()}


def run_actions(prof: PerformanceProfiler, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        with prof.trace("player_action", i=i, text="x" * 40):
            with prof.trace("context_building"):
                pass
            with prof.trace("agent_query", agent="narrator"):
                pass


@pytest.mark.anyio
async def test_SpanLog_writes_one_line_per_root_tree(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    prof = PerformanceProfiler(clock=anyio.current_time)
    async with SpanLog(path, profiler=prof) as span_log:
        with prof.trace("player_action", session="s1"):
            await anyio.sleep(0.5)
            async with anyio.create_task_group() as tg:
                for agent in ("archivist", "narrator"):
                    tg.start_soon(_agent, prof, agent)
        with prof.trace("cache_lookup", key="module:x"):  # another root
            pass
    with prof.trace("player_action"):  # after close: not subscribed any more
        pass
    records = read_span_log(path)
    assert [r["name"] for r in records] == ["player_action", "cache_lookup"]
    root = records[0]
    assert root["attributes"] == {"session": "s1"} and root["status"] == "ok"
    assert root["offset"] == 0.0 and isinstance(root["logged_at"], float)
    assert sorted(c["attributes"]["agent"] for c in root["children"]) == ["archivist", "narrator"]
    assert all(c["status"] == "ok" for c in root["children"])
    stats = span_log.statistics()
    assert (stats.queued, stats.written, stats.dropped, stats.pending) == (2, 2, 0, 0)
    assert path.read_bytes().count(b"\n") == 2


async def _agent(prof: PerformanceProfiler, name: str) -> None:
    with prof.trace("agent_query", agent=name):
        await anyio.sleep(1.0)


@pytest.mark.anyio
@pytest.mark.virtual_clock
async def test_SpanLog_offsets_are_relative_to_the_root(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    prof = PerformanceProfiler(clock=anyio.current_time)
    async with SpanLog(path, profiler=prof):
        await anyio.sleep(3.0)  # the root's start is not 0
        with prof.trace("player_action"):
            await anyio.sleep(0.5)
            await _agent(prof, "narrator")
    (root,) = read_span_log(path)
    assert root["duration"] == 1.5
    assert root["children"][0]["offset"] == 0.5
    assert root["children"][0]["duration"] == 1.0


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_SpanLog_crash_mid_write_keeps_every_complete_line(data: st.DataObject) -> None:
    """Cut the file at any byte (what a crash can leave): the reader returns exactly
    the lines completed before the cut; a writer reopening it appends readable lines."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spans.jsonl"
        n = data.draw(st.integers(min_value=1, max_value=8), label="lines")
        prof = PerformanceProfiler()

        async def write(start: int, count: int) -> None:
            async with SpanLog(path, profiler=prof):
                run_actions(prof, count, start)

        anyio.run(write, 0, n)
        full = path.read_bytes()
        # a fraction: the file's length varies (logged_at), the drawn data must not
        fraction = data.draw(st.floats(min_value=0.0, max_value=1.0), label="cut")
        cut = round(fraction * len(full))
        path.write_bytes(full[:cut])
        complete = full[:cut].count(b"\n")
        records = read_span_log(path)
        assert [r["attributes"]["i"] for r in records] == list(range(complete))

        anyio.run(write, 100, 2)  # the restarted engine appends to the torn log
        after = [r["attributes"]["i"] for r in read_span_log(path)]
        assert after == [*range(complete), 100, 101]


@pytest.mark.anyio
async def test_SpanLog_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    prof = PerformanceProfiler()
    async with SpanLog(path, max_bytes=2000, backups=2, profiler=prof) as span_log:
        for i in range(60):
            run_actions(prof, 1, i)
            if i % 7 == 0:
                await anyio.lowlevel.checkpoint()  # let the writer take partial batches too
    assert listing(tmp_path) == {"spans.jsonl": 1, "spans.jsonl.1": 1, "spans.jsonl.2": 1}
    kept = [r["attributes"]["i"] for r in read_span_log(path, include_backups=True)]
    assert kept == list(range(60 - len(kept), 60))  # the newest, contiguous, in order
    assert span_log.statistics().rotations >= 3  # older files were discarded
    assert span_log.statistics().written == 60


@pytest.mark.anyio
async def test_SpanLog_backups_zero_truncates(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    prof = PerformanceProfiler()
    async with SpanLog(path, max_bytes=1000, backups=0, profiler=prof):
        run_actions(prof, 30)
    assert listing(tmp_path) == {"spans.jsonl": 1}
    kept = [r["attributes"]["i"] for r in read_span_log(path)]
    assert kept and kept == list(range(30 - len(kept), 30))


@pytest.mark.anyio
async def test_SpanLog_full_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    prof = PerformanceProfiler()
    async with SpanLog(path, profiler=prof, max_pending=3) as span_log:
        run_actions(prof, 10)  # no checkpoint: the writer cannot run meanwhile
        stats = span_log.statistics()
        assert (stats.queued, stats.dropped) == (3, 7)
    assert [r["attributes"]["i"] for r in read_span_log(path)] == [0, 1, 2]
    assert span_log.statistics().written == 3


def test_SpanLog_from_config_and_reader_edge_cases(tmp_path: Path) -> None:
    assert SpanLog.from_config(parse_config({})) is None
    path = tmp_path / "log.jsonl"
    config = parse_config(
        {
            "performance": {
                "monitoring": {
                    "span_log_path": str(path),
                    "span_log_max_bytes": 123,
                    "span_log_backups": 1,
                }
            }
        }
    )
    span_log = SpanLog.from_config(config)
    assert span_log is not None
    assert (span_log.path, span_log.max_bytes, span_log.backups) == (path, 123, 1)
    assert read_span_log(tmp_path / "missing.jsonl") == []
    path.write_bytes(b'{"a": 1}\n{"torn\n\n{"b": 2}\n{"c"')
    records: list[Any] = read_span_log(path)
    assert records == [{"a": 1}, {"b": 2}]
    assert json.dumps(records)  # plain JSON values


@pytest.mark.anyio
async def test_SpanLog_cancelled_host_leaves_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    prof = PerformanceProfiler()
    with anyio.move_on_after(1.0):
        async with SpanLog(path, profiler=prof):
            run_actions(prof, 5)
            await anyio.sleep(10)
    with prof.trace("player_action"):  # unsubscribed even when cancelled
        pass
    records = read_span_log(path)
    assert [r["attributes"]["i"] for r in records] == list(range(len(records)))
    assert path.read_bytes().endswith(b"\n") or path.read_bytes() == b""
