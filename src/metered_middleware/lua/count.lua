-- Apply one coalesced count write for a shard, exactly once per (writer, seq).
-- KEYS[1] targets hash, KEYS[2] writers hash, KEYS[3] pending-since time,
-- KEYS[4..4+B] the pending hashes: the unbucketed one of earlier versions (only read), then its B buckets,
-- KEYS[5+B..4+B+U*B] the per-period usage hashes, B buckets for each of the U periods in turn
-- ARGV[1] writer id, ARGV[2] seq (a retried write repeats it), ARGV[3] B, ARGV[4] U,
-- ARGV[5..4+U] when each period's usage hashes expire (its end plus the retention),
-- ARGV[5+U+u] for u = 0..U: the lines counted into period u (0: no period), one "target\tunits\n" each
-- (target ids hold no control characters: BillingTarget refuses them), so a line costs the writer one
-- string append instead of four protocol arguments;
-- then pairs of target id and metadata JSON, only for targets whose metadata this writer had not sent.
-- Returns 1 when applied, 0 when this (writer, seq) had been applied already.
local last = tonumber(redis.call('HGET', KEYS[2], ARGV[1]))
local seq = tonumber(ARGV[2])
if last and seq <= last then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], seq)
local buckets = tonumber(ARGV[3])
local usages = tonumber(ARGV[4])
if redis.call('EXISTS', unpack(KEYS, 4, 4 + buckets)) == 0 then
  -- The first units into an empty shard start its age clock (the oldest-pending-age metric).
  local t = redis.call('TIME')
  redis.call('SET', KEYS[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
-- A target's bucket: the first four hex digits of its id's SHA-1, modulo B (Layout.bucket_of, the same rule).
-- Each bucket's hash stays small enough that Redis's scan of it on every field lookup is short.
local sha1, sub = redis.sha1hex, string.sub
local touched = {}
for u = 0, usages do
  local base = 4 + buckets * u  -- KEYS[base + b] is period u's usage hash of bucket b (u > 0)
  for target, units in string.gmatch(ARGV[4 + usages + u + 1], '([^\t\n]+)\t(%-?%d+)\n') do
    local b = tonumber(sub(sha1(target), 1, 4), 16) % buckets + 1
    redis.call('HINCRBY', KEYS[4 + b], target, units)
    if u > 0 then
      redis.call('HINCRBY', KEYS[base + b], target, units)
      touched[base + b] = u
    end
  end
end
local i = 6 + 2 * usages
while i + 1 <= #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- Once per usage hash written and write, not once per line.
for k, u in pairs(touched) do
  redis.call('EXPIREAT', KEYS[k], tonumber(ARGV[4 + u]))
end
return 1
