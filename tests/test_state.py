"""Tests of the durable session store (engine.state): its contract on both backends.

Tests taking ``store_at`` run on SQLite and on a real PostgreSQL server
(``tests/pg_server.py``; skipped without one, failed in CI); the others are about
the SQLite file itself. PostgreSQL-only behaviour (leases, passwords, its schema
checks) is in ``test_state_postgres*.py``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import random
import sqlite3
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import attrs
import pg_server
import psycopg
import pytest
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_server import PostgresServer

from engine.config import StateConfig
from engine.errors import SessionError
from engine.state import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    AnySessionStore,
    PostgresSessionStore,
    SessionState,
    SessionStore,
    group_commit,
)
from engine.state.group_commit import WritePlacement

pytestmark = pytest.mark.anyio


def _action(text: str = "I search the altar", **changes: Any) -> dict[str, Any]:
    return {
        "action_text": text,
        "action_type": "exploration",
        "narrative": f"You {text.lower()}.",
        "state_changes": changes,
        "responses": {"narrator": {"status": "ok", "tokens": 12}},
    }


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of ``directory`` with its bytes: 'nothing lost, nothing touched'."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


postgres_server = pg_server.postgres_server  # the session's server, started when first asked


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sessions.sqlite"


@attrs.frozen
class Backend:
    """Where a test's store lives: a SQLite file, or a fresh PostgreSQL schema."""

    kind: str
    target: Any  # the SQLite file's Path, or the schema's URL (no password)
    server: PostgresServer | None = None

    def open(self, **options: Any) -> AbstractAsyncContextManager[AnySessionStore]:
        if self.server is None:
            return SessionStore.open(self.target, **options)
        return PostgresSessionStore.open(self.target, password=self.server.password, **options)

    def execute(self, *statements: str) -> None:
        """Run SQL on the store's tables behind the store's back (a second connection)."""
        if self.server is None:
            with contextlib.closing(sqlite3.connect(self.target)) as conn:
                for statement in statements:
                    conn.execute(statement)
                conn.commit()
        else:
            with self.server.connect(self.target) as pg:
                for statement in statements:
                    pg.execute(statement)


def _backend(kind: str, request: pytest.FixtureRequest, folder: Path) -> Backend:
    if kind == "sqlite":
        return Backend(kind, folder / "sessions.sqlite")
    server = request.getfixturevalue("postgres_server")  # only now: SQLite runs without it
    return Backend(kind, server.schema_url(), server)


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A place for a store: each test runs on SQLite and on PostgreSQL."""
    return _backend(request.param, request, tmp_path)


# ------------------------------------------------------------------ happy path


async def test_SessionStore_records_actions_and_state(store_at: Backend) -> None:
    clock = itertools.count(100).__next__
    async with store_at.open(clock=lambda: float(clock())) as store:
        fresh = await store.ensure_session("s1")
        assert fresh == SessionState("s1", 0, {}, 100.0, 100.0)
        assert await store.record_action("s1", **_action("A", hp=10, door="open")) == 1
        assert await store.record_action("s1", **_action("B", hp=7, door=None, gold=[1, 2])) == 2
        state = await store.get_session("s1")
        assert state == SessionState("s1", 2, {"hp": 7, "gold": [1, 2]}, 100.0, 102.0)
        entries = await store.transcript("s1")
        assert [(e.turn, e.action_text, e.created) for e in entries] == [
            (1, "A", 101.0),
            (2, "B", 102.0),
        ]
        assert entries[1].state_changes == {"hp": 7, "door": None, "gold": [1, 2]}
        assert entries[1].responses == {"narrator": {"status": "ok", "tokens": 12}}
        assert entries[1].narrative == "You b."
        assert [e.turn for e in await store.transcript("s1", limit=1)] == [2]
        assert await store.transcript("s1", limit=0) == []
        assert await store.count_actions("s1") == 2
        await store.ensure_session("s0")
        assert await store.count_actions("s0") == 0
        assert await store.count_actions() == 2
        assert await store.session_ids() == ["s0", "s1"]


async def test_SessionStore_ensure_is_idempotent_and_create_refuses_duplicates(
    store_at: Backend,
) -> None:
    async with store_at.open() as store:
        created = await store.create_session("s")
        await store.record_action("s", **_action(x=1))
        again = await store.ensure_session("s")
        assert again.turn == 1 and again.created == created.created
        with pytest.raises(SessionError, match="already exists"):
            await store.create_session("s")
        assert (await store.get_session("s")).turn == 1


async def test_SessionStore_a_first_action_creates_its_session(store_at: Backend) -> None:
    """``turn_expected=0`` on a session the store does not have creates it in the
    action's own transaction; any other expectation still refuses it, writing nothing."""
    clock = itertools.count(100).__next__
    async with store_at.open(clock=lambda: float(clock())) as store:
        assert await store.find_session("new") is None
        for expected in (None, 1):
            with pytest.raises(SessionError, match="unknown session 'new'"):
                await store.record_action("new", turn_expected=expected, **_action("A"))
        assert await store.session_ids() == []
        assert await store.record_action("new", turn_expected=0, **_action("A", hp=3)) == 1
        state = await store.find_session("new")
        entries = await store.transcript("new")
        assert state is not None and (state.turn, state.state) == (1, {"hp": 3})
        assert [e.action_text for e in entries] == ["A"]
        assert state.created == state.updated == entries[0].created  # one transaction
        with pytest.raises(SessionError, match="at turn 1, not 0"):
            await store.record_action("new", turn_expected=0, **_action("B"))
        # two first actions of one new session in one batch: the first creates it
        outcomes: list[int | str] = []

        async def first(text: str) -> None:
            try:
                outcomes.append(
                    await store.record_action("other", turn_expected=0, **_action(text))
                )
            except SessionError as exc:
                outcomes.append(str(exc))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first, "C")
            tg.start_soon(first, "D")
        assert sorted(map(str, outcomes)) == [
            "1",
            "session 'other' is at turn 1, not 0: another action was recorded in between",
        ]
        assert len(await store.transcript("other")) == 1
        assert await store.count_actions() == 2


