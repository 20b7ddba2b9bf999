"""The multi-process load test: engine worker processes on a shared PostgreSQL store
and one Redis limiter, actions sent to random processes, one process SIGKILLed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pg_server import PASSWORD_ENV, pg_url, postgres_server  # noqa: F401
from servers import start_redis

from engine.benchmark.processes import (
    DONE,
    FAILED,
    UNKNOWN,
    SentAction,
    check_session,
    max_concurrent,
    run_process_load_test,
)
from engine.benchmark.worker import CallLog, read_calls
from engine.cli import main


@pytest.fixture
def anyio_backend() -> str:
    return "trio"  # real servers and real processes: the real clock (workers run trio)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[str]:
    """A Redis of this test's own: the killed process's leases stay there until
    they expire, and must not shrink another test's limit."""
    with start_redis(tmp_path / "redis") as url:
        yield url


def write_config(path: Path, tmp: Path, **tables: dict[str, Any]) -> Path:
    """A TOML file: the default adventure without the SRD, compiled under ``tmp``,
    plus ``tables`` (``{"state": {...}, ...}``; dots in a name nest tables)."""
    lines = ["[module]", "include_srd = false", f"cache_dir = {json.dumps(str(tmp / 'mod'))}"]
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------ check_session


def test_every_done_action_in_order_is_ok() -> None:
    sent = [SentAction("a", DONE, 1), SentAction("b", DONE, 2)]
    check = check_session(sent, [(1, "a"), (2, "b")], 2)
    assert check.ok and check.stored == 2 and check.lost == 0


def test_an_unknown_action_may_or_may_not_be_stored() -> None:
    sent = [SentAction("a", DONE, 1), SentAction("b", UNKNOWN), SentAction("c", DONE, 3)]
    stored = check_session(sent, [(1, "a"), (2, "b"), (3, "c")], 3)
    assert stored.ok and stored.unknown_stored == 1
    sent = [SentAction("a", DONE, 1), SentAction("b", UNKNOWN), SentAction("c", DONE, 2)]
    not_stored = check_session(sent, [(1, "a"), (2, "c")], 2)
    assert not_stored.ok and not_stored.unknown_stored == 0


def test_a_done_action_missing_is_lost() -> None:
    sent = [SentAction("a", DONE, 1), SentAction("b", DONE, 2)]
    check = check_session(sent, [(1, "a")], 1)
    assert not check.ok and check.lost == 1


def test_a_duplicate_is_caught() -> None:
    sent = [SentAction("a", UNKNOWN), SentAction("b", DONE, 2)]
    check = check_session(sent, [(1, "a"), (2, "a"), (3, "b")], 3)
    assert not check.ok and check.duplicates == 1


def test_a_failed_action_must_not_be_stored() -> None:
    sent = [SentAction("a", FAILED), SentAction("b", DONE, 1)]
    check = check_session(sent, [(1, "a"), (2, "b")], 2)
    assert not check.ok and check.duplicates == 1 and check.lost == 1


def test_out_of_order_is_caught() -> None:
    sent = [SentAction("a", DONE, 1), SentAction("b", DONE, 2)]
    assert not check_session(sent, [(1, "b"), (2, "a")], 2).ok
    # an unknown action stored after the done action sent after it
    sent = [SentAction("a", UNKNOWN), SentAction("b", DONE, 1)]
    assert not check_session(sent, [(1, "b"), (2, "a")], 2).ok


def test_turns_and_count_must_agree_with_the_transcript() -> None:
    sent = [SentAction("a", DONE, 1), SentAction("b", DONE, 3)]
    assert not check_session(sent, [(1, "a"), (3, "b")], 2).ok  # a hole at turn 2
    sent = [SentAction("a", DONE, 1)]
    assert not check_session(sent, [(1, "a")], 2).ok


def test_repeated_texts_are_matched_in_order() -> None:
    sent = [SentAction("a", UNKNOWN), SentAction("a", DONE, 1), SentAction("a", DONE, 2)]
    assert check_session(sent, [(1, "a"), (2, "a")], 2).ok
    assert not check_session(sent, [(1, "a"), (2, "a"), (3, "a"), (4, "a")], 4).ok


