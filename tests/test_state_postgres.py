"""The PostgreSQL session store against a real server: its schema checks, the
password (never shown), the ``[state]`` keys that select it, reconnection.

The store's whole contract (actions, group commit, cancellation) runs on both
backends in ``test_state.py``; leases are in ``test_state_postgres_lease.py``,
crash safety in ``test_state_postgres_crash.py``. Real clock, trio and asyncio.
"""

from __future__ import annotations

import contextlib
import functools
import re
import traceback
import urllib.parse
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import pg_server
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg_server import PASSWORD_ENV, PostgresServer

import engine
from engine.config import Config, StateConfig, parse_config
from engine.errors import ConfigError, SessionError
from engine.state import PostgresSessionStore, SessionStore, open_session_store

pytestmark = pytest.mark.anyio

# the server fixtures (bound here, not imported: test parameters would shadow an import)
postgres_server = pg_server.postgres_server
pg_url = pg_server.pg_url

TABLES = ["dm_engine_meta", "session_leases", "sessions", "state", "transcript"]


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock: the server answers in real time."""
    return str(request.param)


def _action(text: str = "I search the altar", **changes: Any) -> dict[str, Any]:
    return {
        "action_text": text,
        "action_type": "exploration",
        "narrative": f"You {text.lower()}.",
        "state_changes": changes,
        "responses": {},
    }


def _schema(url: str) -> str:
    options = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["options"][0]
    return options.removeprefix("-csearch_path=")


def _dump(server: PostgresServer, url: str) -> dict[str, list[Any]]:
    """Every table of the URL's schema with its rows: 'nothing touched'."""
    schema = _schema(url)
    with server.connect() as conn:
        names = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s"
                " ORDER BY table_name",
                (schema,),
            )
        ]
        return {
            name: sorted(map(repr, conn.execute(f'SELECT * FROM "{schema}"."{name}"')))
            for name in names
        }


def _no_secret(server: PostgresServer, *texts: str) -> None:
    forms = {server.password, urllib.parse.quote(server.password, safe="")}
    for text in texts:
        for form in forms:
            assert form not in text, f"the password leaked into: {text}"


def _everything(exc: BaseException) -> str:
    """The exception's message, its whole traceback and every chained exception."""
    return "".join(traceback.format_exception(exc)) + repr(exc.__cause__) + repr(exc.__context__)


async def _open(server: PostgresServer, url: str, **options: Any) -> None:
    async with PostgresSessionStore.open(url, password=server.password, **options):
        pass


# ------------------------------------------------------------------ the schema


async def test_open_creates_the_schema_once(postgres_server: PostgresServer, pg_url: str) -> None:
    async with anyio.create_task_group() as tg:  # engines starting together on an empty schema
        for _ in range(4):
            tg.start_soon(_open, postgres_server, pg_url)
    tables = _dump(postgres_server, pg_url)
    assert sorted(tables) == TABLES
    assert tables["dm_engine_meta"] == sorted(
        [repr(("application", "dm-engine session store")), repr(("schema_version", "1"))]
    )
    ids = ["Zeta", "alpha", "Ärger", "beta", "_x", "10", "9"]
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        for sid in ids:
            await store.ensure_session(sid)
        assert await store.session_ids() == sorted(ids)  # code point order, as SQLite


async def test_refuses_another_schema_version_untouched(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        await store.ensure_session("s")
        await store.record_action("s", **_action(hp=1))
    with postgres_server.connect(pg_url) as conn:
        conn.execute("UPDATE dm_engine_meta SET value = '2' WHERE key = 'schema_version'")
    before = _dump(postgres_server, pg_url)
    with pytest.raises(SessionError) as info:
        await _open(postgres_server, pg_url)
    message = str(info.value)
    assert "has schema version 2; this engine reads version 1 only" in message
    assert repr(pg_url) in message and _schema(pg_url) in message
    assert _dump(postgres_server, pg_url) == before


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            "CREATE TABLE sessions (id INTEGER, owner TEXT)",
            r"has tables \['sessions'\] but no dm_engine_meta table: they belong to another "
            "application; refusing",
        ),
        (
            "CREATE TABLE dm_engine_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            " INSERT INTO dm_engine_meta VALUES ('application', 'other'),"
            " ('schema_version', '1')",
            "names application 'other'",
        ),
    ],
    ids=["foreign-tables", "other-application"],
)
async def test_refuses_a_schema_of_another_application_untouched(
    postgres_server: PostgresServer, pg_url: str, setup: str, message: str
) -> None:
    with postgres_server.connect(pg_url) as conn:
        conn.execute(setup)
    before = _dump(postgres_server, pg_url)
    with pytest.raises(SessionError, match=message):
        await _open(postgres_server, pg_url)
    assert _dump(postgres_server, pg_url) == before


