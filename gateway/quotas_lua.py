"""The Lua scripts of the Redis quota backend (``gateway.quotas_redis``, which documents the keys
and the rules): each is one atomic step, since Redis runs a script alone. Every key a script
touches is passed in ``KEYS`` (all of one tenant, its model and key scopes' included: one hash
tag). ``ADMIT``, ``SETTLE``, ``RENEW`` and ``PEEK`` act on an order's scopes (the tenant's, then a
model's and a key's, each if any) in one call; ``INSTALL`` and ``SNAPSHOT`` take the keys of the
one scope they read. Times are float seconds from the server's ``TIME``, or from ``now`` when a
test gives one. Torch-free.
"""

from __future__ import annotations

__all__ = ["ADMIT", "INSTALL", "PEEK", "RENEW", "SETTLE", "SNAPSHOT"]

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

-- The x-ratelimit-* state across `scopes` (each with window, tokens, rpm, tpm; -1: no limit;
-- windows pruned): {limit, remaining, reset_s} of requests, then of tokens, each of the scope
-- with the least remaining (the first on a tie), '' for all three when no scope has the limit.
-- `gateway.quotas_backend.rate_limit_of` is the same in Python.
local function rate_limit(scopes, now, window_s)
  local best = {}
  for _, scope in ipairs(scopes) do
    local newest = redis.call('ZRANGE', scope.window, -1, -1, 'WITHSCORES')
    local reset_s = 0
    if #newest > 0 then reset_s = math.max(0, tonumber(newest[2]) + window_s - now) end
    local used = {redis.call('ZCARD', scope.window),
      tonumber(redis.call('HGET', scope.tokens, SUM) or 0)}
    local limits = {scope.rpm, scope.tpm}
    for i = 1, 2 do
      if limits[i] >= 0 then
        local remaining = math.max(0, limits[i] - used[i])
        if best[i] == nil or remaining < best[i][2] then
          best[i] = {limits[i], remaining, reset_s}
        end
      end
    end
  end
  local reply = {}
  for i = 1, 2 do
    for j = 1, 3 do reply[#reply + 1] = best[i] and fmt(best[i][j]) or '' end
  end
  return reply
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

# KEYS: per scope (the tenant's, then the model's and the key's, each if any): leases, window,
#       tokens, budget (the scope's kind; any key of the scope without a budget), meta, registry
#       (the tenant's set of model or key scopes that lists this one; the tenant's own: any key)
# ARGV: id, estimated, over ('1': reserve over a limit), lease_s, window_s, now ('' : the
#       server's TIME), registry_ttl_s, then per scope: member (its id in the registry; '' : the
#       tenant's own scope), max_concurrent, rpm, tpm, budget (-1: none), kind ('' : no budget)
# Reply: {outcome, now, limit, used, frees_at, scope, periods, rate_limit}:
#   outcome 'missing' (`scope` has no running total for its period: nothing was reserved),
#   'refused' or 'reserved'; `scope` is the 1-based scope that broke `limit` (0: none broke);
#   `periods` the budget period of each scope ('' : no budget); `rate_limit` (`rate_limit` in
#   the prelude) after this admission; empty when 'missing'.
ADMIT = (
    _PRELUDE
    + r"""
local id, estimated, over = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
local lease_s, window_s = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = clock(ARGV[6])
local registry_ttl_s = tonumber(ARGV[7])
local scopes, periods = {}, {}
for s = 1, (#ARGV - 7) / 6 do
  local k, a = 6 * (s - 1), 7 + 6 * (s - 1)
  scopes[s] = {
    leases = KEYS[k + 1], window = KEYS[k + 2], tokens = KEYS[k + 3], budget = KEYS[k + 4],
    meta = KEYS[k + 5], registry = KEYS[k + 6], member = ARGV[a + 1],
    max_concurrent = tonumber(ARGV[a + 2]), rpm = tonumber(ARGV[a + 3]),
    tpm = tonumber(ARGV[a + 4]), budget_limit = tonumber(ARGV[a + 5]), kind = ARGV[a + 6],
    total = 0,
  }
  periods[s] = ''
end
for _, scope in ipairs(scopes) do  -- before anything else: `forget` finds the scopes this way
  if scope.member ~= '' then
    redis.call('SADD', scope.registry, scope.member)
    redis.call('EXPIRE', scope.registry, registry_ttl_s)
  end
end

-- Every scope's budget first: one that is missing reserves nothing anywhere.
for s, scope in ipairs(scopes) do
  if scope.kind ~= '' then
    periods[s] = period_of(now, scope.kind)
    local value = redis.call('HGET', scope.budget, periods[s])
    if not value then return {'missing', fmt(now), '', 0, '0', s, periods, {}} end
    scope.total = tonumber(value)
  end
end

-- Walk the scope's window from its oldest entry until `excess` tokens have left.
local function tokens_free_at(scope, excess)
  local start = 0
  while true do
    local batch = redis.call('ZRANGE', scope.window, start, start + BATCH - 1, 'WITHSCORES')
    if #batch == 0 then return now + window_s end
    local ids = {}
    for i = 1, #batch, 2 do ids[#ids + 1] = batch[i] end
    local amounts = redis.call('HMGET', scope.tokens, unpack(ids))
    for i, amount in ipairs(amounts) do
      excess = excess - tonumber(amount or 0)
      if excess <= 0 then return tonumber(batch[2 * i]) + window_s end
    end
    start = start + BATCH
  end
end

-- The first limit of the scope this request would break: limit ('' : none), used, frees_at.
local function first_breach(scope)
  local num_requests = redis.call('ZCARD', scope.window)
  local num_tokens = tonumber(redis.call('HGET', scope.tokens, SUM) or 0)
  if scope.max_concurrent >= 0 and redis.call('ZCARD', scope.leases) >= scope.max_concurrent then
    return 'max_concurrent_requests', 0, 0
  elseif scope.rpm >= 0 and num_requests >= scope.rpm then
    -- more than `rpm` (demoted ones, a lowered limit): this one fits once all but rpm - 1 left
    local nth = num_requests - scope.rpm
    local entry = redis.call('ZRANGE', scope.window, nth, nth, 'WITHSCORES')
    return 'requests_per_minute', 0, tonumber(entry[2]) + window_s
  elseif scope.tpm >= 0 and num_tokens + estimated > scope.tpm then
    local excess = num_tokens + estimated - scope.tpm
    return 'tokens_per_minute', num_tokens, tokens_free_at(scope, excess)
  elseif scope.budget_limit >= 0 and scope.total + estimated > scope.budget_limit then
    return 'token_budget', scope.total, 0
  end
  return '', 0, 0
end

local limit, used, frees_at, breached = '', 0, 0, 0
for s, scope in ipairs(scopes) do
  drop_lapsed(scope.leases, now)
  prune_window(scope.window, scope.tokens, now - window_s)
end
for s, scope in ipairs(scopes) do  -- the first breach wins: the tenant's scope comes first
  limit, used, frees_at = first_breach(scope)
  if limit ~= '' then
    breached = s
    break
  end
end

local outcome = 'reserved'
if limit ~= '' and not over then
  outcome = 'refused'
else
  local window_ttl_ms = math.ceil((window_s + 1) * 1000)
  for s, scope in ipairs(scopes) do
    redis.call('ZADD', scope.leases, now + lease_s, id)
    redis.call('PEXPIRE', scope.leases, math.ceil(2 * lease_s * 1000))
    redis.call('ZADD', scope.window, now, id)
    redis.call('HSET', scope.tokens, id, estimated)
    redis.call('HINCRBY', scope.tokens, SUM, estimated)
    -- One deadline for both, set here together: they expire together.
    redis.call('PEXPIRE', scope.window, window_ttl_ms)
    redis.call('PEXPIRE', scope.tokens, window_ttl_ms)
    if scope.kind ~= '' then
      redis.call('HINCRBY', scope.budget, periods[s], estimated)
      redis.call('HSET', scope.meta, 'budget', scope.kind)
      local budget_ttl_s = redis.call('TTL', scope.budget)
      if budget_ttl_s > 0 then redis.call('EXPIRE', scope.meta, budget_ttl_s) end
    end
  end
end
return {outcome, fmt(now), limit, used, fmt(frees_at), breached, periods,
  rate_limit(scopes, now, window_s)}
"""
)

# KEYS: per scope of the reservation (the tenant's, then the model's and the key's, each if any):
#       leases, tokens, budget (the scope's kind; any key of the scope without a budget)
# ARGV: id, estimated, actual, now, then per scope: period ('' : no budget)
# Reply: 1 when this settled the reservation; 0 when it was not live (settled, lapsed, forgotten).
# The tenant's lease decides: when it is not live, no scope is touched.
SETTLE = (
    _PRELUDE
    + r"""
local id, estimated, actual = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = clock(ARGV[4])
for s = 1, #KEYS / 3 do
  local leases, tokens, budget, period = KEYS[3 * s - 2], KEYS[3 * s - 1], KEYS[3 * s], ARGV[4 + s]
  drop_lapsed(leases, now)
  if redis.call('ZREM', leases, id) == 1 then
    local reserved = redis.call('HGET', tokens, id)
    if reserved then  -- still in the window
      redis.call('HSET', tokens, id, actual)
      redis.call('HINCRBY', tokens, SUM, actual - tonumber(reserved))
    end
    if period ~= '' and redis.call('HEXISTS', budget, period) == 1 then
      redis.call('HINCRBY', budget, period, actual - estimated)
    end
  elseif s == 1 then
    return 0
  end
end
return 1
"""
)

# KEYS: the tenant's leases, then the leases of its other scopes (models', keys') these ids hold
# ARGV: lease_s, now, then per reservation: id, n, and the n indices in KEYS of its other
#       scopes' leases
# Reply: the ids that were no longer live (lapsed, or settled meanwhile).
RENEW = (
    _PRELUDE
    + r"""
local lease_s, now = tonumber(ARGV[1]), clock(ARGV[2])
for _, leases in ipairs(KEYS) do
  drop_lapsed(leases, now)  -- first, so that a lapsed lease is not revived
end
local deadline = now + lease_s
local lost = {}
local i = 3
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  if redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], 'XX', deadline, id)
    -- XX: a scope's lease gone on its own (the scope forgotten) is not revived either
    for j = i + 2, i + 1 + n do
      redis.call('ZADD', KEYS[tonumber(ARGV[j])], 'XX', deadline, id)
    end
  else
    lost[#lost + 1] = id
  end
  i = i + 2 + n
end
for _, leases in ipairs(KEYS) do
  redis.call('PEXPIRE', leases, math.ceil(2 * lease_s * 1000))
end
return lost
"""
)

# KEYS: budget (of one scope)   ARGV: period, recorded tokens, ttl_s
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

# KEYS: of one scope: leases, window, tokens, meta, budget:day, budget:month
# ARGV: window_s, now
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

# KEYS: per scope (the tenant's, then the model's and the key's, each if any): window, tokens
# ARGV: window_s, now, then per scope: rpm, tpm (-1: no limit)
# Reply: `rate_limit` (in the prelude) of these scopes now; nothing is reserved.
PEEK = (
    _PRELUDE
    + r"""
local window_s, now = tonumber(ARGV[1]), clock(ARGV[2])
local scopes = {}
for s = 1, #KEYS / 2 do
  scopes[s] = {window = KEYS[2 * s - 1], tokens = KEYS[2 * s], rpm = tonumber(ARGV[1 + 2 * s]),
    tpm = tonumber(ARGV[2 + 2 * s])}
  prune_window(scopes[s].window, scopes[s].tokens, now - window_s)
end
return rate_limit(scopes, now, window_s)
"""
)
