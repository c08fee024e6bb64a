-- Move pending counts into a new immutable, numbered batch (fenced by the lease).
-- KEYS[1] targets, KEYS[2] seq, KEYS[3] batches, KEYS[4] lease, KEYS[5..] the shard's pending hashes (the
-- unbucketed one of earlier versions, then the buckets)
-- ARGV[1] lease token, ARGV[2] batch key prefix (same hash tag as KEYS, so the batch stays in the shard's slot),
-- ARGV[3] most lines a batch takes.
-- Returns {seq, claimed_at_ms, lines}, 0 when nothing is pending, -1 when the caller does not hold the lease.
-- The claim time is Redis TIME, so every flusher stamps with one clock; each line keeps the target metadata as it
-- was at claim, so later sends derive the same parameters whatever the middleware writes meanwhile.
if redis.call('GET', KEYS[4]) ~= ARGV[1] then
  return -1
end
local max = tonumber(ARGV[3])
-- A target is in one bucket, and also in the unbucketed hash when it was counted before an upgrade: its line is
-- the sum. A hash is taken whole (DEL) or, where the batch fills up, field by field; what is left stays
-- pending for the next claim.
local units, order = {}, {}
for k = 5, #KEYS do
  local all = redis.call('HGETALL', KEYS[k])
  local taken = 0
  for i = 1, #all, 2 do
    local target = all[i]
    local have = units[target]
    if not have then
      if #order >= max then
        break
      end
      order[#order + 1] = target
      have = 0
    end
    units[target] = have + tonumber(all[i + 1])
    taken = taken + 2
  end
  if taken == #all then
    if taken > 0 then
      redis.call('DEL', KEYS[k])
    end
  else
    for i = 1, taken, 2 do
      redis.call('HDEL', KEYS[k], all[i])
    end
    break
  end
end
-- Zero never reaches Stripe; the counting side only adds, so nothing below zero exists to lose.
local lines = {}
for _, target in ipairs(order) do
  if units[target] > 0 then
    lines[#lines + 1] = target
  end
end
if #lines == 0 then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = redis.call('INCR', KEYS[2])
local batch = ARGV[2] .. seq
for _, target in ipairs(lines) do
  local meta = redis.call('HGET', KEYS[1], target) or ''
  redis.call('HSET', batch, 'u:' .. target, units[target], 'm:' .. target, meta)
end
redis.call('HSET', batch, 'seq', seq, 'claimed_at', now, 'left', #lines)
redis.call('ZADD', KEYS[3], now, seq)
return {seq, now, #lines}
