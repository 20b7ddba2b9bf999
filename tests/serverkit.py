"""What the tests that start a real server share: a free loopback port, stopping a
server by its PID, and skipping (failing in CI) when the server is not installed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest

__all__ = ["free_port", "stop_process", "unavailable"]


def unavailable(message: str) -> None:
    """Skip the test, or fail it when the ``CI`` environment variable is set: in CI a
    missing server is a missing install step, not a reason to test less."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM by PID, then SIGKILL if it has not exited after ``grace`` seconds."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
