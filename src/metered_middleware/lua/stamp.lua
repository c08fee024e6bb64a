-- Fix the parameters a line is sent with, once per attempt (HSETNX), so every retry sends them identically.
-- KEYS[1] lease, KEYS[2] batch
-- ARGV[1] lease token, then pairs: target id, stamp "attempt|timestamp|key" (the first-attempt time is appended
-- here from Redis TIME).
-- Returns the stored stamp per pair (false for a line already acknowledged or dead-lettered), or -1 when the
-- caller does not hold the lease.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 2, #ARGV, 2 do
  local target = ARGV[i]
  if redis.call('HEXISTS', KEYS[2], 'u:' .. target) == 1 then
    redis.call('HSETNX', KEYS[2], 's:' .. target, ARGV[i + 1] .. '|' .. now)
    out[#out + 1] = redis.call('HGET', KEYS[2], 's:' .. target)
  else
    out[#out + 1] = false
  end
end
return out