async def test_SessionStore_persists_across_reopen(store_at: Backend) -> None:
    async with store_at.open() as store:
        await store.ensure_session("s")
        for i in range(3):
            await store.record_action("s", **_action(f"act {i}", i=i))
    async with store_at.open() as store:
        assert (await store.get_session("s")).state == {"i": 2}
        assert [e.action_text for e in await store.transcript("s")] == ["act 0", "act 1", "act 2"]
        assert await store.record_action("s", **_action()) == 4
    if store_at.kind != "sqlite":
        return
    with sqlite3.connect(store_at.target) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


async def test_SessionStore_turn_expected_detects_interleaved_actions(store_at: Backend) -> None:
    async with store_at.open() as store:
        seen = await store.ensure_session("s")
        assert await store.record_action("s", turn_expected=seen.turn, **_action()) == 1
        with pytest.raises(SessionError, match="at turn 1, not 0"):
            await store.record_action("s", turn_expected=seen.turn, **_action())
        assert await store.count_actions("s") == 1


async def test_SessionStore_from_config(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "nested"
    async with SessionStore.from_config(StateConfig(max_action_chars=5), cache) as store:
        assert store.path == cache / "sessions.sqlite"
        assert store.max_action_chars == 5
        await store.ensure_session("s")
    explicit = tmp_path / "x.sqlite"
    async with SessionStore.from_config(StateConfig(path=str(explicit))) as store:
        assert store.path == explicit and store.max_action_chars == 2000
    assert explicit.exists()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "action text is empty"),
        ("  \n\t ", "action text is empty"),
        ("x" * 11, "11 characters long; the limit is 10"),
    ],
)
async def test_SessionStore_rejects_bad_action_text(
    store_at: Backend, text: str, message: str
) -> None:
    async with store_at.open(max_action_chars=10) as store:
        await store.ensure_session("s")
        with pytest.raises(SessionError, match=message):
            await store.record_action("s", **_action(text, hp=1))
        assert await store.record_action("s", **_action("x" * 10)) == 1  # the limit itself is fine
        assert await store.count_actions() == 1
        assert (await store.get_session("s")).state == {}


async def test_SessionStore_rejects_unknown_sessions(store_at: Backend) -> None:
    async with store_at.open() as store:
        with pytest.raises(SessionError, match="unknown session 'nope'"):
            await store.get_session("nope")
        with pytest.raises(SessionError, match="unknown session 'nope'"):
            await store.record_action("nope", **_action())
        with pytest.raises(SessionError, match="unknown session"):
            await store.transcript("nope")
        with pytest.raises(SessionError, match="unknown session"):
            await store.count_actions("nope")
        assert await store.session_ids() == []
        assert await store.count_actions() == 0


@pytest.mark.parametrize(
    ("session_id", "message"),
    [("", "empty"), ("   ", "empty"), ("x" * 201, "201 characters"), ("a\x00b", "NUL"), (7, "str")],
)
async def test_SessionStore_rejects_bad_session_ids(
    store_at: Backend, session_id: Any, message: str
) -> None:
    async with store_at.open() as store:
        with pytest.raises(SessionError, match=message):
            await store.ensure_session(session_id)
        assert await store.session_ids() == []
        await store.ensure_session("x" * 200)


async def test_SessionStore_rejects_unserialisable_changes_writing_nothing(
    store_at: Backend,
) -> None:
    async with store_at.open() as store:
        await store.ensure_session("s")
        with pytest.raises(SessionError, match="state_changes is not JSON-serialisable"):
            await store.record_action("s", **_action(hp=object()))
        with pytest.raises(SessionError, match="not JSON-serialisable"):
            await store.record_action("s", **_action(hp=float("nan")))
        bad = {**_action(), "responses": {"narrator": {1, 2}}}
        with pytest.raises(SessionError, match="responses is not JSON-serialisable"):
            await store.record_action("s", **bad)
        with pytest.raises(SessionError, match="keys must be non-empty strings"):
            await store.record_action("s", **{**_action(), "state_changes": {3: "x"}})
        assert await store.count_actions() == 0
        assert (await store.get_session("s")).turn == 0


@pytest.mark.parametrize(
    ("field", "what"),
    [
        ("action_text", "action text"),
        ("narrative", "narrative"),
        ("action_type", "action type"),
        ("state_changes", "state_changes key"),
    ],
)
async def test_SessionStore_rejects_text_UTF8_cannot_encode_before_any_write(
    store_at: Backend, field: str, what: str
) -> None:
    """A lone surrogate cannot be bound by SQLite: refused up front, nothing queued."""
    async with store_at.open() as store:
        await store.ensure_session("s")
        bad = _action("I sing \ud800 loudly", hp=1)
        if field == "narrative":
            bad = {**_action(), "narrative": "You sing.\udfff"}
        elif field == "action_type":
            bad = {**_action(), "action_type": "\ud83d"}
        elif field == "state_changes":
            bad = _action(**{"note\ud800": 1})
        before = store.statistics()
        with pytest.raises(SessionError, match=rf"^{what} contains '\\ud[0-9a-f]{{3}}' at index"):
            await store.record_action("s", **bad)
        assert store.statistics() == before  # not queued, no transaction
        assert await store.count_actions() == 0
        assert await store.record_action("s", **_action("I sing 🎵 loudly", hp=2)) == 1
        assert (await store.transcript("s"))[0].action_text == "I sing 🎵 loudly"
        # JSON values (and responses keys) are stored as ASCII escapes: accepted, round-trip
        odd = {**_action(note="\ud800"), "responses": {"n\ud800": "\udfff"}}
        assert await store.record_action("s", **odd) == 2
        last = (await store.transcript("s"))[-1]
        assert last.state_changes == {"note": "\ud800"}
        assert last.responses == {"n\ud800": "\udfff"}
        assert (await store.get_session("s")).state == {"hp": 2, "note": "\ud800"}
        # the session id too, in every call that takes one
        with pytest.raises(SessionError, match="session id contains '\\\\udc00' at index 1"):
            await store.ensure_session("s\udc00")
        assert await store.session_ids() == ["s"]


