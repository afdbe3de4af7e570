-- Admissions, each a list of limits counted in order. ARGV[1]: the number of limits of each
-- admission, comma-separated; then, per limit, four values: its kind (f fixed window, s
-- sliding-window counter, m moving window), quota, window in seconds and cost (0: a test that
-- needs room for one and counts nothing). KEYS: the limits' keys, in the same order. Each limit
-- with room is counted, up to the first without. Returns, per admission, 0 when all had room or
-- {its j-th limit, milliseconds until that one has room}.
--
-- The admissions of one call often share keys (one principal's, one address's, the global
-- limit): a fixed or sliding window's key is read once per call, counted here, and written once
-- at the end. The script runs atomically, so this counts exactly as one write per admission would.
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seen = {}  -- per key: what was read and what this call adds

local function fixed(key, quota, need, seconds)
  local s = seen[key]
  if not s then
    local count = tonumber(redis.call('get', key))
    s = {kind = 'f', count = count or 0, new = count == nil, window = seconds, added = 0}
    seen[key] = s
  end
  if s.count + s.added + need > quota then
    if s.new then return seconds * 1000 end  -- created by this call: its window starts now
    return math.max(redis.call('pttl', key), 0)
  end
  return nil
end

local function sliding(key, quota, window, need)
  -- A hash per limit: this window's number (w), its count (c) and the previous window's (p); the
  -- previous one weighs what of it still lies within one window of now.
  local s = seen[key]
  if not s then
    local h = redis.call('hmget', key, 'w', 'c', 'p')
    local index = math.floor(now / window)
    local w, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
    if w ~= index then
      p = (w == index - 1) and c or 0
      c = 0
    end
    s = {kind = 's', c = c, p = p, shifted = w ~= index, index = index, window = window, added = 0}
    seen[key] = s
  end
  local c, p, index = s.c + s.added, s.p, s.index
  local elapsed = now - index * window
  if math.floor(p * (window - elapsed) / window) + c + need <= quota then return nil end
  if c + need > quota then  -- until this window is the previous one and weighs little enough
    return window - elapsed + math.ceil(window * (1 - (quota - need) / c))
  end
  return math.max(math.ceil(window * (1 - (quota - c - need) / p)) - elapsed, 0)
end

local function moving(key, quota, window, need)
  local entry = tonumber(redis.call('lindex', key, quota - need))
  if entry and entry >= now - window then return entry + window - now end
  return nil
end

local function admit(i)  -- limit i: the milliseconds until it has room, or nil (and counted)
  local base = 1 + (i - 1) * 4
  local kind, quota, window, cost = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
    tonumber(ARGV[base + 4])
  local key, ms, need = KEYS[i], window * 1000, math.max(cost, 1)
  local wait
  if need > quota then wait = ms
  elseif kind == 'f' then wait = fixed(key, quota, need, window)
  elseif kind == 's' then wait = sliding(key, quota, ms, need)
  else wait = moving(key, quota, ms, need) end
  if wait or cost == 0 then return wait end
  if kind == 'm' then
    for _ = 1, cost do redis.call('lpush', key, now) end
    redis.call('ltrim', key, 0, quota - 1)
    redis.call('expire', key, window)
  else
    seen[key].added = seen[key].added + cost
  end
  return nil
end

local function write(key, s)  -- what this call counted on a fixed or sliding window's key
  if s.added == 0 then return end
  if s.kind == 'f' then
    if redis.call('incrby', key, s.added) == s.added then redis.call('expire', key, s.window) end
  elseif s.shifted then  -- a new window: kept until the one after it is over
    redis.call('hset', key, 'w', s.index, 'c', s.added, 'p', s.p)
    redis.call('pexpireat', key, (s.index + 2) * s.window)
  else redis.call('hincrby', key, 'c', s.added) end
end

local results, i = {}, 0
for size in string.gmatch(ARGV[1], '%d+') do
  local result = 0
  for j = 1, tonumber(size) do
    i = i + 1
    if result == 0 then
      local wait = admit(i)
      if wait then result = {j, wait} end
    end
  end
  results[#results + 1] = result
end
for key, s in pairs(seen) do write(key, s) end  -- one script: the order is unobservable
return results
