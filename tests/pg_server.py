"""A real PostgreSQL server for tests: ``initdb`` in a temporary folder, then ``postgres``
on a free loopback port, stopped by its PID (SIGTERM, then SIGKILL).

``start_postgres()`` yields a :class:`PostgresServer`; the ``postgres_server`` fixture
shares one for the test session, and the ``pg_url`` fixture gives each test its own
empty schema on it (``?options=-csearch_path%3D<schema>`` in the URL: creating a
schema is instant, a database is not). The server asks for a password over TCP
(``scram-sha-256``): tests read it from the environment variable
:data:`PASSWORD_ENV`, which the fixture sets, as the engine does from
``[state] password_env``.

PostgreSQL refuses to run as root: when the tests run as root, the server runs as
the ``postgres`` OS user (which the Debian package creates), in a folder chowned to
it. Durability settings stay at their defaults (``fsync = on``,
``synchronous_commit = on``): the crash tests rely on them. Without the server
binaries the tests that need them are skipped, or failed when ``CI`` is set.

Import the fixtures where they are needed (``tests/`` is on ``sys.path``)::

    from pg_server import pg_url, postgres_server  # noqa: F401
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serverkit import free_port, stop_process, unavailable

__all__ = [
    "PASSWORD",
    "PASSWORD_ENV",
    "PostgresServer",
    "find_binaries",
    "pg_url",
    "postgres_server",
    "start_postgres",
]

POSTGRES_INSTALL = "apt-get update && apt-get install -y postgresql"
STARTUP_SECONDS = 30.0
#: The superuser's password; it contains characters that URL and conninfo syntax
#: would have to quote, so a leak through either shows up in the tests.
PASSWORD = "s3cr3t pa$$:w@rd/\\'\"&="
PASSWORD_ENV = "DM_ENGINE_TEST_PG_PASSWORD"
USER = "dm"
DATABASE = "dm_test"


def find_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``postgres`` (Debian's newest first), or None."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    return None


class PostgresServer:
    """A running server: ``url`` (no password in it), ``password``, ``schema_url()``."""

    def __init__(self, port: int, folder: Path, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.folder = folder
        self.process = process
        self.password = PASSWORD
        self.url = f"postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"
        self._schemas = itertools.count(1)

    def __repr__(self) -> str:
        return f"<PostgresServer {self.url} pid {self.process.pid}>"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            text = self.log.read_text(encoding="utf-8", errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return "(no log)"

    def connect(self, url: str | None = None, **kwargs: Any) -> Any:
        """An autocommit psycopg connection (for test setup and inspection)."""
        import psycopg

        return psycopg.connect(url or self.url, password=self.password, autocommit=True, **kwargs)

    def wait_for_backend(self, pid: int, condition: str) -> None:
        """Poll (real time, bounded) until backend ``pid`` matches ``condition`` in
        ``pg_stat_activity``; a connection of its own. Blocking: run it in a thread."""
        with self.connect() as admin:
            for _ in range(1000):
                sql = f"SELECT 1 FROM pg_stat_activity WHERE pid = %s AND {condition}"
                if admin.execute(sql, (pid,)).fetchone():
                    return
                time.sleep(0.01)
        pytest.fail(f"backend {pid} never matched {condition}")  # pragma: no cover

    def schema_url(self, name: str | None = None) -> str:
        """Create a fresh schema; return the URL whose ``search_path`` is that schema."""
        name = name or f"t{os.getpid()}_{next(self._schemas)}"
        with self.connect() as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        options = urllib.parse.quote(f"-csearch_path={name}")
        return f"{self.url}?options={options}"


def _as_postgres(root: bool) -> dict[str, Any]:
    """``Popen`` arguments that run a command as the ``postgres`` user when root."""
    if not root:
        return {}
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


@contextlib.contextmanager
def start_postgres() -> Iterator[PostgresServer]:
    """Run a throw-away PostgreSQL server on a free loopback port until the block ends."""
    binaries = find_binaries()
    if binaries is None:
        unavailable(
            "the PostgreSQL server (initdb, postgres) is not installed; install it: "
            f"{POSTGRES_INSTALL}"
        )
    assert binaries is not None
    try:
        import psycopg  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency of the project
        unavailable("psycopg is not installed: pip install -e '.[test]'")
    root = os.geteuid() == 0
    if root:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable(f"running as root needs the 'postgres' OS user; {POSTGRES_INSTALL}")
    # not under pytest's tmp_path: its root-only parent folders would stop the postgres user
    folder = Path(tempfile.mkdtemp(prefix="dm-engine-pg-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        if root:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        data = folder / "data"
        pwfile = folder / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if root:
            os.chown(pwfile, owner.pw_uid, owner.pw_gid)
        initdb = [str(binaries / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(pwfile)]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"]
        initdb += ["--locale=C", "--no-instructions"]
        done = subprocess.run(
            initdb, capture_output=True, text=True, check=False, cwd=folder, **_as_postgres(root)
        )
        pwfile.unlink()
        if done.returncode != 0:
            pytest.fail(f"initdb failed ({done.returncode}):\n{done.stderr}", pytrace=False)
        for attempt in range(3):  # another process may take the free port first
            port = free_port()
            command = [str(binaries / "postgres"), "-D", str(data), "-p", str(port)]
            command += ["-k", str(folder), "-c", "listen_addresses=127.0.0.1"]
            command += ["-c", "max_connections=200", "-c", "deadlock_timeout=200ms"]
            with (folder / "server.log").open("ab") as log:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=folder,
                    **_as_postgres(root),
                )
            server = PostgresServer(port, folder, process)
            if _wait_ready(server):
                with server.connect(server.url.rsplit("/", 1)[0] + "/postgres") as conn:
                    conn.execute(f"CREATE DATABASE {DATABASE}")
                yield server
                return
            stop_process(process, 10)
            if attempt == 2:
                pytest.fail(
                    f"postgres did not start; its log ends:\n{server.log_tail()}", pytrace=False
                )
    finally:
        if process is not None:
            stop_process(process, 10)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_ready(server: PostgresServer) -> bool:
    """Wait until the server accepts a connection; False if it exited first."""
    import psycopg

    deadline = time.monotonic() + STARTUP_SECONDS
    admin = server.url.rsplit("/", 1)[0] + "/postgres"
    while True:
        if server.process.poll() is not None:
            return False
        try:
            with server.connect(admin, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"postgres did not accept connections within {STARTUP_SECONDS:g} s; "
                    f"its log ends:\n{server.log_tail()}",
                    pytrace=False,
                )
            time.sleep(0.05)


# One server per test process: every module that binds ``postgres_server`` gets its own
# session-scoped fixture instance, and they all share this server; the last one
# torn down (at the end of the session) stops it.
_shared: list[Any] = []  # [server, ExitStack, users] while running


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The test session's PostgreSQL server (one per process)."""
    if not _shared:
        stack = contextlib.ExitStack()
        server = stack.enter_context(start_postgres())  # skips or fails without binaries
        _shared[:] = [server, stack, 0]
    _shared[2] += 1
    try:
        yield _shared[0]
    finally:
        _shared[2] -= 1
        if _shared[2] == 0:
            stack = _shared[1]
            _shared.clear()
            stack.close()


@pytest.fixture
def pg_url(postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A URL (without the password) of a fresh, empty schema; the password is in the
    environment variable ``PASSWORD_ENV`` while the test runs."""
    monkeypatch.setenv(PASSWORD_ENV, postgres_server.password)
    return postgres_server.schema_url()
