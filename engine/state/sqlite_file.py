"""The SQLite session store's file: its schema, opening and checking a file, and the
lock that keeps it to one engine process (the row operations are in ``rows``).

A file is ours when its ``application_id`` and ``user_version`` say so and
``PRAGMA quick_check`` passes; an empty file is initialised; anything else is
refused before a single byte is written. A store is then locked for one engine
process (``StoreLock``) and refused if the engine cannot write it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import final

from ..errors import SessionError

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "StoreLock", "connect"]

#: ``PRAGMA application_id`` of a session store ("dmS1"); other SQLite files are foreign.
APPLICATION_ID = 0x646D5331
#: ``PRAGMA user_version`` of the schema below; another version is refused, never migrated.
SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_TABLES = frozenset({"sessions", "transcript", "state"})
_SCHEMA = """
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    turn       INTEGER NOT NULL CHECK (turn >= 0),
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE TABLE transcript (
    session_id    TEXT NOT NULL REFERENCES sessions(session_id),
    turn          INTEGER NOT NULL CHECK (turn >= 1),
    action_text   TEXT NOT NULL,
    action_type   TEXT NOT NULL,
    narrative     TEXT NOT NULL,
    state_changes TEXT NOT NULL,
    responses     TEXT NOT NULL,
    created       REAL NOT NULL,
    PRIMARY KEY (session_id, turn)
);
CREATE TABLE state (
    session_id TEXT NOT NULL REFERENCES sessions(session_id),
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (session_id, key)
);
"""


# --------------------------------------------------------------------------- opening


def connect(path: Path, synchronous: str) -> tuple[sqlite3.Connection, StoreLock]:
    """Open and validate (or initialise) the file; refuse foreign files untouched.

    In order: the path must name a file in an existing folder; the file must be
    empty, missing, or our store (checked by reading only); then the store's lock is
    taken (``StoreLock``: one engine process per store) and a write is tried and
    rolled back, so a store the engine cannot write is refused here, not at the
    first ``record_action``. Returns the connection and the lock; the caller
    releases the lock after closing the connection.
    """
    where = str(path)
    _check_location(path)
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_MAGIC))
    except FileNotFoundError:
        header = b""
    except OSError as exc:
        raise SessionError(f"session store {where!r} cannot be read: {exc}") from exc
    if header and header != _SQLITE_MAGIC:
        raise SessionError(f"session store {where!r} is not an SQLite database; refusing to use it")
    try:
        conn = sqlite3.connect(where, isolation_level=None, check_same_thread=False, timeout=10.0)
    except sqlite3.Error as exc:
        raise _sqlite_error(path, exc, "cannot be opened") from exc
    lock: StoreLock | None = None
    try:
        # Only reads until the file is known to be ours (or empty): a foreign file is untouched.
        fresh = _inspect(conn, path)
        lock = StoreLock.acquire(path)
        _probe_write(conn)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SessionError(f"session store {where!r} cannot use WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = ON")
        if fresh:
            conn.execute("BEGIN IMMEDIATE")
            try:
                # another process may have initialised it meanwhile
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            _inspect(conn, path)
        return conn, lock
    except BaseException as exc:
        conn.close()
        if lock is not None:
            lock.release()
        if isinstance(exc, sqlite3.Error):
            raise _sqlite_error(path, exc, "is unusable") from exc
        raise


def _check_location(path: Path) -> None:
    """The path names a regular file (or nothing yet) in an existing folder."""
    where = str(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except NotADirectoryError:
        mode = None  # a parent is not a folder: said below
    except OSError as exc:
        raise SessionError(f"session store {where!r} cannot be reached: {exc}") from exc
    if mode is not None and stat.S_ISDIR(mode):
        raise SessionError(
            f"session store {where!r} is a folder, not a file; set the [state] path to a "
            f"file in it, such as {str(path / 'sessions.sqlite')!r}"
        )
    if mode is not None and not stat.S_ISREG(mode):
        raise SessionError(
            f"session store {where!r} is not a regular file; choose another [state] path"
        )
    folder = path.parent
    try:
        folder_mode = folder.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        folder_mode = None
    except OSError as exc:
        raise SessionError(
            f"session store {where!r}: its folder {str(folder)!r} cannot be reached: {exc}"
        ) from exc
    if folder_mode is None:
        raise SessionError(
            f"session store {where!r}: the folder {str(folder)!r} does not exist; "
            "create it or choose another [state] path"
        )
    if not stat.S_ISDIR(folder_mode):
        raise SessionError(
            f"session store {where!r}: {str(folder)!r} is not a folder; choose another [state] path"
        )


def _probe_write(conn: sqlite3.Connection) -> None:
    """Write one page in a transaction and roll it back: raises if SQLite cannot write.

    ``BEGIN IMMEDIATE`` alone succeeds on a read-only file in WAL mode; changing a
    page is what SQLite refuses (SQLITE_READONLY), or fails to journal
    (SQLITE_CANTOPEN). Nothing reaches the disk: the page is rolled back in memory.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute(f"PRAGMA user_version = {version}")
    finally:
        if conn.in_transaction:
            conn.rollback()


