"""PromptCacheModel's common-prefix search agrees with a character-by-character scan."""

from __future__ import annotations

import random

from engine.agents.prompt_cache import _common_prefix


def _naive(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_common_prefix_matches_a_scan() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        a = "".join(rng.choice("ab—") for _ in range(rng.randint(0, 40)))
        b = a[: rng.randint(0, len(a))] + "".join(
            rng.choice("ab—") for _ in range(rng.randint(0, 8))
        )
        assert _common_prefix(a, b) == _naive(a, b)
        assert _common_prefix(b, a) == _naive(a, b)
    long = "system " * 1000
    assert _common_prefix(long + "x", long + "y") == len(long)
    assert _common_prefix(long, long) == len(long)
    assert _common_prefix("", long) == 0
