-- Close auctions exactly once; many in one call, so a burst of deadlines costs one script
-- call per batch rather than one per auction.
-- Each close is made either under the caller's lease (fenced), or, for an auction whose
-- lease nobody holds, under a lease taken and given back within this call: it gets a fresh
-- token (as an acquire would) and writes it as the auction's fence, so every earlier
-- holder is refused afterwards.
-- A close also starts the auction's retention: every key of the auction expires RETENTION
-- after the close, and the auction is recorded in auctions:closed scored by that time, for
-- the sweeper that takes it out of the indexes (see forget.lua).
-- KEYS: 1 auctions:open, 2 auctions:closed, then per auction i (from 0): 3+5i state hash,
--       4+5i lock, 5+5i fencing-token counter, 6+5i bids stream, 7+5i outcomes hash
-- ARGV: 1 retention ms, then per auction i: 2+4i lock value ('' = the lease is free: take
--       it for this call), 3+4i token ('' when free), 4+4i auction id, 5+4i 'due' (only if
--       the deadline passed) | 'now'
-- Returns one array per auction:
--   {'closed'|'already', seq, winner, amount, bid_id, bid_count, closed_ms}
--   | {'not_due', deadline_ms} | {'unknown'} | {'fenced'} | {'held', pttl_ms}
-- Winner: the high bid (the earliest at equal amounts, since ties are rejected), if it
-- reaches the reserve price; otherwise none.
-- A retention that is not a whole number of ms of at least a second is refused outright:
-- PEXPIRE with 0 or less would delete the auction on the spot.
local retention = tonumber(ARGV[1])
if not retention or retention < 1000 or retention % 1 ~= 0 then
  return redis.error_reply('close: retention must be a whole number of ms >= 1000, got ' ..
    tostring(ARGV[1]))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local closed_ids = {}
local expiring = {}
local now_s = fmt(now)
local expires_s = fmt(now + retention)
local function close_one(keys, value, token, id, mode)
  local state_key, lock_key, counter_key = keys[1], keys[2], keys[3]
  local f = redis.call('HMGET', state_key, 'state', 'deadline_ms', 'reserve_price',
    'high_amount', 'high_bidder', 'high_bid_id', 'bid_count', 'seq', 'fence')
  if not f[1] then return {'unknown'} end
  -- Reading a closed auction's outcome needs no lease.
  if f[1] == 'closed' then
    local c = redis.call('HMGET', state_key, 'closed_ms', 'winner', 'winning_amount',
      'winning_bid_id')
    return {'already', f[8], c[2] or '', c[3] or '', c[4] or '', f[7], c[1]}
  end
  local fence = tonumber(f[9] or '0')
  -- One read for both: the lock's value and the token counter.
  local l = redis.call('MGET', lock_key, counter_key)
  if value == '' then
    if l[1] then return {'held', redis.call('PTTL', lock_key)} end
    -- A fresh token, as next_token hands out (the counter and the fence already read).
    token = token_after(tonumber(l[2] or '0'), fence)
  elseif l[1] ~= value or not token_current(token, fence) then
    -- fence_ok, with the lock and the fence already read.
    return {'fenced'}
  end
  if mode == 'due' and now < tonumber(f[2]) then return {'not_due', f[2]} end
  local seq = fmt(tonumber(f[8]) + 1)
  local winner, amount, bid_id = '', '', ''
  if f[4] and tonumber(f[4]) >= tonumber(f[3]) then
    winner, amount, bid_id = f[5], f[4], f[6]
  end
  -- The token written as the fence keeps later acquires above it (they take the max of the
  -- counter and the fence), so the counter itself need not move.
  redis.call('HSET', state_key, 'state', 'closed', 'seq', seq, 'fence', token,
    'closed_ms', now_s, 'winner', winner, 'winning_amount', amount, 'winning_bid_id', bid_id)
  -- Nothing writes a closed auction's keys again (bids are refused without a write; an
  -- acquire keeps the counter's expiry, see acquire.lua), so these expiries stand. The lock
  -- is not among them: it expires with its lease.
  for _, key in ipairs(keys) do
    if key ~= lock_key then redis.call('PEXPIRE', key, retention) end
  end
  closed_ids[#closed_ids + 1] = id
  expiring[#expiring + 1] = expires_s
  expiring[#expiring + 1] = id
  return {'closed', seq, winner, amount, bid_id, f[7], now_s}
end
local out = {}
for i = 0, (#ARGV - 1) / 4 - 1 do
  local k = 3 + 5 * i
  out[#out + 1] = close_one({KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]},
    ARGV[2 + 4 * i], ARGV[3 + 4 * i], ARGV[4 + 4 * i], ARGV[5 + 4 * i])
end
if #closed_ids > 0 then
  redis.call('ZREM', KEYS[1], unpack(closed_ids))
  redis.call('ZADD', KEYS[2], unpack(expiring))
end
return out
