-- Apply one coalesced count write for a shard, exactly once per (writer, seq).
-- KEYS[1] pending hash, KEYS[2] targets hash, KEYS[3] writers hash, KEYS[4] pending-since time,
-- KEYS[5..4+U] per-period usage hashes
-- ARGV[1] writer id, ARGV[2] seq (a retried write repeats it), ARGV[3] U, the number of usage hashes,
-- ARGV[4..3+U] when each usage hash expires (its period's end plus the retention),
-- ARGV[4+U+u] for u = 0..U: the lines counted into usage hash u (0: no period), one "target\tunits\n" each
-- (target ids hold no control characters: BillingTarget refuses them), so a line costs the writer one
-- string append instead of four protocol arguments;
-- then pairs of target id and metadata JSON, only for targets whose metadata this writer had not sent.
-- Returns 1 when applied, 0 when this (writer, seq) had been applied already.
local last = tonumber(redis.call('HGET', KEYS[3], ARGV[1]))
local seq = tonumber(ARGV[2])
if last and seq <= last then
  return 0
end
redis.call('HSET', KEYS[3], ARGV[1], seq)
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- The first units into an empty pending hash start its age clock (the oldest-pending-age metric).
  local t = redis.call('TIME')
  redis.call('SET', KEYS[4], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
local usages = tonumber(ARGV[3])
for u = 0, usages do
  local usage = u > 0 and KEYS[4 + u] or nil
  for target, units in string.gmatch(ARGV[4 + usages + u], '([^\t\n]+)\t(%-?%d+)\n') do
    redis.call('HINCRBY', KEYS[1], target, units)
    if usage then
      redis.call('HINCRBY', usage, target, units)
    end
  end
end
local i = 5 + 2 * usages
while i + 1 <= #ARGV do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- Once per usage hash and write, not once per line.
for u = 1, usages do
  redis.call('EXPIREAT', KEYS[4 + u], tonumber(ARGV[3 + u]))
end
return 1
