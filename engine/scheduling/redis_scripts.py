"""The Redis side of the global limiter: its Lua scripts, and a coredis workaround.

Every script runs atomically in Redis and reads time from Redis's own ``TIME``, so
all processes share one clock. :mod:`engine.scheduling.global_limits` says what the
scripts guarantee together.
"""

from __future__ import annotations

from typing import Any

import anyio
import coredis
import coredis.exceptions
from coredis.connection import TCPConnection, UnixDomainSocketConnection

__all__ = [
    "ADMIT",
    "ADMIT_SPARES",
    "COUNT",
    "REDIS_ERRORS",
    "RELEASE",
    "RENEW",
    "close_buffers_on_failed_connect",
]

# Redis < 5 needs effects replication for TIME before a write; a no-op later on.
PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function keep_key(key, ttl_us)
  local ttl_ms = math.ceil(ttl_us / 1000) + 1000
  if redis.call('PTTL', key) < ttl_ms then redis.call('PEXPIRE', key, ttl_ms) end
end
-- drop expired leases (how many: returned) and the queued heads whose tickets expired
local function reclaim(slots_key, queue_key, tickets_key)
  local reclaimed = redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now)
  local gone = redis.call('ZRANGEBYSCORE', tickets_key, '-inf', now)
  for i = 1, #gone do redis.call('ZREM', queue_key, gone[i]) end
  redis.call('ZREMRANGEBYSCORE', tickets_key, '-inf', now)
  return reclaimed
end
"""

#: KEYS: slots zset, queue zset, tickets zset, requests key, tokens key.
#: ARGV: lease id, slots (0: none), lease µs, ticket µs, queue (1: a waiting process's
#: head, which keeps its place in the queue of heads; 0: a newcomer, admitted only if
#: every queued head could have a slot too, and not queued when refused), then per
#: rate (requests, tokens): interval µs per unit (0: none), burst units, cost units.
#: Returns {admitted, rate wait µs, reclaimed, held, now µs, slots full}.
ADMIT = (
    PRELUDE
    + """
local lease = ARGV[1]
local slots = tonumber(ARGV[2])
local lease_us = tonumber(ARGV[3])
local ticket_us = tonumber(ARGV[4])
local queue = tonumber(ARGV[5]) == 1
local reclaimed, held, ahead = 0, 0, 0
if slots > 0 then
  if redis.call('ZSCORE', KEYS[1], lease) then
    -- a retried call whose first attempt got through: admitted already
    redis.call('ZADD', KEYS[1], now + lease_us, lease)
    return {1, 0, 0, redis.call('ZCARD', KEYS[1]), now, 0}
  end
  reclaimed = reclaim(KEYS[1], KEYS[2], KEYS[3])
  held = redis.call('ZCARD', KEYS[1])
  if queue then
    redis.call('ZADD', KEYS[2], 'NX', now, lease)
    redis.call('ZADD', KEYS[3], now + ticket_us, lease)
    keep_key(KEYS[2], ticket_us)
    keep_key(KEYS[3], ticket_us)
    ahead = redis.call('ZRANK', KEYS[2], lease)
  else
    ahead = redis.call('ZCARD', KEYS[2])
  end
end
local wait = 0
local tats = {}
for i = 1, 2 do
  local interval = tonumber(ARGV[3 + 3 * i])
  local burst = tonumber(ARGV[4 + 3 * i])
  local cost = tonumber(ARGV[5 + 3 * i])
  if interval > 0 and cost > 0 then
    local tat = tonumber(redis.call('GET', KEYS[3 + i]) or 0)
    if tat < now then tat = now end
    local allow_at = tat - (burst - math.min(cost, burst)) * interval
    if allow_at > now then wait = math.max(wait, allow_at - now) end
    tats[i] = tat + cost * interval
  end
end
-- a free slot for each waiter queued ahead, and one for this one
local full = slots > 0 and held + ahead >= slots
if wait > 0 or full then
  return {0, math.ceil(wait), reclaimed, held, now, full and 1 or 0}
