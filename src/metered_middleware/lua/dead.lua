-- Move lines Stripe refused for good (or that grew stale) from their batch to the dead-letter hash (fenced).
-- KEYS[1] lease, KEYS[2] batch, KEYS[3] batches, KEYS[4] dead
-- ARGV[1] lease token, ARGV[2] seq, then triples: target id, the stamp sent ('' when none), reason, error JSON.
-- Returns the number of lines moved, or -1 when the caller does not hold the lease.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local moved = 0
for i = 3, #ARGV, 4 do
  local target = ARGV[i]
  local units = redis.call('HGET', KEYS[2], 'u:' .. target)
  local stamp = redis.call('HGET', KEYS[2], 's:' .. target) or ''
  if units and stamp == ARGV[i + 1] then
    local entry = cjson.encode({
      seq = tonumber(ARGV[2]),
      target = target,
      units = tonumber(units),
      meta = redis.call('HGET', KEYS[2], 'm:' .. target) or '',
      stamp = stamp,
      reason = ARGV[i + 2],
      error = ARGV[i + 3],
      at = now,
    })
    redis.call('HSET', KEYS[4], ARGV[2] .. ':' .. target, entry)
    redis.call('HDEL', KEYS[2], 'u:' .. target, 'm:' .. target, 's:' .. target)
    moved = moved + 1
  end
end
if moved > 0 and redis.call('HINCRBY', KEYS[2], 'left', -moved) <= 0 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return moved