async def test_refuses_a_store_missing_a_table(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    await _open(postgres_server, pg_url)
    with postgres_server.connect(pg_url) as conn:
        conn.execute("DROP TABLE session_leases")
    with pytest.raises(SessionError, match=r"lacks tables \['session_leases'\]"):
        await _open(postgres_server, pg_url)


async def test_refuses_a_login_that_cannot_write(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    await _open(postgres_server, pg_url)
    role = f"reader_{_schema(pg_url)}"
    schema = _schema(pg_url)
    secret = "-".join(["reader", schema, "pw"])  # not spelt out in this (traced) source
    with postgres_server.connect(pg_url) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'")
        conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO {role}')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO {role}')
    url = pg_url.replace("postgresql://dm@", f"postgresql://{role}@")
    with pytest.raises(SessionError) as info:
        async with PostgresSessionStore.open(url, password=secret):
            pass  # pragma: no cover
    message = str(info.value)
    assert f"cannot be written: user '{role}' lacks INSERT on sessions" in message
    assert "grant them or choose another [state] url" in message
    assert secret not in _everything(info.value)


async def test_refuses_a_search_path_without_a_schema(postgres_server: PostgresServer) -> None:
    url = f"{postgres_server.url}?options={urllib.parse.quote('-csearch_path=nowhere')}"
    with pytest.raises(SessionError, match="its search_path names no existing schema"):
        await _open(postgres_server, url)


# ------------------------------------------------------------------ the password


async def test_wrong_password_is_refused_without_showing_it(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    wrong = postgres_server.password + "-not"
    with pytest.raises(SessionError) as info:
        async with PostgresSessionStore.open(pg_url, password=wrong):
            pass  # pragma: no cover
    message = str(info.value)
    assert f"PostgreSQL session store {pg_url!r} cannot be reached" in message
    assert "password authentication failed" in message
    assert info.value.__cause__ is None and info.value.__context__ is None
    _no_secret(postgres_server, _everything(info.value))
    assert wrong not in _everything(info.value)


async def test_the_password_never_shows_in_reprs_or_errors(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    password = postgres_server.password
    async with PostgresSessionStore.open(pg_url, password=password) as store:
        _no_secret(postgres_server, repr(store), str(store), store.url, repr(attrs.asdict(store)))
        assert repr(store) == f"<PostgresSessionStore {pg_url!r}>"
        with pytest.raises(SessionError) as info:
            await store.get_session("nope")
        _no_secret(postgres_server, _everything(info.value))
        # an error whose text holds the password (here the server echoes it) is scrubbed
        literal = password.replace("'", "''")
        with postgres_server.connect(pg_url) as conn:
            conn.execute(
                "CREATE FUNCTION echo() RETURNS trigger LANGUAGE plpgsql AS $body$ BEGIN"
                f" RAISE EXCEPTION 'login %', '{literal}'; END $body$"
            )
            conn.execute(
                "CREATE TRIGGER echo BEFORE INSERT ON state FOR EACH ROW EXECUTE FUNCTION echo()"
            )
        await store.ensure_session("s")
        with pytest.raises(SessionError) as info:
            await store.record_action("s", **_action(hp=1))
        assert "login ***" in str(info.value)
        _no_secret(postgres_server, str(info.value))
    assert "closed" in repr(store)


def test_a_url_with_a_password_is_refused_by_the_configuration() -> None:
    secret = "hunter2-secret"
    for url in (
        f"postgresql://dm:{secret}@db.example:5432/dm",
        f"postgres://dm@db.example/dm?sslmode=require&password={secret}",
    ):
        for build in (
            lambda u: parse_config({"state": {"url": u}}),
            lambda u: StateConfig(url=u),
        ):
            with pytest.raises(ConfigError) as info:
                build(url)
            message = str(info.value)
            assert message.startswith("state.url = 'postgres")
            assert "must not contain a password" in message and "[state] password_env" in message
            assert secret not in message and secret not in repr(info.value.value)
            assert "***" in message


@pytest.mark.parametrize(
    ("state", "key", "reason"),
    [
        ({"url": "mysql://dm@db/dm"}, "state.url", "must be a PostgreSQL URL"),
        ({"url": "postgresql://dm@db:99999/dm"}, "state.url", "must be a PostgreSQL URL"),
        ({"url": "postgresql://dm@db/dm", "path": "/x.sqlite"}, "state.path", "must be empty"),
        ({"password_env": "PGPASS"}, "state.password_env", "only read for a PostgreSQL store"),
        (
            {"url": "postgresql://dm@db/dm", "password_env": "PG-PASS"},
            "state.password_env",
            "name of an environment variable",
        ),
        ({"session_lease_seconds": 0.5}, "state.session_lease_seconds", ">= 1.0"),
        ({"session_lease_seconds": 7200}, "state.session_lease_seconds", "<= 3600"),
    ],
)
def test_state_keys_are_validated(state: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"state": state})
    assert info.value.key == key and reason in str(info.value)


def test_state_defaults_select_sqlite() -> None:
    config = Config().state
    assert (config.url, config.password_env, config.session_lease_seconds) == ("", "", 30.0)
    ok = parse_config(
        {"state": {"url": "postgresql://dm@db:5432/dm", "password_env": "DM_PG_PASSWORD"}}
    )
    assert ok.state.url == "postgresql://dm@db:5432/dm"


# ------------------------------------------------------------------ selecting the store


async def test_open_session_store_picks_the_backend(
    postgres_server: PostgresServer, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = StateConfig(url=pg_url, password_env=PASSWORD_ENV, session_lease_seconds=2)
    async with open_session_store(config, tmp_path) as store:
        assert isinstance(store, PostgresSessionStore) and store.shared
        assert (store.url, store.lease_seconds) == (pg_url, 2.0)
        await store.ensure_session("s")
    # state_path (open_engine's) means the SQLite file, whatever url says
    async with open_session_store(config, tmp_path, path=tmp_path / "x.sqlite") as store:
        assert isinstance(store, SessionStore) and not store.shared
    async with open_session_store(StateConfig(), tmp_path) as store:
        assert isinstance(store, SessionStore)
        assert store.path == tmp_path / "sessions.sqlite"
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(SessionError) as info:
        open_session_store(config, tmp_path)
    assert f"the environment variable {PASSWORD_ENV} named by [state] password_env is not set" in (
        str(info.value)
    )
    with pytest.raises(SessionError, match="is empty"):
        open_session_store(config, tmp_path, environ={PASSWORD_ENV: ""})


async def test_open_engine_runs_on_postgres(
    postgres_server: PostgresServer, pg_url: str, tmp_path: Path
) -> None:
    config = Config()
    config = attrs.evolve(
        config,
        module=attrs.evolve(config.module, include_srd=False, cache_dir=str(tmp_path)),
        state=attrs.evolve(config.state, url=pg_url, password_env=PASSWORD_ENV),
        simulation=attrs.evolve(config.simulation, time_scale=0.001),
    )
    async with engine.open_engine(config) as dm:
        assert isinstance(dm.store, PostgresSessionStore)
        result = await dm.player_action("s1", "I search the altar for traps")
        assert result.turn == 1
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        assert [e.action_text for e in await store.transcript("s1")] == [
            "I search the altar for traps"
        ]


# ------------------------------------------------------------------ the connection


async def test_synchronous_maps_to_synchronous_commit(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    for synchronous, setting in (("FULL", "on"), ("NORMAL", "off")):
        async with PostgresSessionStore.open(
            pg_url, password=postgres_server.password, synchronous=synchronous
        ) as store:
            shown = await store._run(
                "show",
                lambda conn: conn.execute("SHOW synchronous_commit").fetchone()[0],
                write=False,
            )
            assert shown == setting


async def test_a_dropped_connection_is_replaced(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        await store.ensure_session("s")
        for round_ in range(2):
            pid = await store._run(
                "pid",
                lambda conn: conn.execute("SELECT pg_backend_pid()").fetchone()[0],
                write=False,
            )
            with postgres_server.connect() as admin:  # as a server restart or a proxy would
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            if round_ == 0:
                assert await store.record_action("s", **_action(hp=1)) == 1  # a write first
            else:
                assert (await store.get_session("s")).turn == 1  # a read first
        assert await store.count_actions("s") == 1


async def test_the_lane_holds_leases_and_reads_and_is_replaced_when_dropped(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """Leases and ``find_session`` run on a second connection whose commits do not wait
    for the WAL flush (the store's own stay FULL); a dropped one is replaced."""
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        query = "SELECT pg_backend_pid(), current_setting('synchronous_commit')"

        async def lane() -> tuple[int, str]:
            (pid, setting), *_ = (await store._lane.execute("pid", query.encode(), ())).rows
            return int(str(pid)), str(setting)

        lane_pid, lane_setting = await lane()
        data_pid, data_setting = await store._run(
            "pid", lambda conn: conn.execute(query).fetchone(), write=False
        )
        assert lane_pid != data_pid
        assert (lane_setting, data_setting) == ("off", "on")
        await store.record_action("s", turn_expected=0, **_action(hp=3))
        for _ in range(2):  # a lease first, then a read first
            with postgres_server.connect() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (lane_pid,))
            async with store.session_lease("s"):
                found = await store.find_session("s")
                assert found is not None and (found.turn, found.state) == (1, {"hp": 3})
            lane_pid, _ = await lane()
        assert await store.find_session("nobody") is None
        with pytest.raises(SessionError, match=r"^sum on '.*' failed: .*division by zero"):
            await store._lane.execute("sum", b"SELECT 1 / $1::int", ("0",))
        assert (await store._lane.execute("sum", b"SELECT 1 / $1::int", ("1",))).rows == [("1",)]
        # a statement sent runs to its end when its caller is cancelled: the outcome is known
        with anyio.move_on_after(0.05) as scope:
            slow = await store._lane.execute("sleep", b"SELECT 'done' FROM pg_sleep(0.3)", ())
        assert scope.cancel_called and slow.rows == [("done",)]
        assert (await store._lane.execute("next", b"SELECT 2", ())).rows == [("2",)]
        with postgres_server.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM session_leases").fetchone()[0] == 0
    with pytest.raises(SessionError, match="is closed"):
        await store.find_session("s")


async def test_a_batch_whose_lock_fails_writes_nothing_and_says_why(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """The batch's lock goes in its pipeline: when the lock itself fails (here a lock
    timeout behind another transaction, in the pipelined transaction and then in the
    one-savepoint-per-action one) the whole batch fails with the server's reason,
    nothing is written, and the store goes on."""
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        await store.record_action("s", turn_expected=0, **_action("first"))
        # on both connections that write a batch: the pipelined one, then the fallback's
        await store._commit_lane.execute("timeout", b"SET lock_timeout = '100ms'", ())
        await store._run("timeout", lambda c: c.execute("SET lock_timeout = '100ms'"), write=True)
        with postgres_server.connect(pg_url) as other, other.transaction():
            other.execute("SELECT 1 FROM sessions WHERE session_id = 's' FOR UPDATE")
            with pytest.raises(SessionError, match=r"(?s)lock timeout.*whole batch of 1 actions"):
                await store.record_action("s", turn_expected=1, **_action("second"))
        assert await store.record_action("s", turn_expected=1, **_action("third")) == 2
        assert [e.action_text for e in await store.transcript("s")] == ["first", "third"]


async def test_batches_take_the_pipeline_and_fall_back_on_a_failure(
    postgres_server: PostgresServer, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown session or a stale ``turn_expected`` fails alone inside the pipelined
    batch; a failing statement sends the batch to the one-savepoint-per-action path."""
    taken: list[bool] = []
    real = PostgresSessionStore._write_on_lane

    async def spy(self: PostgresSessionStore, batch: list[Any]) -> bool:
        taken.append(await real(self, batch))
        return taken[-1]

    monkeypatch.setattr(PostgresSessionStore, "_write_on_lane", spy)
    async with PostgresSessionStore.open(
        pg_url, password=postgres_server.password, in_thread=False
    ) as store:
        await store.ensure_session("s")
        await store.ensure_session("t")
        outcomes: dict[str, Any] = {}

        async def act(name: str, sid: str, turn_expected: int | None) -> None:
            changes = {"hp": "x" * 10} if name == "big" else {"hp": name}
            try:
                outcomes[name] = await store.record_action(
                    sid, turn_expected=turn_expected, **_action(name, **changes)
                )
            except SessionError as exc:
                outcomes[name] = str(exc)

        async def batch(*calls: tuple[Any, ...]) -> None:
            async with anyio.create_task_group() as tg:  # on the loop: one batch
                for call in calls:
                    tg.start_soon(act, *call)

        # in any order: a and b take turn 1 of s and t; ghost and stale fail alone
        await batch(("a", "s", 0), ("ghost", "nope", None), ("stale", "s", 99), ("b", "t", None))
        assert (outcomes["a"], outcomes["b"], outcomes["ghost"]) == (1, 1, "unknown session 'nope'")
        assert re.fullmatch(
            "session 's' is at turn [01], not 99: another action was recorded in between",
            outcomes["stale"],
        )
        assert taken == [True]
        with postgres_server.connect(pg_url) as conn:
            conn.execute("ALTER TABLE state ADD CONSTRAINT small CHECK (length(value) < 5)")
        await batch(("c", "s", 1), ("big", "s", None), ("d", "t", 1))
        assert taken == [True, False]
        assert (outcomes["c"], outcomes["d"]) == (2, 2)
        assert "violates check constraint" in outcomes["big"]
        for sid, texts in (("s", ["a", "c"]), ("t", ["b", "d"])):
            assert [e.action_text for e in await store.transcript(sid)] == texts
            state = await store.get_session(sid)
            assert (state.turn, state.state) == (2, {"hp": texts[-1]})
        assert store.statistics().batches == 2


async def _commit_lane_pid(store: PostgresSessionStore) -> int:
    ((pid,),) = (await store._commit_lane.execute("pid", b"SELECT pg_backend_pid()", ())).rows
    return int(str(pid))


async def test_a_pipelined_batch_in_flight_queues_later_callers_and_ends_when_cancelled(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """A batch waiting on the server (here for a row lock another transaction holds):
    later callers queue for the next batch, a queued caller cancelled leaves unwritten
    at once, and the cancelled flusher's transaction still runs to its end."""
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        await store.ensure_session("s0")
        await store.ensure_session("s1")
        pid = await _commit_lane_pid(store)
        outcomes: dict[str, Any] = {}
        finished: set[str] = set()
        scopes = {name: anyio.CancelScope() for name in ("first", "a", "b", "c")}

        async def act(name: str, sid: str) -> None:
            outcomes[name] = "cancelled"
            with scopes[name]:
                outcomes[name] = await store.record_action(sid, **_action(name))
            finished.add(name)

        async def settle(until: Any) -> None:
            for _ in range(1000):
                if until():
                    return
                await anyio.sleep(0.01)
            pytest.fail("never settled")  # pragma: no cover

        with postgres_server.connect(pg_url) as other:
            other.execute("BEGIN")
            other.execute("SELECT 1 FROM sessions WHERE session_id = 's0' FOR UPDATE")
            async with anyio.create_task_group() as tg:
                tg.start_soon(act, "first", "s0")
                await anyio.to_thread.run_sync(
                    postgres_server.wait_for_backend, pid, "wait_event_type = 'Lock'"
                )
                for name in ("a", "b", "c"):
                    tg.start_soon(act, name, "s1")
                await settle(lambda: store.statistics().pending == 3)
                assert store.statistics().batches == 1 and store.statistics().flushing
                scopes["a"].cancel()
                await settle(lambda: store.statistics().withdrawn == 1)
                scopes["first"].cancel()
                await anyio.sleep(0.05)
                # the cancelled flusher waits for its transaction, shielded
                assert "first" not in finished and store.statistics().flushing
                other.execute("ROLLBACK")
        assert (outcomes["first"], outcomes["a"]) == ("cancelled", "cancelled")
        assert sorted([outcomes["b"], outcomes["c"]]) == [1, 2]  # trio starts tasks in any order
        assert [e.action_text for e in await store.transcript("s0")] == ["first"]
        assert [e.action_text for e in await store.transcript("s1")] == sorted(
            ["b", "c"], key=outcomes.__getitem__
        )
        stats = store.statistics()
        assert (stats.batches, stats.largest_batch, stats.actions_written) == (2, 2, 3)


async def test_a_pipelined_batch_whose_commit_fails_or_is_lost_says_so(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """A COMMIT that fails (a deferred trigger) fails the whole batch, nothing written;
    a COMMIT lost with its connection says the outcome is unknown; the store goes on."""
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        await store.ensure_session("s")
        with postgres_server.connect(pg_url) as conn:
            conn.execute(
                "CREATE FUNCTION doom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                " IF NEW.key = 'stall' THEN PERFORM pg_sleep(30); END IF;"
                " RAISE EXCEPTION 'doomed'; END $$"
            )
            conn.execute(
                "CREATE CONSTRAINT TRIGGER doom AFTER INSERT ON state DEFERRABLE INITIALLY"
                " DEFERRED FOR EACH ROW WHEN (NEW.key IN ('doom', 'stall'))"
                " EXECUTE FUNCTION doom()"
            )
        outcomes: list[Any] = []

        async def act(**changes: Any) -> None:
            try:
                outcomes.append(await store.record_action("s", **_action(**changes)))
            except SessionError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:  # one batch
            for changes in ({"hp": 1}, {"doom": 1}, {"hp": 2}):
                tg.start_soon(functools.partial(act, **changes))
        assert all("doomed" in str(o) and "whole batch of 3" in str(o) for o in outcomes)
        assert await store.count_actions("s") == 0
        pid = await _commit_lane_pid(store)
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(act, stall=1))
            await anyio.to_thread.run_sync(
                postgres_server.wait_for_backend, pid, "wait_event = 'PgSleep'"
            )
            with postgres_server.connect() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        lost = outcomes[-1]
        assert isinstance(lost, SessionError)
        assert re.search(
            r"(?s)lost while committing .*whether the batch of 1 actions was stored is "
            r"unknown; reread the session",
            str(lost),
        )
        _no_secret(postgres_server, str(lost))
        assert await store.count_actions("s") == 0  # here it was not
        assert await store.record_action("s", **_action(hp=9)) == 1  # on a new connection
        assert await _commit_lane_pid(store) != pid


async def test_the_lane_sends_statements_called_meanwhile_in_one_pipeline_each_alone(
    postgres_server: PostgresServer, pg_url: str
) -> None:
    """Statements called while the lane waits for the server go together in its next
    pipeline, each its own transaction (one failing fails alone); a caller cancelled
    before they were sent sends nothing."""
    async with PostgresSessionStore.open(pg_url, password=postgres_server.password) as store:
        lane = store._lane
        outcomes: dict[str, Any] = {}
        ghost = anyio.CancelScope()

        async def run(name: str, sql: bytes, *params: Any) -> None:
            outcomes[name] = "cancelled"
            with ghost if name == "ghost" else contextlib.nullcontext():
                try:
                    outcomes[name] = (await lane.execute(name, sql, params)).rows
                except SessionError as exc:
                    outcomes[name] = str(exc)

        async def until(condition: Any) -> None:
            while not condition():
                await anyio.lowlevel.checkpoint()

        first = lane.pipelines
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "slow", b"SELECT 'slow' FROM pg_sleep(0.3)")
            await until(lambda: lane.pipelines == first + 1)  # sent, not yet answered
            tg.start_soon(run, "ghost", b"INSERT INTO session_leases VALUES ('g', 'h', now())")
            await until(lambda: len(lane._queue) == 1)
            ghost.cancel()
            await until(lambda: not lane._queue)
            for i in range(4):
                tg.start_soon(run, f"double {i}", b"SELECT $1::int * 2", i)
            tg.start_soon(run, "broken", b"SELECT 1 / $1::int", 0)
            await until(lambda: len(lane._queue) == 5)
        assert lane.pipelines == first + 2  # the slow one, then the other five together
        assert outcomes.pop("slow") == [("slow",)]
        assert outcomes.pop("ghost") == "cancelled"
        assert re.fullmatch(r"broken on '.*' failed: .*division by zero", outcomes.pop("broken"))
        assert outcomes == {f"double {i}": [(str(2 * i),)] for i in range(4)}
        with postgres_server.connect(pg_url) as conn:
            assert conn.execute("SELECT count(*) FROM session_leases").fetchone()[0] == 0


# each call: whether its statement succeeds, after how many of the test's
# checkpoints its caller is cancelled (None: never), and whether a second statement
# (tag + PAIRED, always succeeding) goes with it in one ``execute_each``
_lane_calls = st.lists(
    st.tuples(
        st.sampled_from(["ok", "fail"]), st.one_of(st.none(), st.integers(0, 8)), st.booleans()
    ),
    min_size=1,
    max_size=12,
)
PAIRED = 1000


async def _lane_schedule(
    server: PostgresServer, url: str, calls: list[tuple[str, int | None, bool]]
) -> tuple[list[int], dict[int, Any], list[tuple[int, int]]]:
    """Run the calls at once on a store's lane, cancelling as drawn; return the order
    the calls entered ``execute``, each one's outcome, and the rows written."""
    order: list[int] = []
    outcome: dict[int, Any] = {}
    unheard_by: dict[int, Any] = {}  # paired calls cancelled once sent: their outcomes
    scopes = [anyio.CancelScope() for _ in calls]
    async with PostgresSessionStore.open(url, password=server.password) as store:
        lane = store._lane

        async def one(i: int, kind: str, paired: bool) -> None:
            ok = b"INSERT INTO log (tag) VALUES ($1::int) RETURNING id"
            sql = b"INSERT INTO log (tag) SELECT $1::int WHERE 1 / 0 = 1" if kind == "fail" else ok
            outcome[i] = "cancelled"
            with scopes[i]:
                order.append(i)  # no checkpoint before execute queues the call
                if paired:

                    async def unheard(results: list[Any], i: int = i) -> None:
                        unheard_by[i] = [
                            r if isinstance(r, SessionError) else r.rows for r in results
                        ]

                    results = await lane.execute_each(
                        "log", [(sql, (i,)), (ok, (i + PAIRED,))], unheard=unheard
                    )
                    outcome[i] = [r if isinstance(r, SessionError) else r.rows for r in results]
                    return
                try:
                    outcome[i] = (await lane.execute("log", sql, (i,))).rows
                except SessionError as exc:
                    outcome[i] = exc

        async with anyio.create_task_group() as tg:
            for i, (kind, _, paired) in enumerate(calls):
                tg.start_soon(one, i, kind, paired)
            for step in range(10):
                for i, (_, at, _) in enumerate(calls):
                    if at == step:
                        scopes[i].cancel()
                await anyio.lowlevel.checkpoint()
        assert not lane._queue and not lane._sending  # nothing left behind
    with server.connect(url) as conn:
        rows = [(int(r[0]), int(r[1])) for r in conn.execute("SELECT id, tag FROM log ORDER BY id")]
    for i, told in unheard_by.items():  # as ``outcome`` says it, for the checks
        outcome[i] = ("unheard", told)
    return order, outcome, rows


@pytest.mark.parametrize("backend", ["trio", "asyncio"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=_lane_calls)
def test_lane_calls_with_cancellations_match_the_sequential_model(
    backend: str, postgres_server: PostgresServer, calls: list[tuple[str, int | None, bool]]
) -> None:
    """Concurrent ``execute`` and ``execute_each`` calls, some failing, some cancelled
    at any point: each statement runs at most once, in the order the calls came, a
    call's statements one after another; a failing one fails alone; one that returned
    is stored with the id it returned; a cancelled call's statements are all sent or
    none, never twice, and when sent their outcomes reach its ``unheard``; the lane is
    left idle."""
    url = postgres_server.schema_url()
    with postgres_server.connect(url) as conn:
        conn.execute("CREATE TABLE log (id bigserial PRIMARY KEY, tag integer NOT NULL)")
    order, outcome, rows = anyio.run(_lane_schedule, postgres_server, url, calls, backend=backend)
    tags = [tag for _, tag in rows]
    assert len(set(tags)) == len(tags)  # never twice
    sent = [t for i in order for t in ([i, i + PAIRED] if calls[i][2] else [i])]
    assert tags == [t for t in sent if t in tags]  # in the order the calls came
    for i, (kind, cancel_at, paired) in enumerate(calls):
        out = outcome[i]
        if paired:
            if out == "cancelled":  # never sent: nothing ran
                assert cancel_at is not None
                assert i not in tags and i + PAIRED not in tags
                continue
            if out[0] == "unheard":  # cancelled once sent: both ran, outcomes to unheard
                assert cancel_at is not None
                out = out[1]
            first, ((returned,),) = out
            assert (int(str(returned)), i + PAIRED) in rows  # ran, whatever the first did
            out = first
        if out == "cancelled":
            assert cancel_at is not None
            assert kind == "ok" or i not in tags
        elif kind == "fail":
            assert isinstance(out, SessionError) and "division by zero" in str(out)
            assert i not in tags
        else:
            ((returned,),) = out
            assert (int(str(returned)), i) in rows