def _writable(path: Path) -> bool:
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.W_OK, effective_ids=effective)


def _unwritable(path: Path) -> list[str]:
    """What the kernel will not let this process write: the file, its folder, its
    ``-wal``/``-shm``/``-journal`` files (``os.access`` sees read-only mounts and
    immutable files also for root)."""
    found = []
    with contextlib.suppress(OSError):
        if path.exists() and not _writable(path):
            found.append("the file is read-only")
        folder = path.parent
        if folder.is_dir() and not _writable(folder):
            found.append(
                f"its folder {str(folder)!r} is read-only (the engine creates "
                f"{path.name}.lock, and SQLite {path.name}-wal and {path.name}-shm, in it)"
            )
        for suffix in ("-wal", "-shm", "-journal"):
            side = path.with_name(path.name + suffix)
            if side.exists() and not _writable(side):
                found.append(f"{str(side.name)!r} next to it is read-only")
    return found


def _error_kind(exc: sqlite3.Error) -> str:
    """``SQLITE_READONLY``/``SQLITE_CANTOPEN`` (primary code), else ``""``."""
    name = str(getattr(exc, "sqlite_errorname", ""))  # Python >= 3.11
    text = str(exc)
    if name.startswith("SQLITE_READONLY") or "readonly database" in text:
        return "SQLITE_READONLY"
    if name.startswith("SQLITE_CANTOPEN") or "unable to open database file" in text:
        return "SQLITE_CANTOPEN"
    return ""


def _not_writable(path: Path, detail: object) -> SessionError:
    """The store cannot be written: say what is read-only and what to change."""
    found = _unwritable(path)
    if not found:
        found = ["SQLite can only open it read-only"]
    return SessionError(
        f"session store {str(path)!r} cannot be written: {'; '.join(found)}; make "
        f"{'it' if len(found) == 1 else 'them'} writable or choose another [state] path "
        f"({detail})"
    )


def _sqlite_error(path: Path, exc: sqlite3.Error, what: str) -> SessionError:
    """A ``SessionError`` for an SQLite failure while opening; write access first."""
    kind = _error_kind(exc)
    if kind == "SQLITE_READONLY" or (kind == "SQLITE_CANTOPEN" and _unwritable(path)):
        return _not_writable(path, exc)
    return SessionError(f"session store {str(path)!r} {what}: {exc}")


# --------------------------------------------------------------------------- the lock

_held_lock = threading.Lock()
_held: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the lock files this process holds


