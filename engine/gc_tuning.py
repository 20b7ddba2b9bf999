"""The cyclic garbage collector's young threshold, raised while an engine is open.

CPython starts a young collection once 700 more container objects were allocated
than freed, and every 10th young collection also collects the middle generation
and, now and then, the whole heap. Under load an engine allocates fast enough for
about 18 young collections a second, each a pause of the whole event loop (the
middle ones 2 ms, the whole-heap ones about 100 ms: docs/performance-tuning.md).
Most of those objects die young of their reference counts, so a higher threshold
makes every generation's collections far rarer. The engine makes no cyclic garbage
(``test_an_action_leaves_no_cyclic_garbage``), so only cycles made by other code
in the process wait longer to be freed.

Guarantees:

* :func:`young_threshold` sets the first threshold while at least one holder is
  open (the highest value any open holder asked for) and puts back the thresholds
  it found when the last holder leaves. Holders may nest and overlap, on any
  thread. The other two thresholds are left as they are.
* A threshold of 0 changes nothing (``gc.set_threshold(0)`` would disable the
  collector, which this never does).
* Thresholds another library set while a holder was open are overwritten when the
  last holder leaves: the collector's settings are one per process.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections import Counter
from collections.abc import Iterator

__all__ = ["young_threshold"]

_lock = threading.Lock()
_asked: Counter[int] = Counter()  # threshold -> open holders that asked for it
_found: tuple[int, int, int] | None = None  # the thresholds before the first holder


@contextlib.contextmanager
def young_threshold(threshold: int) -> Iterator[None]:
    """Young collections every ``threshold`` net allocations while this is open (0:
    leave the collector alone)."""
    if threshold <= 0:
        yield
        return
    _enter(threshold)
    try:
        yield
    finally:
        _leave(threshold)


def _enter(threshold: int) -> None:
    global _found
    with _lock:
        if not _asked:
            _found = gc.get_threshold()
        _asked[threshold] += 1
        _apply()


def _leave(threshold: int) -> None:
    global _found
    with _lock:
        _asked[threshold] -= 1
        if not _asked[threshold]:
            del _asked[threshold]
        if _asked:
            _apply()
        elif _found is not None:
            gc.set_threshold(*_found)
            _found = None


def _apply() -> None:
    assert _found is not None
    gc.set_threshold(max(_asked), *gc.get_threshold()[1:])
