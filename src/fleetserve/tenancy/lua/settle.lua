-- fleetserve tenancy: a request is over. Its TPM reservations become the tokens it used, its
-- leases are given back, and its budget reservation becomes its cost (never more than it
-- reserved: that was its worst case).
--
-- KEYS: 1/2 tenant TPM window (zset, hash), 3/4 key TPM window, 5 tenant leases, 6 key
--       leases, 7 budget hash, 8 budget expiries (one hash tag: the tenant's)
-- ARGV: 1 request id, 2 time override in us ('' = the server's TIME; tests only),
--       3 window us, 4 tokens used, 5 cost in micro-dollars

local rid = ARGV[1]
local now = now_us(ARGV[2])
local window = tonumber(ARGV[3])
local used = tonumber(ARGV[4])
local cost = tonumber(ARGV[5])

for _, w in ipairs({{KEYS[1], KEYS[2]}, {KEYS[3], KEYS[4]}}) do
  trim_tokens(w[1], w[2], now - window)  -- a reservation past the window counts no more
  local reserved = redis.call('HGET', w[2], 'r:' .. rid)
  if reserved then
    redis.call('HSET', w[2], 'r:' .. rid, used)
    redis.call('HINCRBY', w[2], 'sum', used - tonumber(reserved))
  end
end
redis.call('ZREM', KEYS[5], rid)
redis.call('ZREM', KEYS[6], rid)
expire_reservations(KEYS[7], KEYS[8], now)  -- expired first: then it counts at its worst
local p, amount = take_reservation(KEYS[7], KEYS[8], rid)
if p then
  redis.call('HINCRBY', KEYS[7], 's:' .. p, math.min(math.max(cost, 0), amount))
end
return 1
