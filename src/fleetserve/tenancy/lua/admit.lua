-- fleetserve tenancy: admit requests of one tenant and key against every limit of both and
-- the tenant's budget, one after the other (a batch: those that arrived together at one
-- gateway process); each is recorded in all of them only if all have room.
--
-- KEYS: 1 tenant RPM log, 2 key RPM log, 3/4 tenant TPM window (zset, hash), 5/6 key TPM
--       window, 7 tenant leases, 8 key leases, 9 budget hash, 10 budget expiries
--       (one hash tag: the tenant's)
-- ARGV: 1 time override in us ('' = the server's TIME; tests only), 2 window us, 3 lease
--       TTL us, 4-9 limits (tenant RPM, key RPM, tenant TPM, key TPM, tenant concurrency,
--       key concurrency; 0 = none), 10 budget limit in micro-dollars ('' = none), 11 budget
--       period, 12-14 Retry-After us for concurrency, a budget busy with reservations, a
--       `total` budget spent; then per request, 7 each: request id, prompt tokens,
--       max_tokens, max_tokens given ('1'/'0'), worst-case cost, prompt cost (exact float),
--       output rate (micro-dollars per token)
-- Returns one reply per request, in order: {2} if its id is already admitted, else
--          {admitted 1/0, reason, scope, retry us, capped max_tokens (-1: not capped),
--           tokens reserved, cost reserved, budget left ('' = none), requests quota
--           (limit 0 = none; remaining; reset us), tokens quota (the same)}

local now = now_us(ARGV[1])
local window = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local rpm_lim = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local tpm_lim = {tonumber(ARGV[6]), tonumber(ARGV[7])}
local conc_lim = {tonumber(ARGV[8]), tonumber(ARGV[9])}
local budget_limit = tonumber(ARGV[10])
local kind = ARGV[11]
local conc_retry, busy_retry, never_retry = tonumber(ARGV[12]), tonumber(ARGV[13]),
  tonumber(ARGV[14])
local FIRST, EACH = 15, 7

local scopes = {'tenant', 'key'}
local rpm_keys = {KEYS[1], KEYS[2]}
local tpm_keys = {{KEYS[3], KEYS[4]}, {KEYS[5], KEYS[6]}}
local conc_keys = {KEYS[7], KEYS[8]}
local b, e = KEYS[9], KEYS[10]
local gc_window = math.ceil(2 * window / 1000) + 60000  -- ms: key expiry, garbage only
local gc_lease = math.ceil(2 * ttl / 1000) + 60000

-- Trim every window to now, once for the batch (what left them no longer counts; this
-- records nothing); the counts then follow each admission.
local rpm_n, tpm_sum, conc_n = {}, {}, {}
for i = 1, 2 do
  if rpm_lim[i] > 0 then
    redis.call('ZREMRANGEBYSCORE', rpm_keys[i], '-inf', now - window)
    rpm_n[i] = redis.call('ZCARD', rpm_keys[i])
  end
  if tpm_lim[i] > 0 then
    tpm_sum[i] = trim_tokens(tpm_keys[i][1], tpm_keys[i][2], now - window)
  end
  if conc_lim[i] > 0 then
    redis.call('ZREMRANGEBYSCORE', conc_keys[i], '-inf', now)
    conc_n[i] = redis.call('ZCARD', conc_keys[i])
  end
end

-- The budget's period and its spent and held sums, read once, if any request is priced.
local spent, held, p, p_end
local function budget_state()
  if p then return end
  expire_reservations(b, e, now)
  local p_start
  p_start, p_end = period_bounds(kind, math.floor(now / 1000000))
  p = period_name(kind, p_start)
  enter_period(b, p)
  spent = tonumber(redis.call('HGET', b, 's:' .. p) or '0')
  held = tonumber(redis.call('HGET', b, 'h:' .. p) or '0')
end

local function quotas()
  local rq = {0, 0, 0}
  local tq = {0, 0, 0}
  for i = 1, 2 do
    if rpm_lim[i] > 0 then
      local remaining = math.max(0, rpm_lim[i] - rpm_n[i])
      if rq[1] == 0 or remaining < rq[2] then
        local reset = 0
        if remaining == 0 then reset = oldest(rpm_keys[i]) + window - now end
        rq = {rpm_lim[i], remaining, math.max(0, reset)}
      end
    end
    if tpm_lim[i] > 0 then
      local remaining = math.max(0, tpm_lim[i] - tpm_sum[i])
      if tq[1] == 0 or remaining < tq[2] then
        local reset = 0
        if remaining == 0 then
          reset = token_room_at(tpm_keys[i][1], tpm_keys[i][2], 1, tpm_lim[i], window, now,
            tpm_sum[i])
        end
        tq = {tpm_lim[i], remaining, math.max(0, reset)}
      end
    end
  end
  return rq, tq
end

-- Admit the request whose arguments start at ARGV[at]: its reply.
local function admit(at)
  local rid = ARGV[at]
  local prompt = tonumber(ARGV[at + 1])
  local max_tokens = tonumber(ARGV[at + 2])
  local max_given = ARGV[at + 3] == '1'
  local worst = tonumber(ARGV[at + 4])
  local prompt_cost = tonumber(ARGV[at + 5])
  local out_rate = tonumber(ARGV[at + 6])
  -- What the budget lets the request reserve with `left` left (tenancy/reservations.py, in the
  -- same order of float operations): its worst case, or fewer output tokens when the client
  -- gave no max_tokens; nil if it cannot go.
  local function fit(left)
    if worst <= left then return worst, -1 end
    if max_given or out_rate <= 0 then return nil end
    local room = (left - prompt_cost) / out_rate
    if room < 1 then return nil end
    local affordable
    if room >= max_tokens - 1 then affordable = max_tokens - 1 else affordable = math.floor(room) end
    for _ = 1, 4 do
      if affordable < 1 then return nil end
      local cost = math.ceil(prompt_cost + affordable * out_rate - 1e-9)
      if cost <= left then return cost, affordable end
      affordable = affordable - 1
    end
    return nil
  end

  -- The budget first: a cap it sets lowers the tokens TPM reserves.
  local budgeted = budget_limit ~= nil and worst > 0
  local cost, capped
  if budgeted then
    budget_state()
    cost, capped = fit(budget_limit - spent - held)
  end
  local tokens = prompt + max_tokens
  if capped and capped > 0 then tokens = prompt + capped end

  -- Check, in the contract's order; the first that refuses names the rejection.
  local reason, scope, retry
  for i = 1, 2 do
    if not reason and rpm_lim[i] > 0 and rpm_n[i] >= rpm_lim[i] then
      reason, scope, retry = 'rpm', scopes[i], oldest(rpm_keys[i]) + window - now
    end
  end
  for i = 1, 2 do
    if not reason and tpm_lim[i] > 0 and tpm_sum[i] + tokens > tpm_lim[i] then
      reason, scope = 'tpm', scopes[i]
      retry = token_room_at(tpm_keys[i][1], tpm_keys[i][2], tokens, tpm_lim[i], window, now,
        tpm_sum[i])
    end
  end
  for i = 1, 2 do
    if not reason and conc_lim[i] > 0 and conc_n[i] >= conc_lim[i] then
      reason, scope = 'concurrency', scopes[i]
      retry = math.min(oldest(conc_keys[i]) - now, conc_retry)
    end
  end
  if not reason and budgeted and not cost then
    reason, scope = 'budget', 'tenant'
    if fit(budget_limit - spent) then
      retry = busy_retry  -- it fits once the reservations in flight settle
    elseif p_end < 0 then
      retry = never_retry
    else
      retry = p_end * 1000000 - now
    end
  end
  if reason then
    local rq, tq = quotas()
    return {0, reason, scope, math.ceil(math.max(0, retry)), -1, 0, 0, '',
      rq[1], rq[2], math.ceil(rq[3]), tq[1], tq[2], math.ceil(tq[3])}
  end

  -- A request id is admitted once (a second admission would count it twice in the sums).
  for i = 1, 2 do
    if (rpm_lim[i] > 0 and redis.call('ZSCORE', rpm_keys[i], rid))
      or (tpm_lim[i] > 0 and redis.call('HEXISTS', tpm_keys[i][2], 'r:' .. rid) == 1)
      or (conc_lim[i] > 0 and redis.call('ZSCORE', conc_keys[i], rid)) then
      return {2}
    end
  end
  if budgeted and redis.call('HEXISTS', b, 'r:' .. rid) == 1 then return {2} end

  -- Record it everywhere.
  for i = 1, 2 do
    if rpm_lim[i] > 0 then
      redis.call('ZADD', rpm_keys[i], now, rid)
      redis.call('PEXPIRE', rpm_keys[i], gc_window)
      rpm_n[i] = rpm_n[i] + 1
    end
    if tpm_lim[i] > 0 then
      local z, h = tpm_keys[i][1], tpm_keys[i][2]
      redis.call('ZADD', z, now, rid)
      redis.call('HSET', h, 'r:' .. rid, tokens)
      redis.call('HINCRBY', h, 'sum', tokens)
      redis.call('PEXPIRE', z, gc_window)
      redis.call('PEXPIRE', h, gc_window)
      tpm_sum[i] = tpm_sum[i] + tokens
    end
    if conc_lim[i] > 0 then
      redis.call('ZADD', conc_keys[i], now + ttl, rid)
      redis.call('PEXPIRE', conc_keys[i], gc_lease)
      conc_n[i] = conc_n[i] + 1
    end
  end
  local left = ''
  if budgeted then
    redis.call('HSET', b, 'r:' .. rid, p .. ' ' .. int(cost))
    redis.call('HINCRBY', b, 'h:' .. p, cost)
    redis.call('ZADD', e, now + ttl, rid)
    if p_end < 0 then
      redis.call('PERSIST', b)
      redis.call('PERSIST', e)
    else  -- a day past the period's end: late settlements still find it
      local keep_ms = math.ceil((p_end + 86400) * 1000 - now / 1000)
      redis.call('PEXPIRE', b, keep_ms)
      redis.call('PEXPIRE', e, keep_ms)
    end
    held = held + cost
    left = int(budget_limit - spent - held)
  else
    cost = 0
  end
  local rq, tq = quotas()
  return {1, '', '', 0, capped or -1, tokens, cost, left,
    rq[1], rq[2], math.ceil(rq[3]), tq[1], tq[2], math.ceil(tq[3])}
end

local replies = {}
for at = FIRST, #ARGV, EACH do
  replies[#replies + 1] = admit(at)
end
return replies
