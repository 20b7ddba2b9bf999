"""Run Python code in a child process and SIGKILL it after it printed some lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import engine


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    """``python -c code args...`` with this checkout's ``engine`` importable."""
    root = str(Path(engine.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def kill_after(
    proc: subprocess.Popen[str], n_lines: int, delay: float, watchdog: float = 30.0
) -> list[str]:
    """Read ``n_lines`` lines, wait ``delay``, SIGKILL; return every line printed.

    A child that hangs is killed by a watchdog, so it fails the test instead of CI.
    """
    assert proc.stdout is not None
    timer = threading.Timer(watchdog, proc.kill)
    timer.start()
    try:
        lines = [proc.stdout.readline() for _ in range(n_lines)]
        assert all(lines), f"child exited early: {proc.communicate()[1]}"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=10)
    finally:
        timer.cancel()
    assert proc.returncode == -signal.SIGKILL, err
    return lines + rest.splitlines()


def kill_all_after(
    plans: Sequence[tuple[subprocess.Popen[str], int, float]], watchdog: float = 30.0
) -> list[list[str]]:
    """``kill_after`` for several children running at once, each in its own thread
    (so one child's lines never wait for another's); each child's lines, in order."""
    results: list[list[str] | BaseException] = [[] for _ in plans]

    def run(index: int, proc: subprocess.Popen[str], n_lines: int, delay: float) -> None:
        try:
            results[index] = kill_after(proc, n_lines, delay, watchdog)
        except BaseException as exc:  # re-raised below, in the caller
            results[index] = exc

    threads = [
        threading.Thread(target=run, args=(i, *plan), daemon=True) for i, plan in enumerate(plans)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        lines.append(result)
    return lines


def done_lines(lines: list[str]) -> list[tuple[str, int]]:
    """The ``done <session> <turn>`` lines a child printed, parsed."""
    done = []
    for line in lines:
        if line.startswith("done "):
            _, sid, turn = line.split()
            done.append((sid, int(turn)))
    return done