@final
class StoreLock:
    """An exclusive ``flock`` on ``<store>.lock``, held while a store is open.

    Only one engine process may use a SQLite store at a time: a second one would
    work from stale cached turns. ``flock`` locks belong to an open file
    description, so a second open in the same process is refused as well; the
    kernel drops the lock when the holder closes it or dies (SIGKILL included), so
    a crashed engine never blocks the store. The lock file stays (empty but for the
    holder's pid): removing a lock file races with its next user. ``<store>``
    is the resolved path, so symbolic links to one store share its lock.
    """

    def __init__(self, path: Path, fd: int, key: tuple[int, int]) -> None:
        self.path = path
        self._fd: int | None = fd
        self._key = key

    @classmethod
    def acquire(cls, store: Path) -> StoreLock:
        where = str(store)
        path = store.resolve()
        path = path.with_name(path.name + ".lock")
        writable = True
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not path.exists():
                    raise
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # a read-only lock file locks too
                writable = False
        except OSError as exc:
            if _unwritable(store):
                raise _not_writable(store, exc) from exc
            raise SessionError(
                f"session store {where!r}: its lock file {str(path)!r} cannot be opened: {exc}"
            ) from exc
        try:
            info = os.fstat(fd)
            key = (info.st_dev, info.st_ino)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise cls._in_use(where, path, fd, key) from exc
            except OSError as exc:
                raise SessionError(
                    f"session store {where!r}: its lock file {str(path)!r} cannot be "
                    f"locked ({exc}); keep the store on a local filesystem"
                ) from exc
            with _held_lock:
                _held.add(key)
            if writable:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, key)

    @staticmethod
    def _in_use(where: str, path: Path, fd: int, key: tuple[int, int]) -> SessionError:
        with _held_lock:
            here = key in _held
        if here:
            return SessionError(
                f"session store {where!r} is already open in this process: only one "
                "engine (one SessionStore) may use a SQLite store at a time; "
                "close the other SessionStore first"
            )
        try:
            pid = int(os.pread(fd, 32, 0).decode().strip())
        except (OSError, ValueError):
            holder = "another engine process"
        else:
            holder = f"another engine process (pid {pid})"
        return SessionError(
            f"session store {where!r} is in use by {holder}, which holds "
            f"{str(path)!r}: only one engine process may use a SQLite store at a time; "
            "stop the other engine or choose another [state] path "
            "(several processes on one store will need the PostgreSQL backend)"
        )

    def release(self) -> None:
        """Drop the lock (idempotent); the lock file stays."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with _held_lock:
                _held.discard(self._key)
            os.close(fd)


def _inspect(conn: sqlite3.Connection, path: Path) -> bool:
    """Check the file is our store; True if it is an empty database to initialise."""
    where = str(path)
    try:
        tables = {
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not str(r[0]).startswith("sqlite_")
        }
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        check = None
        if not tables and app_id == 0 and version == 0:
            return True
        if app_id == APPLICATION_ID and version == SCHEMA_VERSION:
            check = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        if _error_kind(exc) == "SQLITE_CANTOPEN":
            # e.g. a WAL store in a read-only folder: SQLite cannot create ``-shm`` to read
            raise _sqlite_error(path, exc, "cannot be opened") from exc
        raise SessionError(f"session store {where!r} is corrupt or not a database: {exc}") from exc
    if app_id != APPLICATION_ID:
        raise SessionError(
            f"session store {where!r} is an SQLite file of another application "
            f"(application_id {app_id:#x}, tables {sorted(tables)}); refusing to use it"
        )
    if version != SCHEMA_VERSION:
        raise SessionError(
            f"session store {where!r} has schema version {version}; "
            f"this engine reads version {SCHEMA_VERSION} only"
        )
    if missing := _TABLES - tables:
        raise SessionError(f"session store {where!r} lacks tables {sorted(missing)}")
    if check != ["ok"]:
        detail = "; ".join((check or [])[:3])
        raise SessionError(f"session store {where!r} is corrupt: {detail}")
    return False
