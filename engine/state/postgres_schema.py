"""The PostgreSQL session store's connection and schema: connecting without ever
showing the password, and checking (or creating) the tables at open.

The tables live in the URL's database, in the first schema of its ``search_path``
(``current_schema()``; ``?options=-csearch_path%3Dname`` in the URL picks another).
They are ours when ``dm_engine_meta`` says so; a schema without any of our tables
is initialised (under an advisory lock, so engines starting together do it once);
anything else — our table names without the marker, another schema version,
missing tables, missing privileges — is refused before anything is written.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import psycopg

from ..errors import SessionError

__all__ = ["APPLICATION", "SCHEMA_VERSION", "Scrubber", "connect", "prepare"]

#: ``dm_engine_meta.application`` of a session store; other values are foreign.
APPLICATION = "dm-engine session store"
#: ``dm_engine_meta.schema_version`` of the schema below; another one is refused.
SCHEMA_VERSION = 1
META = "dm_engine_meta"
TABLES = (META, "sessions", "transcript", "state", "session_leases")
# Text keys sort by code point ("C"), as in SQLite and Python, whatever the
# database's collation. Times are float seconds since the epoch, as in SQLite,
# except the leases', which use the server's clock.
_SCHEMA = f"""
CREATE TABLE {META} (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE sessions (
    session_id TEXT COLLATE "C" PRIMARY KEY,
    turn       INTEGER NOT NULL CHECK (turn >= 0),
    created    DOUBLE PRECISION NOT NULL,
    updated    DOUBLE PRECISION NOT NULL
);
CREATE TABLE transcript (
    session_id    TEXT COLLATE "C" NOT NULL REFERENCES sessions (session_id),
    turn          INTEGER NOT NULL CHECK (turn >= 1),
    action_text   TEXT NOT NULL,
    action_type   TEXT NOT NULL,
    narrative     TEXT NOT NULL,
    state_changes TEXT NOT NULL,
    responses     TEXT NOT NULL,
    created       DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (session_id, turn)
);
CREATE TABLE state (
    session_id TEXT COLLATE "C" NOT NULL REFERENCES sessions (session_id),
    key        TEXT COLLATE "C" NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (session_id, key)
);
CREATE TABLE session_leases (
    session_id TEXT COLLATE "C" PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO {META} (key, value) VALUES
    ('application', '{APPLICATION}'), ('schema_version', '{SCHEMA_VERSION}');
"""


class Scrubber:
    """Removes a password from text (as given, URL-quoted, and conninfo-quoted)."""

    def __init__(self, password: str | None) -> None:
        forms = set()
        if password:
            forms = {
                password,
                urllib.parse.quote(password, safe=""),
                urllib.parse.quote_plus(password, safe=""),
                password.replace("\\", "\\\\").replace("'", "\\'"),
            }
        self._forms = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            text = text.replace(form, "***")
        return text

    def __repr__(self) -> str:
        return "<Scrubber>"


def connect(
    url: str,
    password: str | None,
    scrub: Scrubber,
    *,
    synchronous: str,
    connect_timeout: float,
) -> psycopg.Connection[Any]:
    """An autocommit connection (the store issues BEGIN/COMMIT itself), with
    ``synchronous_commit`` on (``"FULL"``) or off (``"NORMAL"``).

    Raises:
        SessionError: the server cannot be reached or refuses the login; the message
            names the URL (which holds no password) and never the password.
    """
    kwargs: dict[str, Any] = {"application_name": "dm-engine"}
    if password is not None:
        kwargs["password"] = password
    problem = ""
    try:
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=max(1, round(connect_timeout)), **kwargs
        )
        try:
            conn.execute(f"SET synchronous_commit = {'off' if synchronous == 'NORMAL' else 'on'}")
        except BaseException:
            conn.close()
            raise
    except psycopg.Error as exc:
        problem = scrub(str(exc))
    if problem:
        # raised outside the ``except``: the driver's exception is neither the cause nor
        # the context of ours, so no traceback can show its text (or its connection)
        raise SessionError(f"PostgreSQL session store {url!r} cannot be reached: {problem}")
    return conn


def prepare(conn: psycopg.Connection[Any], url: str, scrub: Scrubber) -> None:
    """Check the schema is our store (or create it in an empty schema); refuse
    anything else untouched, and a store this login cannot write."""
    try:
        conn.execute("BEGIN")
        try:
            _check_or_create(conn, url)
            conn.execute("COMMIT")
        finally:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.execute("ROLLBACK")
    except psycopg.Error as exc:
        raise SessionError(
            f"PostgreSQL session store {url!r} cannot be opened: {scrub(str(exc))}"
        ) from exc


def _check_or_create(conn: psycopg.Connection[Any], url: str) -> None:
    schema = _scalar(conn, "SELECT current_schema()")
    if schema is None:
        raise SessionError(
            f"PostgreSQL session store {url!r}: its search_path names no existing schema; "
            "create the schema or fix the URL's options"
        )
    schema_name = str(schema)
    # engines opening an empty schema together: one creates, the others wait and check
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dm-engine session store {schema_name}",)
    )
    present = _tables(conn, schema_name)
    where = f"PostgreSQL session store {url!r} (schema {schema_name!r})"
    if not present & set(TABLES):
        conn.execute(_SCHEMA)
        present = _tables(conn, schema_name)
    if META not in present:
        raise SessionError(
            f"{where} has tables {sorted(present & set(TABLES))} but no {META} table: "
            "they belong to another application; refusing to use them "
            "(choose another database or schema)"
        )
    meta = dict(conn.execute(f"SELECT key, value FROM {META}").fetchall())
    if meta.get("application") != APPLICATION:
        raise SessionError(
            f"{where}: {META} names application {meta.get('application')!r}, "
            f"not {APPLICATION!r}; refusing to use it"
        )
    version = meta.get("schema_version")
    if version != str(SCHEMA_VERSION):
        raise SessionError(
            f"{where} has schema version {version}; this engine reads version {SCHEMA_VERSION} only"
        )
    if missing := set(TABLES) - present:
        raise SessionError(f"{where} lacks tables {sorted(missing)}")
    lacking = [
        f"{privilege} on {table}"
        for table in TABLES[1:]
        for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE")
        if not _scalar(
            conn,
            "SELECT has_table_privilege(format('%%I.%%I', %s::text, %s::text), %s)",
            (schema_name, table, privilege),
        )
    ]
    if lacking:
        user = _scalar(conn, "SELECT current_user")
        raise SessionError(
            f"{where} cannot be written: user {user!r} lacks {', '.join(lacking)}; "
            "grant them or choose another [state] url"
        )


def _scalar(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def _tables(conn: psycopg.Connection[Any], schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
    ).fetchall()
    return {str(r[0]) for r in rows}
