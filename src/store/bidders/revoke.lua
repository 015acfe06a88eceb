-- End a bidder's key and bump the version servers poll.
-- KEYS: 1 bidders:keys, 2 bidders:registered, 3 bidders:version
-- ARGV: 1 bidder
-- Returns 1 if the bidder was registered, 0 if not.
local had = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if had == 1 then redis.call('INCR', KEYS[3]) end
return had