@pytest.mark.parametrize(
    ("field", "what"),
    [
        ("action_text", "action text"),
        ("narrative", "narrative"),
        ("action_type", "action type"),
        ("state_changes", "state_changes key"),
    ],
)
async def test_SessionStore_rejects_NUL_characters_before_any_write(
    store_at: Backend, field: str, what: str
) -> None:
    """PostgreSQL text cannot hold NUL: refused up front on every backend, alike."""
    async with store_at.open() as store:
        await store.ensure_session("s")
        bad: dict[str, Any] = {
            "action_text": _action("I sing \x00 loudly"),
            "narrative": {**_action(), "narrative": "You sing.\x00"},
            "action_type": {**_action(), "action_type": "so\x00ng"},
            "state_changes": _action(**{"note\x00": 1}),
        }[field]
        before = store.statistics()
        with pytest.raises(SessionError, match=rf"^{what} contains a NUL character at index"):
            await store.record_action("s", **bad)
        assert store.statistics() == before
        # in JSON values and responses a NUL is an escape: accepted, round-trips
        odd = {**_action(note="a\x00b"), "responses": {"n\x00": "\x00"}}
        assert await store.record_action("s", **odd) == 1
        entry = (await store.transcript("s"))[-1]
        assert (entry.state_changes, entry.responses) == ({"note": "a\x00b"}, {"n\x00": "\x00"})
        assert (await store.get_session("s")).state == {"note": "a\x00b"}
        with pytest.raises(SessionError, match="turn_expected must be an int or None"):
            await store.record_action("s", turn_expected="1", **_action())  # type: ignore[arg-type]


async def test_SessionStore_shared_and_session_lease(store_at: Backend) -> None:
    """``shared`` tells the pipeline whether other processes write; ``session_lease``
    exists on both (on SQLite, one process per store, it returns at once)."""
    async with store_at.open() as store:
        assert store.shared is (store_at.kind == "postgres")
        async with store.session_lease("s"):
            state = await store.ensure_session("s")
            assert await store.record_action("s", turn_expected=state.turn, **_action()) == 1
        with pytest.raises(SessionError, match="session id must not be empty"):
            async with store.session_lease(" "):
                pass  # pragma: no cover
        if store_at.kind == "sqlite":
            async with store.session_lease("s"), store.session_lease("s"):
                pass  # a no-op: nesting cannot deadlock


async def test_SessionStore_refuses_random_bytes_untouched(tmp_path: Path, db: Path) -> None:
    _write(db, random.Random(1).randbytes(8192))
    before = _snapshot(tmp_path)
    with pytest.raises(SessionError, match=r"sessions\.sqlite.*not an SQLite database"):
        async with SessionStore.open(db):
            pass  # pragma: no cover
    assert _snapshot(tmp_path) == before


async def test_SessionStore_refuses_sqlite_header_with_garbage(tmp_path: Path, db: Path) -> None:
    _write(db, b"SQLite format 3\x00" + random.Random(2).randbytes(8192))
    before = _snapshot(tmp_path)
    with pytest.raises(SessionError, match=r"sessions\.sqlite.*(corrupt|not a database)"):
        async with SessionStore.open(db):
            pass  # pragma: no cover
    assert _snapshot(tmp_path) == before


async def test_SessionStore_refuses_foreign_sqlite_untouched(tmp_path: Path, db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE inventory (item TEXT)")
    conn.execute("INSERT INTO inventory VALUES ('sword')")
    conn.commit()
    conn.close()
    before = _snapshot(tmp_path)
    with pytest.raises(SessionError, match=r"sessions\.sqlite.*another application.*inventory"):
        async with SessionStore.open(db):
            pass  # pragma: no cover
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("pragma", "message"),
    [
        ("application_id = 1234", "another application"),
        (f"user_version = {SCHEMA_VERSION + 1}", f"schema version {SCHEMA_VERSION + 1}"),
    ],
)
async def test_SessionStore_refuses_other_ids_and_versions(
    tmp_path: Path, db: Path, pragma: str, message: str
) -> None:
    async with SessionStore.open(db) as store:
        await store.ensure_session("s")
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA {pragma}")
    conn.commit()
    conn.close()
    before = _snapshot(tmp_path)
    with pytest.raises(SessionError, match=message):
        async with SessionStore.open(db):
            pass  # pragma: no cover
    assert _snapshot(tmp_path) == before


async def test_SessionStore_refuses_a_damaged_store_untouched(tmp_path: Path, db: Path) -> None:
    async with SessionStore.open(db) as store:
        await store.ensure_session("s")
        for i in range(200):
            await store.record_action("s", **_action(f"action number {i} " * 20, i=i))
    data = bytearray(_snapshot(db.parent)[db.name])
    page = 4096
    assert len(data) > 8 * page
    # smash pages in the middle (b-tree pages of the transcript), keep the header page
    data[3 * page : 6 * page] = random.Random(3).randbytes(3 * page)
    _write(db, bytes(data))
    before = _snapshot(tmp_path)
    with pytest.raises(SessionError, match=r"sessions\.sqlite.*corrupt"):
        async with SessionStore.open(db):
            pass  # pragma: no cover
    assert _snapshot(tmp_path) == before


async def test_SessionStore_refuses_calls_after_close(store_at: Backend) -> None:
    async with store_at.open() as store:
        await store.ensure_session("s")
    await store.aclose()  # idempotent
    with pytest.raises(SessionError, match="is closed"):
        await store.get_session("s")


async def test_SessionStore_open_validates_arguments(store_at: Backend) -> None:
    with pytest.raises(ValueError, match="max_action_chars must be >= 1"):
        async with store_at.open(max_action_chars=0):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="synchronous"):
        async with store_at.open(synchronous="OFF"):
            pass  # pragma: no cover
    if store_at.kind == "sqlite":
        assert store_at.target.name not in _snapshot(store_at.target.parent)


# ------------------------------------------------------------------ cancellation


async def test_SessionStore_cancelled_before_the_call_writes_nothing(store_at: Backend) -> None:
    async with store_at.open() as store:
        await store.ensure_session("s")
        with anyio.CancelScope() as scope:
            scope.cancel()
            await store.record_action("s", **_action(hp=1))
            pytest.fail("Cancelled was swallowed")  # pragma: no cover
        assert scope.cancelled_caught
        assert await store.count_actions("s") == 0


