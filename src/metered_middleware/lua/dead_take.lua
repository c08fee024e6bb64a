-- Take dead-lettered lines out, atomically: re-drive them (their units go back to pending, to be claimed into a
-- new batch with a new key) or discard them (an operator's explicit decision).
-- KEYS[1] dead, KEYS[2] targets, KEYS[3..2+B] the shard's pending buckets; ARGV[1] 'retry' or 'discard',
-- ARGV[2] a subscription item to re-drive onto ('' keeps the line's own: the fix for a deleted item is a new
-- one), then entry ids.
-- Returns the entries taken (their JSON), so the caller can log exactly what it moved.
local buckets = #KEYS - 2
local out = {}
for i = 3, #ARGV do
  local raw = redis.call('HGET', KEYS[1], ARGV[i])
  if raw then
    if ARGV[1] == 'retry' then
      local entry = cjson.decode(raw)
      local target = entry.target
      if ARGV[2] ~= '' then
        local customer, _, event = string.match(target, '^([^|]*)|([^|]*)|(.*)$')
        target = customer .. '|' .. ARGV[2] .. '|' .. event
      end
      -- The count script's bucket rule (Layout.bucket_of).
      local b = tonumber(string.sub(redis.sha1hex(target), 1, 4), 16) % buckets
      redis.call('HINCRBY', KEYS[3 + b], target, entry.units)
      if entry.meta ~= '' then
        redis.call('HSETNX', KEYS[2], target, entry.meta)
      end
    end
    redis.call('HDEL', KEYS[1], ARGV[i])
    out[#out + 1] = raw
  end
end
return out
