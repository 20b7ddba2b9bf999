"""The session store refuses, at open, stores it could not use safely.

* a store the engine cannot write (read-only file or folder, a folder as the path,
  a missing folder): refused with what is wrong and what to change, instead of
  failing every action's write after its agent calls were spent;
* a store another engine (another process, or another ``SessionStore`` in this
  process) has open: a second engine would fail actions on stale cached turns.

Read-only here means read-only for this process *including root*, for whom
permission bits do not stop writes: ``_read_only`` uses the permission bits when
they bind, else the immutable attribute (``chattr +i``, also binding root), and
skips when neither is available. ``mode=ro`` injected into SQLite's open covers
the same path on any machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import textwrap
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import crashkit
import pytest

from engine.config import StateConfig
from engine.errors import SessionError
from engine.state import SessionStore


def _action(text: str = "I search the altar") -> dict[str, Any]:
    return {
        "action_text": text,
        "action_type": "exploration",
        "narrative": f"You {text.lower()}.",
        "state_changes": {"searched": True},
        "responses": {},
    }


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _make_store(path: Path, session: str = "s", actions: int = 1) -> None:
    async with SessionStore.open(path) as store:
        await store.ensure_session(session)
        for i in range(actions):
            await store.record_action(session, **_action(f"act {i}"))


async def _check_store(path: Path, session: str = "s", turns: int = 1) -> None:
    """The store opens, holds ``turns`` actions of ``session`` and takes one more."""
    async with SessionStore.open(path) as store:
        assert (await store.get_session(session)).turn == turns
        assert await store.record_action(session, **_action()) == turns + 1


# ------------------------------------------------------------------ read-only for real


def _write_blocked(path: Path) -> bool:
    """Whether this process really cannot write ``path`` (a file, or a folder's entries)."""
    try:
        if path.is_dir():
            probe = path / ".write-probe"
            probe.touch()
            probe.unlink()
        else:
            with path.open("ab"):
                pass
    except OSError:
        return True
    return False


def _chattr(flag: str, path: Path) -> bool:
    try:
        done = subprocess.run(["chattr", flag, str(path)], capture_output=True, check=False)
    except OSError:
        return False
    return done.returncode == 0


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[str]:
    """Make ``path`` read-only for this process, root included; yield how."""
    mode = path.stat().st_mode
    os.chmod(path, mode & ~0o222)
    try:
        if _write_blocked(path):
            yield "permission bits"
            return
    finally:
        os.chmod(path, mode)
    if not _chattr("+i", path):
        pytest.skip("permission bits do not bind (root) and chattr +i is unavailable here")
    try:
        if not _write_blocked(path):  # pragma: no cover - a filesystem ignoring the flag
            pytest.skip("the immutable attribute does not stop writes here")
        yield "immutable attribute"
    finally:
        assert _chattr("-i", path), f"could not clear the immutable attribute of {path}"


@pytest.mark.anyio
async def test_SessionStore_refuses_a_read_only_file(tmp_path: Path) -> None:
    db = tmp_path / "sessions.sqlite"
    await _make_store(db)
    with _read_only(db), pytest.raises(SessionError) as info:
        async with SessionStore.open(db):
            pass  # pragma: no cover
    message = str(info.value)
    assert repr(str(db)) in message
    assert "cannot be written: the file is read-only" in message
    assert "make it writable or choose another [state] path" in message
    await _check_store(db)  # untouched, and the refusal left no lock behind


@pytest.mark.anyio
@pytest.mark.parametrize("existing", [True, False], ids=["existing-store", "new-store"])
async def test_SessionStore_refuses_a_read_only_folder(tmp_path: Path, existing: bool) -> None:
    folder = tmp_path / "saves"
    folder.mkdir()
    db = folder / "sessions.sqlite"
    if existing:
        await _make_store(db)  # closed cleanly: no -wal/-shm, so reading needs new files
    with _read_only(folder), pytest.raises(SessionError) as info:
        async with SessionStore.open(db):
            pass  # pragma: no cover
    message = str(info.value)
    assert "corrupt" not in message
    assert f"cannot be written: its folder {str(folder)!r} is read-only" in message
    assert "sessions.sqlite-wal" in message and "choose another [state] path" in message
    if existing:
        await _check_store(db)
    else:
        assert _names(folder) == []


@pytest.mark.anyio
async def test_SessionStore_refuses_a_store_SQLite_opens_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite opens a file it may not write read-only, without an error: reads work,
    the first write fails. Simulated on any machine with ``mode=ro``."""
    db = tmp_path / "sessions.sqlite"
    await _make_store(db)
    real_connect = sqlite3.connect

    def read_only_connect(database: str, **kwargs: Any) -> sqlite3.Connection:
        return real_connect(f"file:{urllib.parse.quote(database)}?mode=ro", uri=True, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_connect)
    with pytest.raises(SessionError, match=r"cannot be written: SQLite can only open it read-only"):
        async with SessionStore.open(db):
            pass  # pragma: no cover
    monkeypatch.undo()
    # the refusal happened after the lock was taken: it was released
    await _check_store(db)


@pytest.mark.anyio
async def test_SessionStore_refuses_a_missing_folder(tmp_path: Path) -> None:
    db = tmp_path / "no" / "such" / "sessions.sqlite"
    message = f"the folder {str(db.parent)!r} does not exist; create it or choose another"
    with pytest.raises(SessionError, match=message):
        async with SessionStore.open(db):
            pass  # pragma: no cover
    with pytest.raises(SessionError, match=message):
        async with SessionStore.from_config(StateConfig(path=str(db))):
            pass  # pragma: no cover
    assert _names(tmp_path) == []  # not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(SessionError, match=r"'.*file' is not a folder"):
        async with SessionStore.open(tmp_path / "file" / "sessions.sqlite"):
            pass  # pragma: no cover


@pytest.mark.anyio
async def test_SessionStore_refuses_a_folder_as_the_path(tmp_path: Path) -> None:
    with pytest.raises(SessionError) as info:
        async with SessionStore.from_config(StateConfig(path=str(tmp_path))):
            pass  # pragma: no cover
    assert f"{str(tmp_path)!r} is a folder, not a file" in str(info.value)
    assert str(tmp_path / "sessions.sqlite") in str(info.value)
    assert _names(tmp_path) == []


# ------------------------------------------------------------------ one engine per store

# Opens the store; prints "open" (then, with "hold", waits to be killed) or "refused: …".
CHILD = textwrap.dedent(
    """
    import sys, anyio
    from engine.errors import SessionError
    from engine.state import SessionStore

    async def main(path, hold):
        try:
            async with SessionStore.open(path) as store:
                await store.ensure_session("child")
                print("open", flush=True)
                if hold == "hold":
                    await anyio.sleep_forever()
        except SessionError as exc:
            print(f"refused: {exc}", flush=True)

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
)