def test_max_concurrent() -> None:
    assert max_concurrent([]) == 0
    assert max_concurrent([(0, 1), (1, 2)]) == 1  # touching, not overlapping
    assert max_concurrent([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3


def test_a_calls_file_gives_finished_and_open_calls(tmp_path: Path) -> None:
    """What a worker wrote before it was killed: two finished calls, one open, and a
    last line cut short by the kill (ignored)."""
    log = CallLog(os.open(tmp_path / "calls.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND))
    first, second = log.start(), log.start()
    log.end(second)
    third = log.start()
    log.end(first)
    assert log.fd is not None
    os.write(log.fd, b"e %d 12" % third)  # no newline: cut short
    os.close(log.fd)
    finished, still_open = read_calls(tmp_path / "calls.log")
    assert len(finished) == 2 and len(still_open) == 1 and log.count == 3
    assert all(start <= end for start, end in finished)
    assert still_open[0] >= max(start for start, _ in finished)  # the third call's start


# ------------------------------------------------------------------ real processes


@pytest.mark.anyio
async def test_one_process_on_sqlite(tmp_path: Path) -> None:
    """The protocol end to end, no server needed: one worker, its own SQLite file;
    with one process nothing is killed."""
    config = write_config(tmp_path / "one.toml", tmp_path)
    with anyio.fail_after(60):
        result = await run_process_load_test(
            config, processes=1, sessions=5, actions_per_session=2, think_time=0.05
        )
    assert result.no_loss, result
    assert result.completed_actions == result.stored_actions == 10
    assert (result.processes, result.killed_processes, result.state) == (1, 0, "sqlite")
    assert result.overhead.count == 10 and result.agent_calls >= 10
    assert result.max_concurrent_agent_calls >= 1 and result.global_max_concurrent_agents == 0
    assert result.actions_per_process == (10,)


@pytest.mark.anyio
async def test_processes_need_a_shared_store(tmp_path: Path) -> None:
    config = write_config(tmp_path / "sqlite.toml", tmp_path)
    with pytest.raises(ValueError, match=r"\[state\] url"):
        await run_process_load_test(config, processes=2, sessions=1)


@pytest.mark.anyio
async def test_a_worker_that_cannot_start_is_reported(tmp_path: Path) -> None:
    """A worker that cannot open its engine (no PostgreSQL there): its stderr is shown."""
    unreachable = {"url": "postgresql://dm@127.0.0.1:1/nowhere"}
    config = write_config(tmp_path / "bad.toml", tmp_path, state=unreachable)
    with pytest.raises(RuntimeError, match="before it was ready"), anyio.fail_after(60):
        await run_process_load_test(config, processes=1, sessions=1)


@pytest.mark.anyio
async def test_two_processes_one_killed_nothing_lost_limit_kept(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    redis: str,
) -> None:
    """20 sessions x 6 actions on 2 processes sharing PostgreSQL and a global limit of
    4 agent calls (the load would run ~20 at once without it); one process is killed
    once half of the actions were sent — by then most sessions have moved between the
    processes several times, so a stale turn would show as a failed action. Nothing reported done is lost or stored twice, every transcript is in the
    order sent, and never more than 4 agent calls ran at once across the processes."""
    config = write_config(
        tmp_path / "scale.toml",
        tmp_path,
        state={"url": pg_url, "password_env": PASSWORD_ENV, "session_lease_seconds": 2.0},
        **{
            "performance.parallelization": {
                "redis_url": redis,
                "global_max_concurrent_agents": 4,
                "global_lease_seconds": 2.0,
            }
        },
    )
    with anyio.fail_after(60):
        result = await run_process_load_test(
            config, processes=2, sessions=20, actions_per_session=6, think_time=0.1
        )
    assert (result.processes, result.killed_processes, result.crashed_processes) == (2, 1, 0)
    assert result.kill_after_seconds is not None
    assert result.state == "postgresql"
    assert result.lost_actions == 0 and result.duplicate_actions == 0, result
    assert result.mismatched_sessions == 0, result
    assert result.failed_actions == 0, result.errors
    settled = result.completed_actions + result.unknown_actions
    assert settled == result.expected_actions == 120
    # what was stored: everything done, plus some of the unknown
    assert result.stored_actions == result.completed_actions + result.unknown_stored
    assert all(n > 0 for n in result.actions_per_process)  # no affinity: both served
    assert result.global_max_concurrent_agents == 4
    assert 2 <= result.max_concurrent_agent_calls <= 4, result.max_concurrent_agent_calls
    assert result.limit_respected


def test_the_command_writes_load_json(tmp_path: Path) -> None:
    """``dm-engine bench --load --processes 1``: the figures land in load.json."""
    config = write_config(tmp_path / "cli.toml", tmp_path)
    out = tmp_path / "out"
    argv = ["--config", str(config), "bench", "--load", "--processes", "1"]
    argv += ["--sessions", "3", "--actions", "2", "--think-time", "0", "--out", str(out)]
    assert main(argv) == 0
    load = json.loads((out / "load.json").read_text())["load"]
    assert load["processes"] == 1 and load["killed_processes"] == 0
    assert load["lost_actions"] == 0 and load["mismatched_sessions"] == 0
    assert load["max_concurrent_agent_calls"] >= 1 and load["no_loss"]
