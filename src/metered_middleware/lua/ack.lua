-- Acknowledge lines Stripe recorded: count them as delivered and drop them from their batch (fenced).
-- KEYS[1] lease, KEYS[2] batch, KEYS[3] batches, KEYS[4] delivered
-- ARGV[1] lease token, ARGV[2] seq, then pairs: target id, the stamp that was sent.
-- Returns the number of lines acknowledged now, or -1 when the caller does not hold the lease.
-- A line whose stamp differs from the one sent is left alone: that send proved nothing about the current stamp.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local acked = 0
for i = 3, #ARGV, 2 do
  local target = ARGV[i]
  local units = redis.call('HGET', KEYS[2], 'u:' .. target)
  if units and redis.call('HGET', KEYS[2], 's:' .. target) == ARGV[i + 1] then
    redis.call('HINCRBY', KEYS[4], target, units)
    redis.call('HDEL', KEYS[2], 'u:' .. target, 'm:' .. target, 's:' .. target)
    acked = acked + 1
  end
end
if acked > 0 and redis.call('HINCRBY', KEYS[2], 'left', -acked) <= 0 then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return acked
