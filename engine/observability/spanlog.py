"""A JSON-lines span log: one line per finished root span, with its whole tree.

Each line is ``{"name", "attributes", "offset", "duration", "status", "children",
"start", "logged_at"}``: ``offset`` is seconds from the root's start (0 for the
root), ``start`` the root's clock reading and ``logged_at`` the Unix time it was
queued. ``duration`` is null for a child still running when its root ended.

Writing never blocks the event loop: :meth:`SpanLog.submit` (a profiler listener)
snapshots the tree and queues it; a writer task owned by ``async with SpanLog(...)``
writes batches from a worker thread (``anyio.to_thread``) and rotates the file by
size (``path`` -> ``path.1`` -> ... -> ``path.<backups>``). When the queue is full a
tree is dropped and counted, never waited for.

Crash safety: a line is written whole and ends with a newline, so a crash can only
tear the last line. :func:`read_span_log` skips a torn or malformed line and keeps
every complete one; reopening a torn log first cuts the torn fragment off, so new
lines are never glued to it and a record that was not readable never becomes so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, final

import anyio
import anyio.abc
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .profiler import PerformanceProfiler, Span

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["SpanLog", "SpanLogStatistics", "read_span_log", "span_record"]

log = logging.getLogger(__name__)


def span_record(span: Span, logged_at: float | None = None) -> dict[str, Any]:
    """The JSON-ready line for a root span (see the module docstring)."""
    record = span.to_dict()
    record["start"] = span.start
    record["logged_at"] = time.time() if logged_at is None else logged_at
    return record


def read_span_log(path: str | os.PathLike[str], *, include_backups: bool = False) -> list[Any]:
    """Every complete, well-formed record of the log, oldest first.

    A torn last line (no final newline) and malformed lines are skipped. ``include_backups`` also reads the rotated files
    ``path.N .. path.1`` before ``path``. A missing file reads as empty.
    """
    base = Path(path)
    files = [base]
    if include_backups:
        backups = []
        n = 1
        while (candidate := base.with_name(f"{base.name}.{n}")).exists():
            backups.append(candidate)
            n += 1
        files = [*reversed(backups), base]
    records: list[Any] = []
    for file in files:
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            continue
        lines = data.split(b"\n")
        for line in lines[:-1]:  # lines[-1] is b"" or a torn tail
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


@final
@attrs.frozen
class SpanLogStatistics:
    queued: int  # trees accepted by submit()
    written: int  # lines written to disk
    dropped: int  # trees refused because the queue was full or the log closed
    lost: int  # trees queued but not written (a write error, or cancelled while closing)
    rotations: int
    pending: int  # trees queued, not yet written


@final
@attrs.define(eq=False, repr=False)
class SpanLog:
    """Writes root span trees as JSON lines from a background writer task.

    Use as ``async with SpanLog(path, profiler=prof):`` — while open it listens to
    ``profiler``'s finished root spans (or call :meth:`submit` yourself). Leaving the
    block writes every queued tree and closes the file; if the block is cancelled,
    queued trees may be lost but every written line is whole.

    Args:
        path: the log file (its directory must exist).
        max_bytes: rotate before a line would make the file larger than this.
        backups: rotated files kept (0: the log is truncated on rotation).
        profiler: subscribe to its finished root spans while open.
        max_pending: trees queued at most; more are dropped and counted.
    """

    path: Path = attrs.field(converter=Path)
    max_bytes: int = 10_000_000
    backups: int = 3
    profiler: PerformanceProfiler | None = None
    max_pending: int = 10_000

    _send: MemoryObjectSendStream[dict[str, Any]] | None = attrs.field(default=None, init=False)
    _tg: anyio.abc.TaskGroup | None = attrs.field(default=None, init=False)
    _unsubscribe: Callable[[], None] | None = attrs.field(default=None, init=False)
    _fh: BinaryIO | None = attrs.field(default=None, init=False)
    _size: int = attrs.field(default=0, init=False)
    _queued: int = attrs.field(default=0, init=False)
    _written: int = attrs.field(default=0, init=False)
    _dropped: int = attrs.field(default=0, init=False)
    _rotations: int = attrs.field(default=0, init=False)
    _lost: int = attrs.field(default=0, init=False)  # queued, then not written (error, cancel)

    def __attrs_post_init__(self) -> None:
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {self.max_bytes!r}")
        if self.backups < 0:
            raise ValueError(f"backups must be >= 0, got {self.backups!r}")

    def __repr__(self) -> str:
        return f"SpanLog({str(self.path)!r}, open={self._send is not None})"

    @classmethod
    def from_config(
        cls, config: Config, profiler: PerformanceProfiler | None = None
    ) -> SpanLog | None:
        """The log configured by ``[performance.monitoring]``; None when its path is ""."""
        mon = config.performance.monitoring
        if not mon.span_log_path:
            return None
        return cls(mon.span_log_path, mon.span_log_max_bytes, mon.span_log_backups, profiler)

    def statistics(self) -> SpanLogStatistics:
        pending = self._queued - self._written - self._lost
        return SpanLogStatistics(
            self._queued, self._written, self._dropped, self._lost, self._rotations, pending
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SpanLog:
        if self._send is not None:
            raise RuntimeError("this SpanLog is already open")
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](self.max_pending)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._send, self._tg = send, tg
        tg.start_soon(self._writer, receive)
        if self.profiler is not None:
            self._unsubscribe = self.profiler.add_listener(self.submit)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        assert self._send is not None and self._tg is not None
        self._send.close()  # the writer drains what is queued, then ends
        tg, self._send, self._tg = self._tg, None, None
        try:
            return await tg.__aexit__(exc_type, exc, tb)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._close_file)

    def submit(self, span: Span) -> bool:
        """Queue a finished root span's tree; False (and counted) if dropped. Never blocks."""
        send = self._send
        if send is None:
            self._dropped += 1
            return False
        try:
            send.send_nowait(span_record(span))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._dropped += 1
            return False
        self._queued += 1
        return True

    async def _writer(self, receive: MemoryObjectReceiveStream[dict[str, Any]]) -> None:
        async with receive:
            async for first in receive:
                batch = [first]
                try:
                    while len(batch) < 1000:
                        batch.append(receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    pass
                try:
                    await anyio.to_thread.run_sync(self._write, batch)
                except OSError:
                    # a full disk must not take the game down: count, log, go on
                    self._lost += len(batch)
                    log.exception("span log %s: write failed", self.path)
                except BaseException:
                    self._lost += len(batch)
                    raise

    # ------------------------------------------------------------------ file (worker thread)

    def _open(self) -> BinaryIO:
        fh = open(self.path, "ab")  # noqa: SIM115 - kept open across batches
        self._size = fh.seek(0, os.SEEK_END)
        if self._size:
            with open(self.path, "rb+") as check:
                check.seek(-1, os.SEEK_END)
                if check.read(1) != b"\n":
                    # a torn last line from a crash: it was never complete, so drop it
                    # (terminating it could turn a cut that fell just before the
                    # newline into a record that was not there before)
                    check.truncate(_end_of_last_line(check, self._size))
                    self._size = fh.seek(0, os.SEEK_END)
        return fh

    def _write(self, batch: list[dict[str, Any]]) -> None:
        fh = self._fh if self._fh is not None else self._open()
        self._fh = fh
        chunk: list[bytes] = []
        for record in batch:
            line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
            if self._size and self._size + len(line) > self.max_bytes:
                fh.write(b"".join(chunk))
                chunk.clear()
                fh = self._rotate(fh)
            chunk.append(line)
            self._size += len(line)
        fh.write(b"".join(chunk))
        fh.flush()
        self._written += len(batch)

    def _rotate(self, fh: BinaryIO) -> BinaryIO:
        fh.close()
        if self.backups == 0:
            self.path.unlink()
        else:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._rotations += 1
        self._fh = self._open()
        return self._fh

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _end_of_last_line(fh: BinaryIO, size: int, block: int = 1 << 16) -> int:
    """The offset just past the last newline of ``fh`` (0 when there is none)."""
    end = size
    while end > 0:
        start = max(0, end - block)
        fh.seek(start)
        at = fh.read(end - start).rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0
