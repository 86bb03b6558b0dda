-- fleetserve tenancy: requests of one tenant and key are over (a batch: those that ended
-- together at one gateway process). Each one's TPM reservations become the tokens it used,
-- its leases are given back, and its budget reservation becomes its cost (never more than
-- it reserved: that was its worst case).
--
-- KEYS: 1/2 tenant TPM window (zset, hash), 3/4 key TPM window, 5 tenant leases, 6 key
--       leases, 7 budget hash, 8 budget expiries (one hash tag: the tenant's)
-- ARGV: 1 time override in us ('' = the server's TIME; tests only), 2 window us; then per
--       request, 3 each: request id, tokens used, cost in micro-dollars
-- Returns the number of requests settled.

local now = now_us(ARGV[1])
local window = tonumber(ARGV[2])
local windows = {{KEYS[1], KEYS[2]}, {KEYS[3], KEYS[4]}}

for _, w in ipairs(windows) do
  trim_tokens(w[1], w[2], now - window)  -- a reservation past the window counts no more
end
expire_reservations(KEYS[7], KEYS[8], now)  -- expired first: then it counts at its worst

local n = 0
for at = 3, #ARGV, 3 do
  local rid = ARGV[at]
  local used = tonumber(ARGV[at + 1])
  local cost = tonumber(ARGV[at + 2])
  for _, w in ipairs(windows) do
    local reserved = redis.call('HGET', w[2], 'r:' .. rid)
    if reserved then
      redis.call('HSET', w[2], 'r:' .. rid, used)
      redis.call('HINCRBY', w[2], 'sum', used - tonumber(reserved))
    end
  end
  redis.call('ZREM', KEYS[5], rid)
  redis.call('ZREM', KEYS[6], rid)
  local p, amount = take_reservation(KEYS[7], KEYS[8], rid)
  if p then
    redis.call('HINCRBY', KEYS[7], 's:' .. p, math.min(math.max(cost, 0), amount))
  end
  n = n + 1
end
return n
