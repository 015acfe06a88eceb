-- Close an auction exactly once (fenced: the caller holds its lease).
-- KEYS: 1 state hash, 2 lock, 3 auctions:open
-- ARGV: 1 lock value, 2 token, 3 auction id, 4 'due' (only if the deadline passed) | 'now'
-- Returns {'closed'|'already', seq, winner, amount, bid_id, bid_count, closed_ms}
--       | {'not_due', deadline_ms} | {'unknown'} | {'fenced'}
-- Winner: the high bid (the earliest at equal amounts, since ties are rejected), if it
-- reaches the reserve price; otherwise none.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'unknown'} end
local f = redis.call('HMGET', KEYS[1], 'state', 'deadline_ms', 'reserve_price', 'high_amount',
  'high_bidder', 'high_bid_id', 'bid_count', 'seq', 'closed_ms', 'winner', 'winning_amount',
  'winning_bid_id')
if f[1] == 'closed' then
  return {'already', f[8], f[10] or '', f[11] or '', f[12] or '', f[7], f[9]}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[4] == 'due' and now < tonumber(f[2]) then return {'not_due', f[2]} end
local seq = fmt(tonumber(f[8]) + 1)
local winner, amount, bid_id = '', '', ''
if f[4] and tonumber(f[4]) >= tonumber(f[3]) then
  winner, amount, bid_id = f[5], f[4], f[6]
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'seq', seq, 'fence', ARGV[2],
  'closed_ms', fmt(now), 'winner', winner, 'winning_amount', amount, 'winning_bid_id', bid_id)
redis.call('ZREM', KEYS[3], ARGV[3])
return {'closed', seq, winner, amount, bid_id, f[7], fmt(now)}
