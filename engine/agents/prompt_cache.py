"""What a server's prompt cache holds, modelled: the part of a prompt it need not prefill.

Prompt caches (hosted APIs, vLLM, llama.cpp) reuse the longest prefix a new prompt
shares with one they read recently. :class:`PromptCacheModel` keeps the prompts a
server was sent and answers how many tokens of the next one it has cached. Simulated
agents price their prefill with it; HTTP agents on a server that reports no cached
tokens (llama-cpp-python) estimate them with it, with the rules of that server (one
prompt kept, every token reusable).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, final

import attrs

from .prompts import estimate_tokens

if TYPE_CHECKING:
    from ..config import LatencyModel

__all__ = ["PromptCacheModel"]


@final
@attrs.define(eq=False)
class PromptCacheModel:
    """A server's prefix cache, modelled: which part of a prompt it has cached.

    Per cache key (a session), the last ``per_key`` prompts sent within ``ttl``
    seconds; a new prompt's cached part is its longest common prefix with one of them,
    in whole ``step`` tokens, and only when that prefix reaches ``min_tokens`` (the
    documented rules of hosted prompt caches). Keys are dropped least recently used
    past ``max_keys``.
    """

    min_tokens: int = 1024
    step: int = 128
    ttl: float = 300.0
    per_key: int = 8
    max_keys: int = 10_000
    _recent: OrderedDict[str, deque[tuple[float, str]]] = attrs.field(
        factory=OrderedDict, init=False
    )

    @classmethod
    def one_slot(cls) -> PromptCacheModel:
        """llama.cpp's Python server: the one prompt it read last, every token of the
        shared prefix reused, for as long as no other prompt replaces it."""
        return cls(min_tokens=1, step=1, ttl=float("inf"), per_key=1)

    @classmethod
    def from_model(cls, model: LatencyModel) -> PromptCacheModel:
        return cls(
            model.prompt_cache_min_tokens,
            model.prompt_cache_step_tokens,
            model.prompt_cache_ttl_seconds,
        )

    def lookup(self, key: str, prompt: str, now: float) -> int:
        """Cached tokens of ``prompt``: its prefix shared with a prompt of ``key`` whose
        prefill had finished by ``now`` (a server caches a prompt once it has read it)."""
        recent = self._recent.get(key)
        if recent is None:
            return 0
        self._recent.move_to_end(key)
        while recent and now - recent[0][0] > self.ttl:
            recent.popleft()
        best = max(
            (
                _common_prefix(prompt, old)
                for ready, old in recent
                if ready <= now and now - ready <= self.ttl  # read, and not expired
            ),
            default=0,
        )
        tokens = estimate_tokens(prompt[:best])
        tokens -= tokens % self.step
        return tokens if tokens >= max(self.min_tokens, 1) else 0

    def store(self, key: str, prompt: str, ready_at: float) -> None:
        """``prompt`` is in the cache from ``ready_at`` on (when its prefill ends)."""
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent[key] = deque(maxlen=self.per_key)
            while len(self._recent) > self.max_keys:
                self._recent.popitem(last=False)
        recent.append((ready_at, prompt))


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix: a binary search on C-speed compares that
    only compares (and copies) the part still undecided, ``a[lo:mid]`` against
    ``b[lo:mid]`` (``a[:lo] == b[:lo]`` is known), so O(n) characters in all instead
    of O(n log n) for whole-prefix slices."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a.startswith(b[lo:mid], lo):
            lo = mid
        else:
            hi = mid - 1
    return lo
