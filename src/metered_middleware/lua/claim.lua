-- Move pending counts into a new immutable, numbered batch (fenced by the lease).
-- KEYS[1] pending, KEYS[2] targets, KEYS[3] seq, KEYS[4] batches, KEYS[5] lease
-- ARGV[1] lease token, ARGV[2] batch key prefix (same hash tag as KEYS, so the batch stays in the shard's slot),
-- ARGV[3] most lines a batch takes.
-- Returns {seq, claimed_at_ms, lines}, 0 when nothing is pending, -1 when the caller does not hold the lease.
-- The claim time is Redis TIME, so every flusher stamps with one clock; each line keeps the target metadata as it
-- was at claim, so later sends derive the same parameters whatever the middleware writes meanwhile.
if redis.call('GET', KEYS[5]) ~= ARGV[1] then
  return -1
end
local all = redis.call('HGETALL', KEYS[1])
if #all == 0 then
  return 0
end
local max = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = redis.call('INCR', KEYS[3])
local batch = ARGV[2] .. seq
local n = 0
for i = 1, #all, 2 do
  if n >= max then
    break
  end
  local target = all[i]
  local units = tonumber(all[i + 1])
  redis.call('HDEL', KEYS[1], target)
  -- Zero never reaches Stripe; the counting side only adds, so nothing below zero exists to lose.
  if units > 0 then
    n = n + 1
    local meta = redis.call('HGET', KEYS[2], target) or ''
    redis.call('HSET', batch, 'u:' .. target, units, 'm:' .. target, meta)
  end
end
if n == 0 then
  return 0
end
redis.call('HSET', batch, 'seq', seq, 'claimed_at', now, 'left', n)
redis.call('ZADD', KEYS[4], now, seq)
return {seq, now, n}
