-- Fence check, prepended to every script that writes auction state.
-- Convention: KEYS[1] = auction state hash, KEYS[2] = lock key,
--             ARGV[1] = the caller's lock value (OWNER#TOKEN), ARGV[2] = its token.
-- The write goes ahead only if the caller still holds the lock *now*, inside Redis, and
-- its token is not older than the last token that wrote this auction. A holder paused past
-- its lease, or one whose lock vanished in a failover, is refused here.
local function fmt(n) return string.format('%.0f', n) end
local token = tonumber(ARGV[2])
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'fenced'} end
if token < tonumber(redis.call('HGET', KEYS[1], 'fence') or '0') then return {'fenced'} end
