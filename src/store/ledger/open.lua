-- Open an auction (fenced: the caller holds its lease).
-- KEYS: 1 state hash, 2 lock, 3 auctions:open, 4 auctions:all, 5 auctions:closed
-- ARGV: 1 lock value, 2 token, 3 auction id, 4 item, 5 duration ms,
--       6 starting price, 7 min increment, 8 reserve price, 9 soft close ms (0 = off)
-- Returns {'opened', opened_ms, deadline_ms} | {'exists'} | {'fenced'}
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[1],
  'item', ARGV[4], 'state', 'open',
  'starting_price', ARGV[6], 'min_increment', ARGV[7], 'reserve_price', ARGV[8],
  'opened_ms', fmt(now), 'deadline_ms', fmt(deadline), 'soft_close_ms', ARGV[9],
  'seq', '1', 'fence', ARGV[2], 'bid_count', '0')
redis.call('ZADD', KEYS[3], fmt(deadline), ARGV[3])
redis.call('ZADD', KEYS[4], fmt(now), ARGV[3])
-- An earlier auction of this id whose keys expired may not have been swept from the indexes
-- yet: its entry must not take this one's out of auctions:all.
redis.call('ZREM', KEYS[5], ARGV[3])
return {'opened', fmt(now), fmt(deadline)}
