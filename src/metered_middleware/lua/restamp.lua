-- Replace a line's stamp with a new attempt (new timestamp, new key), only if it still carries the stamp the
-- caller sent. Used when Stripe refused the old timestamp because the period closed: the old attempt was not
-- recorded, so a new key cannot bill twice.
-- KEYS[1] lease, KEYS[2] batch; ARGV[1] token, ARGV[2] target id, ARGV[3] old stamp, ARGV[4] new "attempt|ts|key"
-- Returns the new stamp, false when the line changed meanwhile, -1 when the caller lost the lease.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
if redis.call('HGET', KEYS[2], 's:' .. ARGV[2]) ~= ARGV[3] then
  return false
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stamp = ARGV[4] .. '|' .. now
redis.call('HSET', KEYS[2], 's:' .. ARGV[2], stamp)
return stamp
