-- Acquire an auction's lease (runs after the fence functions, for next_token).
-- KEYS[1] auction state hash, KEYS[2] lock key, KEYS[3] fencing-token counter
-- ARGV[1] owner id, ARGV[2] lease in ms, ARGV[3] '1' if the auction must already exist
-- Returns {'acquired', token} | {'held', pttl_ms} | {'unknown'}
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local token = next_token(KEYS[1], KEYS[3])
if not redis.call('SET', KEYS[2], ARGV[1] .. '#' .. token, 'NX', 'PX', ARGV[2]) then
  return {'held', redis.call('PTTL', KEYS[2])}
end
-- A closed auction's keys expire at the end of its retention (close.lua): the counter must
-- not outlive them, so it gets the state hash's remaining time (a plain SET would clear it).
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('SET', KEYS[3], token, 'PX', ttl)
else
  redis.call('SET', KEYS[3], token)
end
return {'acquired', token}