end
for i = 1, 2 do
  if tats[i] then
    local ttl_ms = math.ceil((tats[i] - now) / 1000) + 1000
    redis.call('SET', KEYS[3 + i], string.format('%.0f', tats[i]), 'PX', ttl_ms)
  end
end
if slots > 0 then
  redis.call('ZREM', KEYS[2], lease)
  redis.call('ZREM', KEYS[3], lease)
  redis.call('ZADD', KEYS[1], now + lease_us, lease)
  keep_key(KEYS[1], lease_us)
  held = held + 1
end
return {1, 0, reclaimed, held, now, 0}
"""
)

#: Spare leases, admitted together as newcomers (no rates: spares are refused with them).
#: KEYS: slots zset, queue zset, tickets zset. ARGV: slots, lease µs, lease ids...
#: Admits the first ids for which a slot is free with one left for every queued head
#: (as ADMIT with queue 0, one id after another); no ids: only the count of heads.
#: Returns {admitted, reclaimed, now µs, queued heads}.
ADMIT_SPARES = (
    PRELUDE
    + """
local slots = tonumber(ARGV[1])
local lease_us = tonumber(ARGV[2])
local reclaimed = reclaim(KEYS[1], KEYS[2], KEYS[3])
local heads = redis.call('ZCARD', KEYS[2])
local free = slots - redis.call('ZCARD', KEYS[1]) - heads
local admitted = math.max(0, math.min(free, #ARGV - 2))
for i = 1, admitted do
  redis.call('ZADD', KEYS[1], now + lease_us, ARGV[2 + i])
end
if admitted > 0 then keep_key(KEYS[1], lease_us) end
return {admitted, reclaimed, now, heads}
"""
)

#: KEYS: slots zset, queue zset, tickets zset. ARGV: lease id. Returns 1 if it was held.
RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

#: KEYS: slots zset. ARGV: lease µs, lease ids... Returns the ids no longer present.
RENEW = (
    PRELUDE
    + """
local lease_us = tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + lease_us, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if #lost < #ARGV - 1 then keep_key(KEYS[1], lease_us) end
return lost
"""
)

#: KEYS: slots zset. Returns the number of unexpired leases.
COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

#: What a failing Redis raises through coredis: its own errors, sockets, timeouts.
REDIS_ERRORS = (
    coredis.exceptions.RedisError,
    OSError,
    TimeoutError,
    anyio.ClosedResourceError,  # a connection coredis closed under a request
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)


class _ClosesBuffersOnFailedConnect:
    """Closes a coredis connection's memory streams when its socket never opened.

    coredis 6 creates six anyio memory streams per connection and closes them only
    once the socket is open; a refused connection leaves them to the garbage
    collector, which warns (``ResourceWarning``, an error under this project's
    pytest settings). Every reconnection attempt against a dead Redis leaks six.
    """

    _STREAMS = (
        "_push_message_buffer_in",
        "_push_message_buffer_out",
        "_streamed_message_buffer_in",
        "_streamed_message_buffer_out",
        "_write_buffer_in",
        "_write_buffer_out",
    )

    async def _connect(self) -> Any:
        try:
            return await super()._connect()  # type: ignore[misc]
        except BaseException:
            for attribute in self._STREAMS:
                stream = getattr(self, attribute, None)
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            raise


class _TCPConnection(_ClosesBuffersOnFailedConnect, TCPConnection):
    pass


class _UnixConnection(_ClosesBuffersOnFailedConnect, UnixDomainSocketConnection):
    pass


def close_buffers_on_failed_connect(client: coredis.Redis[bytes]) -> None:
    """Make ``client``'s connections close their buffers when they fail to connect."""
    pool: Any = client.connection_pool
    if pool.connection_class is TCPConnection:
        pool.connection_class = _TCPConnection
    elif pool.connection_class is UnixDomainSocketConnection:
        pool.connection_class = _UnixConnection
