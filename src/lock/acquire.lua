-- Acquire an auction's lease.
-- KEYS[1] auction state hash, KEYS[2] lock key, KEYS[3] fencing-token counter
-- ARGV[1] owner id, ARGV[2] lease in ms, ARGV[3] '1' if the auction must already exist
-- Returns {'acquired', token} | {'held', pttl_ms} | {'unknown'}
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
-- The token must exceed every token that ever wrote this auction, even if the counter was
-- lost (e.g. not yet replicated when a failover happened): take the max of both.
local counter = tonumber(redis.call('GET', KEYS[3]) or '0')
local stored = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
local token = string.format('%.0f', math.max(counter, stored) + 1)
if not redis.call('SET', KEYS[2], ARGV[1] .. '#' .. token, 'NX', 'PX', ARGV[2]) then
  return {'held', redis.call('PTTL', KEYS[2])}
end
redis.call('SET', KEYS[3], token)
return {'acquired', token}
