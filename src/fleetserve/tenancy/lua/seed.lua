-- fleetserve tenancy: start a period's spend counter from the ledger (after a Redis or
-- gateway restart) unless it exists already (SET NX).
--
-- KEYS: 1 budget hash
-- ARGV: 1 period ('month:1769904000'), 2 spent micro-dollars, 3 key expiry in ms
--       ('' = keep it forever: a `total` budget)
-- Returns: 1 if the counter was set, 0 if it existed

local b, p = KEYS[1], ARGV[1]
enter_period(b, p)
local set = redis.call('HSETNX', b, 's:' .. p, ARGV[2])
if ARGV[3] == '' then
  redis.call('PERSIST', b)
elseif redis.call('PTTL', b) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', b, ARGV[3])
end
return set
