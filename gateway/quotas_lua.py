"""The Lua scripts of the Redis quota backend (``gateway.quotas_redis``, which documents the keys
and the rules): each is one atomic step, since Redis runs a script alone. Every key a script
touches is passed in ``KEYS`` (all of one tenant: one hash tag). Times are float seconds from the
server's ``TIME``, or from ``now`` when a test gives one. Torch-free.
"""

from __future__ import annotations

__all__ = ["ADMIT", "INSTALL", "RENEW", "SETTLE", "SNAPSHOT"]

# Shared by every script. Times are float seconds; a reply carries them as strings (Redis turns
# a Lua number into an integer), with %.17g, which round-trips a double.
_PRELUDE = r"""
local SUM = '#sum'
local BATCH = 500

local function clock(given)
  if given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x) return string.format('%.17g', x) end

-- Reservations whose lease ran out give their slot back (their estimates stay charged).
local function drop_lapsed(leases, now)
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
end

-- Drop the window's entries admitted at or before `horizon`, and their tokens from the sum.
local function prune_window(window, tokens, horizon)
  while true do
    local old = redis.call('ZRANGEBYSCORE', window, '-inf', horizon, 'LIMIT', 0, BATCH)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', tokens, unpack(old))
    local freed = 0
    for _, amount in ipairs(amounts) do freed = freed + tonumber(amount or 0) end
    redis.call('HDEL', tokens, unpack(old))
    redis.call('ZREM', window, unpack(old))
    redis.call('HINCRBY', tokens, SUM, -freed)
  end
end

-- The UTC day or month of `now` ("2025-01-31", "2025-01"): civil_from_days, H. Hinnant.
local function period_of(now, kind)
  local z = math.floor(now / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400 + (m <= 2 and 1 or 0)
  if kind == 'day' then return string.format('%04d-%02d-%02d', y, m, d) end
  return string.format('%04d-%02d', y, m)
end
"""

# KEYS: leases, window, tokens, budget (the order's kind; any tenant key without a budget), meta
# ARGV: id, estimated, max_concurrent, rpm, tpm, budget (-1: none), kind ('' : no budget),
#       over ('1': reserve over a limit), lease_s, window_s, now ('' : the server's TIME)
# Reply: {'missing', now, period} | {'reserved' | 'refused', now, period, limit, used, frees_at}
ADMIT = (
    _PRELUDE
    + r"""
local id, estimated = ARGV[1], tonumber(ARGV[2])
local max_concurrent, rpm, tpm = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local budget, kind, over = tonumber(ARGV[6]), ARGV[7], ARGV[8] == '1'
local lease_s, window_s = tonumber(ARGV[9]), tonumber(ARGV[10])
local now = clock(ARGV[11])
local period, total = '', 0
if kind ~= '' then
  period = period_of(now, kind)
  local value = redis.call('HGET', KEYS[4], period)
  if not value then return {'missing', fmt(now), period} end
  total = tonumber(value)
end
drop_lapsed(KEYS[1], now)
prune_window(KEYS[2], KEYS[3], now - window_s)
local num_requests = redis.call('ZCARD', KEYS[2])
local num_tokens = tonumber(redis.call('HGET', KEYS[3], SUM) or 0)

-- Walk the window from its oldest entry until `excess` tokens have left.
local function tokens_free_at(excess)
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', KEYS[2], start, start + BATCH - 1, 'WITHSCORES')
    if #batch == 0 then return now + window_s end
    local ids = {}
    for i = 1, #batch, 2 do ids[#ids + 1] = batch[i] end
    local amounts = redis.call('HMGET', KEYS[3], unpack(ids))
    for i, amount in ipairs(amounts) do
      excess = excess - tonumber(amount or 0)
      if excess <= 0 then return tonumber(batch[2 * i]) + window_s end
    end
    start = start + BATCH
  end
end

local limit, used, frees_at = '', 0, 0
if max_concurrent >= 0 and redis.call('ZCARD', KEYS[1]) >= max_concurrent then
  limit = 'max_concurrent_requests'
elseif rpm >= 0 and num_requests >= rpm then
  -- more than `rpm` (demoted ones, a lowered limit): this one fits once all but rpm - 1 left
  limit = 'requests_per_minute'
  local nth = redis.call('ZRANGE', KEYS[2], num_requests - rpm, num_requests - rpm, 'WITHSCORES')
  frees_at = tonumber(nth[2]) + window_s
elseif tpm >= 0 and num_tokens + estimated > tpm then
  limit, used = 'tokens_per_minute', num_tokens
  frees_at = tokens_free_at(num_tokens + estimated - tpm)
elseif budget >= 0 and total + estimated > budget then
  limit, used = 'token_budget', total
end
local outcome = 'reserved'
if limit ~= '' and not over then
  outcome = 'refused'
else
  redis.call('ZADD', KEYS[1], now + lease_s, id)
  redis.call('PEXPIRE', KEYS[1], math.ceil(2 * lease_s * 1000))
  redis.call('ZADD', KEYS[2], now, id)
  redis.call('HSET', KEYS[3], id, estimated)
  redis.call('HINCRBY', KEYS[3], SUM, estimated)
  -- One deadline for both, set here together: they expire together.
  local window_ttl_ms = math.ceil((window_s + 1) * 1000)
  redis.call('PEXPIRE', KEYS[2], window_ttl_ms)
  redis.call('PEXPIRE', KEYS[3], window_ttl_ms)
  if kind ~= '' then
    redis.call('HINCRBY', KEYS[4], period, estimated)
    redis.call('HSET', KEYS[5], 'budget', kind)
    local budget_ttl_s = redis.call('TTL', KEYS[4])
    if budget_ttl_s > 0 then redis.call('EXPIRE', KEYS[5], budget_ttl_s) end
  end
end
return {outcome, fmt(now), period, limit, used, fmt(frees_at)}
"""
)

