-- fleetserve tenancy: requests still running keep their leases and budget reservations for
-- another TTL. What already expired stays expired (its holder was presumed dead).
--
-- KEYS: 1 tenant leases, 2 key leases, 3 budget hash, 4 budget expiries
-- ARGV: 1 time override in us ('' = the server's TIME; tests only), 2 lease TTL us,
--       3... request ids

local now = now_us(ARGV[1])
local ttl = tonumber(ARGV[2])
local expires = now + ttl
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
expire_reservations(KEYS[3], KEYS[4], now)
for i = 3, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
  redis.call('ZADD', KEYS[2], 'XX', expires, ARGV[i])
  redis.call('ZADD', KEYS[4], 'XX', expires, ARGV[i])
end
local gc_lease = math.ceil(2 * ttl / 1000) + 60000
redis.call('PEXPIRE', KEYS[1], gc_lease)
redis.call('PEXPIRE', KEYS[2], gc_lease)
return 1