async def test_SessionStore_cancelled_midway_is_all_or_nothing(store_at: Backend) -> None:
    async with store_at.open() as store:
        await store.ensure_session("s")
        returned = []
        for i in range(20):
            # on trio the mock clock jumps to the deadline while the worker thread runs
            with anyio.move_on_after(0.001 * (i % 3)):
                returned.append(await store.record_action("s", **_action(f"a{i}", k=i)))
        turn = (await store.get_session("s")).turn
        entries = await store.transcript("s")
        assert [e.turn for e in entries] == list(range(1, turn + 1))
        assert set(returned) <= {e.turn for e in entries}
        state = (await store.get_session("s")).state
        assert state == ({"k": entries[-1].state_changes["k"]} if entries else {})


# ------------------------------------------------------------------ property: concurrency


@attrs.frozen
class _Op:
    writer: int
    key: str
    value: int | None
    yields: int


_ops = st.builds(
    _Op,
    writer=st.integers(0, 1),
    key=st.sampled_from(["hp", "gold", "door"]),
    value=st.none() | st.integers(-5, 5),
    yields=st.integers(0, 3),
)


@contextlib.contextmanager
def _fresh(kind: str, request: pytest.FixtureRequest) -> Iterator[Backend]:
    # a new place per hypothesis example (tmp_path is function-scoped)
    with tempfile.TemporaryDirectory() as directory:
        yield _backend(kind, request, Path(directory))


async def _run_schedule(store_at: Backend, schedule: dict[str, list[_Op]]) -> None:
    """Every session has two writer tasks recording concurrently through ONE store."""
    returned: dict[str, dict[int, int]] = {sid: {} for sid in schedule}  # op index -> turn

    async with store_at.open(synchronous="NORMAL") as store:

        async def writer(sid: str, who: int) -> None:
            for index, op in enumerate(schedule[sid]):
                if op.writer != who:
                    continue
                for _ in range(op.yields):
                    await anyio.lowlevel.checkpoint()
                returned[sid][index] = await store.record_action(
                    sid, **_action(f"{sid} op {index}", **{op.key: op.value})
                )

        async with anyio.create_task_group() as tg:
            for sid in schedule:
                await store.ensure_session(sid)
                for who in (0, 1):
                    tg.start_soon(writer, sid, who)

        for sid, ops in schedule.items():
            # sequential model: n actions -> turns 1..n, each op exactly once
            turns = returned[sid]
            assert sorted(turns.values()) == list(range(1, len(ops) + 1))
            for who in (0, 1):  # one writer's actions keep their order
                mine = [turns[i] for i, op in enumerate(ops) if op.writer == who]
                assert mine == sorted(mine)
            entries = await store.transcript(sid)
            assert [e.turn for e in entries] == list(range(1, len(ops) + 1))
            by_turn = {turn: index for index, turn in turns.items()}
            assert [e.action_text for e in entries] == [
                f"{sid} op {by_turn[e.turn]}" for e in entries
            ]
            model: dict[str, Any] = {}
            for e in entries:  # replay the changes in turn order
                for key, value in e.state_changes.items():
                    if value is None:
                        model.pop(key, None)
                    else:
                        model[key] = value
            state = await store.get_session(sid)
            assert (state.turn, state.state) == (len(ops), model)
            assert await store.count_actions(sid) == len(ops)
        assert await store.count_actions() == sum(len(ops) for ops in schedule.values())
        assert await store.session_ids() == sorted(schedule)


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_SessionStore_concurrent_sessions_never_lose_updates(
    kind: str, backend: str, request: pytest.FixtureRequest, data: st.DataObject
) -> None:
    n_sessions = data.draw(st.integers(1, 4), label="sessions")
    schedule = {
        f"s{i}": data.draw(st.lists(_ops, max_size=8), label=f"s{i}") for i in range(n_sessions)
    }
    options = {"clock": trio.testing.MockClock(autojump_threshold=0)} if backend == "trio" else {}
    with _fresh(kind, request) as store_at:
        anyio.run(_run_schedule, store_at, schedule, backend=backend, backend_options=options)


# ------------------------------------------------------------------ group commit


@attrs.define
class _Hold:
    entered: threading.Event = attrs.field(factory=threading.Event)
    release: threading.Event = attrs.field(factory=threading.Event)


@attrs.define
class _Gate:
    """A store clock that can hold the next write in the worker thread (mid-transaction).

    The store calls its clock inside the transaction, so ``hold()`` parks the next
    write (and the store's connection) until ``release`` is set.
    """

    holds: collections.deque[_Hold] = attrs.field(factory=collections.deque)
    taken: list[_Hold] = attrs.field(factory=list)
    now: float = 1000.0

    def hold(self) -> _Hold:
        hold = _Hold()
        self.holds.append(hold)
        return hold

    def __call__(self) -> float:
        if self.holds:
            hold = self.holds.popleft()
            self.taken.append(hold)
            hold.entered.set()
            assert hold.release.wait(10), "the test never released the write"
        self.now += 1
        return self.now

    def release_all(self) -> None:
        for hold in [*self.taken, *self.holds]:
            hold.release.set()


async def _entered(hold: _Hold) -> None:
    """Wait until the held write is in the worker thread."""
    assert await anyio.to_thread.run_sync(hold.entered.wait, 10)


async def _until(predicate: Callable[[], bool]) -> None:
    """Let other tasks (and threads) run until ``predicate()`` holds.

    Polls with checkpoints, bounded in real time only so that a hang fails the test
    (virtual time would jump while a worker thread runs).
    """
    give_up = time.monotonic() + 10
    while not predicate():
        if time.monotonic() > give_up:
            pytest.fail("condition never became true")  # pragma: no cover
        await anyio.lowlevel.checkpoint()


@attrs.define
class _Call:
    """One ``record_action`` call in its own cancel scope, and what became of it."""

    scope: anyio.CancelScope = attrs.field(factory=anyio.CancelScope)
    outcome: Any = None  # the turn, an exception, or "cancelled"
    finished: bool = False


def _start(
    tg: Any, store: AnySessionStore, sid: str, text: str, log: list[str] | None = None, **kw: Any
) -> _Call:
    """Start ``record_action(sid, ...)``; ``log`` gets ``text`` as the call queues it."""
    call = _Call()

    async def run() -> None:
        with call.scope:
            try:
                if log is not None:
                    log.append(text)  # no checkpoint between this and the queueing
                call.outcome = await store.record_action(sid, **{**_action(text), **kw})
            except SessionError as exc:
                call.outcome = exc
        if call.scope.cancelled_caught:
            call.outcome = "cancelled"
        call.finished = True

    tg.start_soon(run)
    return call


