"""When an HTTP agent retries, and how long it waits: jittered exponential backoff
that honours ``Retry-After``. The agent stops before the caller's deadline."""

from __future__ import annotations

import random
import re
from typing import Any

import attrs

__all__ = ["RetryPolicy", "parse_retry_after", "retryable"]

_RETRY_AFTER_SECONDS = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


def _at_least(minimum: float) -> Any:
    def check(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
        if value < minimum:
            raise ValueError(f"{attr.name} must be >= {minimum}, got {value!r}")

    return check


@attrs.frozen
class RetryPolicy:
    """When and how long to wait before retrying a failed request.

    The wait before retry ``n`` (1-based) is drawn uniformly from ``[d/2, d]`` with
    ``d = min(max_backoff, initial_backoff * multiplier ** (n - 1))`` ("equal jitter");
    a ``Retry-After`` header raises it to at least the server's figure. A server asking
    for more than ``max_retry_after`` seconds is not retried.
    """

    max_attempts: int = attrs.field(default=4, validator=_at_least(1))
    initial_backoff: float = attrs.field(default=0.25, validator=_at_least(0.0))
    max_backoff: float = attrs.field(default=4.0, validator=_at_least(0.0))
    multiplier: float = attrs.field(default=2.0, validator=_at_least(1.0))
    max_retry_after: float = attrs.field(default=60.0, validator=_at_least(0.0))

    def wait(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        d = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        backoff = d / 2 + rng.uniform(0.0, d / 2)
        return backoff if retry_after is None else max(retry_after, backoff)


def parse_retry_after(value: str | None) -> float | None:
    """The seconds form of ``Retry-After``; None when absent or an HTTP date (not used)."""
    if value is None:
        return None
    match = _RETRY_AFTER_SECONDS.fullmatch(value)
    return float(match.group(1)) if match else None


def retryable(status: int) -> bool:
    """Statuses worth retrying: request timeout, too many requests, server errors."""
    return status in (408, 429) or 500 <= status <= 599
