-- Acquire or renew a shard's flusher lease, with a fencing counter.
-- KEYS[1] lease, KEYS[2] fence
-- ARGV[1] the caller's current token ('' when it holds none), ARGV[2] owner id, ARGV[3] TTL in ms
-- Returns the token now held (renewed or new), or false when another flusher holds the lease.
-- A new token starts with a fresh fence number, so everything done under an older token is refused by the
-- fenced scripts (ack, stamp, dead-letter) even if its holder does not know yet that it lost the lease.
local current = redis.call('GET', KEYS[1])
if current then
  if ARGV[1] ~= '' and current == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return current
  end
  return false
end
local fence = redis.call('INCR', KEYS[2])
local token = fence .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], token, 'PX', ARGV[3])
return token