@contextlib.asynccontextmanager
async def _gated(
    store_at: Backend, *sessions: str
) -> AsyncIterator[tuple[AnySessionStore, _Gate, Any]]:
    """A store in thread mode with a gate clock, its sessions, and a task group.

    On PostgreSQL the batches take the one-savepoint-per-action path in the worker
    thread, as on SQLite: the pipelined path reads the clock on the loop, which the
    gate would block (its queueing and cancellation are tested with a server-side
    lock in test_state_postgres.py)."""
    gate = _Gate()
    async with store_at.open(clock=gate, synchronous="NORMAL", in_thread=True) as store:
        if isinstance(store, PostgresSessionStore):
            store._commit.write_first = None
        for sid in sessions:
            await store.ensure_session(sid)
        try:
            async with anyio.create_task_group() as tg:
                yield store, gate, tg
        finally:
            gate.release_all()


async def _texts(store: AnySessionStore, sid: str) -> list[str]:
    return [e.action_text for e in await store.transcript(sid)]


async def test_SessionStore_batches_concurrent_actions_on_the_loop(store_at: Backend) -> None:
    submitted: dict[str, list[str]] = {f"s{i}": [] for i in range(4)}
    async with store_at.open(in_thread=False) as store:
        for sid in submitted:
            await store.ensure_session(sid)
        turns: dict[str, int] = {}

        async def one(sid: str, k: int) -> None:
            submitted[sid].append(f"{sid} a{k}")  # no checkpoint before the call queues it
            turns[f"{sid} a{k}"] = await store.record_action(sid, **_action(f"{sid} a{k}", k=k))

        async with anyio.create_task_group() as tg:
            for k in range(5):
                for sid in submitted:
                    tg.start_soon(one, sid, k)
        stats = store.statistics()
        # every caller queued during the first flusher's scheduling point: one
        # transaction; except on SQLite, whose first caller found the store quiet and
        # wrote at once, alone: the 19 submitted in the same instant shared the window
        alone = int(store.quiet_write_seconds > 0)
        assert (stats.batches, stats.largest_batch, stats.actions_written) == (
            1 + alone,
            20 - alone,
            20,
        )
        assert (stats.pending, stats.withdrawn, stats.flushing) == (0, 0, False)
        for sid, texts in submitted.items():
            assert await _texts(store, sid) == texts  # submission order per session
            assert [turns[t] for t in texts] == [1, 2, 3, 4, 5]
            assert (await store.get_session(sid)).turn == 5


