-- Apply one coalesced count write for a shard, exactly once per (writer, seq).
-- KEYS[1] pending hash, KEYS[2] targets hash, KEYS[3] writers hash, KEYS[4] pending-since time,
-- KEYS[5..4+U] per-period usage hashes
-- ARGV[1] writer id, ARGV[2] seq (a retried write repeats it), ARGV[3] U, the number of usage hashes,
-- ARGV[4..3+U] when each usage hash expires (its period's end plus the retention),
-- then four values a line: target id, units, usage key index (0: no period), target metadata JSON ('' when
-- this writer sent the same metadata before: the HSET would only rewrite the same bytes).
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
local i = 4 + usages
while i + 3 <= #ARGV do
  local target = ARGV[i]
  local units = tonumber(ARGV[i + 1])
  local usage_index = tonumber(ARGV[i + 2])
  redis.call('HINCRBY', KEYS[1], target, units)
  if usage_index > 0 then
    redis.call('HINCRBY', KEYS[usage_index], target, units)
  end
  if ARGV[i + 3] ~= '' then
    redis.call('HSET', KEYS[2], target, ARGV[i + 3])
  end
  i = i + 4
end
-- Once per usage hash and write, not once per line.
for u = 1, usages do
  redis.call('EXPIREAT', KEYS[4 + u], tonumber(ARGV[3 + u]))
end
return 1
