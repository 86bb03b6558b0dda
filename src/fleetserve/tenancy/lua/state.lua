-- fleetserve tenancy: the live state of a tenant's and a key's counters (admin API).
--
-- KEYS: as admit.lua
-- ARGV: 1 time override in us ('' = the server's TIME; tests only), 2 window us,
--       3-8 limits as admit.lua's 5-10 (0 = none), 9 budget period ('' = no budget)
-- Returns: {tenant RPM, key RPM, tenant TPM, key TPM, tenant leases, key leases (-1: no
--           such limit), period start, period end (-1: never), spent, reserved}

local now = now_us(ARGV[1])
local window = tonumber(ARGV[2])
local out = {}
for i = 1, 2 do
  out[i] = -1
  if tonumber(ARGV[2 + i]) > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
    out[i] = redis.call('ZCARD', KEYS[i])
  end
  out[2 + i] = -1
  if tonumber(ARGV[4 + i]) > 0 then
    out[2 + i] = trim_tokens(KEYS[1 + 2 * i], KEYS[2 + 2 * i], now - window)
  end
  out[4 + i] = -1
  if tonumber(ARGV[6 + i]) > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[6 + i], '-inf', now)
    out[4 + i] = redis.call('ZCARD', KEYS[6 + i])
  end
end
local kind = ARGV[9]
if kind ~= '' then
  expire_reservations(KEYS[9], KEYS[10], now)
  local p_start, p_end = period_bounds(kind, math.floor(now / 1000000))
  local p = period_name(kind, p_start)
  out[7], out[8] = p_start, p_end
  out[9] = tonumber(redis.call('HGET', KEYS[9], 's:' .. p) or '0')
  out[10] = tonumber(redis.call('HGET', KEYS[9], 'h:' .. p) or '0')
end
return out
