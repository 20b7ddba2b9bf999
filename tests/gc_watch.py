"""What only the cyclic collector frees: the check that the engine makes no cycles."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def engine_cyclic_garbage() -> Iterator[list[object]]:
    """Collect, then run the block with the collector off; on a normal exit the list
    holds the engine's objects (types of ``engine.*`` modules) that the block left for
    the cyclic collector, i.e. that reference counting alone did not free."""
    found: list[object] = []
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(o for o in gc.garbage if type(o).__module__.startswith("engine."))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