def _child_opens(path: Path) -> str:
    """Run a child process that opens the store once; return what it printed."""
    proc = crashkit.spawn(CHILD, str(path), "once")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def test_SessionStore_refuses_a_second_process(tmp_path: Path) -> None:
    db = tmp_path / "sessions.sqlite"

    async def main() -> str:
        async with SessionStore.open(db) as store:
            await store.ensure_session("s")
            said = await anyio.to_thread.run_sync(_child_opens, db)
            await store.record_action("s", **_action())  # unaffected by the refusal
            return said

    said = anyio.run(main)
    assert said.startswith("refused: "), said
    assert f"session store {str(db)!r} is in use by another engine process" in said
    assert f"(pid {os.getpid()})" in said
    assert "only one engine process may use a SQLite store at a time" in said
    assert _child_opens(db) == "open"  # closed: the lock went with it
    anyio.run(_check_store, db, "s", 1)


def test_SessionStore_lock_of_a_killed_process_is_released(tmp_path: Path) -> None:
    db = tmp_path / "sessions.sqlite"
    proc = crashkit.spawn(CHILD, str(db), "hold")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "open"
        with pytest.raises(
            SessionError, match=rf"in use by another engine process \(pid {proc.pid}\)"
        ):
            anyio.run(_make_store, db)
        lines = crashkit.kill_after(proc, 0, 0.0)  # SIGKILL: no cleanup in the child
    finally:
        if proc.poll() is None:  # pragma: no cover - the test failed above
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    assert lines == []
    assert (tmp_path / "sessions.sqlite.lock").exists()  # stays; the kernel dropped the lock
    anyio.run(_check_store, db, "child", 0)


@pytest.mark.anyio
async def test_SessionStore_refuses_a_second_open_in_the_same_process(tmp_path: Path) -> None:
    db = tmp_path / "sessions.sqlite"
    async with SessionStore.open(db) as store:
        await store.ensure_session("s")
        with pytest.raises(SessionError) as info:
            async with SessionStore.open(db):
                pass  # pragma: no cover
        message = str(info.value)
        assert f"session store {str(db)!r} is already open in this process" in message
        assert "close the other SessionStore first" in message
        # through a symbolic link too: the lock belongs to the resolved path
        link = tmp_path / "link.sqlite"
        link.symlink_to(db)
        with pytest.raises(SessionError, match="already open in this process"):
            async with SessionStore.open(link):
                pass  # pragma: no cover
        assert await store.record_action("s", **_action()) == 1  # the first one is unaffected
    await _check_store(db)  # closed: open again
