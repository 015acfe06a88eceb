-- Close auctions exactly once; many in one call, so a burst of deadlines costs one script
-- call per batch rather than one per auction.
-- Each close is made either under the caller's lease (fenced), or, for an auction whose
-- lease nobody holds, under a lease taken and given back within this call: it gets a fresh
-- token (as an acquire would) and writes it as the auction's fence, so every earlier
-- holder is refused afterwards.
-- KEYS: 1 auctions:open, then per auction i (from 0): 2+3i state hash, 3+3i lock,
--       4+3i fencing-token counter
-- ARGV: per auction i: 1+4i lock value ('' = the lease is free: take it for this call),
--       2+4i token ('' when free), 3+4i auction id, 4+4i 'due' (only if the deadline
--       passed) | 'now'
-- Returns one array per auction:
--   {'closed'|'already', seq, winner, amount, bid_id, bid_count, closed_ms}
--   | {'not_due', deadline_ms} | {'unknown'} | {'fenced'} | {'held', pttl_ms}
-- Winner: the high bid (the earliest at equal amounts, since ties are rejected), if it
-- reaches the reserve price; otherwise none.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local closed_ids = {}
local now_s = fmt(now)
local function close_one(state_key, lock_key, counter_key, value, token, id, mode)
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
  closed_ids[#closed_ids + 1] = id
  return {'closed', seq, winner, amount, bid_id, f[7], now_s}
end
local out = {}
for i = 0, #ARGV / 4 - 1 do
  out[#out + 1] = close_one(KEYS[2 + 3 * i], KEYS[3 + 3 * i], KEYS[4 + 3 * i],
    ARGV[1 + 4 * i], ARGV[2 + 4 * i], ARGV[3 + 4 * i], ARGV[4 + 4 * i])
end
if #closed_ids > 0 then redis.call('ZREM', KEYS[1], unpack(closed_ids)) end
return out
