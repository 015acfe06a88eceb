-- Register a bidder's key, replacing any earlier one, and bump the version servers poll.
-- KEYS: 1 bidders:keys, 2 bidders:registered, 3 bidders:version
-- ARGV: 1 bidder, 2 key
-- Returns the registration time (Redis ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d', now))
redis.call('INCR', KEYS[3])
return now