# KEYS: leases, tokens, budget (the reservation's kind; any tenant key without a budget)
# ARGV: id, estimated, actual, period ('' : no budget), now
# Reply: 1 when this settled the reservation; 0 when it was not live (settled, lapsed, forgotten).
SETTLE = (
    _PRELUDE
    + r"""
drop_lapsed(KEYS[1], clock(ARGV[5]))
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
local actual = tonumber(ARGV[3])
local reserved = redis.call('HGET', KEYS[2], ARGV[1])
if reserved then  -- still in the window
  redis.call('HSET', KEYS[2], ARGV[1], actual)
  redis.call('HINCRBY', KEYS[2], SUM, actual - tonumber(reserved))
end
if ARGV[4] ~= '' and redis.call('HEXISTS', KEYS[3], ARGV[4]) == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[4], actual - tonumber(ARGV[2]))
end
return 1
"""
)

# KEYS: leases   ARGV: lease_s, now, id...
# Reply: the ids that were no longer live (lapsed, or settled meanwhile).
RENEW = (
    _PRELUDE
    + r"""
local lease_s, now = tonumber(ARGV[1]), clock(ARGV[2])
drop_lapsed(KEYS[1], now)  -- first, so that a lapsed lease is not revived
local lost = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', now + lease_s, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(2 * lease_s * 1000))
return lost
"""
)

# KEYS: budget   ARGV: period, recorded tokens, ttl_s
# Reply: 1 when installed; 0 when there already was one, or a later period has begun.
INSTALL = r"""
local periods = redis.call('HKEYS', KEYS[1])
for _, period in ipairs(periods) do
  if period > ARGV[1] then return 0 end
end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
for _, period in ipairs(periods) do redis.call('HDEL', KEYS[1], period) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: leases, window, tokens, meta, budget:day, budget:month   ARGV: window_s, now
# Reply: {concurrent, requests, tokens, period ('' : none), budget total}
SNAPSHOT = (
    _PRELUDE
    + r"""
local now = clock(ARGV[2])
drop_lapsed(KEYS[1], now)
prune_window(KEYS[2], KEYS[3], now - tonumber(ARGV[1]))
local kind = redis.call('HGET', KEYS[4], 'budget')
local period, total = '', 0
if kind then
  local fields = redis.call('HGETALL', kind == 'day' and KEYS[5] or KEYS[6])
  for i = 1, #fields, 2 do
    if fields[i] > period then period, total = fields[i], tonumber(fields[i + 1]) end
  end
end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]),
  tonumber(redis.call('HGET', KEYS[3], SUM) or 0), period, total}
"""
)