@pytest.mark.virtual_clock
@pytest.mark.parametrize("in_thread", [False, "auto"])
async def test_SessionStore_writes_an_action_on_a_quiet_store_at_once(
    tmp_path: Path, in_thread: bool | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite on the loop: an action submitted with none other in the last
    ``quiet_write_seconds`` costs no pass through the event loop (no window); actions
    submitted closer together share the window and one transaction."""
    quiet = SessionStore.quiet_write_seconds
    assert quiet > 0
    monkeypatch.setattr(group_commit, "_work_timer", lambda: 0.0)  # "auto": every write fast
    async with SessionStore.open(tmp_path / "s.sqlite", in_thread=in_thread) as store:
        await store.ensure_session("s")
        others: list[int] = []

        async def other() -> None:
            others.append(len(others))

        async with anyio.create_task_group() as tg:
            for turn in (1, 2):  # the first action on the store, then one after a pause
                tg.start_soon(other)
                assert await store.record_action("s", **_action(f"a{turn}")) == turn
                assert len(others) == turn - 1  # the task started before it has not run
                await anyio.sleep(2 * quiet)
                assert len(others) == turn
            # three in the same instant: the first is written alone at once, the
            # others wait a pass (the window) and share one transaction
            tg.start_soon(other)
            turns: list[int] = []

            async def record(text: str) -> None:
                turns.append(await store.record_action("s", **_action(text)))

            tg.start_soon(record, "a3")
            tg.start_soon(record, "a4")
            tg.start_soon(record, "a5")
        assert sorted(turns) == [3, 4, 5] and len(others) == 3
        stats = store.statistics()
        assert (stats.batches, stats.largest_batch, stats.actions_written) == (4, 2, 5)
        texts = await _texts(store, "s")
        assert texts[:2] == ["a1", "a2"] and sorted(texts[2:]) == ["a3", "a4", "a5"]


async def test_SessionStore_quiet_write_waits_for_a_busy_connection(tmp_path: Path) -> None:
    """A quiet action whose connection is held (another call in a worker thread)
    waits for it, as a window, and is written after it."""
    async with SessionStore.open(tmp_path / "s.sqlite", in_thread="auto") as store:
        await store.ensure_session("s")
        done: list[int] = []

        async def record() -> None:
            done.append(await store.record_action("s", **_action("a1")))

        held = True
        await store._limiter.acquire()  # as a call in a worker thread holds it
        try:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(record)
                    await _until(lambda: store.statistics().flushing)
                    await anyio.sleep(0.01)
                    waited = done == [] and store.statistics().pending == 1
                    store._limiter.release()  # first, so that a failure cannot hang
                    held = False
                    assert waited  # not taken into a batch while the connection was held
        finally:
            if held:
                store._limiter.release()
        assert done == [1]
        assert await _texts(store, "s") == ["a1"]


async def test_SessionStore_callers_during_a_flush_wait_for_the_next_batch(
    store_at: Backend,
) -> None:
    async with _gated(store_at, "s0", "s1", "s2") as (store, gate, tg):
        hold = gate.hold()
        first = _start(tg, store, "s0", "first")
        await _entered(hold)
        assert store.statistics().batches == 1
        log: list[str] = []
        calls = [_start(tg, store, f"s{1 + i % 2}", f"later {i}", log) for i in range(10)]
        await _until(lambda: store.statistics().pending == 10)
        # they queue behind the flush in the thread instead of starting thread jobs
        assert store.statistics().batches == 1 and store.statistics().flushing
        assert not first.finished and not any(c.finished for c in calls)
        hold.release.set()
        await _until(lambda: all(c.finished for c in [first, *calls]))
    stats = store.statistics()
    assert (stats.batches, stats.largest_batch, stats.actions_written) == (2, 10, 11)
    assert (stats.pending, stats.flushing) == (0, False)
    assert first.outcome == 1
    async with store_at.open() as store:
        for sid in ("s1", "s2"):
            mine = [t for t in log if int(t.split()[1]) % 2 == int(sid[1]) - 1]
            assert await _texts(store, sid) == mine  # submission order
            assert [calls[int(t.split()[1])].outcome for t in mine] == [1, 2, 3, 4, 5]


async def test_SessionStore_a_failing_action_fails_alone_in_its_batch(store_at: Backend) -> None:
    async with store_at.open() as store:
        for sid in ("s0", "s1", "s2"):
            await store.ensure_session(sid)
    # fails halfway through an action: after its transcript row
    if store_at.kind == "sqlite":
        store_at.execute(
            "CREATE TRIGGER curse BEFORE INSERT ON state WHEN NEW.key = 'cursed'"
            " BEGIN SELECT RAISE(ABORT, 'cursed key'); END"
        )
        cause: type[Exception] = sqlite3.IntegrityError
    else:
        store_at.execute(
            "CREATE FUNCTION curse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'cursed key'; END $$",
            "CREATE TRIGGER curse BEFORE INSERT ON state FOR EACH ROW"
            " WHEN (NEW.key = 'cursed') EXECUTE FUNCTION curse()",
        )
        cause = psycopg.errors.RaiseException
    async with _gated(store_at) as (store, gate, tg):
        hold = gate.hold()
        _start(tg, store, "s0", "first")
        await _entered(hold)
        plan = [
            ("s1", "a", {"turn_expected": 0}),
            ("ghost", "b", {}),
            ("s1", "c", {"turn_expected": 0}),  # a comes first: s1 is at turn 1 then
            ("s2", "d", {}),
            ("s1", "e", {"state_changes": {"mark": 1, "cursed": 1}}),
            ("s1", "f", {"state_changes": {"hp": 3}}),
        ]
        calls = []
        for n, (sid, text, kw) in enumerate(plan, 1):
            action = {**_action(text), **kw}
            turn_expected = action.pop("turn_expected", None)
            call = _Call()
            calls.append(call)

            async def run(
                call: _Call = call,
                sid: str = sid,
                action: Any = action,
                te: int | None = turn_expected,
            ) -> None:
                try:
                    call.outcome = await store.record_action(sid, turn_expected=te, **action)
                except SessionError as exc:
                    call.outcome = exc
                call.finished = True

            tg.start_soon(run)
            await _until(lambda n=n: store.statistics().pending == n)
        hold.release.set()
        await _until(lambda: all(c.finished for c in calls))
        a, b, c, d, e, f = (call.outcome for call in calls)
        assert (a, d, f) == (1, 1, 2)
        assert isinstance(b, SessionError) and "unknown session 'ghost'" in str(b)
        assert isinstance(c, SessionError) and "at turn 1, not 0" in str(c)
        assert isinstance(e, SessionError) and "cursed key" in str(e)
        assert isinstance(e.__cause__, cause)
        stats = store.statistics()
        assert (stats.batches, stats.largest_batch, stats.actions_written) == (2, 6, 4)
        # e's transcript row and its "mark" were written before the failure: rolled back
        assert await _texts(store, "s1") == ["a", "f"]
        assert (await store.get_session("s1")).state == {"hp": 3}
        assert await _texts(store, "s2") == ["d"]


async def test_SessionStore_a_transaction_failure_fails_the_whole_batch(store_at: Backend) -> None:
    async with store_at.open() as store:
        for sid in ("s0", "s1"):
            await store.ensure_session(sid)
    if store_at.kind == "sqlite":
        store_at.execute(  # like a full disk: SQLite rolls the whole transaction back
            "CREATE TRIGGER doom BEFORE INSERT ON state WHEN NEW.key = 'doom'"
            " BEGIN SELECT RAISE(ROLLBACK, 'doomed'); END"
        )
    else:
        store_at.execute(  # checked at COMMIT: the COMMIT fails, the transaction with it
            "CREATE FUNCTION doom() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'doomed'; END $$",
            "CREATE CONSTRAINT TRIGGER doom AFTER INSERT ON state DEFERRABLE INITIALLY"
            " DEFERRED FOR EACH ROW WHEN (NEW.key = 'doom') EXECUTE FUNCTION doom()",
        )
    async with _gated(store_at) as (store, gate, tg):
        hold = gate.hold()
        _start(tg, store, "s0", "first")
        await _entered(hold)
        calls = []
        for n, changes in enumerate([{"hp": 1}, {"doom": 1}, {"hp": 2}], 1):
            calls.append(_start(tg, store, "s1", f"x{n}", **{"state_changes": changes}))
            await _until(lambda n=n: store.statistics().pending == n)
        hold.release.set()
        await _until(lambda: all(c.finished for c in calls))
        for call in calls:
            assert isinstance(call.outcome, SessionError)
            assert "doomed" in str(call.outcome) and "whole batch of 3" in str(call.outcome)
        assert await store.count_actions("s1") == 0
        assert store.statistics().actions_written == 1
        assert await store.record_action("s1", **_action("after", hp=9)) == 1  # still usable
        assert (await store.get_session("s1")).state == {"hp": 9}


# ------------------------------------------------------------------ group commit: cancellation


async def test_SessionStore_cancelled_while_queued_is_never_written(store_at: Backend) -> None:
    async with _gated(store_at, "s0", "s1") as (store, gate, tg):
        hold = gate.hold()
        first = _start(tg, store, "s0", "first")
        await _entered(hold)
        a = _start(tg, store, "s1", "a")
        await _until(lambda: store.statistics().pending == 1)
        b = _start(tg, store, "s1", "b")
        await _until(lambda: store.statistics().pending == 2)
        a.scope.cancel()
        # a queued caller leaves at once: it does not wait for the batch in the thread
        await _until(lambda: a.finished)
        assert a.outcome == "cancelled" and not first.finished
        stats = store.statistics()
        assert (stats.pending, stats.withdrawn, stats.flushing) == (1, 1, True)
        hold.release.set()
        await _until(lambda: first.finished and b.finished)
    assert (first.outcome, b.outcome) == (1, 1)  # b took turn 1: a is absent
    async with store_at.open() as store:
        assert await _texts(store, "s1") == ["b"]


@pytest.mark.parametrize("victim", ["flusher", "waiter"])
async def test_SessionStore_cancelled_in_the_thread_completes_the_write(
    store_at: Backend, victim: str
) -> None:
    async with _gated(store_at, "s0", "s1") as (store, gate, tg):
        hold1 = gate.hold()
        first = _start(tg, store, "s0", "first")
        await _entered(hold1)
        a = _start(tg, store, "s1", "a")  # will flush the second batch
        await _until(lambda: store.statistics().pending == 1)
        b = _start(tg, store, "s1", "b")  # rides in a's batch
        await _until(lambda: store.statistics().pending == 2)
        hold2 = gate.hold()
        hold1.release.set()
        await _entered(hold2)
        await _until(lambda: first.finished)
        assert store.statistics().batches == 2 and store.statistics().pending == 0
        cancelled, other = (a, b) if victim == "flusher" else (b, a)
        cancelled.scope.cancel()
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert not cancelled.finished  # waits for its transaction, shielded
        hold2.release.set()
        await _until(lambda: a.finished and b.finished)
        assert cancelled.outcome == "cancelled"
        assert other.outcome == (1 if other is a else 2)
        assert await _texts(store, "s1") == ["a", "b"]  # both written, in order
        assert store.statistics().actions_written == 3


async def test_SessionStore_cancelled_flusher_in_the_thread_hands_over(store_at: Backend) -> None:
    async with _gated(store_at, "s0", "s1") as (store, gate, tg):
        hold = gate.hold()
        first = _start(tg, store, "s0", "first")
        await _entered(hold)
        calls = [_start(tg, store, "s1", f"q{i}") for i in range(3)]
        await _until(lambda: store.statistics().pending == 3)
        first.scope.cancel()
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert not first.finished
        hold.release.set()
        await _until(lambda: all(c.finished for c in [first, *calls]))
        assert first.outcome == "cancelled"
        assert await _texts(store, "s0") == ["first"]  # written all the same
        assert sorted(c.outcome for c in calls) == [1, 2, 3]  # the queue was flushed
        stats = store.statistics()
        assert (stats.batches, stats.largest_batch, stats.flushing) == (2, 3, False)


async def test_SessionStore_flusher_cancelled_before_taking_the_batch_hands_over(
    store_at: Backend,
) -> None:
    async with _gated(store_at, "s1") as (store, gate, tg):
        hold = gate.hold()
        busy = _Call()

        async def create() -> None:  # holds the connection in the thread
            await store.ensure_session("new")
            busy.finished = True

        tg.start_soon(create)
        await _entered(hold)
        a = _start(tg, store, "s1", "a")  # the flusher, waiting for the connection
        await _until(lambda: store.statistics().pending == 1)
        assert store.statistics().flushing
        b = _start(tg, store, "s1", "b")
        await _until(lambda: store.statistics().pending == 2)
        c = _start(tg, store, "s1", "c")
        await _until(lambda: store.statistics().pending == 3)
        a.scope.cancel()
        await _until(lambda: a.finished)
        assert a.outcome == "cancelled"
        stats = store.statistics()
        assert (stats.pending, stats.withdrawn, stats.flushing, stats.batches) == (2, 1, True, 0)
        hold.release.set()
        await _until(lambda: busy.finished and b.finished and c.finished)
        assert (b.outcome, c.outcome) == (1, 2)
        assert await _texts(store, "s1") == ["b", "c"]
        stats = store.statistics()
        assert (stats.batches, stats.largest_batch, stats.flushing) == (1, 2, False)


async def test_SessionStore_promoted_caller_cancelled_before_it_runs(store_at: Backend) -> None:
    async with _gated(store_at, "s0", "s1") as (store, gate, tg):
        hold = gate.hold()
        a = _Call()
        b = _Call()

        async def first() -> None:
            await store.record_action("s0", **_action("first"))
            # the flush just promoted a (the oldest queued); cancel it before it runs
            a.scope.cancel()

        tg.start_soon(first)
        await _entered(hold)
        a = _start(tg, store, "s1", "a")
        await _until(lambda: store.statistics().pending == 1)
        b = _start(tg, store, "s1", "b")
        await _until(lambda: store.statistics().pending == 2)
        hold.release.set()
        await _until(lambda: a.finished and b.finished)
        assert a.outcome == "cancelled"
        texts = await _texts(store, "s1")
        # a was promoted but its action still only queued when Cancelled arrived:
        # it withdrew and handed the flusher role to b
        assert texts == ["b"] and b.outcome == 1
        stats = store.statistics()
        assert (stats.withdrawn, stats.batches, stats.largest_batch) == (1, 2, 1)
        assert store.statistics().flushing is False


# ------------------------------------------------------------------ property: group commit


@attrs.frozen
class _Sub:
    submitter: int  # which of three tasks submits it (each submits its own in order)
    session: int  # index into the sessions; -1: an unknown session (always fails)
    yields: int  # checkpoints before submitting
    cancel_after: int | None  # a canceller cancels the call after this many checkpoints


_subs = st.builds(
    _Sub,
    submitter=st.integers(0, 2),
    session=st.integers(-1, 2),
    yields=st.integers(0, 3),
    cancel_after=st.none() | st.integers(0, 6),
).map(lambda s: attrs.evolve(s, cancel_after=None) if s.session < 0 else s)


@contextlib.contextmanager
def _watchdog(seconds: float) -> Iterator[anyio.CancelScope]:
    """A cancel scope cancelled from a thread after ``seconds`` of REAL time.

    Virtual time cannot catch a hang: with no deadline pending, the mock clock
    never moves and the loop just sleeps.
    """
    token = anyio.lowlevel.current_token()
    scope = anyio.CancelScope()

    def fire() -> None:
        with contextlib.suppress(Exception):  # the run may have ended meanwhile
            anyio.from_thread.run_sync(scope.cancel, token=token)

    timer = threading.Timer(seconds, fire)
    timer.start()
    try:
        with scope:
            yield scope
    finally:
        timer.cancel()


async def _run_cancel_schedule(store_at: Backend, subs: list[_Sub], in_thread: bool) -> None:
    sessions = ["s0", "s1", "s2"]
    seq = itertools.count()
    outcome: dict[int, Any] = {}  # sub index -> turn, SessionError or "cancelled"
    submitted: dict[int, int] = {}  # sub index -> submission sequence number

    async with store_at.open(synchronous="NORMAL", in_thread=in_thread) as store:
        for sid in sessions:
            await store.ensure_session(sid)

        async def canceller(scope: anyio.CancelScope, after: int) -> None:
            for _ in range(after):
                await anyio.lowlevel.checkpoint()
            scope.cancel()

        async def submitter(who: int, tg: Any) -> None:
            for index, sub in enumerate(subs):
                if sub.submitter != who:
                    continue
                for _ in range(sub.yields):
                    await anyio.lowlevel.checkpoint()
                sid = sessions[sub.session] if sub.session >= 0 else "ghost"
                with anyio.CancelScope() as scope:
                    if sub.cancel_after is not None:
                        tg.start_soon(canceller, scope, sub.cancel_after)
                    submitted[index] = number = next(seq)
                    try:
                        outcome[index] = await store.record_action(
                            sid, **_action(f"{sid} #{number}", last=number)
                        )
                    except SessionError as exc:
                        outcome[index] = exc
                if scope.cancelled_caught:
                    outcome[index] = "cancelled"

        with _watchdog(5.0) as watchdog:
            async with anyio.create_task_group() as tg:
                for who in range(3):
                    tg.start_soon(submitter, who, tg)
        assert not watchdog.cancelled_caught, "the schedule hung"
        assert len(outcome) == len(subs)  # nobody hung, everybody answered
        stored: dict[int, tuple[str, int]] = {}  # submission number -> (session, turn)
        for sid in sessions:
            entries = await store.transcript(sid)
            numbers = [int(e.action_text.split("#")[1]) for e in entries]
            assert numbers == sorted(numbers)  # submission order per session
            assert [e.turn for e in entries] == list(range(1, len(entries) + 1))
            for e, number in zip(entries, numbers, strict=True):
                assert number not in stored  # exactly once
                stored[number] = (sid, e.turn)
            state = await store.get_session(sid)
            assert state.turn == len(entries) == await store.count_actions(sid)
            assert state.state == ({"last": numbers[-1]} if numbers else {})

        absent_cancelled = 0
        for index, sub in enumerate(subs):
            result, number = outcome[index], submitted[index]
            if sub.session < 0:
                assert isinstance(result, SessionError) and "unknown session" in str(result)
                assert number not in stored
            elif isinstance(result, int):  # returned: stored, at the turn it returned
                assert stored[number] == (sessions[sub.session], result)
            else:
                assert result == "cancelled", result
                absent_cancelled += number not in stored
        stats = store.statistics()
        # a cancelled call is absent exactly when it was withdrawn from the queue
        assert stats.withdrawn == absent_cancelled
        assert stats.actions_written == len(stored)
        assert (stats.pending, stats.flushing) == (0, False)
        assert stats.batches <= len(subs) - stats.withdrawn  # each takes an action


@pytest.mark.parametrize("in_thread", [False, True], ids=["on-loop", "in-thread"])
@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_SessionStore_group_commit_with_cancellations_matches_the_model(
    kind: str, backend: str, in_thread: bool, request: pytest.FixtureRequest, data: st.DataObject
) -> None:
    subs = data.draw(st.lists(_subs, max_size=14), label="subs")
    options = {"clock": trio.testing.MockClock(autojump_threshold=0)} if backend == "trio" else {}
    with _fresh(kind, request) as store_at:
        anyio.run(
            _run_cancel_schedule,
            store_at,
            subs,
            in_thread,
            backend=backend,
            backend_options=options,
        )


# ---------------------------------------------------------------- where the work runs


def test_write_placement_auto_moves_to_threads_at_once_and_back_slowly() -> None:
    placement = WritePlacement.from_setting("auto")
    assert not placement.in_thread()  # nothing measured yet: the loop
    for _ in range(100):
        placement.observe(0.0002)
    assert not placement.in_thread()
    placement.observe(0.030)  # one slow fsync: threads from the next call on
    assert placement.in_thread()
    fast = 0
    while placement.in_thread():
        placement.observe(0.0002)
        fast += 1
    assert 25 <= fast <= 40  # about 30 fast calls bring it back


def test_write_placement_settings() -> None:
    assert WritePlacement.from_setting(True).mode == "thread"
    assert WritePlacement.from_setting(False).mode == "loop"
    assert WritePlacement.from_setting("auto", loop_allowed=False).mode == "thread"
    fixed = WritePlacement.from_setting(True)
    fixed.observe(0.0)
    assert fixed.in_thread() and not WritePlacement.from_setting(False).in_thread()
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        WritePlacement.from_setting("sometimes")


async def test_SessionStore_auto_runs_slow_work_in_threads_and_fast_work_on_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "auto": a slow write (a stand-in for a slow fsync) sends the next write to a
    worker thread; fast writes bring the work back to the loop. The store's work timer
    is replaced, so that "slow" (5 ms) and "fast" (0.1 ms) do not depend on how fast
    this machine writes."""
    loop_thread = threading.get_ident()
    ran_in: list[bool] = []  # per clock call (the clock runs inside each write)
    slow = [False]
    elapsed = [0.0]

    def work_timer() -> float:  # each write reads it twice: before and after
        elapsed[0] += 0.005 if slow[0] else 0.0001
        return elapsed[0]

    def clock() -> float:
        ran_in.append(threading.get_ident() != loop_thread)
        return 1_700_000_000.0

    monkeypatch.setattr(group_commit, "_work_timer", work_timer)
    async with SessionStore.open(tmp_path / "s.sqlite", clock=clock, synchronous="NORMAL") as store:
        await store.ensure_session("s")
        slow[0] = True
        await store.record_action("s", **_action("slow", k=0))
        slow[0] = False
        ran_in.clear()
        await store.record_action("s", **_action("after", k=1))
        assert ran_in and all(ran_in)  # the next write ran in a worker thread
        for k in range(2, 200):  # fast writes (each well under 1 ms) pull the average down
            ran_in.clear()
            await store.record_action("s", **_action(f"fast {k}", k=k))
            if not any(ran_in):
                break
        assert not any(ran_in), "fast writes never came back to the loop"
        assert k >= 10  # not at once: the slow call weighs until about 16 fast ones
        texts = [e.action_text for e in await store.transcript("s")]
        assert texts[:3] == ["slow", "after", "fast 2"] and len(texts) == k + 1
