"""Real servers for tests, started as subprocesses on free loopback ports.

``start_redis(tmp_path)`` runs a throw-away ``redis-server`` (no persistence, its files
under ``tmp_path``) and yields its URL; the ``redis_url`` fixture shares one for the
whole session. Each server is stopped by its PID (SIGTERM, then SIGKILL). Without
``redis-server`` the tests that need it are skipped, or failed when ``CI`` is set.

Import the fixture where it is needed (``tests/`` is on ``sys.path``, as for
``crashkit``)::

    from servers import redis_url  # noqa: F401
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverkit import free_port, stop_process, unavailable

__all__ = ["RedisServer", "redis_url", "start_redis"]

REDIS_INSTALL = "apt-get update && apt-get install -y redis-server"
STARTUP_SECONDS = 10.0


def _pong(port: int) -> bool:
    """Whether a Redis server on ``port`` answers ``PING`` (inline command)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer(str):
    """The server's URL (``redis://127.0.0.1:<port>/0``); ``stop()`` ends it early."""

    port: int
    log: Path
    process: subprocess.Popen[bytes]

    def __new__(cls, port: int, log: Path, process: subprocess.Popen[bytes]) -> RedisServer:
        self = super().__new__(cls, f"redis://127.0.0.1:{port}/0")
        self.port = port
        self.log = log
        self.process = process
        return self

    def stop(self) -> None:
        """Stop the server now (e.g. to test what happens when Redis goes away)."""
        stop_process(self.process)

    def log_tail(self, lines: int = 20) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def start_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """Run ``redis-server`` on a free loopback port until the block ends.

    No persistence (``--save ''``, ``--appendonly no``); its working directory and log
    are ``tmp_path``. Yields once the server answers ``PING``.
    """
    executable = shutil.which("redis-server")
    if executable is None:
        unavailable(f"redis-server is not installed; install it: {REDIS_INSTALL}")
    assert executable is not None
    tmp_path.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):  # another process may take the free port before Redis binds it
        port = free_port()
        log = tmp_path / f"redis-{port}.log"
        command = [executable, "--port", str(port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
        command += ["--logfile", str(log), "--daemonize", "no"]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        server = RedisServer(port, log, process)
        try:
            deadline = time.monotonic() + STARTUP_SECONDS
            while not _pong(port):
                if process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"redis-server did not answer PING within {STARTUP_SECONDS:g} s; "
                        f"its log ends:\n{server.log_tail()}",
                        pytrace=False,
                    )
                time.sleep(0.02)
            else:
                yield server
                return
            if attempt == 2:
                pytest.fail(
                    f"redis-server exited with {process.returncode}; its log ends:\n"
                    f"{server.log_tail() if log.exists() else '(no log)'}",
                    pytrace=False,
                )
        finally:
            stop_process(process)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ``redis-server`` for the test session; yields ``redis://127.0.0.1:<port>/0``.

    Tests share it: give every test its own key names (e.g. a random limiter name).
    """
    with start_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url
