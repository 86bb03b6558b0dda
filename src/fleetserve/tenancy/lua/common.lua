-- fleetserve tenancy: helpers every limiter script starts with (redis_limiter.py prepends
-- this file to each script). Times are integer microseconds on the Redis server's clock.

-- The server's clock, or the caller's (`override`, tests only) when it is not empty.
local function now_us(override)
  if override ~= '' then
    return tonumber(override)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Days since 1970-01-01 of a proleptic Gregorian date, and back (H. Hinnant,
-- "chrono-Compatible Low-Level Date Algorithms"). Lua 5.1 numbers are doubles: exact here.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- The budget period of `kind` holding the second `now_s`: its start and end (end -1: never).
-- The same as fleetserve.tenancy.periods.period_of.
local function period_bounds(kind, now_s)
  if kind == 'total' then
    return 0, -1
  end
  local day = math.floor(now_s / 86400)
  if kind == 'day' then
    return day * 86400, (day + 1) * 86400
  end
  if kind == 'week' then
    local monday = day - (day + 3) % 7  -- 1970-01-01 was a Thursday
    return monday * 86400, (monday + 7) * 86400
  end
  local y, m = civil_from_days(day)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return days_from_civil(y, m, 1) * 86400, days_from_civil(ny, nm, 1) * 86400
end

local function period_name(kind, start_s)
  return kind .. ':' .. string.format('%d', start_s)
end

local PAGE = 500  -- members handled per command, well inside unpack()'s limit

-- Drop the reservations of a TPM window (`z`: request id by time; `h`: 'r:'..id -> tokens
-- and 'sum') made at or before `cutoff`, keeping 'sum' exact; return what the window holds.
local function trim_tokens(z, h, cutoff)
  while true do
    local gone = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff, 'LIMIT', 0, PAGE)
    if #gone == 0 then break end
    local fields = {}
    for i, rid in ipairs(gone) do fields[i] = 'r:' .. rid end
    local freed = 0
    for _, v in ipairs(redis.call('HMGET', h, unpack(fields))) do
      if v then freed = freed + tonumber(v) end
    end
    if freed ~= 0 then redis.call('HINCRBY', h, 'sum', -freed) end
    redis.call('HDEL', h, unpack(fields))
    redis.call('ZREM', z, unpack(gone))
  end
  if redis.call('ZCARD', z) == 0 then
    redis.call('DEL', h)  -- an empty window holds nothing: the sum starts again from 0
    return 0
  end
  return tonumber(redis.call('HGET', h, 'sum') or '0')
end

-- Microseconds until enough reservations leave the window for `tokens` more.
local function token_room_at(z, h, tokens, limit, window, now, sum)
  if tokens > limit then return window end
  local needed = sum + tokens - limit
  local start = 0
  while true do
    local page = redis.call('ZRANGE', z, start, start + PAGE - 1, 'WITHSCORES')
    if #page == 0 then return 0 end
    local fields = {}
    for i = 1, #page, 2 do fields[#fields + 1] = 'r:' .. page[i] end
    local held = redis.call('HMGET', h, unpack(fields))
    for j = 1, #fields do
      needed = needed - (tonumber(held[j]) or 0)
      if needed <= 0 then return tonumber(page[2 * j]) + window - now end
    end
    start = start + PAGE
  end
end

-- The oldest score of a sorted set, or nil when it is empty.
local function oldest(key)
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first == 0 then return nil end
  return tonumber(first[2])
end

-- A budget hash holds 's:'..period (spent), 'h:'..period (reserved), 'r:'..id ->
-- 'period amount' for each reservation, and 'cur' / 'prev': the two periods it keeps.
local function period_kept(b, p)
  return p == redis.call('HGET', b, 'cur') or p == redis.call('HGET', b, 'prev')
end

-- Make `p` the current period; the one before the previous is dropped.
local function enter_period(b, p)
  local cur = redis.call('HGET', b, 'cur')
  if cur == p then return end
  if cur then
    local prev = redis.call('HGET', b, 'prev')
    if prev and prev ~= p then redis.call('HDEL', b, 's:' .. prev, 'h:' .. prev) end
    redis.call('HSET', b, 'prev', cur)
  end
  redis.call('HSET', b, 'cur', p)
end

-- Take a reservation out; returns its period and amount (nil if it is not held).
local function take_reservation(b, e, rid)
  local held = redis.call('HGET', b, 'r:' .. rid)
  if not held then return nil end
  local p, amount = string.match(held, '^(.*) (%d+)$')
  amount = tonumber(amount)
  redis.call('HDEL', b, 'r:' .. rid)
  redis.call('ZREM', e, rid)
  if period_kept(b, p) then
    redis.call('HINCRBY', b, 'h:' .. p, -amount)
    return p, amount
  end
  return nil  -- its period is gone: nothing left to count it against
end

-- Reservations whose expiry (`e`: id by expiry) has come count as spent at their worst case:
-- a gateway that died never settles them, and they may have used it all.
local function expire_reservations(b, e, now)
  while true do
    local due = redis.call('ZRANGEBYSCORE', e, '-inf', now, 'LIMIT', 0, PAGE)
    if #due == 0 then return end
    for _, rid in ipairs(due) do
      local p, amount = take_reservation(b, e, rid)
      if p then redis.call('HINCRBY', b, 's:' .. p, amount) end
    end
    redis.call('ZREM', e, unpack(due))
  end
end

local function int(x)
  return string.format('%d', x)
end
